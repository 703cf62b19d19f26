"""Preemption: a signal makes every rank finish the current step, checkpoint, and exit with a requeue code.

The handler only sets a flag; ranks agree on it with one tiny all-reduce after each step, so a signal that
reaches only some ranks (or reaches them at different steps) still stops all of them at the same step.

The same signal is how launchers stop the survivors when a peer has died. Then the current step never ends (its
collectives wait for the dead rank), so a watchdog exits the process once the step has taken far longer than
steps usually do: a dead peer ends the job in about a minute instead of after the collective timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the job should be requeued, and resumes from its checkpoint
STUCK_EXIT_CODE = 1
MIN_STEP_GRACE_S = 60.0


class Preemption:
    def __init__(self, signals: list[str], device: torch.device):
        self.device = device
        self.received: str | None = None
        self.at: float | None = None
        self.longest_step = 0.0
        self._acknowledged = threading.Event()
        for name in signals:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            return
        self.received, self.at = signal.Signals(signum).name, time.monotonic()
        grace = max(MIN_STEP_GRACE_S, 4 * self.longest_step)
        threading.Thread(target=self._watchdog, args=(grace,), daemon=True, name="preemption-watchdog").start()

    def _watchdog(self, grace: float) -> None:
        if not self._acknowledged.wait(grace):
            log.error("%s received %.0f s ago and the current step has not finished: a peer has probably died "
                      "inside a collective; exiting", self.received, grace)  # fmt: skip
            logging.shutdown()
            os._exit(STUCK_EXIT_CODE)

    def note_step(self, seconds: float) -> None:
        self.longest_step = max(self.longest_step, seconds)

    def requested_on_any_rank(self) -> bool:
        """Collective: every rank must call it at the same point. True on every rank once any rank has received a
        preemption signal."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            # The step ended: from here on, saving the checkpoint may take as long as it needs.
            self._acknowledged.set()
            return True
        return False

    def seconds_since_signal(self) -> float:
        return time.monotonic() - self.at if self.at is not None else float("nan")
