"""Documents to fixed-length blocks.

Packing is the contract between data and loss: each document is tokenized without special tokens, EOS is
appended, documents are concatenated into one stream and the stream is cut into ``seq_len`` blocks. No padding
means every token of a training block is learned from, and EOS teaches the model where documents end.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

TOKENIZE_BATCH = 64
"""Documents handed to the tokenizer at once: batches amortise the per-call overhead of the fast tokenizers."""


def pack(
    token_docs: Iterable[list[int]], seq_len: int, *, keep_partial: bool, eos_id: int | None = None
) -> Iterator[list[int]]:
    """Concatenate documents and cut the stream into blocks of ``seq_len`` tokens.

    With ``eos_id``, it is appended to every document (the packing contract); without, documents are used as
    given (for example when they already end in EOS). Empty documents are skipped, so they never add a lone EOS.
    ``keep_partial`` keeps the final short block: evaluation wants every token scored, training wants every
    block full.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    buffer: list[int] = []
    for doc in token_docs:
        if not doc:
            continue
        buffer.extend(doc)
        if eos_id is not None:
            buffer.append(eos_id)
        if len(buffer) >= seq_len:
            full = len(buffer) - len(buffer) % seq_len
            for start in range(0, full, seq_len):
                yield buffer[start : start + seq_len]
            del buffer[:full]
    if keep_partial and buffer:
        yield buffer


def tokenize_documents(
    texts: Iterable[str], tokenizer: Any, *, batch_size: int = TOKENIZE_BATCH
) -> Iterator[list[int]]:
    """Token ids of each non-blank document, without special tokens and without EOS (``pack`` adds it).

    Whitespace-only documents are dropped before tokenization: they carry no text, and some tokenizers would
    still turn them into tokens.
    """
    batch: list[str] = []
    for text in texts:
        if not text or text.isspace():
            continue
        batch.append(text)
        if len(batch) >= batch_size:
            yield from _encode(tokenizer, batch)
            batch = []
    if batch:
        yield from _encode(tokenizer, batch)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # verbose=False: documents longer than the model's context are expected here; packing cuts them.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def eos_id_of(tokenizer: Any, what: str) -> int:
    """The tokenizer's EOS id; packing cannot separate documents without one."""
    from launcher.data.sources import DataError

    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(f"{what}: the tokenizer has no eos_token; packing needs one to mark where documents end")
    return int(eos)
