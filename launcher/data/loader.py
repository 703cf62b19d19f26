"""Per-rank training batches and per-rank eval blocks.

Training: the sources are mixed, split across ranks with ``datasets.distributed.split_dataset_by_node`` and
then across this rank's DataLoader workers, so no document is tokenized twice; each worker tokenizes, packs and
batches its own documents and the DataLoader hands the batches out round-robin. The stream never ends: after a
pass it starts the next one (epoch + 1, reshuffled when shuffling is on).

Position: batch ``n`` of a rank always comes from worker ``n % num_workers``, and a worker's epoch is a pure
function of (seed, epoch, rank, world size, worker). The state is therefore small (micro-batches yielded, plus
each worker's epoch and batch within it), and resuming re-reads only the current epoch of each worker.

Evaluation: every rank packs the whole eval set as one stream and keeps every world_size-th block, so the union
over ranks is exactly what a single process would score, whatever the world size.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from launcher.config import SourceConfig
from launcher.data.packing import eos_id_of, pack, tokenize_documents
from launcher.data.sources import (
    DataError,
    ResolvedSource,
    check_text,
    describe_failure,
    locate_problem,
    open_source,
    resolve,
)

logger = logging.getLogger(__name__)

READ_BATCH = 256
"""Records fetched from ``datasets`` at a time where this pipeline iterates it itself."""

STATE_VERSION = 1


def _paths(sources: Iterable[SourceConfig]) -> str:
    return ", ".join(s.path for s in sources)


def _bad_text(resolved: list[ResolvedSource], what: str, index: int, problem: str) -> DataError:
    """A DataError for a record without usable text: the file and line when a scan finds them."""
    for r in resolved:
        where = locate_problem(r)
        if where:
            return DataError(where)
    return DataError(f"{what}: document {index}: {problem}")


def _checked(texts: Iterable[Any], resolved: list[ResolvedSource], what: str) -> Iterator[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            fields = "/".join(sorted({r.text_field for r in resolved}))
            raise _bad_text(resolved, what, i, check_text(text, fields) or "not a string")
        yield text


def _texts(ds: Any) -> Iterator[Any]:
    """The ``text`` column, read in batches. ``IterableDataset.iter`` does not split by DataLoader worker."""
    for batch in ds.iter(batch_size=READ_BATCH):
        yield from batch["text"]


def _init_worker(worker_id: int) -> None:
    """Workers tokenize serially: the Rust thread pool of ``tokenizers`` can deadlock after a fork."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        import fsspec.asyn

        fsspec.asyn.reset_lock()  # an fsspec event loop inherited from the parent would hang remote reads
    except (ImportError, AttributeError):
        pass


class _RankShare(IterableDataset):
    """This rank's training batches as produced inside one DataLoader worker (or the caller, with no workers).

    Yields dicts: a batch with its origin (worker, epoch, index within the worker's epoch), a placeholder
    (``{"placeholder": True}``) that keeps the DataLoader's round-robin aligned after a resume, or
    ``{"error": message}`` as its last item, so the caller can raise a clean DataError.
    """

    def __init__(
        self,
        *,
        mixture: Any,
        resolved: list[ResolvedSource],
        tokenizer: Any,
        eos_id: int,
        seq_len: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int,
        start_batches: int,
        positions: list[list[int]] | None,
    ):
        super().__init__()
        self.mixture = mixture
        self.resolved = resolved
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.start_batches = start_batches
        self.positions = positions

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            yield from self._batches(worker, num_workers)
        except DataError as e:
            yield {"error": str(e)}
        except Exception as e:
            yield {"error": describe_failure(self.resolved, e)}

    def _what(self, worker: int, num_workers: int, epoch: int | None = None) -> str:
        where = f"rank {self.rank} of {self.world_size}"
        if num_workers > 1:
            where += f", DataLoader worker {worker} of {num_workers}"
        if epoch is not None:
            where += f", epoch {epoch}"
        return f"training data {_paths(r.source for r in self.resolved)} ({where})"

    def _batches(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        done = self.start_batches
        if worker < done % num_workers:
            # The DataLoader always asks worker 0 first, but batch `done` belongs to worker done % num_workers.
            yield {"placeholder": True}
        if self.positions is not None:
            epoch, skip = self.positions[worker]
        else:
            epoch, skip = 0, len(range(worker, done, num_workers))
        while True:
            produced = 0
            for blocks in self._epoch_batches(epoch, worker, num_workers):
                if skip:
                    skip -= 1
                else:
                    ids = torch.tensor(blocks, dtype=torch.long)
                    yield {"input_ids": ids, "labels": ids.clone(), "worker": worker, "epoch": epoch, "index": produced}
                produced += 1
            if produced == 0:
                workers = " x num_workers" if num_workers > 1 else ""
                raise DataError(
                    f"{self._what(worker, num_workers, epoch)}: a full pass gives fewer than "
                    f"micro_batch_size={self.micro_batch_size} complete block(s) of seq_len={self.seq_len} tokens; "
                    f"the training data is too small for seq_len x micro_batch_size x world size{workers}. "
                    "Add data, or lower seq_len, micro_batch_size, the number of processes or data.num_workers."
                )
            epoch += 1

    def _epoch_batches(self, epoch: int, worker: int, num_workers: int) -> Iterator[list[list[int]]]:
        from datasets.distributed import split_dataset_by_node

        ds = self.mixture
        if self.shuffle_buffer:
            ds = ds.shuffle(seed=self.seed + epoch, buffer_size=self.shuffle_buffer)
        ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        if num_workers > 1 and ds.num_shards >= num_workers:
            # Iterated inside a DataLoader worker, `datasets` gives each worker its own shards (files).
            texts: Iterator[Any] = (example["text"] for example in ds)
        else:
            # Too few shards to give every worker its own: each worker keeps every num_workers-th document.
            texts = islice(_texts(ds), worker, None, num_workers)
        checked = _checked(texts, self.resolved, self._what(worker, num_workers, epoch))
        blocks = pack(tokenize_documents(checked, self.tokenizer), self.seq_len, keep_partial=False, eos_id=self.eos_id)
        while True:
            group = list(islice(blocks, self.micro_batch_size))
            if len(group) < self.micro_batch_size:
                return
            yield group


class TrainStream:
    """The endless stream of training micro-batches of one rank: ``{"input_ids", "labels"}``, LongTensor[B, T].

    Each rank reads only its own part of the data (``split_dataset_by_node``: whole files when their number is a
    multiple of the world size, else every world_size-th document). Within a rank, ``num_workers`` DataLoader
    worker processes tokenize and pack; they split the rank's files among themselves when there are enough,
    else each keeps every num_workers-th document. Several sources are mixed by their normalised weights until
    every source was read at least once (a pass). Each worker packs its own epoch on its own and drops the
    tail that does not fill a micro-batch at the end of each pass.

    Deterministic given the sources, seed, rank, world size, num_workers, seq_len, micro_batch_size and
    shuffle_buffer. ``state_dict``/``load_state_dict`` resume exactly: after loading, iteration yields the
    batches an uninterrupted run would have yielded next. Each ``iter()`` continues from the current position.
    """

    def __init__(
        self,
        sources: list[SourceConfig],
        tokenizer: Any,
        *,
        seq_len: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        shuffle_buffer: int = 0,
    ):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be within [0, world_size), got rank={rank}, world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if prefetch_factor <= 0:
            raise ValueError(f"prefetch_factor must be positive, got {prefetch_factor}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if not sources:
            raise DataError("no training sources: data.train is empty")
        self.sources = list(sources)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.shuffle_buffer = shuffle_buffer
        self._eos_id = eos_id_of(tokenizer, f"training data {_paths(self.sources)}")
        self._resolved = [resolve(s) for s in self.sources]
        self._mixture = self._build_mixture([open_source(s) for s in self.sources])
        self._slots = max(1, num_workers)
        self._batches = 0
        self._epoch = 0
        self._positions: list[list[int] | None] = [[0, 0] for _ in range(self._slots)]
        self._active: weakref.ref | None = None
        """The live iterator, weakly: it refers to this stream, and a cycle would delay stopping its workers."""

    def _build_mixture(self, datasets_: list[Any]) -> Any:
        if len(datasets_) == 1:
            return datasets_[0]
        from datasets import interleave_datasets

        total = sum(s.weight for s in self.sources)
        probabilities = [s.weight / total for s in self.sources]
        return interleave_datasets(
            datasets_, probabilities=probabilities, seed=self.seed, stopping_strategy="all_exhausted"
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._close_active()
        iterator = self._iterate()
        self._active = weakref.ref(iterator)
        return iterator

    def _close_active(self) -> None:
        """Stop the previous iterator and its workers: the position it would continue from is no longer valid."""
        iterator = self._active() if self._active is not None else None
        if iterator is not None:
            iterator.close()  # type: ignore[attr-defined]
        self._active = None

    def _iterate(self) -> Iterator[dict[str, torch.Tensor]]:
        known = all(p is not None for p in self._positions)
        share = _RankShare(
            mixture=self._mixture,
            resolved=self._resolved,
            tokenizer=self.tokenizer,
            eos_id=self._eos_id,
            seq_len=self.seq_len,
            micro_batch_size=self.micro_batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            start_batches=self._batches,
            positions=[list(p) for p in self._positions] if known else None,  # type: ignore[arg-type]
        )
        workers = self.num_workers
        loader = DataLoader(
            share,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.prefetch_factor if workers else None,
            worker_init_fn=_init_worker if workers else None,
        )
        iterator = iter(loader)
        try:
            for item in iterator:
                if "error" in item:
                    raise DataError(item["error"]) from None
                if "placeholder" in item:
                    continue
                self._positions[item["worker"]] = [item["epoch"], item["index"] + 1]
                self._batches += 1
                self._epoch = item["epoch"]
                yield {"input_ids": item["input_ids"], "labels": item["labels"]}
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _layout(self) -> dict[str, Any]:
        """Everything the data order depends on; a resume is exact only when it is unchanged."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self._slots,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "sources": [
                {"path": s.path, "name": s.name, "split": s.split, "text_field": s.text_field, "weight": s.weight}
                for s in self.sources
            ],
        }

    def metrics(self) -> dict[str, float]:
        """Data metrics for the training log (rank-local), merged into metrics.jsonl and W&B."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The position as plain JSON: micro-batches yielded so far, the current epoch, and each worker's
        (epoch, batches consumed in it) so that a resume need not re-read earlier epochs."""
        known = all(p is not None for p in self._positions)
        return {
            "version": STATE_VERSION,
            "batches": self._batches,
            "epoch": self._epoch,
            "workers": [list(p) for p in self._positions] if known else None,  # type: ignore[arg-type]
            "layout": self._layout(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration yields exactly what the saved run would have yielded next.

        If the layout changed (world size, workers, seed, seq_len, micro-batch, shuffle buffer, sources), the
        saved order cannot be reproduced: the stream skips as many micro-batches as were consumed, and warns.
        A state saved by another rank of the same layout is still exact, only slower to reach.
        """
        if not isinstance(state, dict) or not isinstance(state.get("batches"), int) or state["batches"] < 0:
            raise ValueError(f"not a TrainStream state: {state!r}")
        self._close_active()
        saved = state.get("layout") or {}
        mine = self._layout()
        changed = [k for k in mine if k != "rank" and saved.get(k) != mine[k]]
        if changed:
            logger.warning(
                "data layout changed since the saved state (%s); skipping %d micro-batches of the new layout, "
                "which is not the saved data order",
                ", ".join(f"{k}: {saved.get(k)!r} -> {mine[k]!r}" for k in changed),
                state["batches"],
            )
        workers = state.get("workers")
        exact = (
            not changed
            and saved.get("rank") == self.rank
            and isinstance(workers, list)
            and len(workers) == self._slots
            and all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and x >= 0 for x in p) for p in workers
            )
        )
        self._batches = state["batches"]
        self._epoch = int(state.get("epoch", 0))
        self._positions = [list(p) for p in workers] if exact else [None] * self._slots  # type: ignore[union-attr]


def eval_blocks(
    source: SourceConfig,
    tokenizer: Any,
    *,
    seq_len: int,
    rank: int,
    world_size: int,
    max_blocks: int | None = None,
) -> list[list[int]]:
    """This rank's blocks of an eval set: block i of the whole set goes to rank i % world_size.

    The set is read in order (no shuffle) and packed as one stream, keeping the final short block so every token
    is scored; ``max_blocks`` keeps only the first blocks. The union over ranks is exactly the blocks of a single
    process, so perplexity does not depend on the world size. Raises DataError when the set holds no text.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be within [0, world_size), got rank={rank}, world_size={world_size}")
    if max_blocks is not None and max_blocks <= 0:
        raise ValueError(f"max_blocks must be positive, got {max_blocks}")
    what = f"eval set {source.path}"
    eos_id = eos_id_of(tokenizer, what)
    resolved = [resolve(source)]
    ds = open_source(source)
    mine: list[list[int]] = []
    total = 0
    try:
        texts = _checked(_texts(ds), resolved, what)
        blocks: Iterator[list[int]] = pack(
            tokenize_documents(texts, tokenizer), seq_len, keep_partial=True, eos_id=eos_id
        )
        if max_blocks is not None:
            blocks = islice(blocks, max_blocks)
        for i, block in enumerate(blocks):
            total += 1
            if i % world_size == rank:
                mine.append(block)
    except DataError:
        raise
    except Exception as e:
        raise DataError(describe_failure(resolved, e)) from e
    if total == 0:
        raise DataError(f"{what}: no text to evaluate on (every document is empty)")
    return mine
