"""The callback interface the training loop calls, and what every callback is told about the run.

The loop only ever calls these four hooks on a :class:`CallbackList`; what happens with the numbers
(files, W&B, plots, a model card, a progress bar) is up to the callbacks, so adding an output never
touches the loop.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
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
        tokens_per_s_per_device, mfu (None when the peak is unknown), tokens_seen, step_time, mem_*."""

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


_SECRET_WORDS = {"apikey", "secret", "password", "passwd", "pwd", "credential", "credentials"}
_SECRET_LAST_WORDS = {"key", "token"}


def is_secret_key(key: str) -> bool:
    """True for names like ``api_key``, ``HF_TOKEN``, ``clientSecret``, ``db.password``.

    Whole words only, and ``key`` / ``token`` only as the last word, so ``tokenizer``, ``tokens_seen``,
    ``token_budget``, ``keep_last`` and ``num_key_value_heads`` are not secrets.
    """
    words = [w.lower() for w in re.split(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])", str(key)) if w]
    return any(w in _SECRET_WORDS for w in words) or (bool(words) and words[-1] in _SECRET_LAST_WORDS)


def scrub(value: Any) -> Any:
    """``value`` with every mapping entry whose key looks secret removed, recursively."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if not is_secret_key(k)}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    return value


REDACTED = "***"


def redact_values(value: Any) -> Any:
    """``value`` with every value under a secret-looking key replaced by ``***``, recursively (the key stays, so
    a reader sees that one was set)."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_key(k) else redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(v) for v in value]
    return value


_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact_args(args: Sequence[str]) -> list[str]:
    """Command-line arguments with secret values masked: ``api_key=x``, ``--hf-token x``, ``https://u:p@host``."""
    out: list[str] = []
    hide_next = False
    for arg in args:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        arg = _URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", arg)
        name, eq, _ = arg.partition("=")
        if eq and is_secret_key(name.lstrip("-")):
            out.append(f"{name}={REDACTED}")
        else:
            out.append(arg)
            hide_next = arg.startswith("-") and not eq and is_secret_key(arg.lstrip("-"))
    return out


def redact_text(text: str) -> str:
    """A command line or path as one string, with secret values masked (see :func:`redact_args`)."""
    return " ".join(redact_args(text.split())) if text else text


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and ``os.replace``, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish(tmp: str | Path, path: Path) -> None:
    """Move a finished temporary file into place with the permissions a plain ``open`` would have given
    (temporary files are private), so others sharing the run directory can read it."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


def _read_umask() -> int:
    """The process umask, read without changing it where the OS allows (setting it races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


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
