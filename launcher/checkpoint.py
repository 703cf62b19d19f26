"""Checkpoints: written under a temporary name, committed by one rename once every rank has finished.

Layout of ``output_dir/checkpoints/step-N/``: the engine's own files (DeepSpeed checkpoint or a
torch.distributed.checkpoint directory), ``trainer_state.json`` (step, tokens, dtype), ``data-rank{r}.json``
(each rank's data position), ``rng-rank{r}.pt``, and the model config and tokenizer, so a checkpoint alone is
enough to export a Hugging Face model. A directory without the ``.tmp`` suffix is complete by construction.

A save has two halves: :func:`start_save` writes every file but the commit record (the engine's own may go on being
written in the background, ``train.async_save``), and :meth:`PendingSave.commit` waits for them and commits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from .config import to_yaml
from .engine import Engine, SaveHandle
from .files import atomic_write, os_error_in, torch_save, write_text
from .launch import DistInfo

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]


def verify(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (a missing or truncated file, no commit record), or None."""
    try:
        json.loads((path / "trainer_state.json").read_text())
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable commit record ({e})"
    for name, size in manifest.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies; newer ones that do not are skipped with a warning. Every rank gets
    rank 0's answer, so all of them resume from the same step."""
    choice: Path | None = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        for path in reversed(complete_checkpoints(output_dir)):
            problem = verify(path)
            if problem is None:
                choice = path
                break
            log.warning("skipping checkpoint %s: %s; trying the previous one", path, problem)
    if dist.is_initialized():
        box = [str(choice) if choice else None]
        dist.broadcast_object_list(box, src=0)
        choice = Path(box[0]) if box[0] else None
    return choice


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def start_save(
    engine: Engine, info: DistInfo, output_dir: str | Path, step: int, trainer_state: dict[str, Any],
    data_state: dict[str, Any], tokenizer, keep_last: int, *, background: bool = False,
) -> PendingSave | None:  # fmt: skip
    """Save ``step-N``: every file of it into ``step-N.tmp`` but the commit record; with ``background``
    (``train.async_save``) the engine writes its files while training goes on. :meth:`PendingSave.commit` makes it
    ``step-N``. None when ``step-N`` is committed already. Collective.

    Raises CheckpointError when the storage refuses a write (disk full, quota, file too large, I/O error), here or in
    the commit: then nothing is committed, the newest committed checkpoint stays the one a resume uses, and the
    partial ``step-N.tmp`` is never resumed from (the next save removes it)."""
    began = time.perf_counter()
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step}"
    if final.is_dir():
        return None
    tmp = root / f"step-{step}.tmp"
    layout = engine.layout
    with _naming_write_failure(tmp, output_dir):
        if info.rank == 0:
            for stale in root.glob("step-*.tmp") if root.is_dir() else []:
                shutil.rmtree(stale)  # saves that failed or were cut short; never resumed from
            tmp.mkdir(parents=True)
        _barrier()
        handle = engine.save(tmp, background=background)
        # This rank's data position and RNG describe this step: written now, whatever the engine still writes. The
        # data position is one per data-parallel rank (the ranks of a sequence-parallel group read as one).
        if info.rank % layout.sequence_parallel == 0:
            write_text(tmp / f"data-rank{layout.data_rank(info.rank)}.json", json.dumps(data_state))
        torch_save(_rng_state(), tmp / f"rng-rank{info.rank}.pt")
    state = {**trainer_state, "step": step, "world_size": info.world_size,
             "sequence_parallel": layout.sequence_parallel, "engine": engine.recipe.parallel.engine,
             "dtype": str(engine.dtype).removeprefix("torch.")}  # fmt: skip
    return PendingSave(engine, info, Path(output_dir), tmp, final, state, tokenizer, keep_last, handle, background,
                       began, time.perf_counter() - began)  # fmt: skip


@dataclass
class PendingSave:
    """``step-N`` on its way: its files are in ``step-N.tmp``, or still being written there by the engine in the
    background. :meth:`commit` makes it ``step-N``; until then a resume uses the checkpoint before it."""

    engine: Engine
    info: DistInfo
    output_dir: Path
    tmp: Path
    final: Path
    state: dict[str, Any]
    """trainer_state.json, as it was at the save's step."""
    tokenizer: Any
    keep_last: int
    handle: SaveHandle
    background: bool
    began: float
    start_s: float
    """Seconds :func:`start_save` took."""
    stalled_s: float = 0.0
    """Seconds the training waited for this save, once it is committed: its start, the wait for the copy of the
    state before the next optimizer step, and the commit (with the wait for the write)."""

    def done_everywhere(self) -> bool:
        """Whether every rank's write has ended, written or failed. Collective: one all-reduce of one number."""
        flag = torch.tensor([1.0 if self.handle.done() else 0.0], device=self.info.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def commit(self) -> Path:
        """Wait for this rank's write, then commit: the commit record (manifest, trainer_state.json) last and one
        rename on rank 0, once every rank has finished; then ``latest`` and the pruning of all but the newest
        ``keep_last``. Collective. Raises CheckpointError, committing nothing, when a write failed."""
        began = time.perf_counter()
        tmp, final, main = self.tmp, self.final, self.info.rank == 0
        if main and not self.handle.done():
            log.info("checkpoint %s: waiting for its background write to finish", final.name)
        with _naming_write_failure(tmp, self.output_dir):
            self.handle.wait()
            _barrier()
            if main:
                self.engine.config.save_pretrained(tmp / "hf")
                self.tokenizer.save_pretrained(tmp / "hf")
                write_text(tmp / "resolved_recipe.yaml", to_yaml(self.engine.recipe))
                # The manifest records every file's size, so a truncated file is caught before a resume trusts it;
                # trainer_state.json comes last and the rename commits the whole directory at once.
                files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
                atomic_write(tmp / MANIFEST, json.dumps(files, indent=2))
                atomic_write(tmp / "trainer_state.json", json.dumps(self.state, indent=2))
                os.replace(tmp, final)
        root = final.parent
        if main:
            try:
                atomic_write(root / "latest", final.name + "\n")
            except OSError as e:
                log.warning("checkpoint %s is committed but %s could not be updated: %s", final, root / "latest", e)
            # Old checkpoints go only once the new one is committed, and with them what was derived from them.
            for old in complete_checkpoints(self.output_dir)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            for derived in _orphaned_derivatives(root):
                shutil.rmtree(derived, ignore_errors=True)
            log.info("checkpoint committed: %s", final)
        _barrier()
        commit_s, copy_s = time.perf_counter() - began, self.handle.stalled_s()
        self.stalled_s = self.start_s + copy_s + commit_s
        if main and self.background:
            written = self.handle.written_s() or time.perf_counter() - self.began
            log.info("checkpoint %s: training stalled %.2f s, written in background in %.2f s (start %.2f s, waiting "
                     "for the copy %.2f s, commit %.2f s)", final.name, self.stalled_s, written, self.start_s, copy_s,
                     commit_s)  # fmt: skip
        elif main:
            log.info("checkpoint %s: training stalled %.2f s, written synchronously", final.name, self.stalled_s)
        return final


@contextlib.contextmanager
def _naming_write_failure(tmp: Path, output_dir: str | Path) -> Iterator[None]:
    """A write the storage refused becomes a CheckpointError that names the file, the OS error and the checkpoint a
    resume will use; anything else passes unchanged."""
    try:
        yield
    except (Exception, CheckpointException) as e:
        cause = os_error_of(e)
        if cause is None:
            raise
        raise CheckpointError(_write_failure(tmp, output_dir, cause)) from e


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the file, the OS error and the checkpoint a resume
    will use."""


def os_error_of(error: BaseException) -> OSError | None:
    """The OS error behind ``error``: in its chain of causes, or in a rank's failure reported by
    torch.distributed.checkpoint (which collects every rank's exception); one that names its file first."""
    seen: set[int] = set()
    found: list[OSError] = []
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if (cause := os_error_in(e)) is not None:
            found.append(cause)
        if isinstance(e, CheckpointException):
            todo += [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        todo += [e.__cause__, e.__context__]
    return next((e for e in found if e.filename), found[0] if found else None)


def _write_failure(tmp: Path, output_dir: str | Path, cause: OSError) -> str:
    try:
        previous = newest_verified(output_dir)
    except OSError:
        previous = None
    resume = (
        f"the newest committed checkpoint is still {previous}, and running the same command again resumes from it"
        if previous
        else "there is no earlier checkpoint, so running the same command again starts from the base model"
    )
    return (
        f"could not write checkpoint {tmp}: {cause}. Nothing was committed: {resume}. Free space or fix the "
        "storage first."
    )


def _orphaned_derivatives(root: Path) -> list[Path]:
    """What was derived from a checkpoint and kept beside it, ``step-N.<what>`` (``step-N.universal``: DeepSpeed's
    universal form, made when a run resumed on another world size), whose checkpoint ``step-N`` is gone. Unfinished
    ``.tmp`` directories are the next save's to remove."""
    found = [(m.group(1), p) for p in root.iterdir() if (m := DERIVED_RE.match(p.name)) and p.is_dir()]
    return [p for step, p in found if not (root / step).is_dir()]


DERIVED_RE = re.compile(r"^(step-\d+)\.(?!(.*\.)?tmp$)[\w.]+$")


def engine_problem(path: Path, engine: str) -> str | None:
    """Why the checkpoint ``path`` cannot be resumed by ``engine`` (the recipe's parallel.engine), or None: each
    engine reads only its own checkpoint format."""
    saved = json.loads((path / "trainer_state.json").read_text()).get("engine")
    if saved is None or saved == engine:
        return None
    return (
        f"cannot resume {path}: it was written by the {saved} engine and this recipe uses {engine} "
        f"(parallel.engine). Each engine reads only its own checkpoints: run with parallel.engine={saved} (and its "
        f"config), or start from this checkpoint's weights as a new run: `cpt export {path} DIR`, then "
        "model.init_from=DIR with another output_dir."
    )


def load(
    engine: Engine, info: DistInfo, path: Path
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]] | None]:
    """Restore engine and RNG; return (trainer_state, this rank's data state, every old rank's data state when the
    world size changed, else None). Collective.

    The checkpoint must come from the recipe's engine (:func:`engine_problem`); anything else is refused before
    anything is loaded. It may come from another world size (number of ranks):

    - model and optimizer states: the engine reshards them (FSDP2: torch.distributed.checkpoint; DeepSpeed ZeRO:
      through its universal checkpoint, converted once beside the checkpoint);
    - schedule and step: independent of the world size; the global batch stays what the recipe says (gradient
      accumulation follows from it and the new world size), a change of it is logged as a warning;
    - data position: every rank's position is read (``data-rank{r}.json`` of each old rank r) and the stream
      divides what the old ranks had left among the new ones, so no document is read twice or skipped. A new
      rank that the saved run did not have gets rank 0's state as its own (the stream works from all of them);
    - RNG: a rank with a saved ``rng-rank{r}.pt`` continues it; a rank the saved run did not have is seeded from
      (train.seed, step, rank) (:func:`_seed_new_rank`), the same on every resume of this checkpoint.
    """
    state = json.loads((path / "trainer_state.json").read_text())
    problem = engine_problem(path, engine.recipe.parallel.engine)
    if problem is not None:
        raise RuntimeError(problem)
    saved = int(state.get("world_size") or info.world_size)
    if saved != info.world_size:
        rng = (
            f"{_ranks(saved, info.world_size)} (no saved RNG state) seeded from train.seed, the step and the rank"
            if saved < info.world_size
            else f"the saved RNG states of {_ranks(info.world_size, saved)} unused"
        )
        log.info(
            "world size changed: %d -> %d ranks (%s was saved by %d): the engine reshards the model and optimizer "
            "states, the data position of the %d old ranks is re-divided among the %d new ones, %s",
            saved, info.world_size, path, saved, saved, info.world_size, rng,
        )  # fmt: skip
        if info.rank == 0:
            _log_batch_change(engine, path, saved)
    engine.load(path)
    data_state, all_ranks = _continue_stream(engine, info, path, state)
    return state, data_state, all_ranks


def _continue_stream(
    engine: Engine, info: DistInfo, path: Path, state: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """This rank's data state and, when the number of data-parallel ranks changed, every old one's (files
    ``data-rank{d}.json``, one per data-parallel rank: world / ``parallel.sequence_parallel``); the RNG state of this
    rank."""
    saved = int(state.get("world_size") or info.world_size)
    saved_data = saved // int(state.get("sequence_parallel") or 1)
    data_rank = engine.layout.data_rank(info.rank)
    all_ranks = None
    if saved_data != engine.layout.data_parallel:
        all_ranks = [json.loads((path / f"data-rank{r}.json").read_text()) for r in range(saved_data)]
        data_state = all_ranks[data_rank] if data_rank < saved_data else all_ranks[0]
    else:
        data_state = json.loads((path / f"data-rank{data_rank}.json").read_text())
    if info.rank < saved:
        _set_rng_state(torch.load(path / f"rng-rank{info.rank}.pt", weights_only=True))
    else:
        _seed_new_rank(engine.recipe.train.seed, int(state["step"]), info.rank)
    return data_state, all_ranks


def branch(
    engine: Engine, info: DistInfo, path: Path, *, optimizer: bool, data: bool
) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
    """Start a new run from the checkpoint ``path`` of another run (``model.init_from``): its model weights; with
    ``optimizer`` its optimizer state (``model.init_optimizer``); never its schedule, which starts at step 0 with this
    recipe's learning rate, betas, eps and weight decay. With ``data`` (``model.init_data``), every rank's data
    position and RNG state as :func:`load` takes them (re-divided when the world size changed); returns this rank's
    data state and, when the world size changed, every old rank's, else (None, None). Collective.

    The checkpoint must come from the recipe's engine; the pre-flight check refuses anything else before the
    workers start (:func:`launcher.init_from.check_init_from`), so this is the last line of defence."""
    state = json.loads((path / "trainer_state.json").read_text())
    saved_engine, engine_name = state.get("engine"), engine.recipe.parallel.engine
    if saved_engine not in (None, engine_name):
        raise RuntimeError(init_engine_problem(path, saved_engine, engine_name))
    saved = int(state.get("world_size") or info.world_size)
    if saved != info.world_size:
        what = "model and optimizer states" if optimizer else "model"
        data_text = (
            f", the data position of the {saved} old ranks is re-divided among the {info.world_size} new ones"
            if data
            else ""
        )
        log.info("model.init_from: %s was saved by %d ranks, this run has %d: the engine reshards the %s%s", path,
                 saved, info.world_size, what, data_text)  # fmt: skip
        if info.rank == 0 and data:
            _log_batch_change(engine, path, saved)
    engine.load(path, optimizer=optimizer, scheduler=False)
    if not data:
        return None, None
    return _continue_stream(engine, info, path, state)


def init_engine_problem(path: Path, saved: str, engine: str) -> str:
    """``model.init_from`` names a checkpoint of another engine: what to do instead."""
    return (
        f"model.init_from: {path} was written by the {saved} engine and this recipe uses {engine} "
        f"(parallel.engine); each engine reads only its own checkpoints. Start from its weights instead: "
        f"`cpt export {path} DIR`, then model.init_from=DIR (its optimizer state and data position cannot be taken "
        "across engines)."
    )


def _ranks(first: int, end: int) -> str:
    return f"rank {first}" if end - first == 1 else f"ranks {first}-{end - 1}"


def _seed_new_rank(seed: int, step: int, rank: int) -> None:
    """The RNG state of a rank the saved run did not have: torch (CPU and GPU) and Python's ``random`` seeded with
    the first 8 bytes of sha256("{train.seed}:{step}:{rank}")."""
    value = int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:8], "big")
    torch.manual_seed(value)
    random.seed(value)


def _log_batch_change(engine: Engine, path: Path, saved: int) -> None:
    """Log the global batch and gradient accumulation before and after a change of world size; warn if the global
    batch itself changed (train.global_batch_size unset: it is then micro-batch x world size)."""
    now = engine.layout
    try:
        train = (yaml.safe_load((path / "resolved_recipe.yaml").read_text()) or {}).get("train") or {}
        micro = int(train.get("micro_batch_size") or now.micro_batch_size)
        before = int(train.get("global_batch_size") or micro * saved)
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return
    log.info("global batch: gradient accumulation %d x micro-batch %d x %d ranks = %d sequences before, %d x %d x %d "
             "= %d now", before // max(1, micro * saved), micro, saved, before, now.grad_accum, now.micro_batch_size,
             now.world_size, now.global_batch_size)  # fmt: skip
    if before != now.global_batch_size:
        unset = (
            ""
            if engine.recipe.train.global_batch_size
            else " (train.global_batch_size is not set, so it is train.micro_batch_size x the world size)"
        )
        log.warning(
            "the global batch changes from %d to %d sequences per step%s; set train.global_batch_size=%d to keep "
            "the one the checkpoint was trained with", before, now.global_batch_size, unset, before,
        )  # fmt: skip


def newest_verified(output_dir: str | Path) -> Path | None:
    """The newest committed checkpoint that verifies, or None (no logging, no process group)."""
    return next((p for p in reversed(complete_checkpoints(output_dir)) if verify(p) is None), None)
