"""Per-rank training batches and per-rank eval blocks.

Training: every (rank, DataLoader worker) is one *reader*. Each source is divided among the readers on its own
(:func:`launcher.data.sharding.assign_parts`: whole files where there are enough, files shared document by
document where not), so no document is read by two readers or tokenized twice. Each reader mixes its shares of
the sources in proportion to their weights counted in tokens, tokenizes, and cuts its token stream into
micro-batches; the DataLoader hands the readers' batches out round-robin. The stream never ends:
``data.stopping`` decides where a pass ends, and the next pass follows (reshuffled when shuffling is on).

Position: batch ``n`` of a rank always comes from worker ``n % num_workers``, and everything a reader produces
is a pure function of (seed, sources, its reader index, the number of readers, seq_len, micro_batch_size,
shuffle_buffer, stopping rule). Each batch carries its reader's state after it: per source, the pass over it
(cycle), the position of the next document and the tokens drawn from it in the current pass; and where the
carried-over document (the one cut by the end of the batch) comes from. The trainer keeps the state of the
last batch it consumed from each worker, so a checkpoint records exactly what was consumed, not what the
workers had prefetched. A resume re-reads (without tokenizing) at most one file per source up to the saved
position, and re-tokenizes the carried-over document.

Evaluation: every rank packs the whole eval set as one stream and keeps every world_size-th block, so the union
over ranks is exactly what a single process would score, whatever the world size.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import math
import os
import random
import signal
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import count, islice
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from launcher.config import DataConfig, SourceConfig
from launcher.data.packing import TOKENIZE_BATCH, document_position_ids, encode, eos_id_of, pack, tokenize_documents
from launcher.data.sharding import Part, assign_parts, rng_key, shard_order
from launcher.data.sources import (
    COMPRESSIONS,
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
"""Records fetched from ``datasets`` at a time."""

STATE_VERSION = 2

STOPPING_RULES = ("all_exhausted", "first_exhausted", "token_budget")


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


PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
"""Signals DataLoader workers ignore: the trainer acts on them. A worker still stops when its trainer does."""

_RUNNING_LOADERS: weakref.WeakSet[Any] = weakref.WeakSet()
"""DataLoader iterators whose worker processes may still run."""


def _stop_running_workers() -> None:
    """At interpreter exit, stop the workers of the DataLoader iterators still alive. multiprocessing would end
    them with SIGTERM, which they ignore, and then wait for them forever. Registered after the DataLoader's own
    exit hook, so it runs before it, while the DataLoader can still shut its workers down."""
    for iterator in list(_RUNNING_LOADERS):
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


atexit.register(_stop_running_workers)


def _init_worker(worker_id: int) -> None:
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


def source_labels(sources: list[SourceConfig]) -> list[str]:
    """Names of the sources in the logged metrics: ``label``, else the file, directory or dataset name (without
    data extensions or glob patterns); names that would repeat get their source index appended."""
    names = []
    for s in sources:
        if s.label:
            names.append(s.label)
            continue
        parts = [p for p in PurePosixPath(s.path.split("://", 1)[-1]).parts if p not in ("/", ".", "..")]
        while len(parts) > 1 and any(c in parts[-1] for c in "*?["):
            parts.pop()
        name = parts[-1] if parts else s.path
        lower = name.lower()
        for suffix in COMPRESSIONS:
            if lower.endswith(suffix):
                name, lower = name[: -len(suffix)], lower[: -len(suffix)]
                break
        for suffix in (".jsonl", ".json", ".ndjson", ".parquet", ".txt", ".text"):
            if lower.endswith(suffix):
                name = name[: -len(suffix)]
                break
        if s.name:
            name = f"{name}-{s.name}"
        names.append(name or str(len(names)))
    return [n if s.label or names.count(n) == 1 else f"{n}-{i}" for i, (s, n) in enumerate(zip(sources, names))]


# ------------------------------------------------------------------------------------------------ readers


@dataclass
class _Source:
    """A training source as every reader sees it: the opened dataset and its number of shards."""

    config: SourceConfig
    resolved: ResolvedSource
    dataset: Any
    num_shards: int


class _SourceReader:
    """One reader's share of one source, cycle after cycle: (position, token ids) of its non-blank documents.

    A position is (cycle, part, doc): the ``doc``-th document (blank ones included) of the ``part``-th part this
    reader has in that cycle, in reading order. With shuffling, a cycle deals the shards in its own order and
    each part is read in windows of ``window`` documents, each window permuted by its own seed. Reading can
    start at any position; the cost is reading (not tokenizing) the part up to the window that holds it.
    """

    def __init__(
        self, source: _Source, index: int, *, reader: int, num_readers: int, seed: int, window: int, tokenizer: Any,
        what: str,
    ):  # fmt: skip
        self.source = source
        self.index = index
        self.reader = reader
        self.num_readers = num_readers
        self.seed = seed
        self.window = window
        self.tokenizer = tokenizer
        self.what = what

    def parts(self, cycle: int) -> list[Part]:
        n = self.source.num_shards
        order = shard_order(n, seed=self.seed, source=self.index, cycle=cycle, shuffle=self.window > 0)
        return assign_parts(n, self.num_readers, self.reader, order)

    def documents(
        self, cycle: int, part: int = 0, doc: int = 0, *, batch: int = TOKENIZE_BATCH
    ) -> Iterator[tuple[tuple[int, int, int], list[int]]]:
        """Tokenized non-blank documents from position (cycle, part, doc) to the end of the cycle, tokenized
        ``batch`` at a time."""
        positions: list[tuple[int, int, int]] = []
        texts: list[str] = []
        for p, d, text in self._texts(cycle, part, doc):
            if not text or text.isspace():
                continue
            positions.append((cycle, p, d))
            texts.append(text)
            if len(texts) >= batch:
                yield from zip(positions, encode(self.tokenizer, texts))
                positions, texts = [], []
        if texts:
            yield from zip(positions, encode(self.tokenizer, texts))

    def _texts(self, cycle: int, part: int, doc: int) -> Iterator[tuple[int, int, str]]:
        parts = self.parts(cycle)
        for p in range(part, len(parts)):
            for d, text in self._part_texts(cycle, parts[p], doc if p == part else 0):
                yield p, d, text

    def _part_texts(self, cycle: int, part: Part, start: int) -> Iterator[tuple[int, str]]:
        raw = self._raw(part)
        if not self.window:
            yield from zip(count(start), islice(raw, start, None))
            return
        first = start // self.window
        raw = islice(raw, first * self.window, None)
        for w in count(first):
            block = list(islice(raw, self.window))
            if not block:
                return
            order = list(range(len(block)))
            random.Random(rng_key("window", self.seed, self.index, cycle, part.shard, part.offset, w)).shuffle(order)
            base = w * self.window
            for i in range(max(0, start - base), len(block)):
                yield base + i, block[order[i]]

    def _raw(self, part: Part) -> Iterator[str]:
        """The part's documents in the shard's order, checked to be text."""
        src = self.source
        ds = src.dataset.shard(num_shards=src.num_shards, index=part.shard)
        seen = 0
        for batch in ds.iter(batch_size=READ_BATCH):
            texts = batch["text"]
            mine = texts[(part.offset - seen) % part.stride :: part.stride]
            for i, text in enumerate(mine):
                if not isinstance(text, str):
                    index = seen + (part.offset - seen) % part.stride + i * part.stride
                    problem = check_text(text, src.resolved.text_field) or "not a string"
                    raise _bad_text(
                        [src.resolved], f"{self.what}: {src.config.path}, shard {part.shard}", index, problem
                    )
            yield from mine
            seen += len(texts)


@dataclass
class _SourceState:
    cycle: int = 0
    part: int = 0
    doc: int = 0
    """Position of the next document to draw."""
    tokens: int = 0
    """Tokens drawn from this source in the current pass."""
    done: bool = False
    """Exhausted (all_exhausted) or at its budget (token_budget) in the current pass."""


@dataclass
class _Segment:
    """A drawn document whose tokens (EOS appended) are not all in batches yet."""

    source: int
    position: tuple[int, int, int]
    tokens: list[int]
    start: int = 0


class _Reader:
    """One reader's whole pipeline: draw documents from its shares of the sources, cut the token stream into
    micro-batches, and say after each batch where it stands (``state``)."""

    def __init__(
        self, sources: list[_Source], *, tokenizer: Any, eos_id: int, seq_len: int, micro_batch_size: int,
        reader: int, num_readers: int, seed: int, shuffle_buffer: int, stopping: str, budgets: list[int] | None,
        what: str,
    ):  # fmt: skip
        self.readers = [
            _SourceReader(s, i, reader=reader, num_readers=num_readers, seed=seed, window=shuffle_buffer,
                          tokenizer=tokenizer, what=what)
            for i, s in enumerate(sources)
        ]  # fmt: skip
        self.sources = sources
        self.eos_id = eos_id
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.num_readers = num_readers
        self.stopping = stopping
        total = sum(s.config.weight for s in sources)
        self.weights = [s.config.weight / total for s in sources]
        self.budgets = budgets
        self.what = what
        self.pass_ = 0
        self.pass_tokens = 0
        self.batches = 0
        self.src = [_SourceState() for _ in sources]
        self.pending: deque[_Segment] = deque()
        self.pending_tokens = 0
        self._iters: list[Iterator[tuple[tuple[int, int, int], list[int]]] | None] = [None] * len(sources)

    # -- state

    def state(self) -> dict[str, Any]:
        return {
            "pass": self.pass_,
            "pass_tokens": self.pass_tokens,
            "batches": self.batches,
            "sources": [[s.cycle, s.part, s.doc, s.tokens, int(s.done)] for s in self.src],
            "pending": [[g.source, *g.position, g.start] for g in self.pending],
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.pass_ = int(state["pass"])
        self.pass_tokens = int(state["pass_tokens"])
        self.batches = int(state["batches"])
        self.src = [_SourceState(c, p, d, t, bool(done)) for c, p, d, t, done in state["sources"]]
        self.pending.clear()
        self.pending_tokens = 0
        for source, cycle, part, doc, start in state["pending"]:
            first = next(self.readers[source].documents(cycle, part, doc, batch=1), None)
            if first is None or first[0] != (cycle, part, doc):
                raise DataError(
                    f"{self.what}: {self.sources[source].config.path} no longer has the document the saved data "
                    f"position points at (its pass {cycle}, part {part}, document {doc}); the data changed since the "
                    "checkpoint was written"
                )
            segment = _Segment(source, (cycle, part, doc), [*first[1], self.eos_id], start)
            self.pending.append(segment)
            self.pending_tokens += len(segment.tokens) - start

    # -- batches

    def batches_forever(self) -> Iterator[tuple[list[int], list[int]]]:
        """(token ids of one micro-batch, tokens per source in it), forever."""
        need = self.micro_batch_size * self.seq_len
        while True:
            while self.pending_tokens < need:
                self._draw()
            ids: list[int] = []
            counts = [0] * len(self.sources)
            while len(ids) < need:
                g = self.pending[0]
                take = min(need - len(ids), len(g.tokens) - g.start)
                ids.extend(g.tokens[g.start : g.start + take])
                counts[g.source] += take
                g.start += take
                self.pending_tokens -= take
                if g.start == len(g.tokens):
                    self.pending.popleft()
            self.batches += 1
            yield ids, counts

    def _draw(self) -> None:
        """Draw one document into ``pending``, ending cycles and passes as the stopping rule says."""
        while True:
            s = self._choose()
            st = self.src[s]
            it = self._iters[s]
            if it is None:
                it = self._iters[s] = self.readers[s].documents(st.cycle, st.part, st.doc)
            item = next(it, None)
            if item is None:
                self._cycle_ended(s)
                continue
            (_, part, doc), tokens = item
            st.part, st.doc = part, doc + 1
            segment = _Segment(s, item[0], [*tokens, self.eos_id])
            self.pending.append(segment)
            self.pending_tokens += len(segment.tokens)
            self._count(s, len(segment.tokens))
            return

    def _choose(self) -> int:
        """The source furthest below its share of the tokens drawn in this pass (the lowest tokens / weight; under
        token_budget, among the sources below their budget, with the budgets as weights). Mixing by tokens keeps
        every prefix of the stream within one document of the weights, whatever the document lengths; drawing
        documents at random by weight would skew the token shares towards sources with longer documents."""
        if len(self.sources) == 1:
            return 0
        if self.stopping == "token_budget":
            assert self.budgets is not None
            active = [i for i, s in enumerate(self.src) if not s.done]
            return min(active, key=lambda i: (self.src[i].tokens / self.budgets[i], i))  # type: ignore[index]
        return min(range(len(self.src)), key=lambda i: (self.src[i].tokens / self.weights[i], i))

    def _restart(self, s: int) -> None:
        st = self.src[s]
        st.cycle, st.part, st.doc = st.cycle + 1, 0, 0
        self._iters[s] = None

    def _cycle_ended(self, s: int) -> None:
        st = self.src[s]
        if (st.part, st.doc) == (0, 0):
            src = self.sources[s]
            raise DataError(
                f"{self.what}: {src.config.path} has no text for this reader: its {src.num_shards} shard(s) are "
                f"divided among {self.num_readers} readers (world size x data.num_workers) and this one's share is "
                "empty or blank. Add data, or lower the number of processes or data.num_workers."
            )
        if self.stopping == "first_exhausted":
            self._end_pass(ran_out=s)
            for i in range(len(self.src)):
                self._restart(i)
        elif self.stopping == "all_exhausted":
            st.done = True
            self._restart(s)
            if all(x.done for x in self.src):
                self._end_pass()
        else:
            self._restart(s)

    def _count(self, s: int, n: int) -> None:
        st = self.src[s]
        st.tokens += n
        self.pass_tokens += n
        if self.stopping == "token_budget":
            assert self.budgets is not None
            if st.tokens >= self.budgets[s]:
                st.done = True
                if all(x.done for x in self.src):
                    self._end_pass()

    def _end_pass(self, ran_out: int | None = None) -> None:
        need = self.micro_batch_size * self.seq_len
        if self.stopping != "token_budget" and self.pass_tokens < need:
            why = f" (a pass ends when {self.sources[ran_out].config.path} runs out)" if ran_out is not None else ""
            raise DataError(
                f"{self.what}, pass {self.pass_}: a full pass gives {self.pass_tokens} tokens{why}, fewer than one "
                f"micro-batch of micro_batch_size={self.micro_batch_size} x seq_len={self.seq_len}: the training "
                "data is too small for seq_len x micro_batch_size x world size x data.num_workers. Add data, or "
                "lower seq_len, micro_batch_size, the number of processes or data.num_workers."
            )
        self.pass_ += 1
        self.pass_tokens = 0
        for x in self.src:
            x.tokens, x.done = 0, False


class _RankShare(IterableDataset):
    """This rank's training batches as produced inside one DataLoader worker (or the caller, with no workers).

    Yields dicts: a batch (``input_ids``, ``labels``, optionally ``position_ids``) with ``source_tokens`` (tokens
    of each source in it), ``worker`` and ``state`` (the reader's state after it); a placeholder
    (``{"placeholder": True}``) that keeps the DataLoader's round-robin aligned after a resume; or
    ``{"error": message}`` as its last item, so the caller can raise a clean DataError.
    """

    def __init__(
        self, *, sources: list[_Source], tokenizer: Any, eos_id: int, seq_len: int, micro_batch_size: int, rank: int,
        world_size: int, seed: int, shuffle_buffer: int, stopping: str, budgets: list[int] | None,
        document_masking: bool, start_batches: int, states: list[dict[str, Any] | None], replay: bool,
    ):  # fmt: skip
        super().__init__()
        self.sources = sources
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.stopping = stopping
        self.budgets = budgets
        self.document_masking = document_masking
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
        where = f"rank {self.rank} of {self.world_size}"
        if num_workers > 1:
            where += f", DataLoader worker {worker} of {num_workers}"
        return f"training data {_paths(s.config for s in self.sources)} ({where})"

    def _batches(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        done = self.start_batches
        if worker < done % num_workers:
            # The DataLoader always asks worker 0 first, but batch `done` belongs to worker done % num_workers.
            yield {"placeholder": True}
        budgets = None
        num_readers = self.world_size * num_workers
        if self.budgets is not None:
            budgets = [max(1, math.ceil(b / num_readers)) for b in self.budgets]
        reader = _Reader(
            self.sources, tokenizer=self.tokenizer, eos_id=self.eos_id, seq_len=self.seq_len,
            micro_batch_size=self.micro_batch_size, reader=self.rank * num_workers + worker, num_readers=num_readers,
            seed=self.seed, shuffle_buffer=self.shuffle_buffer, stopping=self.stopping, budgets=budgets,
            what=self._what(worker, num_workers),
        )  # fmt: skip
        skip = len(range(worker, done, num_workers)) if self.replay else 0
        saved = None if self.replay else self.states[worker]
        if saved is not None:
            reader.restore(saved)
        for ids, counts in reader.batches_forever():
            if skip:
                skip -= 1
                continue
            # numpy builds the tensor from a list of ints several times faster than torch.tensor does.
            input_ids = torch.from_numpy(np.array(ids, dtype=np.int64)).view(self.micro_batch_size, self.seq_len)
            batch: dict[str, Any] = {"input_ids": input_ids, "labels": input_ids.clone()}
            if self.document_masking:
                batch["position_ids"] = document_position_ids(input_ids, self.eos_id)
            batch.update(source_tokens=counts, worker=worker, state=reader.state())
            yield batch


def _chain_hash(previous: str, input_ids: torch.Tensor) -> str:
    h = hashlib.blake2b(bytes.fromhex(previous), digest_size=8)
    h.update(input_ids.contiguous().numpy().astype("<i8", copy=False).tobytes())
    return h.hexdigest()


def _hash48(*values: int) -> int:
    """A number that fits a float64 exactly (W&B stores floats)."""
    h = hashlib.blake2b(b"".join(v.to_bytes(8, "little", signed=False) for v in values), digest_size=8)
    return int.from_bytes(h.digest()[:6], "little")


class TrainStream:
    """The endless stream of training micro-batches of one rank: ``{"input_ids", "labels"}``, LongTensor[B, T],
    plus ``position_ids`` (restarting after every EOS) with ``document_masking``.

    Every (rank, DataLoader worker) is one reader with its own part of every source (see
    :func:`launcher.data.sharding.assign_parts`): whole files where there are at least as many files as readers,
    and the files left over shared document by document. A reader that shares a file reads all of it but tokenizes
    only its own documents, so a source of fewer, larger files costs more reading; Parquet sources with fewer
    files than readers are split per row group instead, which needs no sharing. Each reader mixes its parts of
    the sources in proportion to their weights (or token budgets) counted in tokens, tokenizes, appends EOS and
    cuts the stream into micro-batches; a document cut by the end of a batch continues in the reader's next
    batch. Passes end as ``stopping`` says and follow each other without a gap.

    Deterministic given the sources, seed, world size, num_workers, seq_len, micro_batch_size, shuffle_buffer
    and stopping rule. ``state_dict``/``load_state_dict`` resume exactly: after loading, iteration yields the
    batches an uninterrupted run would have yielded next. Each ``iter()`` continues from the current position.
    ``metrics`` reports the mixture actually consumed, in tokens, and a running hash of the consumed token ids.
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
        stopping: str = "all_exhausted",
        token_budget: int | None = None,
        document_masking: bool = False,
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
        if stopping not in STOPPING_RULES:
            raise ValueError(f"stopping must be one of {', '.join(STOPPING_RULES)}, got {stopping!r}")
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
        self.stopping = stopping
        self.token_budget = token_budget
        self.document_masking = document_masking
        self.budgets = self._budgets()
        self.labels = source_labels(self.sources)
        self._eos_id = eos_id_of(tokenizer, f"training data {_paths(self.sources)}")
        self._slots = max(1, num_workers)
        self._sources = [self._open(s, world_size * self._slots) for s in self.sources]
        self._batches = 0
        self._states: list[dict[str, Any] | None] = [None] * self._slots
        self._replay = False
        self._source_tokens = [0] * len(self.sources)
        self._hash = "00" * 8
        self._active: weakref.ref | None = None
        """The live iterator, weakly: it refers to this stream, and a cycle would delay stopping its workers."""

    @classmethod
    def from_config(
        cls, data: DataConfig, tokenizer: Any, *, micro_batch_size: int, rank: int, world_size: int, seed: int
    ) -> TrainStream:
        """The stream a recipe's ``data`` section describes."""
        return cls(
            data.train, tokenizer, seq_len=data.seq_len, micro_batch_size=micro_batch_size, rank=rank,
            world_size=world_size, seed=seed, num_workers=data.num_workers, prefetch_factor=data.prefetch_factor,
            shuffle_buffer=data.shuffle_buffer, stopping=data.stopping, token_budget=data.token_budget,
            document_masking=data.document_masking,
        )  # fmt: skip

    def _budgets(self) -> list[int] | None:
        """Tokens per pass of each source over all readers, under the token_budget rule."""
        if self.stopping != "token_budget":
            return None
        own = [s.token_budget for s in self.sources]
        if all(b is not None for b in own) and self.token_budget is None:
            return [int(b) for b in own]  # type: ignore[arg-type]
        if self.token_budget is not None and all(b is None for b in own):
            total = sum(s.weight for s in self.sources)
            return [max(1, round(self.token_budget * s.weight / total)) for s in self.sources]
        raise ValueError("stopping=token_budget needs token_budget on every source, or a total token_budget (not both)")

    @staticmethod
    def _open(config: SourceConfig, num_readers: int) -> _Source:
        resolved = resolve(config)
        ds = open_source(config)
        if ds.num_shards < num_readers:
            # Parquet can be split per row group, so fewer readers have to share a file document by document.
            ds = ds.reshard()
        return _Source(config, resolved, ds, ds.num_shards)

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
        share = _RankShare(
            sources=self._sources, tokenizer=self.tokenizer, eos_id=self._eos_id, seq_len=self.seq_len,
            micro_batch_size=self.micro_batch_size, rank=self.rank, world_size=self.world_size, seed=self.seed,
            shuffle_buffer=self.shuffle_buffer, stopping=self.stopping, budgets=self.budgets,
            document_masking=self.document_masking, start_batches=self._batches, states=list(self._states),
            replay=self._replay,
        )  # fmt: skip
        workers = self.num_workers
        loader = DataLoader(
            share,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.prefetch_factor if workers else None,
            worker_init_fn=_init_worker if workers else None,
        )
        iterator = iter(loader)
        if workers:
            _RUNNING_LOADERS.add(iterator)
        try:
            for item in iterator:
                if "error" in item:
                    raise DataError(item["error"]) from None
                if "placeholder" in item:
                    continue
                self._states[item["worker"]] = item["state"]
                if self._replay and all(s is not None for s in self._states):
                    self._replay = False
                self._batches += 1
                for i, n in enumerate(item["source_tokens"]):
                    self._source_tokens[i] += int(n)
                self._hash = _chain_hash(self._hash, item["input_ids"])
                yield {k: item[k] for k in ("input_ids", "labels", "position_ids") if k in item}
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
            "stopping": self.stopping,
            "budgets": self.budgets,
            "sources": [
                {"path": s.path, "name": s.name, "split": s.split, "text_field": s.text_field, "weight": s.weight}
                for s in self.sources
            ],
        }

    def metrics(self) -> dict[str, float]:
        """Data metrics for the training log, merged into metrics.jsonl and W&B.

        ``data/mix/<label>``: the fraction of the training tokens consumed so far (EOS included) that came from
        each source -- compare with the weights. ``data/batch_hash``: a hash of every token id consumed so far, in
        order; two runs (or a run and its resumed continuation) that trained on the same data show the same
        value at the same step.

        When torch.distributed is initialised with this stream's world size, both cover every rank (one small
        all_gather, so every rank must call this at the same steps); otherwise they cover this rank.
        """
        counts = list(self._source_tokens)
        hashes = [int(self._hash, 16)]
        import torch.distributed as dist

        if (
            self.world_size > 1
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() == self.world_size
            and dist.get_rank() == self.rank
        ):
            device = torch.device("cpu")
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            # Hashes are 64-bit; sent as two 32-bit halves so no value needs the sign bit of an int64.
            h = hashes[0]
            mine = torch.tensor([*counts, h >> 32, h & 0xFFFFFFFF], dtype=torch.long, device=device)
            gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(gathered, mine)
            rows = torch.stack(gathered).cpu().tolist()
            counts = [sum(r[i] for r in rows) for i in range(len(counts))]
            hashes = [(r[-2] << 32) | r[-1] for r in rows]
        total = sum(counts)
        out: dict[str, float] = {}
        if total:
            out.update({f"data/mix/{label}": n / total for label, n in zip(self.labels, counts)})
        out["data/batch_hash"] = _hash48(*hashes)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The position as plain JSON: micro-batches yielded so far, each worker's reader state after the last
        batch taken from it, the tokens consumed per source and the running hash of the consumed token ids."""
        return {
            "version": STATE_VERSION,
            "batches": self._batches,
            "workers": None if self._replay else [dict(s) if s is not None else None for s in self._states],
            "source_tokens": list(self._source_tokens),
            "hash": self._hash,
            "layout": self._layout(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration yields exactly what the saved run would have yielded next.

        If the layout changed (world size, workers, seed, seq_len, micro-batch, shuffle buffer, stopping rule,
        sources), the saved order cannot be reproduced: the stream skips as many micro-batches as were consumed,
        and warns. A state saved by another rank of the same layout (or by an older version) is still exact,
        only slower to reach: the batches before it are produced again and dropped.
        """
        if not isinstance(state, dict) or not isinstance(state.get("batches"), int) or state["batches"] < 0:
            raise ValueError(f"not a TrainStream state: {state!r}")
        self._close_active()
        saved = state.get("layout") or {}
        mine = self._layout()
        changed = [k for k in mine if k not in ("rank", "stopping", "budgets") and saved.get(k) != mine[k]]
        changed += [k for k in ("stopping", "budgets") if saved.get(k, mine[k]) != mine[k]]
        if changed:
            logger.warning(
                "data layout changed since the saved state (%s); skipping %d micro-batches of the new layout, "
                "which is not the saved data order",
                ", ".join(f"{k}: {saved.get(k)!r} -> {mine[k]!r}" for k in changed),
                state["batches"],
            )
        elif state.get("version") != STATE_VERSION and state["batches"]:
            logger.warning(
                "the data position was saved by another version of the data pipeline (%s, this is %s); skipping %d "
                "micro-batches, which is not the saved data order",
                state.get("version"),
                STATE_VERSION,
                state["batches"],
            )
        workers = state.get("workers")
        exact = (
            not changed
            and state.get("version") == STATE_VERSION
            and saved.get("rank") == self.rank
            and isinstance(workers, list)
            and len(workers) == self._slots
            and all(w is None or _valid_reader_state(w, len(self.sources)) for w in workers)
        )
        self._batches = state["batches"]
        self._states = [dict(w) if w is not None else None for w in workers] if exact else [None] * self._slots  # type: ignore[union-attr]
        self._replay = not exact and self._batches > 0
        tokens = state.get("source_tokens")
        same_sources = saved.get("sources") == mine["sources"]
        ok = same_sources and isinstance(tokens, list) and len(tokens) == len(self.sources)
        self._source_tokens = [int(n) for n in tokens] if ok else [0] * len(self.sources)  # type: ignore[union-attr]
        digest = state.get("hash")
        self._hash = digest if isinstance(digest, str) and len(digest) == 16 else "00" * 8


def _valid_reader_state(state: Any, n_sources: int) -> bool:
    if not isinstance(state, dict):
        return False
    if not all(isinstance(state.get(k), int) for k in ("pass", "pass_tokens", "batches")):
        return False
    sources, pending = state.get("sources"), state.get("pending")
    return (
        isinstance(sources, list)
        and len(sources) == n_sources
        and all(isinstance(s, list) and len(s) == 5 for s in sources)
        and isinstance(pending, list)
        and all(isinstance(p, list) and len(p) == 5 and 0 <= p[0] < n_sources for p in pending)
    )


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
