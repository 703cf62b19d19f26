"""What each engine answers before and after a run, without building anything: what its config must hold, what
memory its model states need, which layers compile, and how its checkpoints are read for export.

These are cheap to import (no DeepSpeed, no process group): ``cpt plan``, the pre-flight check and ``cpt export``
use them. The engines that train (:mod:`launcher.engine.deepspeed`, :mod:`launcher.engine.fsdp`) are imported
only by the run that uses them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..config import Recipe

RECOMPILE_LIMIT = 8
"""torch._dynamo.config.recompile_limit's default: how many variants of one compiled function torch keeps before it
runs the function uncompiled for every new variant."""


def recompile_limit(layers: int) -> int:
    """The recompile limit a run with ``train.compile`` sets: room for every decoder layer to need a variant of its
    own (DeepSpeed's ``memory_efficient_linear`` makes each layer one) on top of torch's default, so no layer is
    left uncompiled; a model whose layers share one compiled variant compiles once all the same."""
    return layers + RECOMPILE_LIMIT


class EnginePlan:
    """One engine's answers, as class methods of a recipe. Subclasses: :class:`launcher.engine.deepspeed_plan.
    DeepSpeedPlan` and :class:`launcher.engine.fsdp_plan.FsdpPlan`; :func:`launcher.engine.plan_for` picks one."""

    name: ClassVar[str]
    default_config: ClassVar[str]
    """The engine config in ds_configs/ that ``cpt eval`` uses."""

    @classmethod
    def check(cls, recipe: Recipe, world_size: int | None = None) -> list[str]:
        """Problems with the engine's part of the recipe, each naming its key (``world_size``: when known)."""
        return []

    @classmethod
    def describe(cls, recipe: Recipe) -> str:
        """The engine and its main settings in a few words, for the model card."""
        raise NotImplementedError

    @classmethod
    def offloaded(cls, recipe: Recipe) -> bool:
        """Whether the model states (optimizer states at least) live in host memory."""
        raise NotImplementedError

    @classmethod
    def loads_shards(cls, recipe: Recipe) -> bool:
        """Whether every rank builds the model without weights and reads only its own share of a safetensors
        checkpoint (:mod:`launcher.weights`); otherwise every rank loads the whole model through transformers."""
        return True

    @classmethod
    def host_state_bytes(cls, recipe: Recipe, n_params: int, world: int) -> dict[str, float]:
        """Host bytes per rank of the training state the engine keeps off the GPU (offload), by component."""
        return {}

    @classmethod
    def compiled_layers(cls, recipe: Recipe, layers: int, limit: int | None = None) -> range:
        """The decoder layers that run compiled under ``train.compile``, with torch._dynamo's recompile limit
        ``limit`` (None: the one a run sets, :func:`recompile_limit`)."""
        return range(layers) if recipe.train.compile else range(0)

    @classmethod
    def model_state_bytes(
        cls, recipe: Recipe, n_params: int, layer_params: int, layers: int, world: int, low: int
    ) -> dict[str, float]:
        """Peak GPU bytes of parameters, gradients, optimizer states and gathered parameters, by component, for
        ``n_params`` parameters (``layer_params`` per decoder layer) on ``world`` ranks; ``low`` is the bytes of
        one compute-precision value (2 under bf16)."""
        raise NotImplementedError

    @classmethod
    def export_tensors(cls, checkpoint: Path, model_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """The consolidated weights of a checkpoint this engine saved, as ``(state-dict key, tensor)`` pairs read
        one decoder layer at a time (what :func:`launcher.export.write_hf_model` takes), in one process without a
        process group. Tied copies (``lm_head.weight`` of a model with tied embeddings) are not read."""
        raise NotImplementedError
