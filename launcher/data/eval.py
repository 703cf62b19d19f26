"""Per-rank eval blocks: every rank packs the whole eval set as one stream and keeps every world_size-th block,
so the union over ranks is exactly what a single process would score, whatever the world size. A training source
that holds documents out is evaluated on exactly those."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from launcher.config import SourceConfig
from launcher.data.packing import eos_id_of, pack, tokenize_documents
from launcher.data.readers import READ_BATCH, held_out_documents
from launcher.data.sources import (
    DataError,
    ResolvedSource,
    bad_text,
    check_text,
    describe_failure,
    open_source,
    resolve,
)


def _texts(ds: Any) -> Iterator[Any]:
    """The ``text`` column, read in batches. ``IterableDataset.iter`` does not split by DataLoader worker."""
    for batch in ds.iter(batch_size=READ_BATCH):
        yield from batch["text"]


def _checked(texts: Iterable[Any], resolved: ResolvedSource, what: str) -> Iterator[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise bad_text([resolved], what, i, check_text(text, resolved.text_field) or "not a string")
        yield text


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
    process, so perplexity does not depend on the world size. A source with ``holdout_documents`` (a training
    source's held-out part, see :meth:`launcher.config.Recipe.eval_sources`) gives only those documents, the
    ones its training stream skips. Raises DataError when the set holds no text.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be within [0, world_size), got rank={rank}, world_size={world_size}")
    if max_blocks is not None and max_blocks <= 0:
        raise ValueError(f"max_blocks must be positive, got {max_blocks}")
    held = source.holdout_documents
    what = f"eval set {source.path}" + (f" (its first {held} documents, held out of training)" if held else "")
    eos_id = eos_id_of(tokenizer, what)
    resolved = resolve(source)
    ds = open_source(source)
    mine: list[list[int]] = []
    total = 0
    try:
        records = (r for _, r in islice(held_out_documents(ds, source), held)) if held else _texts(ds)
        texts = _checked(records, resolved, what)
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
        raise DataError(describe_failure([resolved], e)) from e
    if total == 0:
        raise DataError(f"{what}: no text to evaluate on (every document is empty)")
    return mine
