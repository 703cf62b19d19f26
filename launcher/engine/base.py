"""What the training loop needs from a sharding engine, and what both engines share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from ..config import BatchLayout, Recipe
from ..launch import DistInfo
from ..model import count_parameters
from .loss import clear_labels, set_labels

Batch = dict[str, torch.Tensor]


def resolve_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU unless the recipe says otherwise."""
    p = recipe.train.precision
    if p == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if p == "bf16" else torch.float32


def lr_lambda(recipe: Recipe):
    """Multiplier of ``train.lr`` at each step: linear warmup, then cosine/linear decay to min_lr_ratio."""
    t = recipe.train
    warm, total, floor = t.warmup_steps, max(1, t.max_steps), t.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if t.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t+1]; -100 labels are ignored."""
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction=reduction
    )


MODEL_INPUTS = ("input_ids", "position_ids")


def model_inputs(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """What the model's forward takes from a batch. ``position_ids`` restart at each document when the data
    pipeline masks attention across documents in a packed block."""
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}


def forward_loss(
    module: nn.Module, hf_model: nn.Module, batch: Batch, device: torch.device, fused: bool
) -> torch.Tensor:
    """The mean next-token loss of one micro-batch through ``module`` (the engine's wrapper of ``hf_model``).
    With the fused head the model's output is the loss itself; the logits are never formed."""
    inputs = model_inputs(batch, device)
    labels = batch["labels"].to(device, non_blocking=True)
    if not fused:
        return causal_lm_loss(module(**inputs).logits, labels)
    set_labels(hf_model, labels)
    try:
        return module(**inputs).logits.view(())
    finally:
        clear_labels(hf_model)


class Engine(ABC):
    """One interface over DeepSpeed and FSDP2: build and shard, step, evaluate, save, load, gather."""

    def __init__(self, recipe: Recipe, info: DistInfo, layout: BatchLayout, config: PretrainedConfig):
        self.recipe = recipe
        self.info = info
        self.layout = layout
        self.config = config
        self.dtype = resolve_dtype(recipe, info.device)
        self.fused_loss = False
        """Set by the engine when the model's head computes the loss (:mod:`launcher.engine.loss`)."""
        self.skipped = False
        """Whether the last :meth:`train_step` dropped its update: its gradient norm was not finite."""

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The callable model (wrapped as the engine needs it)."""

    @abstractmethod
    def train_step(self, micro_batches: list[Batch]) -> tuple[torch.Tensor, float]:
        """Forward and backward over the micro-batches, one optimizer step. Returns this rank's mean loss (a
        tensor, so the caller decides when to synchronise) and the global gradient norm before clipping. A
        non-finite norm (the same on every rank) drops the update and sets :attr:`skipped`."""

    @abstractmethod
    def lr(self) -> float: ...

    def n_params(self) -> int:
        """Parameters of the whole model, however it is sharded."""
        return count_parameters(self.module)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.module(input_ids=input_ids.to(self.info.device)).logits

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    @abstractmethod
    def save(self, path: Path) -> None:
        """Model, optimizer and scheduler state into ``path`` (every rank writes its shard)."""

    @abstractmethod
    def load(self, path: Path) -> None: ...

    @abstractmethod
    def export_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The consolidated weights as ``(state-dict key, CPU tensor)`` pairs, gathered one decoder layer (or one
        tensor) at a time, so no rank holds more than that beyond its own shard. Collective: every rank iterates it
        to the end, in step; only rank 0 gets tensors, the other ranks' iterators yield nothing."""
