"""The callback interface the training loop calls, and what every callback is told about the run.

The loop only ever calls these four hooks on a :class:`CallbackList`; what happens with the numbers
(files, W&B, plots, a model card, a progress bar) is up to the callbacks, so adding an output never
touches the loop.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config import Recipe


@dataclass
class RunInfo:
    """Facts about the run that the recipe alone does not give (world size, resume point, ...)."""

    recipe: Recipe
    output_dir: Path
    world_size: int
    grad_accum: int
    global_batch_size: int
    tokens_per_step: int
    n_params: int
    start_step: int
    max_steps: int
    resumed: bool
    command: str


class Callback:
    """Override the hooks you need; every hook is a no-op by default."""

    def on_train_start(self, run: RunInfo) -> None:
        """Called once, before the first step (and before the optional evaluation at the start)."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """Called every ``train.log_every`` steps with loss, lr, grad_norm, tokens_per_s,
        tokens_per_s_per_device, mfu (None when the peak is unknown), tokens_seen, step_time, mem_*; and
        checkpoint_stall_s (seconds a checkpoint stalled training) in the first call after each commit."""

    def on_eval(self, step: int, results: dict[str, dict[str, float]]) -> None:
        """Called after each evaluation with ``{set_name: {"loss", "perplexity", "tokens"}}``."""

    def on_train_end(self, run: RunInfo, final_dir: Path | None) -> None:
        """Called once after the last step; ``final_dir`` is the exported Hugging Face model, if any."""


class CallbackList(Callback):
    """Calls each callback in order. Exceptions propagate: a broken output should stop the run loudly."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)

    def on_train_start(self, run: RunInfo) -> None:
        for cb in self.callbacks:
            cb.on_train_start(run)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_step(step, metrics)

    def on_eval(self, step: int, results: dict[str, dict[str, float]]) -> None:
        for cb in self.callbacks:
            cb.on_eval(step, results)

    def on_train_end(self, run: RunInfo, final_dir: Path | None) -> None:
        for cb in self.callbacks:
            cb.on_train_end(run, final_dir)


# ------------------------------------------------------------------------------------- shared helpers


def run_name(recipe: Recipe) -> str:
    """``logging.run_name``, else the name of the output directory."""
    return recipe.logging.run_name or Path(recipe.output_dir).resolve().name


def plain(value: Any) -> Any:
    """``value`` as JSON-ready Python data: tensors and numpy scalars become numbers, paths strings."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    return str(value)


def logged_number(v: object) -> float | None:
    """A metric as a float for a logger (NaN included: a diverged loss is worth seeing); None for None, booleans
    and text."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def finite(x: Any) -> float | None:
    """``x`` as a float, or None when missing or not finite."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, skipping lines that do not parse (a line cut short by a crash)."""
    records: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                    records.append(rec)
    except FileNotFoundError:
        pass
    return records
