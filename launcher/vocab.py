"""Vocabulary extension: the tokens of ``model.add_tokens``, and a ``model.tokenizer`` that extends the tokenizer of
the base model, get rows in the input and output embeddings.

:func:`extend_vocabulary` decides it once, from the recipe, its tokenizer and the base model's config: it adds the
``add_tokens`` to the tokenizer (each a normal, non-special token that encodes to one id), checks that a separate
``model.tokenizer`` keeps every token of the base tokenizer at its id, and grows the config's ``vocab_size`` to the
new vocabulary, padded to a multiple of :data:`PAD_TO` when it no longer fits. The result says, for each new token,
which rows of the base embeddings it starts from: the pieces the base tokenizer splits its text into.

The rows themselves are computed in one place, :class:`GrownMatrix`, from rows of the base matrix read on demand,
so that each engine fills only the rows it holds: FSDP2 a block of rows per rank, ZeRO-3 a flat run of elements per
rank (both reading from the checkpoint's safetensors), ZeRO 0-2 the whole matrix of the model transformers loaded.

- a row of the base vocabulary: the base row;
- a new token: the mean of the base rows of its pieces (the mean of all base rows when it has none);
- a padding row (beyond the tokenizer): the mean of all base rows.

A tied model has one matrix; an untied one computes its output rows from the output matrix's own rows.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AddedToken, AutoTokenizer, PretrainedConfig

from .config import ConfigError, Recipe
from .model import _warn_remote_code, load_config, load_tokenizer, weights_source
from .weights import flat_from_rows

log = logging.getLogger(__name__)

PAD_TO = 64
"""A grown vocabulary is padded to a multiple of this many rows (the matrix shapes GPUs multiply fastest)."""

RowReader = Callable[[int, int], torch.Tensor]
"""Rows ``start:stop`` of a base embedding matrix."""


@dataclass
class VocabExtension:
    """Where each row of the grown embedding matrices starts from."""

    base_config: PretrainedConfig
    """The base model's config: the shapes its checkpoint holds."""
    config: PretrainedConfig
    """The config of the model that trains: ``vocab_size`` grown to :attr:`rows`."""
    base_rows: int
    """Rows of the base embedding matrices."""
    rows: int
    """Rows of the grown matrices."""
    vocab: int
    """Tokens of the extended tokenizer; rows from here to :attr:`rows` are padding."""
    pieces: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """New token id -> the base token ids its text splits into (empty: none; the mean of all rows)."""

    def matrix(self, read: RowReader) -> GrownMatrix:
        return GrownMatrix(self, read)


@dataclass
class VocabPlan:
    """What :func:`extend_vocabulary` decided."""

    config: PretrainedConfig
    """The config to build the model from (the base one when nothing grows)."""
    extension: VocabExtension | None
    """How to fill the embeddings from the base weights; None when they are the base ones as they are (or when
    there are no base weights: a random start only needs the padded config)."""
    added: list[str] = field(default_factory=list)
    """The ``add_tokens`` that were added."""
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str | None:
        """One line on what grew, or None when nothing did."""
        ext = self.extension
        if ext is None and not self.added:
            return None
        size = self.config.get_text_config().vocab_size
        if ext is None:
            return f"vocabulary: {len(self.added)} token(s) added; embeddings of {size} rows, initialised at random"
        without = sum(1 for p in ext.pieces.values() if not p)
        return (
            f"vocabulary: {len(ext.pieces)} new token(s) ({len(self.added)} from model.add_tokens), embeddings of "
            f"{ext.base_rows} rows grown to {ext.rows} (a multiple of {PAD_TO}); each new row starts as the mean of "
            "the base rows of its pieces" + (f" ({without} without pieces: the mean of all rows)" if without else "")
        )


class GrownMatrix:
    """The rows of one grown embedding matrix, computed from the base matrix's rows as they are asked for: a block
    of rows reads those base rows, plus the few rows the new tokens in it start from. The mean of all base rows
    (for padding, and for tokens without pieces) is read in blocks, once."""

    def __init__(self, ext: VocabExtension, read: RowReader):
        self.ext = ext
        self.read = read
        self._mean: torch.Tensor | None = None
        self._piece_rows: dict[int, torch.Tensor] = {}

    def mean(self) -> torch.Tensor:
        """The mean of every row of the base matrix (float32), summed in float64 a block of rows at a time."""
        if self._mean is None:
            n = self.ext.base_rows
            first = self.read(0, 1)
            block = max(1, (1 << 22) // max(1, first[0].numel()))
            total = torch.zeros(first.shape[1:], dtype=torch.float64)
            for start in range(0, n, block):
                total += self.read(start, min(n, start + block)).to(torch.float64).sum(0)
            self._mean = (total / n).to(torch.float32)
        return self._mean

    def _row(self, i: int) -> torch.Tensor:
        if i not in self._piece_rows:
            self._piece_rows[i] = self.read(i, i + 1)[0].to(torch.float32)
        return self._piece_rows[i]

    def new_row(self, token_id: int) -> torch.Tensor:
        """The starting row of a new token: the mean of its pieces' base rows (all rows' mean without pieces)."""
        pieces = self.ext.pieces[token_id]
        if not pieces:
            return self.mean()
        return torch.stack([self._row(i) for i in pieces]).mean(0)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the grown matrix, in float32."""
        ext = self.ext
        base_stop = min(stop, ext.base_rows)
        parts = [self.read(start, base_stop).to(torch.float32)] if start < base_stop else []
        if stop > max(start, ext.base_rows):
            pad = self.mean()
            parts.append(pad.expand(stop - max(start, ext.base_rows), *pad.shape).clone())
        if not parts:
            return torch.empty(0, *self._row(0).shape)
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        for token_id in ext.pieces:
            if start <= token_id < stop:
                out[token_id - start] = self.new_row(token_id)
        return out

    def flat(self, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of the grown matrix flattened (a ZeRO-3 partition): the rows covering them."""
        return flat_from_rows(self.rows, self._row(0).numel(), start, stop)


def embedding_keys(model: nn.Module) -> list[str]:
    """Parameter names of the input and output embedding matrices (one name when they are tied)."""
    wanted = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    return [name for name, p in model.named_parameters() if id(p) in wanted]


@torch.no_grad()
def grow_embeddings(model: nn.Module, ext: VocabExtension) -> None:
    """A whole pretrained model of the base vocabulary (ZeRO 0-2, each rank holds one) grown to ``ext.rows`` rows:
    the same rows :class:`GrownMatrix` gives the sharded engines."""
    keys = embedding_keys(model)
    before = {k: model.get_parameter(k).detach().clone() for k in keys}
    model.resize_token_embeddings(ext.rows, mean_resizing=False)
    for key, base in before.items():
        p = model.get_parameter(key)
        p.copy_(ext.matrix(lambda a, b, base=base: base[a:b]).rows(0, ext.rows))


# ----------------------------------------------------------------------------------------------------- planning


def _tokenizer_source(recipe: Recipe) -> str | None:
    m = recipe.model
    return m.tokenizer or m.name_or_path or m.from_config


def _separate_base(recipe: Recipe) -> bool:
    """Whether the starting weights come with a tokenizer other than the one the run trains with."""
    source = weights_source(recipe)
    return bool(source) and source != _tokenizer_source(recipe)


def _base_tokenizer(recipe: Recipe):
    """The tokenizer of the starting weights when the run's tokenizer comes from elsewhere (``model.tokenizer``),
    else None: the run's tokenizer, before ``model.add_tokens``, is the base one. Starting weights without a
    tokenizer of their own have nothing to be extended."""
    if not _separate_base(recipe):
        return None
    source = weights_source(recipe)
    _warn_remote_code(recipe, "tokenizer", source)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as e:
        log.info("%s has no tokenizer of its own (%s): the run's tokenizer is taken as its vocabulary", source, e)
        return None


def _base_rows(recipe: Recipe, config: PretrainedConfig) -> int:
    """Rows of the embeddings of the starting weights: ``config``'s, unless they come from another directory
    (``model.init_from``) whose config says otherwise."""
    rows = int(config.get_text_config().vocab_size)
    source = weights_source(recipe)
    if not source or source == recipe.model.name_or_path:
        return rows
    from transformers import AutoConfig

    try:
        other = AutoConfig.from_pretrained(source, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError):
        return rows
    return int(getattr(other.get_text_config(), "vocab_size", None) or rows)


def _first_difference(base: dict[str, int], ext: dict[str, int]) -> str | None:
    for token, i in sorted(base.items(), key=lambda item: item[1]):
        if ext.get(token) != i:
            where = f"id {ext[token]}" if token in ext else "no id"
            return f"token {token!r} has id {i} in the base tokenizer and {where} in this one"
    return None


def _text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _empty_tokens(recipe: Recipe) -> list[str]:
    return [f"model.add_tokens[{i}]: empty; a token needs at least one character"
            for i, t in enumerate(recipe.model.add_tokens) if not t]  # fmt: skip


def _with_rows(config: PretrainedConfig, rows: int) -> PretrainedConfig:
    if int(config.get_text_config().vocab_size) == rows:
        return config
    config = copy.deepcopy(config)
    config.get_text_config().vocab_size = rows
    return config


def extend_vocabulary(recipe: Recipe, tokenizer, config: PretrainedConfig) -> VocabPlan:
    """Add ``model.add_tokens`` to ``tokenizer`` (in place) and decide the grown config and the starting rows of
    the new tokens. Raises ConfigError naming ``model.tokenizer`` (a tokenizer that does not extend the base one)
    or ``model.add_tokens[i]`` (an empty entry, one that does not encode to one id once added)."""
    m = recipe.model
    problems = _empty_tokens(recipe)
    has_weights = bool(weights_source(recipe))
    base_tok = _base_tokenizer(recipe) if has_weights else None
    vocab = tokenizer.get_vocab()
    base_vocab = base_tok.get_vocab() if base_tok is not None else dict(vocab)
    pieces_of = base_tok if base_tok is not None else tokenizer
    warnings: list[str] = []
    adding: list[tuple[int, str]] = []
    for i, text in enumerate(m.add_tokens):
        if not text:
            continue
        if text in {t for _, t in adding}:
            warnings.append(f"model.add_tokens[{i}]: {text!r} is listed twice; added once")
        elif text in vocab or len(_encode(tokenizer, text)) == 1:
            warnings.append(f"model.add_tokens[{i}]: {text!r} is already one token of the vocabulary; skipped")
        else:
            adding.append((i, text))
    # The pieces of the added tokens, from the base tokenizer as it is before they are added.
    add_pieces = {text: tuple(_encode(pieces_of, text)) for _, text in adding}
    if adding:
        tokenizer.add_tokens([AddedToken(text, special=False, normalized=False) for _, text in adding])
        problems += [
            f"model.add_tokens[{i}]: {text!r} does not encode to one token once added (it gives {ids}); this "
            "tokenizer splits or normalises it before added tokens are matched"
            for i, text in adding
            if len(ids := _encode(tokenizer, text)) != 1
        ]
    # The tokenizer the run trains with, tokens added, keeps every token of the starting weights at its id.
    if base_tok is not None and (diff := _first_difference(base_vocab, tokenizer.get_vocab())):
        key = "model.tokenizer" if m.tokenizer else "model.name_or_path"
        problems.append(
            f"{key}: the tokenizer {_tokenizer_source(recipe)}"
            + (" with model.add_tokens" if adding else "")
            + f" does not extend the tokenizer of the starting weights {weights_source(recipe)}: {diff}. A "
            "tokenizer for these weights must keep every one of their tokens at its id and add new ones after them"
        )
    if problems:
        raise ConfigError(problems)

    added = [text for _, text in adding]
    size = len(tokenizer)
    base_rows = _base_rows(recipe, config) if has_weights else int(config.get_text_config().vocab_size)
    rows = math.ceil(size / PAD_TO) * PAD_TO if size > base_rows else base_rows
    grown = _with_rows(config, rows)
    if not has_weights:
        return VocabPlan(grown, None, added, warnings)
    base_ids = set(base_vocab.values())
    pieces: dict[int, tuple[int, ...]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in base_ids:
            continue
        found = add_pieces.get(token)
        if found is None:  # a token of model.tokenizer: its text as the base tokenizer splits it
            found = tuple(_encode(pieces_of, _text(tokenizer, token_id)))
        pieces[token_id] = tuple(i for i in found if 0 <= i < base_rows)
    if not pieces and rows == base_rows:
        return VocabPlan(grown, None, added, warnings)
    ext = VocabExtension(base_config=_with_rows(config, base_rows), config=grown, base_rows=base_rows, rows=rows,
                         vocab=size, pieces=dict(sorted(pieces.items())))  # fmt: skip
    return VocabPlan(grown, ext, added, warnings)


def check_vocabulary(recipe: Recipe, load: bool = True) -> list[str]:
    """The pre-flight check of the vocabulary keys: empty ``model.add_tokens`` entries always; with ``load`` (the
    model's files are there) the whole plan, as each worker will make it: a ``model.tokenizer`` that does not
    extend the base tokenizer, tokens that do not encode to one id."""
    if not load or not (recipe.model.add_tokens or _separate_base(recipe)):
        return _empty_tokens(recipe)
    try:
        tokenizer, config = load_tokenizer(recipe), load_config(recipe)
    except (OSError, ValueError):
        return _empty_tokens(recipe)  # the model and tokenizer checks name what is missing
    try:
        extend_vocabulary(recipe, tokenizer, config)
    except ConfigError as e:
        return e.problems
    return []
