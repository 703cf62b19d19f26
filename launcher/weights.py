"""Model weights filled in place, one tensor at a time: from a Hugging Face safetensors checkpoint, every rank
reading only the elements it owns, or from a deterministic random initialisation.

Both engines build the model without weights (FSDP2 on the meta device, ZeRO-3 partitioned under
``deepspeed.zero.Init``) and then fill each rank's share from here, so no process ever holds the whole model:

- :func:`read_rows` and :func:`read_flat` read a slice of one tensor of a lazily opened safetensors file (the
  file is memory-mapped; only the pages of the slice are read), converted to the training dtype slice by slice.
- :func:`init_tensors` gives the random initialisation of a model one module at a time: each module is
  materialised alone, seeded from ``train.seed`` and its own name, and initialised by the model's own
  ``_init_weights`` (transformers' rule for that architecture). The weights therefore depend on the seed alone --
  the same on any world size and under either engine -- but not on the order modules are visited. They are not
  the draws of ``AutoModelForCausalLM.from_config`` (which seeds once for the whole model), and a GPU's random
  generator draws other numbers than the CPU's for the same seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compat import init_module_weights
from .files import is_hub_id
from .model import tied_copies

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class WeightsError(ValueError):
    """A checkpoint's weights cannot be loaded into the model: the message names the file or tensor."""


def local_model_dir(name_or_path: str) -> Path:
    """The directory of ``model.name_or_path``: itself, or the local snapshot of a hub model (downloading the
    config and safetensors files that are not cached yet; the recipe check has made sure the hub can be asked)."""
    if not is_hub_id(name_or_path) or Path(name_or_path).exists():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    # Only transformers' own files: some repositories also ship the weights again in another layout
    # (consolidated.safetensors, original/), which would double the download.
    return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "model*.safetensors"]))


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index or the single file. Raises WeightsError
    naming the directory or the shard when there are no safetensors or the index lists a shard that is missing."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a safetensors index ({e})") from None
        files = {name: model_dir / file for name, file in weight_map.items()}
        missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if missing:
            raise WeightsError(
                f"{index} lists {len(missing)} shard(s) that are not in {model_dir}: {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else "")
                + "; the download is incomplete: download the model again"
            )
        return files
    single = model_dir / SINGLE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118
    others = sorted(p.name for p in model_dir.glob("*.bin")) if model_dir.is_dir() else []
    found = f" (it has {', '.join(others[:3])}: PyTorch pickles, which every rank would load whole)" if others else ""
    raise WeightsError(
        f"{model_dir}: no safetensors weights ({SINGLE} or {INDEX}){found}. Convert the model once with "
        "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(out)` (safetensors is its default) and pass "
        "that directory."
    )


_BYTES = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str
    """As safetensors names it: BF16, F32, ..."""
    file: Path

    @property
    def element_size(self) -> int:
        return _BYTES.get(self.dtype, 1)


def read_headers(files: dict[str, Path]) -> dict[str, TensorInfo]:
    """Shape and dtype of every tensor, from the safetensors headers alone (no tensor data is read)."""
    from safetensors import safe_open

    out: dict[str, TensorInfo] = {}
    for file in sorted(set(files.values())):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118
                    s = f.get_slice(name)
                    out[name] = TensorInfo(tuple(s.get_shape()), str(s.get_dtype()), file)
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise WeightsError(f"{file}: cannot read the safetensors header ({type(e).__name__}: {e})") from None
    return out


def checkpoint_bytes(model_dir: Path) -> int | None:
    """Bytes of the tensors of a local safetensors checkpoint, from its headers; None when there is none here."""
    try:
        headers = read_headers(weight_files(model_dir))
    except WeightsError:
        return None
    return sum(math.prod(t.shape) * t.element_size for t in headers.values())


def expected_tensors(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(name -> shape of every tensor a checkpoint must hold for ``model``, names it may omit: the second names
    of tied weights, and persistent buffers, which models recompute). ``model`` may live on the meta device."""
    optional = tied_copies(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False) if n not in optional}
    state = model.state_dict(keep_vars=True)
    for name, b in model.named_buffers():
        if name in state:
            shapes.setdefault(name, tuple(b.shape))
            optional.add(name)
    return shapes, optional


def check_weights(model_dir: Path, model: nn.Module) -> dict[str, TensorInfo]:
    """The checkpoint's tensors, after checking that they are the ones ``model`` needs with the shapes its config
    gives. Raises WeightsError naming the tensors and the file."""
    files = weight_files(model_dir)
    headers = read_headers(files)
    shapes, optional = expected_tensors(model)
    missing = [n for n in shapes if n not in headers and n not in optional]
    if missing:
        raise WeightsError(
            f"{model_dir}: the checkpoint lacks {len(missing)} tensor(s) of {type(model).__name__}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (it has {len(headers)} tensors; is it "
            "a checkpoint of this architecture, or saved with other tensor names?)"
        )
    wrong = [
        f"{n}: {list(headers[n].shape)} in {headers[n].file.name}, the config gives {list(shape)}"
        for n, shape in shapes.items()
        if n in headers and headers[n].shape != shape
    ]
    if wrong:
        raise WeightsError(
            f"{model_dir}: tensor shapes do not match the model config: {'; '.join(wrong[:3])}"
            + (f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else "")
        )
    unused = [n for n in headers if n not in shapes]
    if unused:
        log.info("%s: %d tensor(s) the model does not use are ignored (e.g. %s)", model_dir, len(unused), unused[0])
    return headers


class LazyWeights:
    """The checkpoint's safetensors files, opened lazily (memory-mapped) and kept open while in use."""

    def __init__(self, headers: dict[str, TensorInfo]):
        self.headers = headers
        self._stack = ExitStack()
        self._open: dict[Path, Any] = {}

    def __enter__(self) -> LazyWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._open.clear()

    def _file(self, name: str) -> Any:
        from safetensors import safe_open

        path = self.headers[name].file
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (along the first dimension) of tensor ``name``."""
        f = self._file(name)
        if not self.headers[name].shape:
            return f.get_tensor(name)
        return f.get_slice(name)[start:stop]

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of tensor ``name`` flattened (what a ZeRO-3 partition holds): the rows that
        cover them are read, nothing more."""
        shape = self.headers[name].shape
        if not shape:
            return self._file(name).get_tensor(name).reshape(-1)[start:stop]
        return flat_from_rows(lambda a, b: self.read_rows(name, a, b), math.prod(shape[1:]), start, stop)


def flat_from_rows(read_rows: Callable[[int, int], torch.Tensor], row: int, start: int, stop: int) -> torch.Tensor:
    """Elements ``start:stop`` of a matrix flattened, from ``read_rows(first, last)`` of the rows that cover them
    (``row`` elements each)."""
    first, last = start // row, -(-stop // row)
    rows = read_rows(first, last).reshape(-1)
    return rows[start - first * row : stop - first * row]


def _module_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"cpt-init/{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def init_tensors(
    model: nn.Module, seed: int, device: torch.device, wanted: set[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full initial value) of every parameter of ``model`` (a throwaway copy built on the meta device), one
    module at a time on ``device``: each module's own parameters are materialised, seeded by (``seed``, the
    module's name), initialised by the model's ``_init_weights`` and handed out, then dropped again. Only names in
    ``wanted`` are made (default: all). Raises WeightsError for a parameter the model's own rule leaves unset."""
    devices = [device] if device.type == "cuda" else []
    for mname, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False)]
        names = [f"{mname}.{n}" if mname else n for n, _ in own]
        if not own or (wanted is not None and not any(n in wanted for n in names)):
            continue
        module.to_empty(device=device, recurse=False)
        with torch.no_grad():
            for p in module.parameters(recurse=False):
                p.fill_(float("nan"))
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_module_seed(seed, mname))
            init_module_weights(model, module)
        for full_name, (_, p) in zip(names, module.named_parameters(recurse=False)):
            if wanted is not None and full_name not in wanted:
                continue
            if p.is_floating_point() and bool(torch.isnan(p).any()):
                raise WeightsError(
                    f"cannot initialise {full_name} ({type(module).__name__}): the model's _init_weights leaves "
                    "it unset; start from pretrained weights (model.name_or_path) instead of model.from_config"
                )
            yield full_name, p.detach()
        module.to_empty(device="meta", recurse=False)
