"""How long a run trains: ``train.max_steps``, or the steps that ``train.max_tokens`` asks for.

Continual pretraining is budgeted in tokens ("10B tokens of domain data"). With ``train.max_tokens`` the number of
optimizer steps follows from it and the tokens per step (global batch x seq_len), rounding up so that at least
that many tokens are trained, and the learning-rate schedule, evaluation, checkpoints and the model card use those
steps. ``train.max_tokens`` wins over ``train.max_steps`` (whose default of 1000 cannot be told apart from a value
the recipe wrote), except ``train.max_steps=0``, which still means: evaluate the model and exit.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from .config import BatchLayout, Recipe, TrainConfig

log = logging.getLogger(__name__)


def train_steps(train: TrainConfig, tokens_per_step: int) -> int:
    """Optimizer steps of the run: ``ceil(max_tokens / tokens_per_step)`` when ``train.max_tokens`` is set (and
    ``max_steps`` is not 0), else ``train.max_steps``."""
    if train.max_tokens is None or train.max_steps == 0:
        return train.max_steps
    return max(1, math.ceil(train.max_tokens / tokens_per_step))


def check_length(recipe: Recipe) -> list[str]:
    """Problems with ``train.max_tokens``, each naming the key."""
    n = recipe.train.max_tokens
    if n is not None and n <= 0:
        return [f"train.max_tokens: must be a positive number of tokens (or null for train.max_steps), got {n}"]
    return []


def with_token_budget(recipe: Recipe, layout: BatchLayout) -> Recipe:
    """``recipe`` with ``train.max_steps`` set to the steps ``train.max_tokens`` derives for ``layout``, logged;
    ``recipe`` itself when the length is given in steps. A copy: the caller's recipe is left as it was. The copy
    still holds ``max_tokens``, so saving it (resolved_recipe.yaml) and loading it again derives the same steps."""
    t = recipe.train
    if t.max_tokens is None or t.max_steps == 0:
        return recipe
    steps = train_steps(t, layout.tokens_per_step)
    log.info(
        "train.max_tokens=%s: %s steps of %s tokens (global batch %d x seq_len %d), %s tokens in all; "
        "train.max_steps=%d is not used",
        f"{t.max_tokens:,}", f"{steps:,}", f"{layout.tokens_per_step:,}", layout.global_batch_size,
        recipe.data.seq_len, f"{steps * layout.tokens_per_step:,}", t.max_steps,
    )  # fmt: skip
    return dataclasses.replace(recipe, train=dataclasses.replace(t, max_steps=steps))
