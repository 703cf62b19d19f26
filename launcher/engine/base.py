"""What the training loop needs from a sharding engine, and what both engines share."""

from __future__ import annotations

import math
import re
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
from .ulysses import SequenceParallel, sequence_loss

Batch = dict[str, torch.Tensor]


def resolve_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU unless the recipe says otherwise."""
    p = recipe.train.precision
    if p == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if p == "bf16" else torch.float32


DECAY_SHAPES = {
    "linear": lambda p: 1 - p,
    "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1 - math.sqrt(p),
}
"""Fraction of the way from the floor to the peak, as a function of the fraction ``p`` of the decay done."""


def lr_lambda(recipe: Recipe):
    """Multiplier of ``train.lr`` at each step (0-based, the optimizer step about to be taken): linear warmup,
    then cosine/linear decay to min_lr_ratio over the rest of the run, a constant, or WSD's stable phase and final
    decay of ``decay_steps`` in ``decay_shape``."""
    t = recipe.train
    warm, total, floor = t.warmup_steps, max(1, t.max_steps), t.min_lr_ratio
    if t.schedule == "wsd":
        decay = t.wsd_decay_steps()
        start, shape = total - decay, DECAY_SHAPES[t.decay_shape]
    else:
        # cosine and linear decay over the whole run after warmup (constant never reaches the shape)
        decay, start, shape = max(1, total - warm), warm, DECAY_SHAPES.get(t.schedule, DECAY_SHAPES["linear"])

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if t.schedule == "constant" or step < start:
            return 1.0
        return floor + (1 - floor) * shape(min(1.0, (step - start) / decay))

    return f


def optimizer_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """The trainable parameters in two AdamW groups: decayed, and those ``train.weight_decay_exclude`` names (each
    pattern searched in the parameter's name) with no weight decay. Empty groups are left out; a shared parameter
    (tied embeddings) appears once."""
    patterns = [re.compile(p) for p in recipe.train.weight_decay_exclude]
    decay: list[nn.Parameter] = []
    spared: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (spared if any(x.search(name) for x in patterns) else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay}, {"params": spared, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def embedding_parameters(model: nn.Module) -> set[int]:
    """ids of the input and output embedding matrices (one matrix when they are tied)."""
    found = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            found.update(id(p) for p in module.parameters())
    return found


def apply_trainable(model: nn.Module, recipe: Recipe) -> None:
    """``train.trainable: embeddings`` freezes every parameter but the input and output embeddings; before the
    engine shards the model, so frozen weights get no gradient and no optimizer state."""
    if recipe.train.trainable == "all":
        return
    keep = embedding_parameters(model)
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


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
    module: nn.Module,
    hf_model: nn.Module,
    batch: Batch,
    device: torch.device,
    fused: bool,
    sp: SequenceParallel | None = None,
) -> torch.Tensor:
    """The mean next-token loss of one micro-batch through ``module`` (the engine's wrapper of ``hf_model``).
    With the fused head the model's output is the loss itself; the logits are never formed. With ``sp`` this rank's
    part of it: the sum over its part of the sequences divided by the whole micro-batch's target count, so the
    parts of a group add up to the loss (:mod:`launcher.engine.ulysses`)."""
    count = None
    if sp is None:
        inputs = model_inputs(batch, device)
        labels = batch["labels"].to(device, non_blocking=True)
    else:
        inputs, labels, count = sp.train_inputs(batch)
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        labels = labels.to(device, non_blocking=True)
    if not fused:
        logits = module(**inputs).logits
        return causal_lm_loss(logits, labels) if count is None else sequence_loss(logits, labels, count.to(device))
    set_labels(hf_model, labels, count)
    try:
        return module(**inputs).logits.view(())
    finally:
        clear_labels(hf_model)


OPTIMIZER_SETTINGS = ("betas", "eps", "weight_decay")
"""AdamW's hyperparameters in each parameter group, as the recipe sets them (``train.betas``, ``train.eps``,
``train.weight_decay`` for the decayed group, 0 for the other)."""
SCHEDULE_SETTINGS = ("lr", "initial_lr")
"""The learning rate of each parameter group and the peak the schedule scales (``train.lr``)."""


class SaveHandle:
    """A save of the engine's state (:meth:`Engine.save`). This one is already written; a save in the background
    returns its own."""

    def done(self) -> bool:
        """Whether this rank's write has ended, written or failed; never blocks."""
        return True

    def wait(self) -> None:
        """Block until this rank's write has ended; raise its error if it failed."""

    def stalled_s(self) -> float:
        """Seconds the training waited, outside :meth:`Engine.save` and :meth:`wait`, for the state to be copied
        before the next optimizer step could change it."""
        return 0.0

    def written_s(self) -> float | None:
        """Seconds from the start of the save to the end of this rank's write in the background, once it has ended
        (None before; 0 for a save that wrote nothing in the background)."""
        return 0.0


WRITTEN = SaveHandle()
"""What a synchronous save returns: its files are written."""


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
        self.sp: SequenceParallel | None = None
        """This rank's sequence-parallel group (``parallel.sequence_parallel`` > 1), set by the engine."""

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
    def logits(self, input_ids: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits of ``input_ids`` (and further model inputs: ``position_ids``, a sequence-parallel mask)."""
        device = self.info.device
        extra = {k: v.to(device) for k, v in inputs.items()}
        return self.module(input_ids=input_ids.to(device), **extra).logits

    @property
    def loss_weight(self) -> int:
        """What the loss is multiplied by for the backward pass. Both engines average gradients over every rank;
        with sequence parallelism a rank's loss is its part of its group's, so the average over the world is 1/N of
        the average over groups unless each part counts N times. (DeepSpeed's own sequence-parallel groups, its
        ``mpu``, would divide by world / N instead, but deepspeed 0.19.8's ZeRO-3 reduce-scatter path ignores them:
        the gradient came out N times too small, grad_norm exactly half at N=2 on CPU, so ZeRO runs over every rank
        as data parallelism and the loss carries the factor, as under FSDP2.)"""
        return self.sp.size if self.sp is not None else 1

    def group_loss(self, parts: torch.Tensor) -> torch.Tensor:
        """The micro-batches' loss from this rank's ``parts`` of it: summed over the sequence-parallel group (each
        rank's part is its tokens' share of the group's loss); the loss itself without sequence parallelism."""
        if self.sp is not None:
            torch.distributed.all_reduce(parts, group=self.sp.group)
        return parts

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    @abstractmethod
    def save(self, path: Path, *, background: bool = False) -> SaveHandle:
        """Model, optimizer and scheduler state into ``path`` (every rank writes its shard). Collective. Returns once
        the files are written; with ``background`` (``train.async_save``, FSDP2 only) once the state is captured,
        and the files are written while training goes on: the handle tells when that has ended."""

    @abstractmethod
    def load(self, path: Path, *, optimizer: bool = True, scheduler: bool = True) -> None:
        """The model's weights from the checkpoint ``path`` (saved on any world size); with ``optimizer`` the
        optimizer state (Adam's moments and step), with ``scheduler`` the learning-rate schedule's position. Without
        ``scheduler`` the schedule stays where it is (a new run's: step 0). Either way the optimizer keeps this
        recipe's hyperparameters (:meth:`_restore_settings`). Collective."""

    def _keep_settings(self, optimizer: torch.optim.Optimizer) -> None:
        """Remember each parameter group's hyperparameters as this recipe and the new schedule set them, before
        anything is loaded."""
        self._settings = [
            {k: g[k] for k in (*SCHEDULE_SETTINGS, *OPTIMIZER_SETTINGS) if k in g} for g in optimizer.param_groups
        ]

    def _restore_settings(self, optimizer: torch.optim.Optimizer, *, schedule: bool) -> None:
        """Loading an optimizer state replaces its parameter groups' hyperparameters with those of the run that saved
        it (DeepSpeed's universal ZeRO-3 load even gives every group those of the first, weight decay included):
        this recipe's betas, eps and weight decay, each group its own, win again, and with ``schedule`` (a schedule
        that starts afresh) also its learning rate for step 0 (``lr``, ``initial_lr``)."""
        groups = optimizer.param_groups
        if len(groups) != len(self._settings):
            raise RuntimeError(
                f"the loaded optimizer state has {len(groups)} parameter groups, this recipe makes "
                f"{len(self._settings)} (train.weight_decay_exclude and train.trainable decide them)"
            )
        keys = (*OPTIMIZER_SETTINGS, *(SCHEDULE_SETTINGS if schedule else ()))
        for group, settings in zip(groups, self._settings):
            group.update({k: settings[k] for k in keys if k in settings})

    @abstractmethod
    def export_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The consolidated weights as ``(state-dict key, CPU tensor)`` pairs, gathered one decoder layer (or one
        tensor) at a time, so no rank holds more than that beyond its own shard. Collective: every rank iterates it
        to the end, in step; only rank 0 gets tensors, the other ranks' iterators yield nothing."""
