"""Preemption: a signal makes every rank finish the current step, checkpoint, and exit with a requeue code.

The handler only sets a flag; ranks agree on it with one tiny all-reduce after each step, so a signal that
reaches only some ranks (or reaches them at different steps) still stops all of them at the same step.

The same signal is how launchers stop the survivors when a peer has died. Then the current step never ends (its
collectives wait for the dead rank), so a watchdog exits the process once the step has taken far longer than
steps usually do: a dead peer ends the job in about a minute instead of after the collective timeout. A Python
signal handler runs only when the main thread returns to the interpreter, which a rank blocked inside a
collective never does; so the signal is also read from ``signal.set_wakeup_fd`` by a thread, which starts the
watchdog at once.
"""

from __future__ import annotations

import contextlib
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

SIGNALLED = threading.Event()
"""Set once this process received a preemption signal: it is saving a checkpoint, whatever else goes away."""


class Preemption:
    def __init__(self, signals: list[str], device: torch.device):
        self.device = device
        self.received: str | None = None
        self.at: float | None = None
        self.longest_step = 0.0
        self._acknowledged = threading.Event()
        self._lock = threading.Lock()
        self._signums = {int(getattr(signal, name)) for name in signals}
        for name in signals:
            signal.signal(getattr(signal, name), self._handle)
        if self._signums:
            read, write = os.pipe()
            os.set_blocking(write, False)
            # The interpreter writes each signal's number to this pipe from its C handler, at once.
            self._chained = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            threading.Thread(target=self._listen, args=(read,), daemon=True, name="preemption-signals").start()

    def _handle(self, signum: int, frame) -> None:
        self._note(signum)

    def _listen(self, fd: int) -> None:
        while data := os.read(fd, 64):
            if self._chained >= 0:  # whoever set the wakeup fd before us still hears of every signal
                with contextlib.suppress(OSError):
                    os.write(self._chained, data)
            for signum in data:
                if signum in self._signums:
                    self._note(signum)

    def _note(self, signum: int) -> None:
        """The first preemption signal: remember it and start the watchdog (from the handler or the listener,
        whichever comes first)."""
        with self._lock:
            if self.received is not None:
                return
            self.received, self.at = signal.Signals(signum).name, time.monotonic()
            SIGNALLED.set()
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
