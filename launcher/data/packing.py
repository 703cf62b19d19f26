"""Documents to fixed-length blocks: the one tokenize loop and the one packer that training and evaluation share.

Packing is the contract between data and loss: each document is tokenized without special tokens, EOS is
appended, documents are concatenated into one stream and the stream is cut into ``seq_len`` blocks. No padding
means every token of a training block is learned from, and EOS teaches the model where documents end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

TOKENIZE_BATCH = 64
"""Documents handed to the tokenizer at once: batches amortise the per-call overhead of the fast tokenizers."""

K = TypeVar("K")


def tokenize(
    documents: Iterable[tuple[K, str]], tokenizer: Any, *, batch_size: int = TOKENIZE_BATCH
) -> Iterator[tuple[K, list[int]]]:
    """(key, token ids) of each non-blank document, without special tokens and without EOS; ``key`` travels with
    its text through the batching (training uses it for the document's position in its source).

    Whitespace-only documents are dropped before tokenization: they carry no text, and some tokenizers would
    still turn them into tokens.
    """
    keys: list[K] = []
    texts: list[str] = []
    for key, text in documents:
        if not text or text.isspace():
            continue
        keys.append(key)
        texts.append(text)
        if len(texts) >= batch_size:
            yield from zip(keys, encode(tokenizer, texts))
            keys, texts = [], []
    if texts:
        yield from zip(keys, encode(tokenizer, texts))


def tokenize_documents(
    texts: Iterable[str], tokenizer: Any, *, batch_size: int = TOKENIZE_BATCH
) -> Iterator[list[int]]:
    """Token ids of each non-blank document (:func:`tokenize` without keys); ``pack`` adds the EOS."""
    for _, ids in tokenize(((None, t) for t in texts), tokenizer, batch_size=batch_size):
        yield ids


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens.

    A Hugging Face fast tokenizer whose Rust backend is set up as ``tokenizer(texts)`` would set it (no truncation,
    no padding, special tokens in the text handled as configured) is called directly through ``encode_batch_fast``,
    which skips computing character offsets and building a BatchEncoding: 10-20% more tokens per second, the
    same ids. Any other tokenizer is called as usual.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is not None
        and hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    # verbose=False: documents longer than the model's context are expected here; packing cuts them.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


@dataclass(slots=True)
class Segment:
    """A document in the packer, EOS included: ``start`` of its ``length`` tokens are in blocks already."""

    source: int
    """Which source it came from, for the per-source token counts of each block."""
    position: Any
    """Where in its source it came from, to resume from it."""
    length: int
    start: int = 0


class Packer:
    """The packing core: documents go in whole, EOS appended; blocks of any length come out, cut wherever they end.

    The pending tokens are one flat list, read from an offset that moves on and is compacted now and then, so
    cutting costs the same whatever the document lengths. With ``track``, each pending document is also kept as a
    :class:`Segment` (``pending``): where it came from and how far it was cut, which is all a resume needs to
    rebuild the packer, and what the per-source counts of each block come from.
    """

    COMPACT = 1 << 16
    """Consumed tokens kept at the head of the list before it is compacted: a few memmoves per million tokens."""

    def __init__(self, eos_id: int | None, num_sources: int = 1, *, track: bool = True):
        self.eos_id = eos_id
        self.num_sources = num_sources
        self.track = track
        self.pending: deque[Segment] = deque()
        self._tokens: list[int] = []
        self._head = 0

    @property
    def size(self) -> int:
        """Tokens pending."""
        return len(self._tokens) - self._head

    def add(self, tokens: list[int], source: int = 0, position: Any = None, *, start: int = 0) -> int:
        """Append a document (from its token ``start`` on, for one partly cut before a resume); returns its
        length with EOS."""
        buffer = self._tokens
        before = len(buffer)
        buffer.extend(tokens)
        if self.eos_id is not None:
            buffer.append(self.eos_id)
        length = len(buffer) - before
        if start:
            del buffer[before : before + start]
        if self.track:
            self.pending.append(Segment(source, position, length, start))
        return length

    def cut(self, n: int) -> tuple[list[int], list[int]]:
        """The next ``n`` pending tokens (at most ``size``) and, with ``track``, how many of them came from each
        source (else no counts)."""
        head = self._head
        ids = self._tokens[head : head + n]
        head += n
        if head >= self.COMPACT and 2 * head >= len(self._tokens):
            del self._tokens[:head]
            head = 0
        self._head = head
        if not self.track:
            return ids, []
        counts = [0] * self.num_sources
        pending = self.pending
        while n:
            g = pending[0]
            take = min(n, g.length - g.start)
            counts[g.source] += take
            g.start += take
            n -= take
            if g.start == g.length:
                pending.popleft()
        return ids, counts

    def clear(self) -> None:
        self.pending.clear()
        self._tokens = []
        self._head = 0


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
    packer = Packer(eos_id, track=False)
    pending = 0  # packer.size, kept here: this loop runs once per document
    for doc in token_docs:
        if not doc:
            continue
        pending += packer.add(doc)
        while pending >= seq_len:
            yield packer.cut(seq_len)[0]
            pending -= seq_len
    if keep_partial and pending:
        yield packer.cut(pending)[0]


def document_position_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Positions of packed blocks ``[B, T]`` that restart at 0 at the start of each row and after every EOS.

    The token after an EOS starts a new document; a document cut by the start of a block counts from 0 as well,
    as it would without masking. Given to a Hugging Face model (with no attention mask and no KV cache), these
    make attention stay within each document and rotary positions count from each document's start.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    index = torch.arange(length, device=input_ids.device).expand(batch, length)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def eos_id_of(tokenizer: Any, what: str) -> int:
    """The tokenizer's EOS id; packing cannot separate documents without one."""
    from launcher.data.sources import DataError

    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(f"{what}: the tokenizer has no eos_token; packing needs one to mark where documents end")
    return int(eos)
