"""Reading DeepSpeed checkpoints without DeepSpeed's engine: safely (nothing in a file can run code), and, for
export, one decoder layer at a time.

A ZeRO checkpoint keeps the fp32 master weights in the optimizer files, one per rank: ZeRO-1/2 (and the bf16
optimizer of ZeRO-0) split each parameter group's flat vector into consecutive per-rank partitions; ZeRO-3 splits
every parameter into equal per-rank pieces, laid one after the other in each rank's flat vector. The export reads
each layer's pieces from every rank's file, mapped (``torch.load(mmap=True)``) rather than read whole, and lets the
mapping go before the next layer, so memory holds one layer; the Adam moments beside them are never read.

DeepSpeed's own reader, ``get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True)`` (deepspeed 0.19.8), keeps
every rank's optimizer file mapped until the end, so its resident memory grows by the whole fp32 model as the
weights are read: +270 MiB just to read each weight of a 24-layer, 70M-parameter (268 MiB) ZeRO-3 checkpoint once,
against +61 MiB for the whole ``cpt export`` through this reader with 20 MB shards (and +536 MiB for the earlier
export that read the whole state dict, then saved it). For ZeRO-1/2 it also concatenates every rank's partitions
into one fp32 copy of the model first.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FP32_ZERO3 = "fp32_flat_groups"
FP32_PARTITIONS = "single_partition_of_fp32_groups"


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """DeepSpeed's checkpoint loads inside read tensors and plain data only, plus the few DeepSpeed value types its
    checkpoints hold: nothing else in a checkpoint is unpickled, so a tampered checkpoint cannot run code.
    DeepSpeed calls ``torch.load(weights_only=False)``; torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides that
    for every load while it is set, and ``safe_globals`` allows DeepSpeed's types."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # Nested uses keep the outer one's types: safe_globals adds to, and restores, torch's list of allowed types.
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _mapped(path: Path) -> dict[str, Any]:
    """A checkpoint file with its tensors mapped from disk, not read: only the parts that are used are read, and
    the mapping goes with the last tensor that refers to it."""
    with weights_only_loading():
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _rank_of(path: Path) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(m.group(1)) if m else 0


@dataclass(frozen=True)
class _Piece:
    rank: int
    start: int
    """Offset in the rank's fp32 groups, laid end to end."""
    length: int
    into: int
    """Offset in the whole parameter (flattened)."""


@dataclass
class _Zero:
    """Where each parameter's fp32 pieces are in a ZeRO checkpoint's optimizer files."""

    files: list[Path]
    key: str
    shapes: dict[str, torch.Size]
    pieces: dict[str, list[_Piece]]
    buffers: dict[str, torch.Tensor]
    aliases: dict[str, str]


def _read_layout(checkpoint: Path, files: list[Path]) -> _Zero:
    sizes: list[list[int]] = []
    for path in files:
        opt = _mapped(path)["optimizer_state_dict"]
        if not sizes:
            stage = int(opt.get("zero_stage", 0))
            key = FP32_ZERO3 if stage == 3 else FP32_PARTITIONS
            world = opt["partition_count"]
            world = max(world) if isinstance(world, list) else int(world)
            paddings = opt.get("param_alignment_paddings")
        sizes.append([t.numel() for t in opt[key]])
        del opt
    if world != len(files):
        raise ValueError(f"{checkpoint}: saved by {world} ranks, but {len(files)} optimizer files are there")
    states = checkpoint / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt")
    model = _mapped(states)
    if model.get("frozen_param_shapes"):
        raise ValueError(f"{states}: frozen parameters ({', '.join(model['frozen_param_shapes'])}) cannot be exported")
    groups: list[dict[str, torch.Size]] = model["param_shapes"]
    buffers = {k: v.clone() for k, v in model["module"].items() if k in set(model.get("buffer_names") or [])}
    aliases = dict(model.get("shared_params") or {})
    del model
    shapes = {name: torch.Size(shape) for group in groups for name, shape in group.items()}
    pieces: dict[str, list[_Piece]] = {}
    if stage == 3:
        # each parameter: ceil(n / world) elements on every rank, at the same offset in each rank's groups
        offset = 0
        for name, shape in shapes.items():
            n = shape.numel()
            part = math.ceil(n / world)
            pieces[name] = [_Piece(r, offset, min(part, n - r * part), r * part) for r in range(world) if r * part < n]
            offset += part
    else:
        # each group: the ranks' partitions end to end hold its parameters one after the other
        for g, group in enumerate(groups):
            base = [sum(rank_sizes[:g]) for rank_sizes in sizes]
            bounds = [0]
            for rank_sizes in sizes:
                bounds.append(bounds[-1] + rank_sizes[g])
            at = 0
            for i, (name, shape) in enumerate(group.items()):
                n = torch.Size(shape).numel()
                pieces[name] = [
                    _Piece(r, base[r] + max(at, lo) - lo, min(at + n, hi) - max(at, lo), max(at, lo) - at)
                    for r, (lo, hi) in enumerate(zip(bounds, bounds[1:]))
                    if max(at, lo) < min(at + n, hi)
                ]
                at += n + (paddings[g][i] if paddings else 0)
    return _Zero(files, key, shapes, pieces, buffers, aliases)


def _copy(groups: list[torch.Tensor], piece: _Piece, out: torch.Tensor) -> None:
    """``piece`` of one rank's groups (laid end to end) into the flat ``out``."""
    at, left, into = piece.start, piece.length, piece.into
    for flat in groups:
        n = flat.numel()
        if at >= n:
            at -= n
            continue
        take = min(left, n - at)
        out[into : into + take].copy_(flat[at : at + take])
        left, into, at = left - take, into + take, 0
        if not left:
            return
    raise ValueError(f"rank {piece.rank}'s optimizer file ends before the parameter does")


def _zero_tensors(zero: _Zero, units: list[list[str]]) -> Iterator[tuple[str, torch.Tensor]]:
    for unit in units:
        sources = {key: zero.aliases.get(key, key) for key in unit}
        flat = {key: torch.empty(zero.shapes[src].numel(), dtype=torch.float32)
                for key, src in sources.items() if src in zero.pieces}  # fmt: skip
        for rank, path in enumerate(zero.files):
            todo = [(key, p) for key in flat for p in zero.pieces[sources[key]] if p.rank == rank]
            if not todo:
                continue
            groups = _mapped(path)["optimizer_state_dict"][zero.key]
            for key, piece in todo:
                _copy(groups, piece, flat[key])
            del groups
        for key in unit:
            if key in flat:
                yield key, flat.pop(key).view(zero.shapes[sources[key]])
            elif key in zero.buffers:
                yield key, zero.buffers[key]


def zero_checkpoint_tensors(checkpoint: Path, units: list[list[str]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of a DeepSpeed checkpoint directory, ``units`` (lists of state-dict keys) one at a time: the
    fp32 master weights of ZeRO 1-3 (and of ZeRO-0's bf16 optimizer), or the module's own weights under ZeRO-0
    without an optimizer wrapper. A key the checkpoint does not hold is left out."""
    files = sorted(checkpoint.glob("*optim_states.pt"), key=_rank_of)
    if files:
        yield from _zero_tensors(_read_layout(checkpoint, files), units)
        return
    # ZeRO-0 without DeepSpeed's optimizer wrapper: the module's weights are whole in the model-states file.
    for unit in units:
        module = _mapped(checkpoint / "mp_rank_00_model_states.pt")["module"]
        read = [(key, module[key].clone()) for key in unit if key in module]
        del module
        yield from read
