"""What the recipe asks of the model itself before it is sharded: activation checkpointing (every k-th decoder
layer), the fused output projection + loss, and torch.compile of each decoder layer. Both engines call it, in
the one order that works for both: options first, then sharding."""

from __future__ import annotations

import logging
from typing import Any

from ..config import Recipe
from ..model import decoder_layers
from .loss import install_fused_loss

log = logging.getLogger(__name__)


def apply_training_options(model: Any, recipe: Recipe, compile_layers: bool = True) -> dict[str, object]:
    """What the recipe asks of the model itself, before it is sharded: activation checkpointing (every k-th
    decoder layer), the fused output projection + loss, and torch.compile of each decoder layer
    (``nn.Module.compile``: the module stays the same object, so state-dict names and checkpoints do not depend on
    it)."""
    m, t = recipe.model, recipe.train
    layers = decoder_layers(model)
    checkpointed = 0
    if m.activation_checkpointing:
        # transformers renamed gradient_checkpointing_enable (deprecated from 5.2x on)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        selective = all(hasattr(layer, "gradient_checkpointing") for layer in layers)
        if m.checkpoint_every > 1 and not selective:
            log.warning("model.checkpoint_every: %s checkpoints all its layers or none", type(model).__name__)
        for i, layer in enumerate(layers):
            keep = i % m.checkpoint_every == 0 or not selective
            if selective:
                layer.gradient_checkpointing = keep
            checkpointed += keep
    fused = install_fused_loss(model) if t.fused_loss else False
    compiled = t.compile and compile_layers
    if compiled:
        for layer in layers:
            layer.compile()
    applied: dict[str, object] = {
        "checkpointed_layers": checkpointed,
        "layers": len(layers),
        "fused_loss": fused,
        "compiled": compiled,
    }
    log.info("model options: %s", applied)
    return applied
