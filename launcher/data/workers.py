"""What runs inside a rank's DataLoader workers: the readers' batches of one worker (:class:`RankShare`), how the
workers treat signals and the tokenizer's threads, and how they are stopped at exit."""

from __future__ import annotations

import atexit
import os
import signal
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from launcher.compat import shutdown_dataloader_workers
from launcher.config import SourceConfig
from launcher.data.mixture import Mixture
from launcher.data.packing import document_position_ids
from launcher.data.readers import OpenedSource
from launcher.data.sources import DataError, describe_failure
from launcher.data.spec import StreamSpec

PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
"""Signals DataLoader workers ignore: the trainer acts on them. A worker still stops when its trainer does."""

RUNNING_LOADERS: weakref.WeakSet[Any] = weakref.WeakSet()
"""DataLoader iterators whose worker processes may still run."""


def stop_workers(iterator: Any) -> None:
    """Stop the workers of ``iterator`` once; an iterator without workers, or stopped before, is left alone (a
    generator finalised at interpreter exit may get here after the exit hook, when imports no longer work)."""
    if iterator in RUNNING_LOADERS:
        RUNNING_LOADERS.discard(iterator)
        shutdown_dataloader_workers(iterator)


def _stop_running_workers() -> None:
    """At interpreter exit, stop the workers of the DataLoader iterators still alive. multiprocessing would end
    them with SIGTERM, which they ignore, and then wait for them forever. Registered after the DataLoader's own
    exit hook, so it runs before it, while the DataLoader can still shut its workers down."""
    for iterator in list(RUNNING_LOADERS):
        stop_workers(iterator)


atexit.register(_stop_running_workers)


def init_worker(worker_id: int) -> None:
    """Workers ignore the preemption signals: schedulers send them to every process of a job (Slurm) or of a
    process group, and a worker that exits on one makes its rank fail before it can checkpoint.

    Workers tokenize serially: the Rust thread pool of ``tokenizers`` can deadlock after a fork. (Where the
    parent already used the pool, ``tokenizers`` itself turns parallelism off in the child; setting it here
    also covers a parent that did not, and silences the warning.)"""
    for name in PREEMPTION_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        import fsspec.asyn

        fsspec.asyn.reset_lock()  # an fsspec event loop inherited from the parent would hang remote reads
    except (ImportError, AttributeError):
        pass


def source_paths(sources: list[SourceConfig]) -> str:
    return ", ".join(s.path for s in sources)


class RankShare(IterableDataset):
    """This rank's training batches as produced inside one DataLoader worker (or the caller, with no workers).

    Yields dicts: a batch (``input_ids``, ``labels``, optionally ``position_ids``) with ``source_tokens`` (tokens
    of each source in it), ``worker`` and ``state`` (the reader's state after it); a placeholder
    (``{"placeholder": True}``) that keeps the DataLoader's round-robin aligned after a resume; or
    ``{"error": message}`` as its last item, so the caller can raise a clean DataError.

    ``start_batches`` batches were consumed before; each worker continues from its saved state in ``states``, or,
    with ``replay``, produces the batches before the position again and drops them.
    """

    def __init__(
        self, sources: list[OpenedSource], spec: StreamSpec, tokenizer: Any, *, start_batches: int,
        states: list[dict[str, Any] | None], replay: bool,
    ):  # fmt: skip
        super().__init__()
        self.sources = sources
        self.spec = spec
        self.tokenizer = tokenizer
        self.start_batches = start_batches
        self.states = states
        self.replay = replay

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            yield from self._batches(worker, num_workers)
        except DataError as e:
            yield {"error": str(e)}
        except Exception as e:
            yield {"error": describe_failure([s.resolved for s in self.sources], e)}

    def _what(self, worker: int, num_workers: int) -> str:
        where = f"rank {self.spec.rank} of {self.spec.world_size}"
        if num_workers > 1:
            where += f", DataLoader worker {worker} of {num_workers}"
        return f"training data {source_paths([s.config for s in self.sources])} ({where})"

    def _batches(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        spec = self.spec
        done = self.start_batches
        if worker < done % num_workers:
            # The DataLoader always asks worker 0 first, but batch `done` belongs to worker done % num_workers.
            yield {"placeholder": True}
        mixture = Mixture(
            self.sources, spec, self.tokenizer, reader=spec.rank * num_workers + worker,
            num_readers=spec.world_size * num_workers, what=self._what(worker, num_workers),
        )  # fmt: skip
        skip = len(range(worker, done, num_workers)) if self.replay else 0
        saved = None if self.replay else self.states[worker]
        if saved is not None:
            mixture.restore(saved)
        for ids, counts, step in mixture.batches_forever():
            if skip:
                skip -= 1
                continue
            # numpy builds the tensor from a list of ints several times faster than torch.tensor does.
            input_ids = torch.from_numpy(np.array(ids, dtype=np.int64)).view(spec.micro_batch_size, spec.seq_len)
            batch: dict[str, Any] = {"input_ids": input_ids, "labels": input_ids.clone()}
            if spec.document_masking:
                batch["position_ids"] = document_position_ids(input_ids, spec.eos_id)
            batch.update(source_tokens=counts, worker=worker, state=mixture.state(), step=step)
            yield batch
