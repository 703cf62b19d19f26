"""``train.gc_every``: Python's full garbage collection at chosen steps, on every rank at the same step.

Python collects its oldest generation when enough objects have survived into it, walking every object the process
holds; a trainer that compiled its model holds many (one H200, the 1.1B shape, per-layer compile: 0.83 million
objects, 0.40 s, once in 160 steps of 0.44 s). The rank stalls at a moment of its own choosing, and between
ranks the others wait for it at the next collective, so at N ranks each rank's stalls are paid by all. With
``gc_every: N``, while training: the young generations are still collected as Python would (cheap, and they free
cycles holding tensors promptly); the automatic full collection is off; the objects alive after the first step of
the process (the model and what compiling it built) are frozen out of the collector's walks (``gc.freeze``); every
N steps each rank runs one full collection (the 1.1B run with it: 12 ms).
"""

from __future__ import annotations

import gc
import time

NEVER = 1 << 30
"""The oldest generation's threshold while training: Python never reaches it on its own (on Python 3.14 and later
the oldest generation is collected incrementally, in small pieces, and this threshold is not used)."""


class StepCollector:
    """Context for the training loop: full collections at every ``every``-th step only (0: Python's own)."""

    def __init__(self, every: int):
        self.every = every
        self.thresholds: tuple[int, int, int] | None = None
        self.frozen = False

    def __enter__(self) -> StepCollector:
        if self.every > 0:
            self.thresholds = gc.get_threshold()
            gc.collect()
            gc.set_threshold(self.thresholds[0], self.thresholds[1], NEVER)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.thresholds is not None:
            gc.set_threshold(*self.thresholds)
            self.thresholds = None
        if self.frozen:
            gc.unfreeze()
            self.frozen = False

    def after_step(self, step: int) -> float | None:
        """Called after each optimizer step, inside its timing (a collection is part of the step's cost): the
        milliseconds a collection took at this step, None where there was none."""
        if self.thresholds is None:
            return None
        if not self.frozen:  # the first step of this process: what setup and compiling left lives long
            gc.freeze()
            self.frozen = True
        if step % self.every:
            return None
        start = time.perf_counter()
        gc.collect()
        return (time.perf_counter() - start) * 1e3
