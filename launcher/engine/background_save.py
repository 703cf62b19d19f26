"""FSDP2 checkpoints written while training goes on (``train.async_save``), through
``torch.distributed.checkpoint.async_save``.

A save copies this rank's shards of the model and optimizer state into host memory (pinned on a GPU; the stager
is :func:`launcher.compat.async_checkpoint_stager`) and a thread writes the copy to the checkpoint directory. Only
the copy has to finish before the state changes: where the stager copies in a thread of its own, the optimizer's
step pre-hook waits for it, so the forward and backward of the next step overlap it. The write's collectives
(planning, the metadata) run in the writing thread on a process group of their own: on the training's group they
would interleave with the training's collectives in a different order on each rank.
"""

from __future__ import annotations

import concurrent.futures
import time
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ..compat import async_checkpoint_stager
from ..files import os_error_in
from .base import SaveHandle


def hidden_os_error(error: BaseException, writer: Any) -> OSError | None:
    """The OS error a failed write of ``writer`` (:func:`launcher.compat.dcp_writer_naming_os_errors`) ran into, when
    ``error`` does not carry it: torch.save reports a write the storage refused as "unexpected pos". None when
    ``error`` names it already, or there is none."""
    failure = writer.failure()
    return None if failure is None or os_error_in(error) is not None else failure


class BackgroundSave(SaveHandle):
    """One save in the background: the copy of the state (``staged``), then the write (``written``)."""

    def __init__(self, staged: Future | None, written: Future, writer: Any):
        self._start = time.perf_counter()
        self._staged = staged
        self._written = written
        self._writer = writer
        self._stalled = 0.0
        self._written_s: float | None = None
        written.add_done_callback(self._note_end)

    def _note_end(self, _: Future) -> None:
        self._written_s = time.perf_counter() - self._start

    def wait_for_copy(self) -> None:
        """Block until the state is copied (its failure, if any, surfaces from :meth:`wait`)."""
        if self._staged is not None and not self._staged.done():
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
        return self._stalled

    def written_s(self) -> float | None:
        return self._written_s


class BackgroundSaves:
    """The background saves of one engine: their process group, their stager, and the wait before each optimizer
    step for the copy of the save in flight. Made at the engine's first background save, on every rank (it creates a
    process group, a collective)."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.device = device
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.stager = async_checkpoint_stager(device)
        self.copying: BackgroundSave | None = None
        optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # The step changes the parameters and moments in place: the copy of the save in flight must be complete.
        if self.copying is not None:
            self.copying.wait_for_copy()
            self.copying = None

    def start(self, state: dict[str, Any], writer: Any) -> BackgroundSave:
        """Copy ``state`` and write it through ``writer`` in the background. Collective."""
        if self.device.type == "cuda":
            # The stager may copy on a stream of its own, which does not wait for this one: the last optimizer
            # step's kernels must have finished writing the state it reads.
            torch.cuda.current_stream(self.device).synchronize()
        response = dcp.async_save(state, storage_writer=writer, process_group=self.group, async_stager=self.stager)
        # A stager that copies in a thread of its own gives the copy's future beside the write's.
        if isinstance(response, Future):
            staged, written = None, response
        else:
            staged, written = response.staging_completion, response.upload_completion
        save = BackgroundSave(staged, written, writer)
        self.copying = save
        return save
