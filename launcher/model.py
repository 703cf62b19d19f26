"""The Hugging Face model, tokenizer and config a recipe names, and the layout of its weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from .config import Recipe

log = logging.getLogger(__name__)


def config_source(recipe: Recipe) -> str:
    return recipe.model.name_or_path or recipe.model.from_config or ""


def init_checkpoint(recipe: Recipe) -> Path | None:
    """``model.init_from`` when it is a checkpoint of this tool (a directory with ``trainer_state.json``): the
    engine builds the model without reading any weights and loads the checkpoint's once it is set up."""
    init = recipe.model.init_from
    if init and (Path(init) / "trainer_state.json").is_file():
        return Path(init)
    return None


def weights_source(recipe: Recipe) -> str | None:
    """Where the starting weights are read from as Hugging Face safetensors (a local directory or a hub id), or
    None for a random start or a start from a checkpoint (:func:`init_checkpoint`): ``model.init_from`` when it is
    a Hugging Face model directory, else ``model.name_or_path``. An ``init_from`` that is gone is None too: only a
    branch that resumes a checkpoint of its own gets this far without it (the pre-flight check refuses any other),
    and the resume brings the weights."""
    m = recipe.model
    if m.init_from:
        model_dir = Path(m.init_from).is_dir() and init_checkpoint(recipe) is None
        return m.init_from if model_dir else None
    return m.name_or_path


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
    apply_rope(cfg, recipe)
    return cfg


def sets_rope(recipe: Recipe) -> bool:
    """Whether the recipe changes the model's positions: ``model.rope_theta``, ``rope_scaling`` or
    ``max_position_embeddings``."""
    m = recipe.model
    return m.rope_theta is not None or m.rope_scaling is not None or m.max_position_embeddings is not None


_ROPE_KEPT = ("rope_theta", "partial_rotary_factor")
"""What a model's ``rope_parameters`` keeps under a new ``model.rope_scaling``: the keys that are not its scaling."""


def apply_rope(config: PretrainedConfig, recipe: Recipe) -> None:
    """``model.rope_theta``, ``model.rope_scaling`` and ``model.max_position_embeddings`` written into ``config``
    (its text config, for a model with several). transformers 5 keeps a model's RoPE settings, ``rope_theta``
    included, in one ``rope_parameters`` dict (what ``rope_scaling`` and ``rope_theta`` were before). A new scaling
    replaces the model's own; ``rope_theta`` and ``partial_rotary_factor`` stay unless the recipe sets them.
    Raises ValueError, naming the key, for a model these keys do not fit."""
    if not sets_rope(recipe):
        return
    m = recipe.model
    text = config.get_text_config()
    params = getattr(text, "rope_parameters", None)
    given = {"model.rope_scaling": m.rope_scaling, "model.rope_theta": m.rope_theta,
             "model.max_position_embeddings": m.max_position_embeddings}  # fmt: skip
    key = ", ".join(k for k, v in given.items() if v is not None)
    if not isinstance(params, dict) or not params:
        raise ValueError(
            f"{key}: the model's config ({type(text).__name__}) has no rotary position embedding (rope_parameters) "
            "to set"
        )
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(
            f"{key}: the model's config ({type(text).__name__}) gives each kind of layer a RoPE of its own "
            f"({', '.join(params)}); model.rope_theta, rope_scaling and max_position_embeddings set one for all"
        )
    params = dict(params)
    if m.rope_scaling is not None:
        params = {**{k: params[k] for k in _ROPE_KEPT if k in params}, **m.rope_scaling}
    if m.rope_theta is not None:
        params["rope_theta"] = float(m.rope_theta)
    if m.max_position_embeddings is not None:
        text.max_position_embeddings = m.max_position_embeddings
    text.rope_parameters = params
    text.validate_rope()


def position_limit(config: PretrainedConfig) -> int | None:
    """The longest block the model of ``config`` takes: its ``max_position_embeddings``, times the factor under
    ``dynamic`` RoPE scaling (which rescales the frequencies for longer sequences); None when the config says
    nothing."""
    text = config.get_text_config()
    limit = getattr(text, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    params = getattr(text, "rope_parameters", None) or {}
    if params.get("rope_type") == "dynamic" and isinstance(params.get("factor"), (int, float)):
        return int(limit * params["factor"])
    return limit


def describe_rope(positions: int | None, params: dict[str, Any]) -> str:
    """Positions and RoPE settings in one line (``max_position_embeddings 2,048; rope_theta 500,000; rope_scaling
    llama3 (factor 8, ...)``), for ``cpt plan`` and the model card."""
    parts = [f"max_position_embeddings {positions:,}"] if positions is not None else []
    if params.get("rope_theta") is not None:
        parts.append(f"rope_theta {_number(params['rope_theta'])}")
    rope_type = params.get("rope_type") or params.get("type")
    scaling = sorted((k, v) for k, v in params.items() if k not in ("rope_type", "type", *_ROPE_KEPT))
    if rope_type and rope_type != "default":
        parts.append(f"rope_scaling {rope_type} ({', '.join(f'{k} {_number(v)}' for k, v in scaling)})")
    elif rope_type:
        parts.append("no RoPE scaling")
    return "; ".join(parts)


def _number(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


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
    """The whole pretrained model of ``model.name_or_path``, loaded by transformers in this process: what ZeRO 0-2
    replicate on every rank. FSDP2 and ZeRO-3 never build a whole model (see :mod:`launcher.weights`)."""
    m = recipe.model
    source = weights_source(recipe)
    if not source:
        raise ValueError("build_model loads pretrained weights: model.name_or_path is not set")
    _warn_remote_code(recipe, "model", source)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        config=config,
        dtype=dtype,
        attn_implementation=m.attn_implementation,
        trust_remote_code=m.trust_remote_code,
    )
    model.config.use_cache = False
    return model


def meta_model(recipe: Recipe, config: PretrainedConfig) -> nn.Module:
    """The model of ``config`` on the meta device (no memory, no initialisation): the names, shapes and tied
    weights a checkpoint is checked against, and the modules :func:`launcher.weights.init_tensors` materialises
    one at a time."""
    _warn_remote_code(recipe, "model", recipe.model.name_or_path or config_source(recipe))
    m = recipe.model
    return weights_layout_model(
        config, attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code
    )


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


def weights_layout_model(config: PretrainedConfig, dtype: torch.dtype = torch.float32, **options: Any) -> nn.Module:
    """The model ``config`` describes, on the meta device: the names, shapes and tied weights a saved model stores,
    no memory. ``options`` go to ``from_config`` (attn_implementation, trust_remote_code)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **options)


def tied_copies(model: nn.Module) -> set[str]:
    """State-dict keys that are another key's weight under a second name (``lm_head.weight`` of a model with
    tied embeddings): a saved model stores each shared weight once, under the name ``from_pretrained`` ties the
    others to."""
    declared = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or []
    declared = set(declared)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    copies: set[str] = set()
    for group in names.values():
        if len(group) > 1:
            keep = next((n for n in group if n not in declared), group[0])
            copies.update(n for n in group if n != keep)
    return copies


def weight_units(model: nn.Module) -> list[list[str]]:
    """The keys a saved model stores, in state-dict order, grouped into what is read or gathered at once: each
    decoder layer's keys together, every other key on its own. Tied copies are left out."""
    try:
        classes = decoder_layer_classes(model)
    except ValueError:
        classes = ()  # no known decoder layers: every key is read on its own
    prefixes = [f"{name}." for name, mod in model.named_modules() if classes and isinstance(mod, classes)]
    copies = tied_copies(model)
    units: dict[str, list[str]] = {}
    for key in model.state_dict():
        if key in copies:
            continue
        unit = next((p for p in prefixes if key.startswith(p)), key)
        units.setdefault(unit, []).append(key)
    return list(units.values())
