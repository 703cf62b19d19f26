"""The GPU speed benchmark's bookkeeping that runs without a GPU: what a checkpoint save cost training, measured
from the metrics lines' wall times (benchmarks/speed_gpu.py)."""

from __future__ import annotations

from benchmarks.speed_gpu import RUNS, save_every, save_gaps


def lines(step_time: float, pauses: dict[int, float], steps: int = 10) -> list[dict]:
    """Metrics lines of a run whose steps each take ``step_time`` s, with ``pauses[N]`` s of wall time after step N
    that no step accounts for; step 1 takes 30 s (compilation)."""
    out, now = [], 0.0
    for step in range(1, steps + 1):
        took = 30.0 if step == 1 else step_time
        now += took
        out.append({"step": step, "step_time": took, "time": now})
        now += pauses.get(step, 0.0)
    return out


def test_a_synchronous_save_costs_its_pause_between_the_steps():
    assert save_gaps(lines(0.7, {6: 94.0}), every=6) == {6: 94.0}


def test_a_background_save_costs_its_start_and_the_slower_step_after_it():
    train = lines(0.7, {6: 0.25})
    train[6]["step_time"] += 0.4  # step 7 waits 0.4 s for the copy of the state
    for later in train[6:]:
        later["time"] += 0.4
    assert save_gaps(train, every=6) == {6: 0.65}


def test_a_save_at_the_last_step_has_no_gap_and_other_steps_none():
    assert save_gaps(lines(0.5, {10: 50.0}), every=5) == {5: 0.0}


def test_the_save_runs_save_once_and_the_others_never():
    assert save_every(RUNS["llama3-3b-fsdp-mb4-save-async"].extra) == 6
    assert save_every(RUNS["llama3-3b-fsdp-mb4"].extra) == 0
