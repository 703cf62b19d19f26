"""The continual-pretraining methods on GPUs, bf16, as a user runs them: a vocabulary extension trained
embeddings-only, then a WSD annealing branch from its checkpoint with Adam's state and the data position. The CPU
suite checks the same paths in fp32 against references; here DeepSpeed's bf16 optimizer, FSDP2's mixed precision
and the CUDA copies of the grown rows run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cpt, read_metrics, tiny_recipe, write_recipe
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: bf16 kernels on a card"),
]

CUDA = {"DS_ACCELERATOR": "cuda"}
NEW = ["return self", "import numpy"]
EMBED = "model.embed_tokens.weight"


@pytest.mark.parametrize("engine, config", [("deepspeed", "zero3.json"), ("fsdp", "fsdp.yaml")])
def test_extension_trained_embeddings_only_then_an_annealing_branch(assets, tmp_path, engine, config):
    from transformers import AutoTokenizer

    gpus = min(2, torch.cuda.device_count())
    parallel = {"engine": engine, "config": config, "nproc_per_node": gpus}
    model = {"add_tokens": NEW}
    train = {"max_steps": 4, "save_every": 2, "precision": "bf16", "trainable": "embeddings", "lr": 1e-2,
             "global_batch_size": 8, "micro_batch_size": 8 // gpus}  # fmt: skip
    first = tmp_path / "first"
    cpt("run", str(write_recipe(tmp_path / "a.yaml", tiny_recipe(assets, first, model=model, train=train,
                                                                 parallel=parallel))), **CUDA)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(first / "final")
    for text in NEW:
        assert len(tok.encode(text, add_special_tokens=False)) == 1, text
    config_json = json.loads((first / "final" / "config.json").read_text())
    assert config_json["vocab_size"] % 64 == 0 and config_json["vocab_size"] >= len(tok)
    base = load_file(assets["base"] / "model.safetensors")
    final = {k: v for f in (first / "final").glob("*.safetensors") for k, v in load_file(f).items()}
    for key, value in base.items():
        if key != EMBED:
            assert torch.equal(final[key], value.to(final[key].dtype)), f"{key} moved under trainable: embeddings"
    assert not torch.equal(final[EMBED][: base[EMBED].shape[0]], base[EMBED].to(final[EMBED].dtype))

    # The annealing branch at step 2: Adam's state and the data position taken, a WSD decay over 2 steps.
    branch = tmp_path / "branch"
    anneal = {**train, "max_steps": 2, "save_every": 0, "warmup_steps": 0, "schedule": "wsd", "decay_steps": 2,
              "min_lr_ratio": 0.0}  # fmt: skip
    model = {**model, "init_from": str(first / "checkpoints" / "step-2"), "init_optimizer": True, "init_data": True}
    p = cpt("run", str(write_recipe(tmp_path / "b.yaml", tiny_recipe(assets, branch, model=model, train=anneal,
                                                                     parallel=parallel))), **CUDA)  # fmt: skip
    assert "weights, optimizer state, data position" in p.stderr
    steps = {m["step"]: m for m in read_metrics(branch) if "loss" in m}
    assert sorted(steps) == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in steps.values())
    assert steps[1]["lr"] == pytest.approx(1e-2) and steps[2]["lr"] == pytest.approx(0.5e-2)  # 1 - p, p = 0, 1/2
    # the branch's first step is the first run's third step (same weights, Adam state, batch); bf16 reductions differ
    original = {m["step"]: m for m in read_metrics(first) if "loss" in m}
    assert steps[1]["loss"] == pytest.approx(original[3]["loss"], rel=1e-2)
