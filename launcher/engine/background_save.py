"""FSDP2 checkpoints written while training goes on (``train.async_save``), through
``torch.distributed.checkpoint.async_save``.

A save copies this rank's shards of the model and optimizer state into a host copy kept for the run
(:class:`HostStager`: allocated once, in a thread after the first optimizer step, page-locked on a GPU), and a thread
writes that copy to the checkpoint directory. Only the copy has to finish before the state changes: on a GPU it runs
on a stream of its own and the training stream waits for it before the next optimizer step (the host does not), so
the forward and backward of the next step overlap it. The write's collectives (planning, the metadata) run in the
writing thread on a process group of their own: on the training's group they would interleave with the training's
collectives in a different order on each rank.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

from ..compat import dtensor_around
from ..files import os_error_in
from .base import SaveHandle

if TYPE_CHECKING:
    from ..config import Recipe

log = logging.getLogger(__name__)


def background_saves(recipe: Recipe, device_type: str) -> bool:
    """Whether a run on ``device_type`` writes its ``save_every`` checkpoints in the background: ``train.async_save``,
    whose ``auto`` means FSDP2 on GPUs without CPU offload (offloaded shards live in host memory already: a copy
    would double them there). Never in a run without ``save_every``: it would keep a host copy of the state for
    nothing, and making it takes time from the training steps beside it (10 s for the 1.1B shape on an H200)."""
    setting = recipe.train.async_save
    if not recipe.train.save_every:
        return False
    if setting != "auto":
        return bool(setting)
    return recipe.parallel.engine == "fsdp" and device_type == "cuda" and not recipe.parallel.fsdp.cpu_offload


PIN_BY_REGISTER = 1 << 20
"""Host tensors of this many bytes or more are page-locked in place (``cudaHostRegister``), smaller ones come from
torch's pinned-memory allocator, which rounds each allocation up to a power of two (a 3B model's state would take
about 40% more host memory that way)."""


def _map_tensors(state: Any, fn: Callable[[tuple, torch.Tensor], Any], path: tuple = ()) -> Any:
    """``state`` (a state dict) with each tensor replaced by ``fn(path, tensor)`` and the rest copied."""
    if isinstance(state, torch.Tensor):
        return fn(path, state)
    if isinstance(state, dict):
        return {k: _map_tensors(v, fn, (*path, k)) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_map_tensors(v, fn, (*path, i)) for i, v in enumerate(state))
    return copy.deepcopy(state)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _page_locked(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    size = t.numel() * t.element_size()
    if size < PIN_BY_REGISTER:
        return t.pin_memory()
    # Pages written first, by torch's own threads: cudaHostRegister of untouched memory faults every page in while
    # it holds up the training thread (3B shape on an H200: 37.4 GiB in 18.7 s, and the step beside it 18.5 s).
    t.zero_()
    cudart = torch.cuda.cudart()
    error = int(cudart.cudaHostRegister(t.data_ptr(), size, 1))  # 1: cudaHostRegisterPortable, for every device
    if error != 0:
        raise RuntimeError(f"train.async_save: page-locking {size / 2**30:.2f} GiB of host memory for the checkpoint "
                           f"copy failed (CUDA error {error}); set train.async_save: false")  # fmt: skip
    weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
    return t


def _copied(event: torch.cuda.Event, staged: Any) -> Any:
    event.synchronize()
    return staged


class HostStager(AsyncStager):
    """The stager of one run's background saves (``dcp.async_save``'s ``async_stager``): each save's tensors are
    copied into a host copy of this rank's state that is allocated once and kept for the run, page-locked on a GPU.

    On a GPU the copies are queued on a stream of their own, after the work already queued on the training stream,
    and :meth:`stage` returns at once: ``copied`` is the event that marks their end, which the write waits for in its
    own thread and the training stream before the next optimizer step. :meth:`reserve` allocates the host copy in a
    thread while training goes on, so that a save neither allocates nor page-locks memory (torch 2.11's stagers pin
    their copy at the first save, in the training thread: 72 s for the 3B shape on an H200, and its ``DefaultStager``
    cannot be reused, pytorch/pytorch#183413). Without a GPU the copies are made in :meth:`stage`."""

    _synchronize_after_execute = False

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.copied: torch.cuda.Event | None = None
        """The end of the last save's copies on the GPU (None without one)."""
        self._host: dict[tuple, torch.Tensor] = {}
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-copy")
        self._reserving: Future | None = None

    def reserve(self, state: Any) -> None:
        """Allocate the host copy of ``state``'s tensors in a thread (shapes and dtypes only; nothing is copied)."""
        specs: list[tuple[tuple, torch.Size, torch.dtype]] = []
        _map_tensors(state, lambda path, t: specs.append((path, _local(t).shape, _local(t).dtype)))
        self._reserving = self._thread.submit(self._reserve, specs)

    def _reserve(self, specs: list[tuple[tuple, torch.Size, torch.dtype]]) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)
        start = time.perf_counter()
        size = sum(self._buffer(path, shape, dtype).nbytes for path, shape, dtype in specs)
        log.info("host copy for background checkpoints: %.2f GiB%s, made in %.1f s", size / 2**30,
                 " page-locked" if self.cuda else "", time.perf_counter() - start)  # fmt: skip

    def _buffer(self, path: tuple, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        t = self._host.get(path)
        if t is None or t.shape != shape or t.dtype != dtype:
            t = self._host[path] = _page_locked(shape, dtype) if self.cuda else torch.empty(shape, dtype=dtype)
        return t

    def _mirror(self, state: Any, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        """``state`` with each tensor replaced by its host copy (a DTensor's shard by the host copy of the shard);
        ``pairs`` gets each (host copy, tensor) to copy."""

        def host(path: tuple, t: torch.Tensor) -> torch.Tensor:
            local = _local(t)
            buffer = self._buffer(path, local.shape, local.dtype)
            pairs.append((buffer, local))
            return dtensor_around(t, buffer) if isinstance(t, DTensor) else buffer

        return _map_tensors(state, host)

    @torch.no_grad()
    def stage(self, state_dict: Any) -> Future:
        if self._reserving is not None:  # a save before the host copy is made waits for it
            self._reserving.result()
            self._reserving = None
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        staged = self._mirror(state_dict, pairs)
        if self.stream is None:
            for host, source in pairs:
                host.copy_(source)
            done: Future = Future()
            done.set_result(staged)
            return done
        # after what the training stream has queued (the last optimizer step), without the host waiting for it
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for host, source in pairs:
                host.copy_(source, non_blocking=True)
                if source.is_cuda:
                    source.record_stream(self.stream)  # the memory is not reused before the copy has read it
        self.copied = torch.cuda.Event()
        self.copied.record(self.stream)
        return self._thread.submit(_copied, self.copied, staged)

    def synchronize_staging(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def hidden_os_error(error: BaseException, writer: Any) -> OSError | None:
    """The OS error a failed write of ``writer`` (:func:`launcher.compat.dcp_writer_naming_os_errors`) ran into, when
    ``error`` does not carry it: torch.save reports a write the storage refused as "unexpected pos". None when
    ``error`` names it already, or there is none."""
    failure = writer.failure()
    return None if failure is None or os_error_in(error) is not None else failure


class BackgroundSave(SaveHandle):
    """One save in the background: the copy of the state (``staged``; on a GPU its end is the event ``copied``), then
    the write (``written``)."""

    def __init__(self, staged: Future, written: Future, writer: Any, copied: torch.cuda.Event | None):
        self._start = time.perf_counter()
        self._staged = staged
        self._copied = copied
        self._written = written
        self._writer = writer
        self._stalled = 0.0
        self._written_s: float | None = None
        written.add_done_callback(self._note_end)

    def _note_end(self, _: Future) -> None:
        self._written_s = time.perf_counter() - self._start

    def wait_for_copy(self) -> None:
        """Before the state changes: on a GPU the training stream waits for the end of the copy (the host does not);
        without one the host waits for it (its failure, if any, surfaces from :meth:`wait`)."""
        if self._copied is not None:
            torch.cuda.current_stream().wait_event(self._copied)
        elif not self._staged.done():
            start = time.perf_counter()
            concurrent.futures.wait([self._staged])
            self._stalled += time.perf_counter() - start

    def done(self) -> bool:
        return self._written.done()

    def wait(self) -> None:
        try:
            self._written.result()
        except (Exception, CheckpointException) as e:  # (not an Exception)
            cause = hidden_os_error(e, self._writer)
            if cause is None:
                raise
            raise cause from e

    def stalled_s(self) -> float:
        """Seconds the host waited for the copy (a GPU's wait shows in the step's time instead)."""
        return self._stalled

    def written_s(self) -> float | None:
        return self._written_s


class BackgroundSaves:
    """The background saves of one engine: their process group, their stager, the host copy reserved after the first
    optimizer step (``state`` gives the state dict a save writes), and the wait before each optimizer step for the
    copy of the save in flight. Made on every rank (it creates a process group, a collective)."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, state: Callable[[], dict[str, Any]]):
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.stager = HostStager(device)
        self.copying: BackgroundSave | None = None
        optimizer.register_step_pre_hook(self._before_step)
        # the optimizer's states exist from its first step on
        self._reserve = optimizer.register_step_post_hook(lambda *_: self._after_first_step(state))

    def _after_first_step(self, state: Callable[[], dict[str, Any]]) -> None:
        self._reserve.remove()
        self.stager.reserve(state())

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # The step changes the parameters and moments in place: the copy of the save in flight must be complete.
        if self.copying is not None:
            self.copying.wait_for_copy()
            self.copying = None

    def start(self, state: dict[str, Any], writer: Any) -> BackgroundSave:
        """Copy ``state`` and write it through ``writer`` in the background. Collective."""
        response = dcp.async_save(state, storage_writer=writer, process_group=self.group, async_stager=self.stager)
        # the stager's stage() gives a future, so async_save answers with the copy's and the write's
        assert not isinstance(response, Future), "async_save did not take the staging future"
        save = BackgroundSave(response.staging_completion, response.upload_completion, writer, self.stager.copied)
        self.copying = save
        return save
