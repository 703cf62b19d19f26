"""Next-token cross-entropy fused with the output projection, computed a chunk of tokens at a time.

The plain path materialises the logits of the whole micro-batch (tokens x vocab) in bf16, then again in fp32 for
the softmax, and keeps them for the backward pass: at micro-batch 16 x 2048 and a 32K vocabulary that is 6 GiB,
at a 128K vocabulary 24 GiB. Here each chunk of tokens is projected, its loss and its gradients (with respect
to the hidden states and to the projection weight) are worked out at once, and the chunk's logits are dropped
before the next chunk: the backward pass only scales the stored gradients. The FLOPs are the same as the plain
path (one forward and two backward matmuls per chunk); nothing is recomputed. Between the projection and the
gradient matmuls, a chunk's element-wise work (log-sum-exp, softmax minus one-hot, the cast back) is compiled with
the layers under ``train.compile``: eager, it makes about eight passes over the chunk's fp32 logits.

The model's output projection is replaced, before sharding, by a module holding the very same weight parameter
(``set_output_embeddings``), so the parameter, its name in state dicts and weight tying are unchanged, and the
sharding engines put their hooks on it as on any layer. Without pending labels (evaluation, generation) it is a
plain linear layer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHUNK_BYTES = 1 << 30
"""fp32 logits held at once: the chunk is the largest power of two of tokens that fits (8192 tokens at a 32K
vocabulary, 2048 at 128K). Larger chunks mean larger, more efficient matmuls."""


def chunk_tokens(vocab: int, budget: int = CHUNK_BYTES) -> int:
    rows = max(1, budget // (4 * vocab))
    return 1 << (rows.bit_length() - 1)


Terms = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]
"""``(logits, labels, count, want_grad) -> (summed loss, d loss / d logits in the logits' dtype or None)`` of one
chunk: the element-wise part of the loss, between the chunk's projection and its two gradient matmuls."""


def _loss_sum(
    wide: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk's summed loss from its fp32 logits, with what the gradient needs: ``(loss, lse, target, valid)``."""
    valid = labels != IGNORE_INDEX
    target = labels.clamp(min=0)
    lse = torch.logsumexp(wide, dim=-1)
    return ((lse - wide.gather(1, target[:, None]).squeeze(1)) * valid).sum(), lse, target, valid


def eager_terms(
    logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:data:`Terms` in place on one fp32 copy of the logits (no compiler): each step one pass over the chunk."""
    wide = logits.float()
    loss, lse, target, valid = _loss_sum(wide, labels)
    if not want_grad:
        return loss, None
    # d loss / d logits = softmax - onehot, per valid token, over the token count (the mean)
    grad = wide.sub_(lse[:, None]).exp_()
    grad[torch.arange(grad.shape[0], device=grad.device), target] -= 1
    grad *= (valid.to(grad.dtype) / count)[:, None]
    return loss, grad.to(logits.dtype)


def pointwise_terms(
    logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:data:`Terms` as element-wise expressions only (the one-hot a comparison, not a scatter), the same arithmetic
    as :func:`eager_terms`, written for torch.compile: it fuses them into a reduction and one pass that reads the
    logits in their own dtype and writes the gradient, where the eager form makes about eight passes over fp32
    logits (the 1.1B shape: 4 chunks of 8192 x 32000 a micro-batch)."""
    wide = logits.float()
    loss, lse, target, valid = _loss_sum(wide, labels)
    if not want_grad:
        return loss, None
    p = (wide - lse[:, None]).exp()
    hit = torch.arange(wide.shape[1], device=wide.device)[None, :] == target[:, None]
    grad = torch.where(hit, p - 1, p) * (valid.to(p.dtype) / count)[:, None]
    return loss, grad.to(logits.dtype)


@functools.cache
def compiled_terms() -> Terms:
    """:func:`pointwise_terms` through torch.compile, made once per process (a chunk of another length, such as
    a micro-batch's last, compiles one shape-generic variant more)."""
    return cast(Terms, torch.compile(pointwise_terms))


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum cross_entropy(hidden @ weight.T, labels) / count`` over the labels that are not IGNORE_INDEX; ``count``
    is their number unless given (a sequence-parallel rank divides by its whole group's)."""

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, count: torch.Tensor | None,
        terms: Terms,
    ) -> torch.Tensor:  # fmt: skip
        n = hidden.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if count is None:
            count = (labels != IGNORE_INDEX).sum().clamp(min=1)
        count = count.to(device=hidden.device, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk]
            loss, grad = terms(h @ weight.t(), labels[start : start + chunk], count, want_h or want_w)
            total += loss
            if grad is None:
                continue
            if grad_h is not None:
                torch.matmul(grad, weight, out=grad_h[start : start + chunk])
            if grad_w is not None:
                grad_w += (grad.t() @ h).float()
            del grad
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk: int | None = None,
    *,
    targets: bool = False,
    count: torch.Tensor | None = None,
    terms: Terms = eager_terms,
) -> torch.Tensor:
    """Mean next-token loss of ``hidden`` [batch, seq, dim] projected by ``weight`` [vocab, dim]: position t
    predicts ``labels[t+1]``. Matches ``causal_lm_loss(hidden @ weight.T, labels)``. With ``targets`` the labels
    are each position's own target already (shifted), and with ``count`` the sum is divided by it instead of by
    the number of targets (a sequence-parallel rank's part of its group's loss). ``terms`` works out each chunk's
    element-wise part (:func:`compiled_terms` with ``train.compile``)."""
    if targets:
        h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    else:
        h, y = hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)
    return _LinearCrossEntropy.apply(h, weight, y, chunk or chunk_tokens(weight.shape[0]), count, terms)


class FusedLossHead(nn.Module):
    """The model's ``lm_head`` after :func:`install_fused_loss`: a linear layer without bias over the original
    weight. With labels set by :func:`set_labels` its next forward returns the micro-batch's mean loss (shape
    [1, 1, 1], where the logits would be) instead of logits."""

    pending_labels: torch.Tensor | None = None
    pending_count: torch.Tensor | None = None
    """With sequence parallelism: the labels are targets (shifted) and the sum is divided by this count."""

    def __init__(self, weight: nn.Parameter, terms: Terms = eager_terms):
        super().__init__()
        self.weight = weight
        self.terms = terms
        # ZeRO-3 leaves the parameter a partition; ds_shape is the whole weight's shape.
        self.out_features, self.in_features = tuple(getattr(weight, "ds_shape", weight.shape))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        labels = self.pending_labels
        if labels is None:
            return nn.functional.linear(hidden, self.weight)
        count, self.pending_labels, self.pending_count = self.pending_count, None, None
        targets = count is not None
        loss = linear_cross_entropy(hidden, self.weight, labels, targets=targets, count=count, terms=self.terms)
        return loss.view(1, 1, 1).clone()


# Configs that change the logits after the projection: the fused loss would skip that step.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def install_fused_loss(model: nn.Module, compiled: bool = False) -> bool:
    """Switch the output projection of a Hugging Face causal LM to :class:`FusedLossHead` (``compiled``: its
    element-wise part through torch.compile). False (and the model unchanged) where the model is not a plain
    ``hidden -> lm_head -> logits`` decoder."""
    head = getattr(model, "lm_head", None) if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    transforms = [k for k in _LOGIT_TRANSFORMS if getattr(cfg, k, None) not in (None, 1, 1.0)]
    if type(head) is not nn.Linear or head.bias is not None or transforms:
        why = f"it sets {transforms}" if transforms else "its output projection is not a plain linear layer"
        log.info("train.fused_loss: using the model's logits instead, %s", why)
        return False
    model.set_output_embeddings(FusedLossHead(head.weight, compiled_terms() if compiled else eager_terms))
    return True


def set_labels(model: nn.Module, labels: torch.Tensor, count: torch.Tensor | None = None) -> None:
    """The labels the head's next forward takes the loss of; with ``count``, each position's target and the
    count to divide the sum by (:mod:`launcher.engine.ulysses`)."""
    head = model.get_submodule("lm_head")
    assert isinstance(head, FusedLossHead)
    head.pending_labels, head.pending_count = labels, count


def clear_labels(model: nn.Module) -> None:
    head = model.get_submodule("lm_head")
    if isinstance(head, FusedLossHead):
        head.pending_labels = head.pending_count = None
