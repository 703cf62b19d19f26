"""Preemption: a signal makes every rank finish the current step, checkpoint, and exit with a requeue code.

The handler only sets a flag; ranks agree on it with one tiny all-reduce after each step, so a signal that
reaches only some ranks (or reaches them at different steps) still stops all of them at the same step.
"""

from __future__ import annotations

import logging
import signal
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the job should be requeued, and resumes from its checkpoint


class Preemption:
    def __init__(self, signals: list[str], device: torch.device):
        self.device = device
        self.received: str | None = None
        self.at: float | None = None
        for name in signals:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received, self.at = signal.Signals(signum).name, time.monotonic()

    def requested(self) -> bool:
        """True on every rank once any rank has received a preemption signal. Collective."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def seconds_since_signal(self) -> float:
        return time.monotonic() - self.at if self.at is not None else float("nan")
