"""``train.gc_every``: Python's full collections only at the chosen steps, seen through ``gc.callbacks`` (the
interpreter's own report of each collection), and in the metrics of real runs of both engines."""

from __future__ import annotations

import gc
import weakref

import pytest
from conftest import TRAINED, read_metrics

from launcher.gc_steps import StepCollector


class Collections:
    """The generation of every collection the interpreter runs while this is open, and whether ``after_step`` was
    running at the time."""

    def __init__(self):
        self.seen: list[tuple[int, bool]] = []
        self.in_step = False

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.seen.append((info["generation"], self.in_step))

    def __enter__(self) -> Collections:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)

    def full(self, in_step: bool) -> int:
        return sum(1 for g, s in self.seen if g == 2 and s == in_step)


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the collector frees it


def survivors(n: int) -> list[list[int]]:
    """``n`` container objects that stay alive: what makes Python schedule a full collection on its own."""
    return [[i] for i in range(n)]


def steps(collector: StepCollector, watch: Collections, n: int, per_step: int) -> list:
    kept: list = []
    for step in range(1, n + 1):
        kept.append(survivors(per_step))
        watch.in_step = True
        collector.after_step(step)
        watch.in_step = False
    return kept


def test_python_collects_the_old_generation_on_its_own_under_this_allocation():
    # the control: without the setting, the allocation of the test below makes Python run full collections itself
    # (so the test below can see the setting stop them)
    per_step = max(100_000, len(gc.get_objects()) // 2)
    with Collections() as watch, StepCollector(0) as collector:
        kept = steps(collector, watch, 8, per_step)
    assert watch.full(in_step=False) >= 1
    del kept


def test_full_collections_run_only_at_every_nth_step_and_free_cycles():
    per_step = max(100_000, len(gc.get_objects()) // 2)
    before = gc.get_threshold()
    with Collections() as watch, StepCollector(4) as collector:
        cycle = Node()
        gone = weakref.ref(cycle)
        del cycle
        kept = steps(collector, watch, 8, per_step)
        watch.in_step = True
        took = [collector.after_step(s) for s in (9, 12)]
    full = [x for x in watch.seen if x[0] == 2]
    assert watch.full(in_step=False) == 1, full  # the one on entering, before the first step
    assert watch.full(in_step=True) == 3, full  # steps 4, 8 and 12
    assert gone() is None
    assert took[0] is None and took[1] is not None and took[1] >= 0
    # the interpreter is left as it was: its thresholds, nothing frozen
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    del kept


def test_the_objects_alive_after_the_first_step_are_left_out_of_the_collections():
    with StepCollector(2) as collector:
        collector.after_step(1)
        frozen = gc.get_freeze_count()
        collector.after_step(2)
        assert gc.get_freeze_count() == frozen
    assert frozen > 10_000  # this process's modules, functions and test objects


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_runs_log_their_collections_at_the_steps_of_gc_every(trained_runs, engine):
    every = TRAINED["gc_every"]
    metrics = [m for m in read_metrics(trained_runs[engine]) if "loss" in m]
    at = [m["step"] for m in metrics if "gc_ms" in m]
    assert at == [s for s in range(1, TRAINED["max_steps"] + 1) if s % every == 0]
    assert all(m["gc_ms"] >= 0 for m in metrics if "gc_ms" in m)
