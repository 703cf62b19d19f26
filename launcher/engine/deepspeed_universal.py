"""Resuming a DeepSpeed ZeRO checkpoint on another number of ranks, through DeepSpeed's universal checkpoint.

A ZeRO checkpoint (stage 1, 2 or 3) holds each rank's flat partition of the fp32 master weights and of the Adam
states; a partition only fits the world size that wrote it, and DeepSpeed's ordinary loader refuses any other.
DeepSpeed's ``ds_to_universal`` rewrites the partitions once as one file per parameter and state
(``zero/<name>/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``, plus the optimizer's common state); its engine, with
``checkpoint.load_universal``, then cuts from them the partitions of the world size that loads them.

Where it goes: beside the checkpoint, ``checkpoints/step-N.universal/``. It is built as ``step-N.universal.tmp``
and renamed when complete, so a directory of that name is whole. It records which checkpoint it was made from
(``source.json``: a digest of the checkpoint's commit record) and is reused by every later resume of that
checkpoint, whatever the world size; a stale one is rebuilt. The committed checkpoint is never changed. It goes
when its checkpoint is pruned (:meth:`launcher.checkpoint.PendingSave.commit`).

What it costs: the conversion reads every rank's optimizer file and writes each state twice (per-rank fragments,
then the merged per-parameter files, the fragments removed at the end): about 12 bytes per parameter stay on disk
(fp32 weights and two Adam moments), 24 at the peak, plus a copy of DeepSpeed's model-state files (ZeRO-1/2: the
whole model in its training dtype); under ZeRO-3 the converter's copy of rank 0's optimizer file is cut down to
the step and settings the loader reads (:func:`_slim_common_state`). It runs once, on rank 0, in a separate
process; the other ranks wait for it, with the collective timeout raised for that wait (:func:`wait_limit_s`).
On 2 CPU cores the tests' tiny model converts in about 3 s (mostly the process start), a 51M-parameter ZeRO-3
checkpoint of 2 ranks (0.61 GB of optimizer state) in about 8 s; loading it then takes under a second.

Run as ``python -m launcher.engine.deepspeed_universal CHECKPOINT OUTPUT WORKERS`` it is the conversion itself,
with DeepSpeed's checkpoint reads restricted to tensors and plain data (:func:`weights_only_loading`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from ..compat import deepspeed_engine_config
from ..files import torch_save
from .deepspeed_checkpoint import weights_only_loading

log = logging.getLogger(__name__)

SUFFIX = ".universal"
SOURCE = "source.json"
MIN_DISK_RATE = 20e6
"""Bytes per second the wait for the conversion assumes at the least (each byte of optimizer state is read once
and written twice)."""


def universal_dir(checkpoint: Path) -> Path:
    """Where the universal form of ``checkpoint`` (``.../step-N``) lives: ``.../step-N.universal``."""
    return checkpoint.with_name(checkpoint.name + SUFFIX)


def _optim_files(checkpoint: Path) -> list[Path]:
    return [f for f in checkpoint.glob("*optim_states.pt") if not f.name.startswith(("layer_", "expert_"))]


def saved_world_size(checkpoint: Path) -> int | None:
    """The number of ranks that saved ``checkpoint`` when its optimizer state is partitioned among them (ZeRO 1-3),
    None when it is not (ZeRO-0: the whole optimizer is in the model-states file and loads on any world size)."""
    if not _optim_files(checkpoint):
        return None
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["world_size"])


def _source_digest(checkpoint: Path) -> str:
    """The identity of a committed checkpoint: its commit record (every file's size, then the trainer state)."""
    h = hashlib.sha256()
    for name in ("manifest.json", "trainer_state.json"):
        h.update((checkpoint / name).read_bytes())
    return h.hexdigest()


def _is_current(target: Path, checkpoint: Path) -> bool:
    try:
        return json.loads((target / SOURCE).read_text()).get("digest") == _source_digest(checkpoint)
    except (OSError, ValueError, AttributeError):
        return False


def wait_limit_s(checkpoint: Path, timeout_minutes: float) -> float:
    """How long the other ranks wait for rank 0's conversion: the recipe's collective timeout plus the time to read
    the optimizer files once and write them twice at :data:`MIN_DISK_RATE`."""
    size = sum(f.stat().st_size for f in _optim_files(checkpoint))
    return timeout_minutes * 60 + 3 * size / MIN_DISK_RATE


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _amount(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _workers() -> int:
    """Processes for the conversion's extract and merge passes: half the cores of this machine, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 2))


def convert(checkpoint: Path) -> Path:
    """Build (or reuse) the universal form of ``checkpoint``, on this process alone; returns its directory."""
    target = universal_dir(checkpoint)
    if target.is_dir() and _is_current(target, checkpoint):
        log.info("reusing the universal checkpoint %s", target)
        return target
    if target.exists():
        log.info("%s was made from another checkpoint of that name: rebuilding it", target)
        shutil.rmtree(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    workers = _workers()
    size = sum(f.stat().st_size for f in _optim_files(checkpoint))
    log.info("converting %s (%s of optimizer state) to DeepSpeed's universal checkpoint in %s, %d worker "
             "process(es)", checkpoint, _amount(size), target, workers)  # fmt: skip
    start = time.perf_counter()
    # Its own process: DeepSpeed's converter forks worker processes, which must not inherit this rank's GPU context
    # and communication threads.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", __name__, str(checkpoint), str(tmp), str(workers)]
    tail: list[str] = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = [*tail[-40:], line]
            if line.startswith("***"):  # the converter's stages
                log.info("universal checkpoint: %s", line.strip("* ."))
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(
            f"DeepSpeed's conversion of {checkpoint} to a universal checkpoint failed (exit code {proc.returncode}); "
            "the checkpoint itself is unchanged and still resumes with the world size it was saved with. Its "
            "output ended with:\n" + "\n".join(tail)
        )
    (tmp / SOURCE).write_text(json.dumps({"checkpoint": checkpoint.name, "digest": _source_digest(checkpoint)}))
    os.replace(tmp, target)
    log.info("universal checkpoint written in %.1f s: %s, %s", time.perf_counter() - start, target,
             _amount(_size(target)))  # fmt: skip
    return target


def ensure_universal(checkpoint: Path, rank: int, timeout_minutes: float) -> Path:
    """The universal form of ``checkpoint``: rank 0 converts it (or finds it already there), the other ranks wait
    for it, up to :func:`wait_limit_s`. Collective; every rank raises if the conversion failed."""
    import torch.distributed as dist

    from ..compat import set_collective_timeout

    target = universal_dir(checkpoint)
    distributed = dist.is_initialized()
    limit = wait_limit_s(checkpoint, timeout_minutes)
    if distributed:
        if rank == 0:
            log.info("rank 0 prepares the universal checkpoint; the other ranks wait for it up to %.0f min", limit / 60)
        set_collective_timeout(datetime.timedelta(seconds=limit))
    failure: str | None = None
    try:
        if rank == 0:
            try:
                convert(checkpoint)
            except Exception as e:
                failure = f"{type(e).__name__}: {e}"
        if distributed:
            box: list[Any] = [failure]
            dist.broadcast_object_list(box, src=0)
            failure = box[0]
    finally:
        if distributed:
            set_collective_timeout(datetime.timedelta(minutes=timeout_minutes))
    if failure is not None:
        raise RuntimeError(failure if rank == 0 else f"rank 0 could not prepare the universal checkpoint: {failure}")
    return target


class _Reads(TorchCheckpointEngine):
    """DeepSpeed's file reader for a universal load: weights-only, under the :func:`weights_only_loading` that
    encloses the whole load (entering it again for each file would end the enclosing one's allowances on exit)."""

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def universal_loading(engine: Any) -> Iterator[None]:
    """While it lasts, ``engine.load_checkpoint`` reads a universal checkpoint, every file weights-only.

    DeepSpeed's engine reads a universal checkpoint while its parsed config says ``checkpoint.load_universal``; it
    reads that flag only when it loads (deepspeed 0.19.8), so it is set for this one load. Its universal loader
    calls ``torch.load`` directly for the optimizer state and the per-parameter files: the enclosing
    :func:`weights_only_loading` covers those."""
    config = deepspeed_engine_config(engine)
    flag, files = config.load_universal_checkpoint, engine.checkpoint_engine
    config.load_universal_checkpoint, engine.checkpoint_engine = True, _Reads()
    try:
        with weights_only_loading():
            yield
    finally:
        config.load_universal_checkpoint, engine.checkpoint_engine = flag, files


def _slim_common_state(output: Path) -> None:
    """Drop the tensors of more than one element from the universal checkpoint's common optimizer state.

    Under ZeRO-3, ``ds_to_universal`` keeps rank 0's whole optimizer file as the common state that every rank
    loads: its partition of the fp32 weights and Adam moments (12/W bytes per parameter, in the per-parameter files
    already), read into host memory by every rank at once. The ZeRO-3 loader takes only the step, the
    hyperparameters and the loss-scale settings from it (deepspeed 0.19.8)."""
    path = output / "zero" / "optimizer_state.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "fp32_flat_groups" not in state:
        return  # ZeRO-1/2: the converter already kept only the common part

    def scalars(d: dict) -> dict:
        return {k: v for k, v in d.items() if not (torch.is_tensor(v) and v.numel() > 1)}

    state["fp32_flat_groups"] = []
    inner = state.get("optimizer_state_dict")
    if isinstance(inner, dict) and isinstance(inner.get("state"), dict):
        inner["state"] = {i: scalars(s) for i, s in inner["state"].items()}
    torch_save(state, path)


def _main(argv: list[str]) -> None:
    from deepspeed.checkpoint import ds_to_universal

    p = argparse.ArgumentParser(prog=f"python -m {__name__}", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("workers", type=int)
    a = p.parse_args(argv)
    args = argparse.Namespace(
        input_folder=a.checkpoint, output_folder=a.output, num_extract_workers=a.workers,
        num_merge_workers=max(1, a.workers // 2), keep_temp_folder=False, strict=True,
        # a model that is not Megatron's records no universal-checkpoint info of its own; DeepSpeed's default is
        # right for it (no tensor or pipeline parallelism)
        inject_missing_state=True,
    )  # fmt: skip
    with weights_only_loading():
        ds_to_universal.main(args)
        _slim_common_state(Path(a.output))
    # The converter also points a ``latest_universal`` file beside its output at it: not used here (every load
    # names its directory), and it would outlive the rename.
    Path(a.output).parent.joinpath("latest_universal").unlink(missing_ok=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
