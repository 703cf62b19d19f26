"""Non-finite loss or gradient on one rank: every rank agrees, and train.nonfinite decides (skip or stop).

The fault is real, not simulated: the base model has one corrupted embedding row (NaN) for a token that occurs
in a single training document, so only the step whose batch holds that document produces a NaN loss, on only
the rank that reads it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_metrics, tiny_recipe, worker_env, write_recipe
from safetensors.torch import load_file

POISON = "<pad>"  # a special token: never produced by ordinary text, matched when written literally


@pytest.fixture(scope="module")
def poisoned(assets, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("nonfinite")
    tok = AutoTokenizer.from_pretrained(assets["base"])
    poison_id = tok.convert_tokens_to_ids(POISON)
    # untied, so the NaN row is read only where the token occurs (a tied lm_head would put it in every logit row)
    model = AutoModelForCausalLM.from_pretrained(assets["base"], tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        model.get_input_embeddings().weight[poison_id] = float("nan")
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    # short documents, so one step covers only a few; the poisoned one is read around step 3
    text = "".join(json.loads(line)["text"] for line in assets["code_train"].read_text().splitlines()[:40])
    docs = [text[i : i + 160] for i in range(0, 160 * 120, 160)]
    docs = [d for d in docs if "<" not in d]
    docs.insert(8, f"def corrupted(): {POISON} return None")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {"base": root / "base", "data": data, "poison_id": poison_id}


def run(assets, poisoned, tmp_path, engine, config, nproc=2, env=None, **train):
    out = tmp_path / "out"
    tree = tiny_recipe(
        assets, out, model={"name_or_path": str(poisoned["base"])}, data={"train": [{"path": str(poisoned["data"])}],
        "seq_len": 32}, eval={"sets": {}},
        train={"max_steps": 12, "save_every": 2, "log_every": 1, "schedule": "constant", **train},
        parallel={"engine": engine, "config": config, "nproc_per_node": nproc},
    )  # fmt: skip
    recipe = write_recipe(tmp_path / "r.yaml", tree)
    p = subprocess.run([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=REPO, env=worker_env(**(env or {})),
                       capture_output=True, text=True, timeout=420)  # fmt: skip
    return out, p


@pytest.mark.parametrize("engine, config", [("fsdp", "fsdp.yaml"), ("deepspeed", "zero3.json")])
def test_a_nan_on_one_rank_skips_that_step_on_every_rank_and_training_goes_on(assets, poisoned, tmp_path, engine,
                                                                              config):  # fmt: skip
    out, p = run(assets, poisoned, tmp_path, engine, config, nonfinite="skip", max_skipped_steps=3)
    assert_nan_step_skipped(out, p, poisoned)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: FSDP2's optimizer is fused there")
def test_on_gpus_the_fused_optimizer_skips_the_nan_step_and_training_goes_on(assets, poisoned, tmp_path):
    """FSDP2 on CUDA: the fused AdamW kernel drops the update (launcher.compat.step_unless_nonfinite)."""
    # on one GPU a step reads half the tokens of two, and the poisoned document comes at step 12: run on past it
    out, p = run(assets, poisoned, tmp_path, "fsdp", "fsdp.yaml", nproc=min(2, torch.cuda.device_count()),
                 nonfinite="skip", max_skipped_steps=3, max_steps=16)  # fmt: skip
    assert_nan_step_skipped(out, p, poisoned)


def assert_nan_step_skipped(out, p, poisoned) -> None:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    steps = [m for m in read_metrics(out) if "loss" in m]
    bad = [m["step"] for m in steps if not math.isfinite(m["loss"])]
    assert bad, "the poisoned document was never trained on"
    assert len(bad) <= 3 and steps[-1]["skipped_steps"] == len(bad)
    after = [m for m in steps if m["step"] > max(bad)]
    assert after and all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in after)
    assert "update skipped" in p.stderr + p.stdout
    # no update was applied from the NaN step: every weight is finite but the corrupted row itself
    weights = load_file(str(out / "final" / "model.safetensors"))
    for name, w in weights.items():
        if "embed_tokens" in name:
            rows = torch.isfinite(w).all(dim=1)
            assert rows.sum() == w.shape[0] - 1 and not rows[poisoned["poison_id"]], name
        else:
            assert torch.isfinite(w).all(), name


def test_stop_policy_ends_the_run_at_the_bad_step_and_keeps_the_last_checkpoint(assets, poisoned, tmp_path):
    out, p = run(assets, poisoned, tmp_path, "fsdp", "fsdp.yaml", nonfinite="stop")
    assert p.returncode not in (0, 75), p.stdout[-3000:]
    assert "train.nonfinite=stop" in p.stderr and "not finite" in p.stderr, p.stderr[-3000:]
    steps = [m for m in read_metrics(out) if "loss" in m]
    bad = [m["step"] for m in steps if not math.isfinite(m["loss"])]
    assert bad == [] or bad == [steps[-1]["step"]]
    committed = sorted((out / "checkpoints").glob("step-*[0-9]"), key=lambda d: int(d.name.split("-")[1]))
    assert committed, "no checkpoint before the bad step"
    last = int(committed[-1].name.split("-")[1])
    assert (committed[-1] / "trainer_state.json").is_file()
    assert not (out / "final").exists()
    assert "intact" in p.stderr and str(committed[-1]) in p.stderr and last < 12


def _fused_step_on_shards() -> dict:
    """One finite and one non-finite step of a fused AdamW over FSDP2 shards (this rank's part of 2), and the same
    finite step of torch's single-tensor AdamW on an unsharded copy in this process."""
    import copy

    from torch.distributed.fsdp import fully_shard

    from launcher.compat import step_unless_nonfinite

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    reference = copy.deepcopy(model)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=True)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.1, weight_decay=0.1, foreach=False)
    x = torch.linspace(-1, 1, 16).reshape(2, 8)

    def full(m):
        return [p.detach().full_tensor().clone() if hasattr(p, "full_tensor") else p.detach().clone()
                for p in m.parameters()]  # fmt: skip

    for m, o, step in ((model, opt, step_unless_nonfinite), (reference, ref_opt, None)):
        m(x).square().sum().backward()
        norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        step(o, norm) if step else o.step()
        o.zero_grad()
    after_finite = full(model)
    model(x * float("nan")).square().sum().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).full_tensor()
    step_unless_nonfinite(opt, norm)
    state = opt.state[next(iter(model.parameters()))]
    return {
        "finite_vs_reference": max((a - b).abs().max().item() for a, b in zip(after_finite, full(reference))),
        "moved_by_nonfinite": max((a - b).abs().max().item() for a, b in zip(after_finite, full(model))),
        "nonfinite_norm": float(norm),
        "steps": float(state["step"]),
        "finite_moments": bool(torch.isfinite(state["exp_avg"].to_local()).all()),
        "flag_left": hasattr(opt, "found_inf"),
    }


def test_a_fused_optimizer_drops_a_nonfinite_update_on_fsdp2_shards_without_the_host_deciding():
    """The FSDP2 engine's GPU path: the fused AdamW kernel itself skips the update of a non-finite gradient norm
    (launcher.compat.step_unless_nonfinite), the finite step is torch's plain AdamW on the whole model."""
    from conftest import run_distributed

    for got in run_distributed(_fused_step_on_shards, 2):
        assert got["finite_vs_reference"] < 1e-6, got
        assert math.isnan(got["nonfinite_norm"]), got
        assert got["moved_by_nonfinite"] == 0.0, got
        assert got["steps"] == 1.0, got  # the skipped step is not counted in Adam's bias correction
        assert got["finite_moments"], got
        assert not got["flag_left"], got
