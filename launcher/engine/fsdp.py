"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with torch.distributed.checkpoint for sharded saves."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import init_empty_weights
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM, PretrainedConfig

from ..config import BatchLayout, Recipe
from ..files import torch_save
from ..launch import DistInfo
from ..model import build_model, decoder_layers
from .base import Batch, Engine, forward_loss, lr_lambda
from .options import apply_training_options

log = logging.getLogger(__name__)


class FsdpEngine(Engine):
    def __init__(self, recipe: Recipe, info: DistInfo, layout: BatchLayout, config: PretrainedConfig):
        super().__init__(recipe, info, layout, config)
        f = recipe.parallel.fsdp
        dev = info.device.type
        if f.replicate_degree > 1:
            mesh = init_device_mesh(
                dev, (f.replicate_degree, info.world_size // f.replicate_degree), mesh_dim_names=("replicate", "shard")
            )
        else:
            mesh = init_device_mesh(dev, (info.world_size,), mesh_dim_names=("shard",))
        mp = None
        if self.dtype == torch.bfloat16:
            reduce = torch.float32 if f.reduce_dtype == "fp32" else torch.bfloat16
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
        kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": f.reshard_after_forward}
        if mp is not None:
            kwargs["mp_policy"] = mp
        # Without a GPU everything already lives in CPU memory, so the same recipe runs there unchanged.
        offload = f.cpu_offload and dev == "cuda"
        if f.cpu_offload and not offload:
            log.info("parallel.fsdp.cpu_offload has no effect without a GPU")
        if offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()

        # Rank 0 reads the weights once; every other rank builds the model on the meta device and receives its
        # shards by broadcast, so host memory holds one full copy per node, not one per rank.
        source = recipe.model.name_or_path
        log.info("FSDP2: %s on rank 0", f"loading the weights of {source}" if source else "initialising the model")
        start = time.perf_counter()
        full = build_model(recipe, config, torch.float32) if info.rank == 0 else None
        log.info("model built in %.1f s; sharding it over %d ranks", time.perf_counter() - start, info.world_size)
        start = time.perf_counter()
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch.float32, attn_implementation=recipe.model.attn_implementation,
                trust_remote_code=recipe.model.trust_remote_code,
            )  # fmt: skip
        self.fused_loss = bool(apply_training_options(model, recipe)["fused_loss"])
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        # Each decoder layer is its own FSDP unit, so one layer's all-gather overlaps the previous one's compute;
        # the root unit holds embeddings, final norm and lm_head (tied weights stay one parameter there).
        layers = decoder_layers(model)
        for layer in layers:
            fully_shard(cast(nn.Module, layer), **kwargs)
        fully_shard(model, **kwargs)
        # Issue the next layers' all-gathers before the current layer computes, in both directions.
        k = f.prefetch_layers
        for i, layer in enumerate(layers if k else []):
            layer.set_modules_to_forward_prefetch(layers[i + 1 : i + 1 + k])
            layer.set_modules_to_backward_prefetch(layers[max(0, i - k) : i][::-1])
        model.to_empty(device="cpu" if offload else info.device)
        with torch.no_grad():
            for name, value in buffers.items():
                model.get_buffer(name).copy_(value)
        set_model_state_dict(
            model,
            full.state_dict() if full is not None else {},
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False),
        )
        del full
        log.info("model sharded in %.1f s", time.perf_counter() - start)
        if config.tie_word_embeddings:
            model.tie_weights()
        self.model = model
        t = recipe.train
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=t.lr, betas=(t.betas[0], t.betas[1]), eps=t.eps, weight_decay=t.weight_decay,
            fused=True if dev == "cuda" and not offload else None,
        )  # fmt: skip
        self.scheduler = LambdaLR(self.optimizer, lr_lambda(recipe))

    @property
    def module(self):
        return self.model

    def train_step(self, micro_batches: list[Batch]) -> tuple[torch.Tensor, float]:
        total = torch.zeros((), device=self.info.device)
        n = len(micro_batches)
        for i, mb in enumerate(micro_batches):
            # Reduce-scatter gradients once per optimizer step, not once per micro-batch.
            self.model.set_requires_gradient_sync(i == n - 1)
            loss = forward_loss(self.model, self.model, mb, self.info.device, self.fused_loss)
            (loss / n).backward()
            total += loss.detach()
        clip = self.recipe.train.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        value = float(norm.item())
        # The norm is reduced over every rank, so all of them agree on skipping a non-finite step.
        self.skipped = not math.isfinite(value)
        if not self.skipped:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / n, value

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        if self.info.rank == 0:
            torch_save(self.scheduler.state_dict(), path / "scheduler.pt")

    def load(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        dist.barrier()
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)} if self.info.rank == 0 else {}
