"""train.max_tokens: a run budgeted in tokens trains ceil(max_tokens / tokens per step) steps, its schedule decays
over those steps, and the log says how many steps that is and when a pass over the data ends."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import cpt, read_metrics, tiny_recipe, write_recipe

from launcher.config import BatchLayout, Recipe, TrainConfig
from launcher.lengths import check_length, train_steps, with_token_budget
from launcher.quickstart_assets import read_jsonl_texts


def test_steps_round_up_to_cover_the_budget():
    t = TrainConfig(max_steps=1000, max_tokens=1_000_001)
    assert train_steps(t, tokens_per_step=1000) == 1001
    assert train_steps(TrainConfig(max_steps=1000, max_tokens=1_000_000), 1000) == 1000
    assert train_steps(TrainConfig(max_steps=7), 1000) == 7
    # max_steps=0 still means: evaluate and exit, whatever the budget.
    assert train_steps(TrainConfig(max_steps=0, max_tokens=10**9), 1000) == 0


def test_a_budget_must_be_positive():
    r = Recipe()
    assert check_length(r) == []
    r.train.max_tokens = 0
    assert check_length(r) == [
        "train.max_tokens: must be a positive number of tokens (or null for train.max_steps), got 0"
    ]


def test_the_derived_steps_go_into_a_copy():
    r = Recipe()
    r.train.max_tokens = 10**10
    layout = BatchLayout(world_size=8, micro_batch_size=2, grad_accum=8, global_batch_size=128,
                         tokens_per_step=128 * 2048)  # fmt: skip
    derived = with_token_budget(r, layout)
    assert derived.train.max_steps == math.ceil(10**10 / (128 * 2048)) == 38147
    assert derived.train.max_tokens == 10**10
    assert r.train.max_steps == 1000, "the caller's recipe changed"


@pytest.mark.slow
def test_a_run_budgeted_in_tokens(assets, tmp_path):
    # A small source (about 500 tokens per rank), so that a pass over it ends within the run.
    docs = [text[:200] for text in list(read_jsonl_texts(assets["prose_train"]))[:10]]
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "run"
    max_tokens = 1500  # 2 ranks x micro-batch 2 x seq_len 64 = 256 tokens per step -> 5.9 -> 6 steps, not 4
    tree = tiny_recipe(
        assets, out,
        data={"train": [{"path": str(small)}], "seq_len": 64, "num_workers": 0},
        train={"max_steps": 4, "max_tokens": max_tokens, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 0,
               "schedule": "linear", "min_lr_ratio": 0.1, "seed": 3, "export_final": False, "save_final": False},
        eval={"sets": {"prose": {"path": str(assets["prose_eval"])}}, "max_blocks": 2},
        # FSDP2, which starts faster than DeepSpeed: the steps and the schedule come from the recipe the loop derives
        # (launcher/lengths.py), which both engines are built from
        parallel={"engine": "fsdp", "config": "fsdp.yaml", "nproc_per_node": 2},
    )  # fmt: skip
    p = cpt("run", str(write_recipe(tmp_path / "r.yaml", tree)))
    log = p.stdout + p.stderr
    steps = math.ceil(max_tokens / 256)
    assert steps == 6
    assert f"train.max_tokens=1,500: {steps} steps of 256 tokens" in log, log[-3000:]
    train = [m for m in read_metrics(out) if "loss" in m]
    assert [m["step"] for m in train] == list(range(1, steps + 1))
    assert train[-1]["tokens_seen"] == steps * 256 >= max_tokens
    # The linear decay spans the derived steps: step k trains at lr * (1 - 0.9 (k - 1) / 6), and one more step
    # down the same line is the floor, lr * min_lr_ratio.
    lrs = [m["lr"] for m in train]
    assert lrs == pytest.approx([1e-3 * (1 - 0.9 * k / steps) for k in range(steps)], rel=1e-6)
    assert lrs[-1] - (lrs[-2] - lrs[-1]) == pytest.approx(1e-4, rel=1e-6)
    resolved = yaml.safe_load((out / "resolved_recipe.yaml").read_text())["train"]
    assert (resolved["max_steps"], resolved["max_tokens"]) == (steps, max_tokens)
    assert "pass 1 over the training data complete (rank 0's share" in log, log[-3000:]
