"""Progress on rank 0: a tqdm bar in a terminal, a compact line now and then in a log file."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import IO, Any

from launcher.callbacks.base import Callback, RunInfo, finite, run_name


class ProgressBar(Callback):
    """Shows step/max_steps, loss, tokens/s and MFU (when known).

    A redrawn bar is unreadable in a Slurm output file, so when the stream is not a terminal it prints one
    line every ``max(1, max_steps // 20)`` steps (and at the last step) instead.
    """

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream
        self._bar: Any = None
        self._every = 1
        self._max_steps = 0
        self._start_step = 0
        self._t0 = 0.0

    def on_train_start(self, run: RunInfo) -> None:
        stream = self.stream or sys.stdout
        self.stream = stream
        self._max_steps = run.max_steps
        self._start_step = run.start_step
        self._every = max(1, run.max_steps // 20)
        self._t0 = time.monotonic()
        if _isatty(stream):
            from tqdm import tqdm

            self._bar = tqdm(
                total=run.max_steps,
                initial=run.start_step,
                desc=run_name(run.recipe),
                unit="step",
                file=stream,
                dynamic_ncols=True,
            )

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        loss = finite(metrics.get("loss"))
        tps = finite(metrics.get("tokens_per_s"))
        mfu = finite(metrics.get("mfu"))
        if self._bar is not None:
            self._bar.update(max(0, step - self._bar.n))
            post = {}
            if loss is not None:
                post["loss"] = f"{loss:.4f}"
            if tps is not None:
                post["tok/s"] = _si(tps)
            if mfu is not None:
                post["mfu"] = f"{100 * mfu:.1f}%"
            self._bar.set_postfix(post, refresh=False)
            return
        if step % self._every and step != self._max_steps:
            return
        parts = [f"step {step}/{self._max_steps}"]
        if self._max_steps:
            parts[0] += f" ({100 * step / self._max_steps:.0f}%)"
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if tps is not None:
            parts.append(f"{_si(tps)} tok/s")
        if mfu is not None:
            parts.append(f"MFU {100 * mfu:.1f}%")
        done = step - self._start_step
        if done > 0 and step < self._max_steps:
            eta = (time.monotonic() - self._t0) / done * (self._max_steps - step)
            parts.append(f"eta {_duration(eta)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def on_train_end(self, run: RunInfo, final_dir: Path | None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _si(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    s = int(seconds)
    h, m = s // 3600, s % 3600 // 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"
