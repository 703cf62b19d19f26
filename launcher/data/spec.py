"""What a training stream is, fixed for its whole life: :class:`StreamSpec`, built once by
:class:`~launcher.data.stream.TrainStream` and handed down to every DataLoader worker and reader."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from launcher.config import SourceConfig, weight_at

STOPPING_RULES = ("all_exhausted", "first_exhausted", "token_budget")


@dataclass(frozen=True)
class StreamSpec:
    """The settings of one rank's training stream. Together with the sources and the number of DataLoader
    workers they decide every token of it: two streams of equal specs yield the same batches."""

    seq_len: int
    micro_batch_size: int
    rank: int
    world_size: int
    seed: int
    eos_id: int
    """Appended to every document; it is also where ``document_masking`` restarts the positions."""
    shuffle_buffer: int = 0
    """Documents per shuffled window of a source; 0 reads every source in order."""
    stopping: str = "all_exhausted"
    budgets: tuple[int, ...] | None = None
    """Under ``stopping: token_budget``, the tokens of each source per pass over all readers; else None."""
    document_masking: bool = False
    grad_accum: int = 1
    """Micro-batches of a rank per optimizer step: batch ``m`` of a rank (from 0) is of step ``m // grad_accum``,
    which is what a weight schedule (``SourceConfig.weight``) is read at."""

    def __post_init__(self) -> None:
        if self.seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        if self.micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {self.micro_batch_size}")
        if self.world_size <= 0 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be within [0, world_size), got rank={self.rank}, world_size={self.world_size}")
        if self.grad_accum <= 0:
            raise ValueError(f"grad_accum must be positive, got {self.grad_accum}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.stopping not in STOPPING_RULES:
            raise ValueError(f"stopping must be one of {', '.join(STOPPING_RULES)}, got {self.stopping!r}")
        if (self.budgets is not None) != (self.stopping == "token_budget"):
            raise ValueError("budgets are given under stopping=token_budget, and only then (see budgets_of)")

    @property
    def batch_tokens(self) -> int:
        """Tokens in one micro-batch."""
        return self.micro_batch_size * self.seq_len


def budgets_of(sources: Sequence[SourceConfig], stopping: str, token_budget: int | None) -> tuple[int, ...] | None:
    """Tokens per pass of each source over all readers under the token_budget rule: ``token_budget`` split by the
    weights, else each source's own. The recipe check (``launcher.config``) has already made sure the budgets are
    set in exactly one of these two ways; this only computes them."""
    if stopping != "token_budget":
        return None
    if token_budget is not None:
        weights = [weight_at(s.weight, 0) for s in sources]  # numbers: the recipe check refuses schedules here
        total = sum(weights)
        return tuple(max(1, round(token_budget * w / total)) for w in weights)
    own = []
    for s in sources:
        assert s.token_budget is not None, "the recipe check requires a token_budget on every source"
        own.append(s.token_budget)
    return tuple(own)
