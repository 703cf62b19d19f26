"""metrics.jsonl and eval_results.json: the run's record on disk, readable without W&B."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

from launcher.callbacks.base import Callback, RunInfo, plain, read_metrics
from launcher.files import atomic_write

METRICS_FILE = "metrics.jsonl"
EVAL_RESULTS_FILE = "eval_results.json"


class MetricsJsonl(Callback):
    """Appends one JSON object per line to ``output_dir/metrics.jsonl``.

    Train lines are ``{"step", "loss", "lr", ..., "time"}``, eval lines ``{"step", "eval": {name: {...}},
    "time"}``. Every line is flushed, so a crash loses at most the line being written. A resumed run first
    drops the lines after the checkpoint it resumes from, so the file never holds a step twice; a fresh
    run starts a new file. ``eval_results.json`` always holds the latest evaluation.
    """

    def __init__(self) -> None:
        self.path: Path | None = None
        self.eval_path: Path | None = None
        self._file: IO[str] | None = None

    def on_train_start(self, run: RunInfo) -> None:
        out = Path(run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / METRICS_FILE
        self.eval_path = out / EVAL_RESULTS_FILE
        if self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= run.start_step] if run.resumed else []
            atomic_write(self.path, "".join(_line(r) for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open until on_train_end)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._write({"step": int(step), **metrics, "time": time.time()})

    def on_eval(self, step: int, results: dict[str, dict[str, float]]) -> None:
        results = plain(results)
        self._write({"step": int(step), "eval": results, "time": time.time()})
        assert self.eval_path is not None
        atomic_write(self.eval_path, json.dumps(results, indent=2, sort_keys=True) + "\n")

    def on_train_end(self, run: RunInfo, final_dir: Path | None) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise RuntimeError("MetricsJsonl: on_train_start was not called")
        self._file.write(_line(record))
        self._file.flush()


def _line(record: dict[str, Any]) -> str:
    return json.dumps(plain(record)) + "\n"
