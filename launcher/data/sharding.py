"""How a source is divided among the readers of the training data: one reader per (rank, DataLoader worker).

A source is a list of shards: its files, or the row groups of its Parquet files when there are fewer files than
readers (``datasets`` can split Parquet per row group; other formats only per file). Every reader must get a
disjoint part of every shard list, and together they must cover it, or documents are skipped or seen twice.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    """What one reader takes from one shard: its documents ``offset``, ``offset + stride``, ... (stride 1: the
    whole shard). Documents are counted in the shard's own order."""

    shard: int
    stride: int = 1
    offset: int = 0


def assign_parts(num_shards: int, num_readers: int, reader: int, order: Sequence[int] | None = None) -> list[Part]:
    """The parts of ``reader`` (0-based) when ``num_shards`` shards are divided among ``num_readers`` readers.

    Whole shards are dealt round-robin while every reader can get one (``num_shards // num_readers`` each). Each
    of the ``num_shards % num_readers`` shards left over is shared by a group of about equally many readers, who
    split it document by document: every reader of the group reads that shard but tokenizes only its own
    documents. So every document goes to exactly one reader, the readers' shares differ by at most a fraction of
    one shard, and a reader reads at most one shard beyond its own documents -- instead of every reader reading
    everything whenever the number of shards does not divide the number of readers.

    ``order`` is the shard order of this pass (a permutation, for shuffling); the default is the natural order.
    """
    if num_readers <= 0 or not 0 <= reader < num_readers:
        raise ValueError(f"reader must be within [0, num_readers), got reader={reader}, num_readers={num_readers}")
    order = list(range(num_shards)) if order is None else list(order)
    if sorted(order) != list(range(num_shards)):
        raise ValueError(f"order must be a permutation of range({num_shards})")
    whole, left = divmod(num_shards, num_readers)
    parts = [Part(order[i]) for i in range(reader, whole * num_readers, num_readers)]
    if left:
        group = reader % left
        parts.append(Part(order[whole * num_readers + group], len(range(group, num_readers, left)), reader // left))
    return parts


def shard_order(num_shards: int, *, seed: int, source: int, cycle: int, shuffle: bool) -> list[int]:
    """The shard order of one cycle (pass over a source): natural, or a permutation that every reader computes
    alike from (seed, source, cycle), so that the readers' parts still partition the shards."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(rng_key("shards", seed, source, cycle)).shuffle(order)
    return order


def rng_key(*parts: object) -> str:
    """A seed for ``random.Random``: strings are hashed with SHA-512, so the same parts give the same stream in
    every process, whatever PYTHONHASHSEED is."""
    return "cpt/" + "/".join(map(str, parts))


@dataclass(frozen=True)
class Span:
    """Documents ``start`` up to ``stop`` (exclusive; -1: to the end) of one part, counted in the reading order the
    part has in pass ``cycle`` over its source while the source is divided into ``shards`` shards.

    A span names its documents without naming a reader: every process reads the same documents from it, in the
    same order (the shuffle of a part depends on the seed, the source, the cycle and the part, never on who reads
    it). That is what lets a data position be divided anew among another number of readers.
    """

    cycle: int
    shards: int
    part: Part
    start: int = 0
    stop: int = -1

    def to_list(self) -> list[int]:
        """``[cycle, shards, shard, stride, offset, start, stop]``: the span as plain JSON."""
        return [self.cycle, self.shards, self.part.shard, self.part.stride, self.part.offset, self.start, self.stop]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> Span:
        cycle, shards, shard, stride, offset, start, stop = (int(v) for v in values)
        return cls(cycle, shards, Part(shard, stride, offset), start, stop)

    @staticmethod
    def valid(values: object) -> bool:
        """Whether ``values`` is what :meth:`to_list` gives."""
        if not isinstance(values, list) or len(values) != 7:
            return False
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return False
        cycle, shards, shard, stride, offset, start, stop = values
        return (
            cycle >= 0 and 0 <= shard < shards and 0 <= offset < stride and start >= 0 and (stop == -1 or stop >= start)
        )

    def holds(self, doc: int) -> bool:
        """Whether document ``doc`` of the part (in its reading order) is in the span."""
        return doc >= self.start and (self.stop < 0 or doc < self.stop)
