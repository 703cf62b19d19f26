"""Both engines on GPUs as a user runs them: bf16, compiled decoder layers, the fused loss, checkpoints, the
Hugging Face export, resume. The CPU suite runs the same paths in fp32 without compile; these are the ones that
only a card exercises (DeepSpeed's bf16 optimizer, FSDP2's mixed precision, torch.compile's kernels)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cpt, read_metrics, tiny_recipe, write_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: bf16 and compiled kernels on a card"),
]

# the test helpers run workers with DeepSpeed's CPU accelerator; here DeepSpeed runs on the card
CUDA = {"DS_ACCELERATOR": "cuda"}


@pytest.mark.parametrize("engine, config", [("deepspeed", "zero3.json"), ("fsdp", "fsdp.yaml")])
def test_bf16_compiled_run_exports_what_it_checkpointed_and_resumes(assets, tmp_path, engine, config):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    gpus = min(2, torch.cuda.device_count())
    tree = tiny_recipe(
        assets, out, train={"max_steps": 4, "save_every": 2, "log_every": 1, "precision": "bf16", "compile": True},
        parallel={"engine": engine, "config": config, "nproc_per_node": gpus},
    )  # fmt: skip
    recipe = write_recipe(tmp_path / "r.yaml", tree)
    cpt("run", str(recipe), **CUDA)
    losses = {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values()), losses
    assert json.loads((out / "checkpoints" / "step-4" / "trainer_state.json").read_text())["dtype"] == "bfloat16"

    # final/ (gathered from the live engine) and `cpt export` of the last checkpoint (read from its files) agree
    cpt("export", str(out / "checkpoints" / "step-4"), str(tmp_path / "exported"), **CUDA)
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert final.dtype == exported.dtype == torch.bfloat16
    a, b = final.state_dict(), exported.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    p = cpt("run", str(recipe), "train.max_steps=6", **CUDA)
    assert f"resumed from {out / 'checkpoints' / 'step-4'} at step 4" in p.stderr
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6], steps
