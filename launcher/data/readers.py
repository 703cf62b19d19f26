"""One reader's share of one training source: which documents are its own, in which order, and where each sits.

A reader is one (rank, DataLoader worker). Each source is divided among the readers on its own
(:func:`launcher.data.sharding.assign_parts`: whole files where there are enough, files shared document by
document where not), so no document is read by two readers or tokenized twice. Everything here is a pure function
of the seed, the source, the reader's index and the number of readers, so any position can be found again.

After a resume on another number of readers, a reader's pass in progress is an explicit list of spans instead
(:class:`launcher.data.sharding.Span`, see :mod:`launcher.data.reshard`): what the old readers had left of it.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count, islice
from typing import Any

from launcher.config import SourceConfig
from launcher.data.packing import TOKENIZE_BATCH, tokenize
from launcher.data.sharding import Part, Span, assign_parts, rng_key, shard_order
from launcher.data.sources import DataError, ResolvedSource, bad_text, check_text, open_source, resolve
from launcher.data.spec import StreamSpec

READ_BATCH = 256
"""Records fetched from ``datasets`` at a time."""

Position = tuple[int, int, int]
"""(cycle, part, doc): the ``doc``-th document (blank ones included) of the ``part``-th part a reader has in its
``cycle``-th pass over a source, in reading order."""


@dataclass
class OpenedSource:
    """A training source as every reader sees it: the opened dataset and its number of shards."""

    config: SourceConfig
    resolved: ResolvedSource
    dataset: Any
    num_shards: int
    held_out: tuple[int, ...] = ()
    """How many leading documents of each shard are held out for evaluation (shards past the end: none)."""
    files: int = 0
    """Shards before any split per row group (its files, or what ``datasets`` first divides it into)."""
    others: dict[int, OpenedSource] = field(default_factory=dict)
    """The same source divided into another number of shards, by that number: for the spans of a data position
    saved by a run with another number of readers, which divided the source otherwise."""

    def divided(self, shards: int) -> OpenedSource:
        """This source as divided into ``shards`` shards (itself, or one of ``others``)."""
        if shards == self.num_shards:
            return self
        if shards not in self.others:
            raise DataError(f"{self.config.path}: it is not opened divided into {shards} shards")
        return self.others[shards]


def open_training_source(config: SourceConfig, num_readers: int, *, num_shards: int | None = None) -> OpenedSource:
    """The source divided for ``num_readers`` readers: into its files, or, where there are fewer files than
    readers, per Parquet row group. With ``num_shards``: divided into that many shards, one way or the other (a
    DataError if neither gives that many: the source changed)."""
    resolved = resolve(config)
    ds = open_source(config)
    files = ds.num_shards
    if (ds.num_shards < num_readers) if num_shards is None else (ds.num_shards != num_shards):
        # Parquet can be split per row group, so fewer readers have to share a file document by document.
        ds = ds.reshard()
    if num_shards is not None and ds.num_shards != num_shards:
        raise DataError(
            f"{config.path}: the saved data position divides it into {num_shards} shards, but it now has {files} "
            f"files and {ds.num_shards} shards split per row group; the data changed since the checkpoint was written"
        )
    held = Counter(shard for shard, _ in held_out_documents(ds, config))
    held_out = tuple(held[i] for i in range(max(held, default=-1) + 1))
    return OpenedSource(config, resolved, ds, ds.num_shards, held_out, files)


def held_out_documents(ds: Any, config: SourceConfig) -> Iterator[tuple[int, Any]]:
    """(shard, record) of the documents ``config`` holds out of the opened source ``ds`` (``holdout_documents``):
    its first ones in the natural order, shard after shard.

    The natural order is the same however the source is split into shards (files, or Parquet row groups), so
    every world size, DataLoader layout, seed and shuffle holds out the same documents, and the eval set, which
    reads them through this same function, gets exactly them. Raises DataError when the source is not larger
    than the holdout: nothing would be left to train on."""
    want = config.holdout_documents
    if want <= 0:
        return
    seen = 0
    for shard in range(ds.num_shards):
        for batch in ds.shard(num_shards=ds.num_shards, index=shard).iter(batch_size=min(READ_BATCH, want)):
            for record in batch["text"]:
                if seen == want:
                    return
                seen += 1
                yield shard, record
    raise DataError(
        f"{config.path}: holdout_documents={want} holds out every document of the source (it has {seen}); "
        "nothing would be left to train on. Hold out fewer."
    )


class SourceReader:
    """One reader's share of one source, cycle after cycle: (position, token ids) of its non-blank documents.

    With shuffling, a cycle deals the shards in its own order and each part is read in windows of
    ``shuffle_buffer`` documents, each window permuted by its own seed. Reading can start at any position; the
    cost is reading (not tokenizing) the part up to the window that holds it.
    """

    def __init__(
        self, source: OpenedSource, index: int, spec: StreamSpec, tokenizer: Any, *, reader: int, num_readers: int,
        what: str,
    ):  # fmt: skip
        self.source = source
        self.index = index
        self.seed = spec.seed
        self.window = spec.shuffle_buffer
        self.tokenizer = tokenizer
        self.reader = reader
        self.num_readers = num_readers
        self.what = what
        self.explicit: tuple[int, list[Span]] | None = None
        """(cycle, spans): in that cycle, the reader reads these spans instead of its parts (after a re-division)."""

    def parts(self, cycle: int) -> list[Part]:
        n = self.source.num_shards
        order = shard_order(n, seed=self.seed, source=self.index, cycle=cycle, shuffle=self.window > 0)
        return assign_parts(n, self.num_readers, self.reader, order)

    def spans(self, cycle: int) -> list[Span]:
        """What the reader reads in ``cycle``, in order: its explicit spans, or each of its parts whole."""
        if self.explicit is not None and self.explicit[0] == cycle:
            return self.explicit[1]
        return [Span(cycle, self.source.num_shards, part) for part in self.parts(cycle)]

    def documents(
        self, cycle: int, part: int = 0, doc: int = 0, *, batch: int = TOKENIZE_BATCH
    ) -> Iterator[tuple[Position, list[int]]]:
        """Tokenized non-blank documents from position (cycle, part, doc) to the end of the cycle, tokenized
        ``batch`` at a time."""
        return tokenize(self._texts(cycle, part, doc), self.tokenizer, batch_size=batch)

    def _texts(self, cycle: int, part: int, doc: int) -> Iterator[tuple[Position, str]]:
        spans = self.spans(cycle)
        for p in range(part, len(spans)):
            for d, text in self._span_texts(spans[p], doc if p == part else 0):
                yield (cycle, p, d), text

    def _span_texts(self, span: Span, start: int) -> Iterator[tuple[int, str]]:
        """(document number in the part's reading order, text) of the span from document ``start`` on."""
        start = max(start, span.start)
        if span.stop >= 0:
            if start >= span.stop:
                return
            yield from islice(self._part_texts(span, start), span.stop - start)
        else:
            yield from self._part_texts(span, start)

    def _part_texts(self, span: Span, start: int) -> Iterator[tuple[int, str]]:
        part = span.part
        raw = self._raw(part, span.shards)
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
            key = rng_key("window", self.seed, self.index, span.cycle, part.shard, part.offset, w)
            random.Random(key).shuffle(order)
            base = w * self.window
            for i in range(max(0, start - base), len(block)):
                yield base + i, block[order[i]]

    def _raw(self, part: Part, shards: int) -> Iterator[str]:
        """The part's documents in the shard's order (of the source divided into ``shards`` shards), checked to be
        text. Held-out documents are blank: training skips them as it skips every blank document, and every other
        document keeps its position."""
        src = self.source.divided(shards)
        ds = src.dataset.shard(num_shards=src.num_shards, index=part.shard)
        held = src.held_out[part.shard] if part.shard < len(src.held_out) else 0
        seen = 0
        for batch in ds.iter(batch_size=READ_BATCH):
            texts = batch["text"]
            if seen < held:
                texts = [""] * min(held - seen, len(texts)) + texts[held - seen :]
            mine = texts[(part.offset - seen) % part.stride :: part.stride]
            for i, text in enumerate(mine):
                if not isinstance(text, str):
                    index = seen + (part.offset - seen) % part.stride + i * part.stride
                    problem = check_text(text, src.resolved.text_field) or "not a string"
                    raise bad_text(
                        [src.resolved], f"{self.what}: {src.config.path}, shard {part.shard}", index, problem
                    )
            yield from mine
            seen += len(texts)
