"""The Hugging Face model, tokenizer and config a recipe names; and writing a consolidated model back out."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig

from .config import Recipe

log = logging.getLogger(__name__)


def config_source(recipe: Recipe) -> str:
    return recipe.model.name_or_path or recipe.model.from_config or ""


def _warn_remote_code(recipe: Recipe, what: str, src: str | None) -> None:
    """``model.trust_remote_code`` lets Python files shipped with a model, config or tokenizer run on load."""
    if recipe.model.trust_remote_code:
        log.warning("model.trust_remote_code is on: Python code that comes with the %s at %s may run", what, src)


def load_config(recipe: Recipe) -> PretrainedConfig:
    m = recipe.model
    _warn_remote_code(recipe, "model config", config_source(recipe))
    cfg = AutoConfig.from_pretrained(
        config_source(recipe), trust_remote_code=m.trust_remote_code, attn_implementation=m.attn_implementation
    )
    cfg.use_cache = False
    return cfg


def load_tokenizer(recipe: Recipe):
    m = recipe.model
    src = m.tokenizer or m.name_or_path or m.from_config
    assert src is not None
    _warn_remote_code(recipe, "tokenizer", src)
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=m.trust_remote_code)
    if tok.eos_token_id is None:
        raise ValueError(f"model.tokenizer: the tokenizer at {src} has no eos token; packing needs one")
    return tok


def build_model(recipe: Recipe, config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """Pretrained weights from ``model.name_or_path``, or a random initialisation of ``config``."""
    m = recipe.model
    _warn_remote_code(recipe, "model", m.name_or_path or config_source(recipe))
    if m.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            m.name_or_path,
            config=config,
            dtype=dtype,
            attn_implementation=m.attn_implementation,
            trust_remote_code=m.trust_remote_code,
        )
    else:
        torch.manual_seed(recipe.train.seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code
        )
    model.config.use_cache = False
    return model


def decoder_layer_classes(model: nn.Module) -> tuple[type, ...]:
    """The repeated block classes (LlamaDecoderLayer, ...) that sharding wraps one by one."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(mod) for mod in model.modules() if type(mod).__name__ in names}
    if not classes:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (no _no_split_modules)")
    return tuple(classes)


def decoder_layers(model: nn.Module) -> list[Any]:
    """The model's decoder layers in order: the units that sharding wraps and the training options apply to."""
    classes = decoder_layer_classes(model)
    return [mod for mod in model.modules() if isinstance(mod, classes)]


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, each shared one counted once: the one counter of the package. On the meta device,
    and for FSDP2's DTensors (whose ``numel`` is the whole parameter's), it counts the full model."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class ParamCounts:
    total: int
    """Parameters of the whole model (shared ones once)."""
    layer: int
    """Parameters of one decoder layer: the unit FSDP2 shards and ZeRO-3 gathers at once."""
    layers: int
    """Number of decoder layers."""


_COUNTS: dict[str, ParamCounts] = {}


def param_counts(config: PretrainedConfig, trust_remote_code: bool = False) -> ParamCounts:
    """Parameter counts of the model ``config`` describes, from the model itself built on the meta device (no
    memory, any architecture transformers knows)."""
    key = config.to_json_string(use_diff=False)
    if key not in _COUNTS:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        layers = decoder_layers(model)
        _COUNTS[key] = ParamCounts(count_parameters(model), count_parameters(layers[0]), len(layers))
    return _COUNTS[key]


def save_hf_model(
    state_dict: dict[str, torch.Tensor],
    config: PretrainedConfig,
    tokenizer,
    out_dir: Path,
    dtype: torch.dtype,
    max_shard_size: str = "5GB",
) -> Path:
    """A directory ``AutoModelForCausalLM.from_pretrained`` loads: sharded safetensors, config, tokenizer,
    generation config. The state dict is attached to a meta-device model, so no second copy is made."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config.__class__.from_dict(config.to_dict())
    config.use_cache = True
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"export: state dict does not match the model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    try:
        GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    except ValueError as e:
        log.warning("export: no generation config written: %s", e)
    return out_dir
