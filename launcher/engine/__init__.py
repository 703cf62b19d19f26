"""The one place that decides how the model is sharded: DeepSpeed ZeRO or FSDP2, by ``parallel.engine``.

Each engine answers for itself in two halves: a plan (:mod:`~launcher.engine.plan`: config checks and fills,
memory, export; cheap to import) and the engine that trains (:class:`~launcher.engine.base.Engine`: build and
shard, step, save, load, gather). Nothing outside this package branches on the engine's name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import PretrainedConfig

from ..config import BatchLayout, Recipe
from ..launch import DistInfo
from .base import Batch, Engine, SaveHandle, causal_lm_loss, lr_lambda, resolve_dtype
from .deepspeed_plan import DeepSpeedPlan
from .fsdp_plan import FsdpPlan
from .plan import EnginePlan

if TYPE_CHECKING:
    from ..vocab import VocabExtension

__all__ = [
    "Batch",
    "Engine",
    "EnginePlan",
    "SaveHandle",
    "build_engine",
    "causal_lm_loss",
    "lr_lambda",
    "plan_for",
    "resolve_dtype",
]

PLANS: dict[str, type[EnginePlan]] = {"deepspeed": DeepSpeedPlan, "fsdp": FsdpPlan}


def plan_for(engine: str | Recipe) -> type[EnginePlan]:
    """The plan of an engine, by name or by the recipe's ``parallel.engine``."""
    return PLANS[engine if isinstance(engine, str) else engine.parallel.engine]


def build_engine(
    recipe: Recipe, info: DistInfo, layout: BatchLayout, config: PretrainedConfig,
    vocab: VocabExtension | None = None,
) -> Engine:  # fmt: skip
    """Build the model of ``config`` under the recipe's engine; with ``vocab`` its embeddings are grown from the base
    model's (:mod:`launcher.vocab`). Imports are deferred so a run pays only for the engine it uses."""
    if recipe.parallel.engine == "deepspeed":
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(recipe, info, layout, config, vocab)
    from .fsdp import FsdpEngine

    return FsdpEngine(recipe, info, layout, config, vocab)
