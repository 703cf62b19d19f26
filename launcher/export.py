"""Writing a Hugging Face model from weights that arrive one at a time, so that neither the end of a run
(``final/``) nor ``cpt export`` holds the whole model in one process: host memory holds at most one safetensors
shard plus one decoder layer.

The engines yield the weights one decoder layer after another (:meth:`launcher.engine.Engine.export_tensors`,
:meth:`launcher.engine.EnginePlan.export_tensors`); :func:`write_hf_model` converts each to the export dtype,
collects it into the shard planned for it (from the model's own shapes, built on the meta device) and writes the
shard as soon as its last weight has arrived. The directory is written beside its destination under a ``.tmp``
name and moved into place at the end: a directory with that name and no ``.tmp`` suffix is complete.

:func:`export` (``cpt export``) does this from a committed checkpoint, in one process without a process group.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, PretrainedConfig

from .checkpoint import STEP_RE, newest_verified, verify
from .engine import PLANS, plan_for
from .model import tied_copies, weight_units, weights_layout_model

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_SHARD_NAME = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")


def parse_size(size: str | int) -> int:
    """Bytes in ``size``: a number of bytes, or a number with a unit (``500MB``, ``5GB``: powers of 10;
    ``2GiB``: powers of 2). Raises ValueError, quoting the value, for anything else or for a size below 1 byte."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = _SIZE.match(str(size))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{size!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise ValueError(f"{size!r}: a shard must hold at least one byte")
    return value


def _weight_conversion(model: Any):
    """transformers' reverse of the renames and fusions it applies when loading (fused MoE experts and the like),
    so the files hold the layout ``save_pretrained`` writes; None when the model has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x saves the weights as the model names them
        return None
    if not get_model_conversion_mapping(model, add_legacy=False):
        return None
    return lambda tensors: revert_weight_conversion(model, tensors)


@dataclass
class _Layout:
    """What the model's files hold: the keys the engines yield, grouped into units (a decoder layer each); the
    tensors each unit is written as; and which shard file each of those goes to."""

    units: list[list[str]]
    shard_of: dict[str, str]
    """Written tensor -> its file."""
    shapes: dict[str, tuple[int, ...]]
    """Written tensor -> its shape."""
    shard_sizes: dict[str, int]
    """File -> how many tensors it holds."""
    total_size: int


def _plan(model: Any, dtype: torch.dtype, max_bytes: int, convert) -> _Layout:
    """Every written tensor's shard, from the meta model's shapes, in state-dict order: a new shard starts when the
    next tensor would take the current one past ``max_bytes``, so a tensor larger than that fills a shard alone."""
    meta = model.state_dict()
    units = weight_units(model)
    shards: list[list[str]] = [[]]
    shapes: dict[str, tuple[int, ...]] = {}
    size = total = 0
    for unit in units:
        written = {k: meta[k] for k in unit}
        for name, t in (convert(written) if convert else written).items():
            t = t[0] if isinstance(t, list) else t
            nbytes = t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            shapes[name] = tuple(t.shape)
            size += nbytes
            total += nbytes
    n = len(shards)
    names = [WEIGHTS if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shard_of = {key: name for name, keys in zip(names, shards) for key in keys}
    return _Layout(units, shard_of, shapes, {name: len(keys) for name, keys in zip(names, shards)}, total)


def _write_weights(
    tensors: Iterable[tuple[str, torch.Tensor]], model: Any, dtype: torch.dtype, layout: _Layout,
    out: Path, convert,
) -> None:  # fmt: skip
    """Each unit, once all of its keys have arrived, converted and put into its shards; each shard written once
    complete. Raises RuntimeError naming the keys when the weights do not match the model."""
    unit_of = {k: i for i, unit in enumerate(layout.units) for k in unit}
    copies = tied_copies(model)
    arriving: dict[int, dict[str, torch.Tensor]] = {}
    filling: dict[str, dict[str, torch.Tensor]] = {}
    done: set[int] = set()
    for key, tensor in tensors:
        if key in copies:
            continue  # stored once, under the name it is tied to
        unit = unit_of.get(key)
        if unit is None:
            raise RuntimeError(f"export: {key} is not a weight of {type(model).__name__}")
        got = arriving.setdefault(unit, {})
        if unit in done or key in got:
            raise RuntimeError(f"export: {key} arrived twice")
        got[key] = tensor
        if len(got) < len(layout.units[unit]):
            continue
        done.add(unit)
        written = arriving.pop(unit)
        for name, value in (convert(written) if convert else written).items():
            value = value[0] if isinstance(value, list) else value
            shard = layout.shard_of[name]
            if tuple(value.shape) != layout.shapes[name]:
                raise RuntimeError(
                    f"export: {name} has shape {tuple(value.shape)}, the model's is {layout.shapes[name]}"
                )
            value = value.detach().to("cpu", dtype=dtype if value.is_floating_point() else value.dtype)
            filling.setdefault(shard, {})[name] = value.contiguous()
            if len(filling[shard]) == layout.shard_sizes[shard]:
                save_file(filling.pop(shard), out / shard, metadata={"format": "pt"})
        del written
    if arriving or filling or len(done) < len(layout.units):
        missing = [
            k for i, unit in enumerate(layout.units) if i not in done for k in unit if k not in arriving.get(i, {})
        ]
        raise RuntimeError(f"export: the weights do not match {type(model).__name__}: missing {missing}")
    if len(layout.shard_sizes) > 1:
        index = {
            "metadata": {"total_parameters": model.num_parameters(), "total_size": layout.total_size},
            "weight_map": dict(sorted(layout.shard_of.items())),
        }
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_hf_model(
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: PretrainedConfig,
    tokenizer,
    out_dir: Path,
    dtype: torch.dtype,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
) -> Path:
    """A directory ``AutoModelForCausalLM.from_pretrained`` loads, from ``(state-dict key, tensor)`` pairs in any
    order of decoder layers: safetensors shards of at most ``max_shard_size`` (``model.safetensors`` alone when one
    is enough, else ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``), config, tokenizer
    and generation config. Floating-point weights are written in ``dtype``; a tied weight is stored once, as
    ``save_pretrained`` does. The directory is assembled in ``OUT.tmp`` (what an interrupted export left there is
    removed first) and moved to ``out_dir`` once complete."""
    out_dir = Path(out_dir)
    max_bytes = parse_size(max_shard_size)
    config = config.__class__.from_dict(config.to_dict())
    config.use_cache = True
    model: Any = weights_layout_model(config, dtype)
    convert = _weight_conversion(model)
    layout = _plan(model, dtype, max_bytes, convert)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        log.info("removing %s, left by an export that did not finish", tmp)
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_weights(tensors, model, dtype, layout, tmp, convert)
        # what save_pretrained records about the weights it writes
        model.config.dtype = str(dtype).removeprefix("torch.")
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            GenerationConfig.from_model_config(config).save_pretrained(tmp)
        except ValueError as e:
            log.warning("export: no generation config written: %s", e)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _move_into_place(tmp, out_dir)
    return out_dir


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """``tmp`` becomes ``out_dir``. Into a directory that already holds files, the model's files move one by one:
    its config.json (what marks a model directory) goes first and comes back last, and the weights of an earlier
    model there are removed, so the directory never mixes two models' shards."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    (out_dir / "config.json").unlink(missing_ok=True)
    for old in out_dir.iterdir():
        if _SHARD_NAME.match(old.name) and old.is_file():
            old.unlink()
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
        os.replace(f, out_dir / f.name)
    tmp.rmdir()


def export_problem(checkpoint: Path, out_dir: Path | None = None) -> str | None:
    """Why ``checkpoint`` cannot be exported (to ``out_dir``), naming the path and what to pass instead; None when
    it can."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        what = "not a directory" if checkpoint.exists() else "no such directory"
        return f"{checkpoint}: {what}; pass a checkpoint folder, e.g. runs/NAME/checkpoints/step-N"
    if not (checkpoint / "trainer_state.json").is_file():
        return f"{checkpoint}: {_instead_of(checkpoint)}"
    problem = verify(checkpoint)
    if problem is not None:
        return f"{checkpoint}: cannot be exported: {problem}"
    engine = json.loads((checkpoint / "trainer_state.json").read_text()).get("engine")
    if engine not in PLANS:
        return f"{checkpoint / 'trainer_state.json'}: unknown engine {engine!r} (known: {', '.join(PLANS)})"
    if out_dir is not None:
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            return f"{out}: not a directory; pass a directory for the model"
        if out.resolve().is_relative_to(checkpoint.resolve()):
            return f"{out}: inside the checkpoint {checkpoint}; pass a directory outside it"
    return None


def _instead_of(path: Path) -> str:
    """What ``path``, a directory without trainer_state.json, is, and the checkpoint to pass instead."""
    name = path.name
    if name.endswith(".tmp") and STEP_RE.match(name.removesuffix(".tmp")):
        newest = newest_verified(path.parent.parent)
        instead = f"pass a complete one: the newest is {newest}" if newest else "the run has no complete checkpoint"
        return f"an unfinished checkpoint (its save did not complete); {instead}"
    if name == "checkpoints" and (newest := newest_verified(path.parent)) is not None:
        return f"holds a run's checkpoints; pass one of them, the newest is {newest}"
    if (newest := newest_verified(path)) is not None:
        return f"a run's output_dir, not a checkpoint; pass its newest checkpoint {newest}"
    if (path / "final" / "config.json").is_file():
        return f"a run's output_dir without a complete checkpoint; its final model {path / 'final'} needs no export"
    if (path / "config.json").is_file():
        return "already a Hugging Face model (config.json, no trainer_state.json); it needs no export"
    return "no trainer_state.json, so not a checkpoint; pass a checkpoint folder, e.g. runs/NAME/checkpoints/step-N"


def export(checkpoint: Path, out_dir: Path, max_shard_size: str | int = DEFAULT_SHARD_SIZE) -> Path:
    """A consolidated Hugging Face model from a checkpoint, in one process, without a process group, read and
    written one decoder layer at a time (memory: one safetensors shard of at most ``max_shard_size`` plus one
    layer). Raises ValueError, naming the path, when ``checkpoint`` is not a complete checkpoint (see
    :func:`export_problem`)."""
    from transformers import AutoConfig, AutoTokenizer

    checkpoint = Path(checkpoint)
    problem = export_problem(checkpoint, out_dir)
    if problem is not None:
        raise ValueError(problem)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    config = AutoConfig.from_pretrained(checkpoint / "hf")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "hf")
    dtype = getattr(torch, state.get("dtype", "float32"))
    tensors = plan_for(state["engine"]).export_tensors(checkpoint, config)
    return write_hf_model(tensors, config, tokenizer, out_dir, dtype, max_shard_size=max_shard_size)
