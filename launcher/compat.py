"""Every use of another library's private API, in one place, each checked against the versions it was written for.

Where a public API serves, the rest of the package uses it. What remains here has none: each function names the
private symbol it reaches for and the versions it was tested with. On a version outside that range it still
tries, and says once in the log that the behaviour is unverified there; where the symbol is gone it fails with
a message that names it, instead of an AttributeError from deep inside a run.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import re
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

TESTED = {
    "torch": ("2.11", "2.13"),
    "datasets": ("5.2", "5.2"),
    "transformers": ("5.17", "5.24"),
    "deepspeed": ("0.19", "0.19"),
    "torchao": ("0.18", "0.18"),
}
"""Inclusive (oldest, newest) major.minor of each library the private uses below were checked with."""

_warned: set[str] = set()


def _minor(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check_version(library: str, version: str, what: str) -> bool:
    """Whether ``version`` of ``library`` is within the tested range for the private ``what``; warns once if not."""
    low, high = TESTED[library]
    ok = _minor(low) <= _minor(version) <= _minor(high)
    if not ok and what not in _warned:
        _warned.add(what)
        log.warning(
            "%s %s is outside the versions %s-%s that %s was checked with; it may behave differently",
            library, version, low, high, what,
        )  # fmt: skip
    return ok


def _require(owner: Any, name: str, what: str) -> Any:
    value = getattr(owner, name, None)
    if value is None:
        raise RuntimeError(f"{what} is not in this version of the library; this launcher needs an update for it")
    return value


def set_collective_timeout(timeout: datetime.timedelta) -> None:
    """How long every collective waits for its peers from now on: the world group's (``c10d._set_pg_timeout``)
    and the default of every group created later (DeepSpeed's and FSDP's own groups would otherwise get torch's
    30 or 10 minutes). torch offers the timeout only when a group is created; the world group is created with a
    short one for the world check (a dead node fails in minutes) and raised here once the world is known."""
    import torch
    import torch.distributed as dist

    what = "torch.distributed.distributed_c10d._set_pg_timeout"
    check_version("torch", torch.__version__, what)
    c10d = dist.distributed_c10d
    _require(c10d, "_set_pg_timeout", what)(timeout)
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout


def shutdown_dataloader_workers(iterator: Any) -> None:
    """Stop the worker processes of a multi-process DataLoader iterator now (``_MultiProcessingDataLoaderIter.
    _shutdown_workers``, what its ``__del__`` calls). Our workers ignore the preemption signals, so at
    interpreter exit multiprocessing's SIGTERM would not end them and it would wait for them forever; and a
    stream that starts over must not leave its previous workers reading."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is None:
        return  # a single-process iterator has no workers
    import torch

    check_version("torch", torch.__version__, "torch.utils.data.DataLoader iterator _shutdown_workers")
    shutdown()


@contextlib.contextmanager
def no_download_count_ping() -> Iterator[None]:
    """Inside, ``datasets`` does not send the hub its download-count ping for its built-in file builders (json,
    parquet, text): reading local files must not touch the network, and on a cluster without internet each ping
    costs a timeout. No argument of ``load_dataset`` or ``DownloadConfig`` turns it off, and datasets reads the
    environment variable ``HF_UPDATE_DOWNLOAD_COUNTS`` only at import, so its module setting is switched for the
    call and restored."""
    import datasets
    import datasets.config

    check_version("datasets", datasets.__version__, "datasets.config.HF_UPDATE_DOWNLOAD_COUNTS")
    before = _require(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", "datasets.config.HF_UPDATE_DOWNLOAD_COUNTS")
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = before


def init_module_weights(model: Any, module: Any) -> None:
    """Initialise ``module``'s own parameters by the rule of ``model``'s architecture: transformers'
    ``PreTrainedModel._init_weights(module)``, the method each architecture overrides (documented for subclasses,
    but named as private). It is what ``from_config`` applies to every module; here it is applied to one module
    at a time, so that a model too large for one process can be initialised in place."""
    import transformers

    what = "transformers PreTrainedModel._init_weights"
    check_version("transformers", transformers.__version__, what)
    _require(model, "_init_weights", what)(module)


def deepspeed_engine_config(engine: Any) -> Any:
    """The parsed config of a DeepSpeed engine (``DeepSpeedEngine._config``): DeepSpeed reads its
    ``load_universal_checkpoint`` flag when it loads a checkpoint, and offers no other way to load a universal
    checkpoint into an engine built without it."""
    import deepspeed

    what = "deepspeed DeepSpeedEngine._config.load_universal_checkpoint"
    check_version("deepspeed", deepspeed.__version__, what)
    config = _require(engine, "_config", what)
    _require(config, "load_universal_checkpoint", what)
    return config


class _WriteRecorder:
    """A file that remembers the OS error of a failed write, flush or tell (a buffered file writes when it flushes).
    torch.save writes through C++, which turns that error into "unexpected pos N vs M" and drops it: a full disk or
    quota would not be named."""

    def __init__(self, stream: Any, owner: Any, path: Any):
        self._stream = stream
        self._owner = owner
        self._path = path

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._stream, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return value(*args, **kwargs)
            except OSError as e:
                if self._owner.failure is None:
                    from .files import named_os_error

                    self._owner.failure = named_os_error(e, self._path)
                raise

        return call


def dcp_writer_naming_os_errors(path: str) -> Any:
    """torch.distributed.checkpoint's ``FileSystemWriter`` for ``path``, with a ``failure()`` method that returns the
    first OS error of a write (None if none): its private ``fs`` (the ``FileSystem`` its streams come from, torch
    2.11 to 2.13) is replaced, for this writer only, by one whose streams record it."""
    import torch
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem

    check_version("torch", torch.__version__, "FileSystemWriter.fs")

    class RecordingFileSystem(FileSystem):
        failure: OSError | None = None

        @contextlib.contextmanager
        def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
            with super().create_stream(path, mode) as stream:
                yield _WriteRecorder(stream, self, path) if "w" in mode or "a" in mode else stream

    class Writer(FileSystemWriter):
        def __init__(self, path: str):
            super().__init__(path)
            _require(self, "fs", "torch.distributed.checkpoint.FileSystemWriter.fs")
            self.fs = RecordingFileSystem()

        def failure(self) -> OSError | None:
            return self.fs.failure

    return Writer(path)


def dtensor_around(like: Any, local: Any) -> Any:
    """A DTensor with the mesh, placements, global shape and strides of the DTensor ``like`` around the tensor
    ``local`` (this rank's shard), which may be on another device than the mesh's, without copying: what
    ``DTensor.to("cpu")`` gives, for a shard already copied into memory of one's own. ``DTensor.from_local`` would
    move ``local`` to the mesh's device. Through the private constructor ``DTensor(local, spec, requires_grad=...)``
    that ``to`` uses (checked with torch 2.11 and 2.13)."""
    import torch
    from torch.distributed.tensor import DTensor

    check_version("torch", torch.__version__, "DTensor(local_tensor, spec, requires_grad)")
    return DTensor(local, like._spec, requires_grad=False)


def attention_implementation(model: Any) -> str | None:
    """The attention implementation a transformers model runs (``config._attn_implementation``, which
    ``set_attn_implementation`` sets and no public getter reads back)."""
    return getattr(model.config, "_attn_implementation", None)


def step_unless_nonfinite(optimizer: Any, norm: Any) -> None:
    """``optimizer.step()`` for a fused torch optimizer (``fused=True``), dropped by the optimizer's own kernel when
    the gradient norm ``norm`` (a 0-dimensional tensor on the parameters' device) is not finite: parameters, moments
    and step counts stay as they were. The host decides nothing, so it queues the update without waiting for the
    backward pass to end.

    The flag is the ``found_inf`` attribute torch's ``GradScaler`` sets on a fused optimizer for one step (read by
    ``Adam.step`` / ``AdamW.step`` through ``getattr`` since torch 2.0's fused Adam; checked with torch 2.13 on CPU,
    on plain and FSDP2 DTensor parameters)."""
    import torch

    check_version("torch", torch.__version__, "a fused optimizer's found_inf flag")
    if not optimizer.defaults.get("fused"):
        raise ValueError("step_unless_nonfinite needs an optimizer made with fused=True")
    optimizer.found_inf = (~torch.isfinite(norm)).to(torch.float32)
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def float8_gainful_layer(mode: str) -> Any:
    """torchao's own test of whether float8 makes a linear layer faster, ``(module, name) -> bool``: False for a
    layer whose (output, input) dimensions are below the thresholds torchao measured on H100 for ``mode``
    (``torchao.float8._auto_filter_for_recipe``; rowwise: output <= 2048, or input <= 1024, or both <= 4096 and
    2048; tensorwise: input <= 4096 and output <= 1024). Checked with torchao 0.18."""
    import torchao
    import torchao.float8 as float8

    check_version("torchao", torchao.__version__, "torchao's float8 layer-size filter")
    auto = _require(float8, "_auto_filter_for_recipe", "torchao.float8._auto_filter_for_recipe")
    return auto(mode, [])
