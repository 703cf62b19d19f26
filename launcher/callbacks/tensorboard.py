"""TensorBoard event files from rank 0, next to W&B: ``tensorboard --logdir OUTPUT_DIR/tensorboard``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.callbacks.base import Callback, RunInfo, logged_number

TENSORBOARD_DIR = "tensorboard"

# A 48-bit hash as a float32 scalar would lose its low bits, and with them the point of comparing it.
_NOT_SCALARS = {"data/batch_hash"}


class TensorBoard(Callback):
    """Writes train metrics as ``train/<name>`` (loss, lr, grad_norm, tokens_per_s, mfu, memory, data mix ...) and
    eval results as ``eval/<set>/loss|perplexity|tokens`` under ``output_dir/tensorboard``, the same names as W&B.

    A resumed run appends to the same directory and hides the events its previous run logged after the checkpoint
    it resumes from (``purge_step``), so a step never shows twice; a fresh start in the same directory hides all
    earlier events, as metrics.jsonl starts a new file. The hidden events stay in the older event files.
    """

    def __init__(self) -> None:
        self.writer: Any = None

    def on_train_start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(run.output_dir) / TENSORBOARD_DIR
        log_dir.mkdir(parents=True, exist_ok=True)
        # Events at steps >= purge_step in the directory's earlier files are dropped by TensorBoard's reader: after a
        # resume from step N the run logs N+1 onwards again (an evaluation at N is not repeated).
        purge_step = run.start_step + 1 if run.resumed else 0
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in metrics.items():
            number = logged_number(value)
            if number is not None and name not in _NOT_SCALARS:
                self.writer.add_scalar(f"train/{name}", number, global_step=int(step))
        # Flushed at every logged step, as metrics.jsonl is: a preempted or crashed run keeps what it logged.
        self.writer.flush()

    def on_eval(self, step: int, results: dict[str, dict[str, float]]) -> None:
        if self.writer is None:
            return
        for name, res in results.items():
            for key in ("loss", "perplexity", "tokens"):
                number = logged_number(res.get(key))
                if number is not None:
                    self.writer.add_scalar(f"eval/{name}/{key}", number, global_step=int(step))
        self.writer.flush()

    def on_train_end(self, run: RunInfo, final_dir: Path | None) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
