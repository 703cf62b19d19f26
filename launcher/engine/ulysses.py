"""Sequence parallelism (``parallel.sequence_parallel: N``), Ulysses style, for both engines.

Groups of N contiguous ranks share each sequence. Every rank of a group reads the same micro-batch (the data stream
is built for the data-parallel rank, ``rank // N``) and keeps the N-th part of each sequence that is its own:
embeddings, norms, MLPs and the loss run on T/N tokens. Inside attention one all-to-all turns "all heads of T/N
tokens" into "H/N heads of all T tokens", the attention kernel runs over the whole sequence (causal, or the
whole sequence's document mask), and a second all-to-all turns the result back. The exchanges are torch's
differentiable functional collectives, which run on gloo and NCCL and trace under torch.compile.

The attention runs as a transformers attention implementation of its own, ``"ulysses"`` (the sdpa function around
the exchanges, registered beside the others, nothing replaced), and the model's config points at it; its mask
builder makes no local mask, since a mask of T/N tokens would be wrong for the whole sequence.

The loss is weighted by tokens over the group, never a mean of the ranks' means: each rank returns the sum of its
tokens' losses over the token count of the whole micro-batch, so the N parts add up to the micro-batch's mean loss
and the gradients of the N ranks add up to its gradient. The labels are shifted before the sequence is cut, so the
first token of each part is predicted by the last token of the part before it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..compat import attention_implementation

log = logging.getLogger(__name__)

IMPLEMENTATION = "ulysses"
"""The attention implementation name a sequence-parallel model's config carries."""
MASK_KWARG = "sequence_mask"
"""The keyword that carries the whole sequence's document mask from the model's call to every attention layer."""
IGNORE_INDEX = -100


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in its group of ``size`` contiguous ranks that share each sequence."""

    size: int
    rank: int
    """Rank within the group: which N-th of each sequence this rank holds."""
    group: Any
    """The group's process group."""

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``t`` along the sequence (dimension 1)."""
        n = t.shape[1] // self.size
        return t[:, self.rank * n : (self.rank + 1) * n]

    def train_inputs(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The model's inputs for this rank's part of a training micro-batch (``input_ids`` ``[B, T]``, ``labels``,
        with document masking ``position_ids``), the targets of its tokens (labels shifted by one, before the
        cut), and the number of targets of the whole micro-batch, which every rank of the group divides by."""
        target = shifted(batch["labels"])
        count = (target != IGNORE_INDEX).sum().clamp(min=1).to(torch.float32)
        return self.model_inputs(batch["input_ids"], batch.get("position_ids")), self.shard(target), count

    def model_inputs(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Token ids and their positions in the whole sequence (``arange(T)`` unless ``positions`` are given,
        which restart at each packed document), cut to this rank's part; with ``positions``, the whole sequence's
        block-causal document mask as :data:`MASK_KWARG`."""
        if ids.shape[1] % self.size:
            raise ValueError(f"a sequence of {ids.shape[1]} tokens does not split over {self.size} ranks")
        whole = positions if positions is not None else torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        inputs = {"input_ids": self.shard(ids), "position_ids": self.shard(whole)}
        if positions is not None:
            inputs[MASK_KWARG] = document_mask(positions)
        return inputs

    def pad(self, ids: torch.Tensor, labels: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids`` and ``labels`` right-padded to a multiple of the group size (ignored labels): right padding
        leaves every real token's causal attention as it was."""
        extra = -ids.shape[1] % self.size
        if not extra:
            return ids, labels
        pad = nn.functional.pad
        return pad(ids, (0, extra), value=pad_id), pad(labels, (0, extra), value=IGNORE_INDEX)


def shifted(labels: torch.Tensor) -> torch.Tensor:
    """Each position's target: the next token's label, ignored at the last position."""
    return nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` bool, True where a token may attend: causal within its packed document. A document begins
    where the position does not follow the one before (transformers' rule for packed position ids)."""
    step = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1)
    doc = (step != 1).cumsum(-1)
    t = positions.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def sequence_loss(logits: torch.Tensor, target: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Sum of this rank's token losses over the group's target count (``logits`` ``[B, T/N, V]``)."""
    nll = nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll / count


def _exchange(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Chunk i of dimension 0 goes to rank i of the group; chunk i of the result came from rank i. Differentiable."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    return all_to_all_single_autograd(x.contiguous(), None, None, group)


def _whole_sequence(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """``[B, h, T/N, D]`` (all heads, this rank's tokens) -> ``[B, h/N, T, D]`` (its heads, every token)."""
    b, h, s, d = x.shape
    n = sp.size
    x = _exchange(x.reshape(b, n, h // n, s, d).transpose(0, 1), sp.group)  # [N (token part), B, h/N, T/N, D]
    return x.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * s, d)


def _own_tokens(out: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """``[B, T, H/N, D]`` (its heads, every token) -> ``[B, T/N, H, D]`` (all heads, this rank's tokens)."""
    b, t, hl, d = out.shape
    n = sp.size
    out = _exchange(out.reshape(b, n, t // n, hl, d).transpose(0, 1), sp.group)  # [N (head group), B, T/N, H/N, D]
    return out.permute(1, 2, 0, 3, 4).reshape(b, t // n, n * hl, d)


def attention_function(sp: SequenceParallel):
    """A transformers attention function (``module, query, key, value, attention_mask, **kwargs``, tensors
    ``[B, heads, T/N, D]``) that attends over the whole sequence through transformers' sdpa function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        mask = kwargs.pop(MASK_KWARG, None)  # the whole sequence's; the local one is of T/N tokens and unused
        q, k, v = (_whole_sequence(x, sp) for x in (query, key, value))
        out, _ = sdpa_attention_forward(module, q, k, v, mask, **kwargs)
        return _own_tokens(out, sp), None

    return attention


def _no_local_mask(*args, **kwargs) -> None:
    return None


def install(model: Any, sp: SequenceParallel) -> None:
    """Point ``model``'s attention at the sequence-parallel function of ``sp`` (this worker's one model)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, attention_function(sp))
    AttentionMaskInterface.register(IMPLEMENTATION, _no_local_mask)
    # The model gets a config of its own first: a config object is shared with whatever else was built from it,
    # and building another model from it (the reference model that weights are checked against) would set its
    # attention implementation back.
    shared = model.config
    own = copy.deepcopy(shared)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = own
    model.set_attn_implementation(IMPLEMENTATION)
    if attention_implementation(model) != IMPLEMENTATION:
        raise RuntimeError(
            f"parallel.sequence_parallel: {type(model).__name__} keeps its own attention implementation; "
            "sequence parallelism needs a model whose attention follows transformers' attention interface"
        )


def contiguous_group(size: int):
    """This rank's group of ``size`` contiguous ranks (``[g * size, (g + 1) * size)``); every rank calls it."""
    group, _ = dist.new_subgroups(group_size=size)
    return group


def join(model: nn.Module, size: int, group: Any = None) -> SequenceParallel | None:
    """Make this rank a member of its sequence-parallel group of ``size`` (``group``: one made already, e.g. by
    DeepSpeed) and route ``model``'s attention through it; None when ``size`` is 1."""
    if size <= 1:
        return None
    group = group if group is not None else contiguous_group(size)
    sp = SequenceParallel(size, dist.get_rank(group), group)
    install(model, sp)
    log.info("sequence parallel: part %d of %d of each sequence (data-parallel rank %d of %d)", sp.rank + 1, size,
             dist.get_rank() // size, dist.get_world_size() // size)  # fmt: skip
    return sp
