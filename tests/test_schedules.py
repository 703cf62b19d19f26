"""Learning-rate schedules: the lr each step of a real run logs follows the schedule's formula, written out here;
the recipe check of the WSD keys and the weight-decay patterns."""

from __future__ import annotations

import math

import pytest
from conftest import cpt, read_metrics, tiny_recipe, write_recipe

from launcher.config import ConfigError
from launcher.preflight import load_recipe

LR, FLOOR, WARM, STEPS = 1e-3, 0.1, 2, 9


def expected_lr(schedule: str, shape: str | None, step: int, decay: int) -> float:
    """The lr of optimizer step ``step`` (counted from 1, as metrics.jsonl counts them)."""
    s = step - 1
    if s < WARM:
        return LR * (s + 1) / (WARM + 1)
    if schedule == "constant":
        return LR
    if schedule == "linear":
        return LR * (FLOOR + (1 - FLOOR) * (1 - (s - WARM) / (STEPS - WARM)))
    # wsd: flat until the last `decay` steps, then from LR down towards LR * FLOOR
    start = STEPS - decay
    if s < start:
        return LR
    p = (s - start) / decay
    done = {"linear": p, "cosine": (1 - math.cos(math.pi * p)) / 2, "1-sqrt": math.sqrt(p)}[shape]
    return LR * (1 - (1 - FLOOR) * done)


CASES = {
    "linear": ({"schedule": "linear"}, None, 0),
    "constant": ({"schedule": "constant"}, None, 0),
    "wsd-linear": ({"schedule": "wsd", "decay_steps": 4, "decay_shape": "linear"}, "linear", 4),
    "wsd-cosine": ({"schedule": "wsd", "decay_fraction": 0.5, "decay_shape": "cosine"}, "cosine", 4),  # round(4.5)
    "wsd-1-sqrt": ({"schedule": "wsd", "decay_steps": 3, "decay_shape": "1-sqrt"}, "1-sqrt", 3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logged_lr_follows_the_schedule_formula_at_every_step(assets, tmp_path, name):
    train, shape, decay = CASES[name]
    out = tmp_path / name
    tree = tiny_recipe(
        assets, out,
        train={"max_steps": STEPS, "lr": LR, "min_lr_ratio": FLOOR, "warmup_steps": WARM, "save_final": False,
               "export_final": False, **train},
        eval={"sets": {}}, parallel={"engine": "fsdp", "config": "fsdp.yaml", "nproc_per_node": 1},
    )  # fmt: skip
    cpt("run", str(write_recipe(tmp_path / "r.yaml", tree)))
    lrs = {m["step"]: m["lr"] for m in read_metrics(out) if "lr" in m}
    assert sorted(lrs) == list(range(1, STEPS + 1))
    for step, lr in lrs.items():
        assert lr == pytest.approx(expected_lr(train["schedule"], shape, step, decay), rel=1e-9), (name, step, lrs)


def _problems(tmp_path, assets, **train) -> str:
    tree = tiny_recipe(assets, tmp_path / "out", train={"max_steps": 10, **train})
    with pytest.raises(ConfigError) as e:
        load_recipe(write_recipe(tmp_path / "r.yaml", tree))
    return str(e.value)


@pytest.mark.parametrize(
    "train,message",
    [
        ({"schedule": "wsd"}, "train.schedule: wsd needs the length of its final decay"),
        ({"schedule": "wsd", "decay_steps": 2, "decay_fraction": 0.2}, "(both are set)"),
        ({"schedule": "wsd", "decay_steps": 0}, "train.decay_steps: must be positive, got 0"),
        ({"schedule": "wsd", "decay_fraction": 1.5}, "train.decay_fraction: must be within (0, 1], got 1.5"),
        ({"schedule": "wsd", "decay_steps": 8, "warmup_steps": 3}, "the warmup (3 steps) and the decay (8 steps)"),
        ({"schedule": "cosine", "decay_steps": 3}, "train.decay_steps: only used with train.schedule=wsd"),
        ({"decay_shape": "exp"}, "train.decay_shape: 'exp' is not one of"),
        ({"weight_decay_exclude": ["norm", "(bias"]}, "train.weight_decay_exclude[1]: '(bias' is not a regular"),
    ],
)
def test_bad_schedule_keys_are_named(assets, tmp_path, train, message):
    assert message in _problems(tmp_path, assets, **train)
