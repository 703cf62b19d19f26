"""FSDP2: what its config must hold, the memory its model states take, and how its torch.distributed.checkpoint
directories are read for export."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, Recipe
from .background_save import background_saves
from .plan import EnginePlan


class FsdpPlan(EnginePlan):
    name = "fsdp"
    default_config = "fsdp.yaml"

    @classmethod
    def check(cls, recipe: Recipe, world_size: int | None = None) -> list[str]:
        f = recipe.parallel.fsdp
        problems = []
        if f.replicate_degree <= 0:
            problems.append(f"parallel.fsdp.replicate_degree: must be positive, got {f.replicate_degree}")
        elif world_size is not None and world_size % f.replicate_degree:
            problems.append(
                f"parallel.fsdp.replicate_degree: world size {world_size} is not divisible by {f.replicate_degree}"
            )
        if f.prefetch_layers < 0:
            problems.append(f"parallel.fsdp.prefetch_layers: must be >= 0, got {f.prefetch_layers}")
        return problems

    @classmethod
    def describe(cls, recipe: Recipe) -> str:
        f = recipe.parallel.fsdp
        text = f"FSDP2, reshard_after_forward={f.reshard_after_forward}, reduce {f.reduce_dtype}"
        if f.replicate_degree > 1:
            text += f", hybrid sharding over {f.replicate_degree} replicas"
        if not f.reduce_every_micro_batch:
            text += ", gradients reduced once per step"
        return text + (", CPU offload" if f.cpu_offload else "")

    @classmethod
    def offloaded(cls, recipe: Recipe) -> bool:
        return recipe.parallel.fsdp.cpu_offload

    @classmethod
    def host_state_bytes(cls, recipe: Recipe, n_params: int, world: int) -> dict[str, float]:
        """CPU offload keeps the fp32 parameter, gradient and Adam shards in host memory; ``train.async_save`` keeps
        a copy of the parameter and Adam shards there (12 bytes per parameter) for the saves in the background."""
        parts = {"offloaded params+grads+adam": 16 * n_params / world} if cls.offloaded(recipe) else {}
        if background_saves(recipe, "cuda"):
            parts["background save copy"] = 12 * n_params / world
        return parts

    @classmethod
    def model_state_bytes(
        cls, recipe: Recipe, n_params: int, layer_params: int, layers: int, world: int, low: int
    ) -> dict[str, float]:
        """fp32 parameter, gradient and Adam shards (``16 N / W``); the gathered compute-precision parameters of
        the root unit and of the layers in flight (all of them when parameters stay gathered after forward; one
        byte each under tensorwise float8), and one layer's gradients before their reduce-scatter; with gradient
        accumulation reduced once per step, the whole model's unsharded gradients. Offload keeps the shards in
        host memory and gathers every layer from there."""
        f = recipe.parallel.fsdp
        offload = cls.offloaded(recipe)
        root_params = n_params - layer_params * layers
        held = (1 + f.prefetch_layers) if f.reshard_after_forward else layers
        # tensorwise float8 with more than one shard gathers the decoder layers' weights already cast: a byte each
        sharded = world // max(1, f.replicate_degree) > 1
        layer_low = 1 if recipe.train.float8 == "tensorwise" and low == 2 and sharded else low
        gathered = low * root_params + layer_low * layer_params * held
        reduce_bytes = 4 if f.reduce_dtype == "fp32" or low == 4 else 2
        parts = {
            "params+grads+adam": 0.0 if offload else 16 * n_params / world,
            "gathered params": gathered + reduce_bytes * layer_params + (low * layer_params * layers if offload else 0),
        }
        if not f.reduce_every_micro_batch and _accumulation(recipe, world) > 1:
            # reduced once per step: every rank keeps the whole model's unsharded gradients between micro-batches
            parts["unsharded grads (accumulation)"] = reduce_bytes * n_params
        return parts

    @classmethod
    def export_tensors(cls, checkpoint: Path, model_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """One decoder layer's weights at a time from the torch.distributed.checkpoint directory: the checkpoint's
        metadata gives each weight's shape and dtype, and each load reads only the keys asked for (every rank's
        piece of them), so memory holds one layer plus one stored piece."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from ..model import weight_units, weights_layout_model

        stored = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
        for unit in weight_units(weights_layout_model(model_config)):
            found = {k: md for k in unit if isinstance(md := stored.get(f"model.{k}"), TensorStorageMetadata)}
            if not found:
                continue  # the writer names what is missing
            holder = {"model": {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in found.items()}}
            with warnings.catch_warnings():  # that no process group is there is the point here
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                dcp.load(holder, checkpoint_id=str(checkpoint), no_dist=True)
            yield from holder["model"].items()
            del holder


def _accumulation(recipe: Recipe, world: int) -> int:
    """Micro-batches per optimizer step on ``world`` ranks (1 where the batch does not divide: the recipe check
    names that)."""
    try:
        return recipe.batch_layout(world).grad_accum
    except ConfigError:
        return 1
