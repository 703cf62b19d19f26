"""What the recipe asks of the model itself before it is sharded: activation checkpointing (every k-th decoder
layer), the fused output projection + loss, float8 linear layers, and torch.compile of each decoder layer (and of
the fused loss's element-wise part). Both engines call it, in the one order that works for both: options first,
then sharding."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from ..config import Recipe
from ..model import decoder_layers
from .float8 import convert_to_float8
from .loss import install_fused_loss
from .plan import recompile_limit

log = logging.getLogger(__name__)


def apply_training_options(
    model: Any, recipe: Recipe, compile_layers: bool = True, fsdp_float8_all_gather: bool = False
) -> dict[str, object]:
    """What the recipe asks of the model itself, before it is sharded: activation checkpointing (every k-th
    decoder layer), the fused output projection + loss, float8 linear layers (``fsdp_float8_all_gather``: FSDP2
    gathers their weights in float8) and torch.compile of each decoder layer (``nn.Module.compile``: the module
    stays the same object, so state-dict names and checkpoints do not depend on it) and of the fused loss's
    element-wise part."""
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
    compiled = t.compile and compile_layers
    fused = install_fused_loss(model, compiled) if t.fused_loss else False
    prefer_attention_backend(m.attention_backend)
    float8 = convert_to_float8(model, recipe, fsdp_float8_all_gather) if t.float8 != "off" else 0
    tuned = compiled and compile_tuning(recipe)
    if compiled:
        # each sequence-length stage is another input shape: up to one more variant per layer
        shapes = len({stage.seq_len for stage in recipe.data.seq_len_stages}) or 1
        watch_recompile_limit(len(layers) * shapes)
        if tuned:
            import torch._inductor.config

            torch._inductor.config.coordinate_descent_tuning = True
        for layer in layers:
            layer.compile()
    applied: dict[str, object] = {
        "checkpointed_layers": checkpointed,
        "layers": len(layers),
        "fused_loss": fused,
        "compiled": compiled,
        "compile_tuning": tuned,
        "float8_layers": float8,
    }
    log.info("model options: %s", applied)
    return applied


def compile_tuning(recipe: Recipe) -> bool:
    """Whether compiled layers get their kernels' block sizes tuned (``train.compile_tuning``): ``auto`` means
    with rowwise float8, whose scaling casts (reductions across the token dimension) ran 1.7% faster tuned on an
    H200 (3B shape: 26,342 against 25,894 tokens/s), where bf16 gained nothing."""
    setting = recipe.train.compile_tuning
    return recipe.train.float8 == "rowwise" if setting == "auto" else bool(setting)


class _RecompileLimitHit(logging.Filter):
    """Says, in the run's log, what torch._dynamo's "hit config.recompile_limit" warning means for the run."""

    def __init__(self, layers: int):
        super().__init__()
        self.layers = layers
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.said and str(record.msg).startswith("torch._dynamo hit config."):
            self.said = True
            log.warning(
                "torch.compile gave up recompiling a function after %s variants: each further variant runs "
                "uncompiled (slower, more activation memory). With %d decoder layers compiled one by one this "
                "usually means each layer compiled its own variant; TORCH_LOGS=recompiles shows why",
                record.args[1] if isinstance(record.args, tuple) and len(record.args) > 1 else "its limit of",
                self.layers,
            )
        return True


def watch_recompile_limit(layers: int) -> None:
    """Raise torch._dynamo's recompile limit to :func:`launcher.engine.plan.recompile_limit` (a model whose layers
    each need their own compiled variant then still compiles every layer, at the cost of compile time) and say in
    the log when a function hits it anyway."""
    import torch._dynamo

    limit = recompile_limit(layers)
    if torch._dynamo.config.recompile_limit < limit:
        torch._dynamo.config.recompile_limit = limit
    logger = logging.getLogger("torch._dynamo.convert_frame")
    # one filter per process, telling of the model set up last (a test process builds several)
    for f in logger.filters:
        if isinstance(f, _RecompileLimitHit):
            f.layers, f.said = layers, False
            return
    logger.addFilter(_RecompileLimitHit(layers))


_ATTENTION_ORDER = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
_attention_priority = contextlib.ExitStack()


def prefer_attention_backend(backend: str) -> None:
    """Put ``backend`` first in the order torch's scaled_dot_product_attention tries its kernels, for the rest of
    this process (a worker trains one model); the others follow in torch's order as fallbacks."""
    if backend == "auto":
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = getattr(SDPBackend, _ATTENTION_ORDER[backend])
    rest = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    _attention_priority.close()
    _attention_priority.enter_context(sdpa_kernel([first, *[b for b in rest if b != first]], set_priority=True))
    log.info("model.attention_backend: %s first in torch's attention kernel order", backend)
