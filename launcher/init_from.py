"""The pre-flight check of ``model.init_from`` (and ``init_optimizer``, ``init_data``): what it names is a complete
checkpoint of the recipe's engine, or a Hugging Face model directory, holding the recipe's architecture; run before
any worker starts, from :func:`launcher.preflight.load_recipe`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .config import ConfigError, Recipe

INIT_FROM = "model.init_from"
INIT_KINDS = (
    "a checkpoint of this tool (<output_dir>/checkpoints/step-N) or a Hugging Face model directory (a run's final/)"
)


def check_init_from(r: Recipe) -> list[str]:
    """What ``model.init_from`` names: a complete checkpoint of the recipe's engine, or a Hugging Face model
    directory with safetensors, of the recipe's architecture either way; with ``model.init_optimizer`` or
    ``model.init_data``, a checkpoint. Nothing is checked when the run has a checkpoint of its own to resume: then
    ``model.init_from`` is not used (a branch that was stopped resumes itself, even if what it came from is gone)."""
    m = r.model
    if not m.init_from:
        return []
    from .checkpoint import newest_verified

    try:
        if r.train.max_steps > 0 and newest_verified(r.output_dir) is not None:
            return []
    except OSError:
        pass  # an unreadable output_dir: the resume reports it
    path = Path(m.init_from)
    if not path.exists():
        return [f"{INIT_FROM}: no such directory {path}; pass {INIT_KINDS}"]
    if not path.is_dir():
        return [f"{INIT_FROM}: {path} is not a directory; pass {INIT_KINDS}"]
    if (path / "trainer_state.json").is_file():
        return _check_init_checkpoint(r, path)
    if (path / "config.json").is_file():
        return _check_init_model(r, path)
    return [f"{INIT_FROM}: {path} is {_not_a_start(path)}"]


def _not_a_start(path: Path) -> str:
    """What ``path``, neither a checkpoint nor a Hugging Face model, is, and what to pass instead."""
    from .checkpoint import STEP_RE, newest_verified

    if path.name.endswith(".tmp") and STEP_RE.match(path.name.removesuffix(".tmp")):
        return "an unfinished checkpoint (its save did not complete, it has no trainer_state.json); pass a complete one"
    run = path.parent if path.name == "checkpoints" else path
    choices = []
    if (newest := newest_verified(run)) is not None:
        choices.append(f"one of its checkpoints (the newest is {newest})")
    if (run / "final" / "config.json").is_file():
        choices.append(f"its final model {run / 'final'}")
    if choices:
        return f"a run's output_dir, not a checkpoint; pass {' or '.join(choices)}"
    return f"neither a checkpoint (no trainer_state.json) nor a Hugging Face model (no config.json); pass {INIT_KINDS}"


def _check_init_checkpoint(r: Recipe, path: Path) -> list[str]:
    from .checkpoint import init_engine_problem, verify

    problem = verify(path)
    if problem is not None:
        return [f"{INIT_FROM}: {path} is not a complete checkpoint: {problem}"]
    state = json.loads((path / "trainer_state.json").read_text())
    saved_engine = state.get("engine")
    if saved_engine not in (None, r.parallel.engine):
        return [init_engine_problem(path, saved_engine, r.parallel.engine)]
    problems = _check_init_architecture(r, path)
    if r.model.init_optimizer:
        problems += _check_init_groups(r, path)
    return problems


def _check_init_model(r: Recipe, path: Path) -> list[str]:
    """A Hugging Face model directory: weights only, read as ``model.name_or_path``'s would be."""
    from .model import meta_model
    from .weights import WeightsError, check_weights

    problems = [
        f"{key}: {path} (model.init_from) is a Hugging Face model directory, which holds no {what}; set {key}: false, "
        "or init from a checkpoint (<output_dir>/checkpoints/step-N)"
        for key, on, what in (
            ("model.init_optimizer", r.model.init_optimizer, "optimizer state"),
            ("model.init_data", r.model.init_data, "data position"),
        )  # fmt: skip
        if on
    ]
    try:
        check_weights(path, meta_model(r, _model_configs(r)[1]))
    except WeightsError as e:
        problems.append(f"{INIT_FROM}: {e} (the recipe's model, {_model_key(r)}, says what the model is)")
    except (OSError, ValueError):
        pass  # the recipe's own model config is unreadable: check_model_paths says so
    return problems


def _model_key(r: Recipe) -> str:
    m = r.model
    return f"model.name_or_path={m.name_or_path}" if m.name_or_path else f"model.from_config={m.from_config}"


def _model_configs(r: Recipe) -> tuple[Any, Any]:
    """(the config of the model the recipe trains, the config of the weights it starts from), as the workers decide
    them: the recipe's model config, the first grown by a vocabulary extension (``model.add_tokens``, an extending
    ``model.tokenizer``) and the second too unless the extension grows the starting weights as they are loaded."""
    from .model import load_config, load_tokenizer
    from .vocab import extend_vocabulary

    config = load_config(r)
    if not (r.model.add_tokens or r.model.tokenizer):
        return config, config
    try:
        plan = extend_vocabulary(r, load_tokenizer(r), config)
    except (ConfigError, OSError, ValueError):
        return config, config  # check_vocabulary reports it
    return plan.config, plan.extension.base_config if plan.extension is not None else plan.config


def _check_init_architecture(r: Recipe, path: Path) -> list[str]:
    """The checkpoint's model (its ``hf/config.json``) against the recipe's: the same tensors with the same shapes,
    compared on models built on the meta device (no weights read)."""
    from transformers import AutoConfig

    from .model import weights_layout_model
    from .weights import expected_tensors

    try:
        mine_config = _model_configs(r)[0]
    except (OSError, ValueError):
        return []  # the recipe's own model config is unreadable: check_model_paths says so
    options = {"trust_remote_code": r.model.trust_remote_code}
    try:
        saved_config = AutoConfig.from_pretrained(path / "hf", **options)
        theirs, _ = expected_tensors(weights_layout_model(saved_config, **options))
    except (OSError, ValueError) as e:
        return [f"{INIT_FROM}: cannot read the model config of the checkpoint {path / 'hf'} ({e})"]
    mine, _ = expected_tensors(weights_layout_model(mine_config, **options))
    if mine == theirs:
        return []
    differ = [f"{n}: {list(theirs[n])} there, {list(shape)} here" for n, shape in mine.items()
              if n in theirs and theirs[n] != shape]  # fmt: skip
    differ += [f"{n} only here" for n in mine if n not in theirs]
    differ += [f"{n} only there" for n in theirs if n not in mine]
    more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
    return [
        f"{INIT_FROM}: {path} holds a {saved_config.model_type} model of another architecture than the recipe's "
        f"({_model_key(r)}, {mine_config.model_type}): {'; '.join(differ[:3])}{more}"
    ]


def _check_init_groups(r: Recipe, path: Path) -> list[str]:
    """An optimizer state fits only the same parameter groups: the ones train.weight_decay_exclude and
    train.trainable make."""
    import yaml

    try:
        saved = (yaml.safe_load((path / "resolved_recipe.yaml").read_text()) or {}).get("train") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    t = dataclasses.asdict(r.train)
    changed = [f"train.{k}={saved[k]!r} there, {t[k]!r} here" for k in ("weight_decay_exclude", "trainable")
               if k in saved and saved[k] != t[k]]  # fmt: skip
    if not changed:
        return []
    return [
        f"model.init_optimizer: the optimizer state of {path} is for other parameter groups ({'; '.join(changed)}); "
        "use the settings of the run it came from, or set model.init_optimizer: false"
    ]
