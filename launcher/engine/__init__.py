"""The one place that decides how the model is sharded: DeepSpeed ZeRO or FSDP2, by ``parallel.engine``."""

from __future__ import annotations

from transformers import PretrainedConfig

from ..config import BatchLayout, Recipe
from ..launch import DistInfo
from .base import Batch, Engine, causal_lm_loss, lr_lambda, resolve_dtype

__all__ = ["Batch", "Engine", "build_engine", "causal_lm_loss", "lr_lambda", "resolve_dtype"]


def build_engine(recipe: Recipe, info: DistInfo, layout: BatchLayout, config: PretrainedConfig) -> Engine:
    """Build the model under the recipe's engine. Imports are deferred so a run pays only for the engine it uses."""
    if recipe.parallel.engine == "deepspeed":
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(recipe, info, layout, config)
    from .fsdp import FsdpEngine

    return FsdpEngine(recipe, info, layout, config)
