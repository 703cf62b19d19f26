"""float8 training of the decoder's linear layers (``train.float8``) through torchao, and the checks that keep a
recipe that cannot use it from starting.

torchao's ``Float8Linear`` keeps each weight in its training dtype and casts the weight, the input and the output
gradient to float8 (e4m3) inside the three matrix products of a linear layer, with one scale per tensor
(``tensorwise``) or per row (``rowwise``: more accurate, slower casts). Parameters, gradients, optimizer states,
checkpoints and the exported model stay in the model's dtype; only the products run in float8. The output
projection and the embeddings are never converted (their products feed the loss directly), nor is a layer whose
dimensions are not multiples of 16 (the float8 matrix product's alignment).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from torch import nn

from ..compat import float8_gainful_layer
from ..config import Recipe
from ..model import decoder_layers

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 9)
"""CUDA compute capability with float8 matrix products (Ada L4/L40S, Hopper H100/H200, Blackwell and later)."""
ALIGNMENT = 16


def float8_problem(recipe: Recipe, capability: tuple[int, int] | None) -> str | None:
    """Why ``recipe``'s ``train.float8`` cannot run on a machine whose first GPU has ``capability`` (None: no CUDA
    GPU), or None when it can (or float8 is off)."""
    mode = recipe.train.float8
    if mode == "off":
        return None
    key = f"train.float8: {mode}"
    if capability is None:
        return (f"{key} needs a CUDA GPU with compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                f"(L4, L40S, H100, H200 or newer); there is none here. Set train.float8: off")  # fmt: skip
    if tuple(capability) < MIN_CAPABILITY:
        return (f"{key} needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} for float8 matrix "
                f"products; this GPU has {capability[0]}.{capability[1]}. Set train.float8: off")  # fmt: skip
    if recipe.train.precision == "fp32":
        return f"{key} with train.precision: fp32: float8 training runs the rest of the model in bf16"
    if importlib.util.find_spec("torchao") is None:
        return f"{key} trains through torchao, which is not installed: pip install 'torchao>=0.12'"
    return None


def gpu_capability() -> tuple[int, int] | None:
    """The compute capability of the first visible CUDA GPU, None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(0)


def convert_to_float8(model: nn.Module, recipe: Recipe, fsdp_float8_all_gather: bool = False) -> int:
    """Swap the linear layers inside ``model``'s decoder layers for torchao's ``Float8Linear`` (before sharding and
    compiling). ``fsdp_float8_all_gather`` (tensorwise under FSDP2): FSDP2 gathers the weights already cast to
    float8, half the bytes of bf16. Returns the number of layers converted; a skipped one is logged."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    mode = recipe.train.float8
    config = Float8LinearConfig.from_recipe_name(mode)
    if fsdp_float8_all_gather:
        config = Float8LinearConfig(**{**config.__dict__, "enable_fsdp_float8_all_gather": True})
    skipped: list[str] = []
    small: list[str] = []
    gainful = float8_gainful_layer(mode) if recipe.train.float8_skip_small else None

    def wanted(module: nn.Module, name: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if module.in_features % ALIGNMENT or module.out_features % ALIGNMENT:
            skipped.append(f"{name} ({module.in_features} -> {module.out_features})")
            return False
        if gainful is not None and not gainful(module, name):
            small.append(f"{name} ({module.in_features} -> {module.out_features})")
            return False
        return True

    converted = 0
    for i, layer in enumerate(decoder_layers(model)):
        before = sum(isinstance(m, nn.Linear) for m in layer.modules())
        n_skipped = len(skipped) + len(small)
        convert_to_float8_training(layer, module_filter_fn=lambda m, n, i=i: wanted(m, f"layers.{i}.{n}"),
                                   config=config)  # fmt: skip
        converted += before - (len(skipped) + len(small) - n_skipped)
    if skipped:
        log.info("train.float8: %d linear layer(s) stay in bf16, their dimensions not multiples of %d: %s",
                 len(skipped), ALIGNMENT, _some(skipped))  # fmt: skip
    if small:
        log.info("train.float8_skip_small: %d linear layer(s) stay in bf16, below torchao's sizes for a %s gain: "
                 "%s", len(small), mode, _some(small))  # fmt: skip
    log.info("train.float8: %s scaling in %d linear layers of the decoder (output projection and embeddings stay "
             "in bf16)%s", mode, converted, "; FSDP2 gathers their weights in float8" if fsdp_float8_all_gather
             else "")  # fmt: skip
    return converted


def _some(names: list[str]) -> str:
    return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")


def precompute_scales(model: Any) -> None:
    """After an optimizer step under FSDP2's float8 all-gather: every float8 weight's scale in one all-reduce,
    instead of one per weight as each layer gathers."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


def plain_tensor(value: Any) -> Any:
    """A weight as a plain tensor: FSDP2's float8 all-gather wraps each converted weight in a torchao tensor
    subclass that holds the real (bf16/fp32) values; exports and checkpoints want those."""
    inner = getattr(value, "_tensor", None)
    return inner if inner is not None and type(value).__name__ == "WeightWithDynamicFloat8CastTensor" else value
