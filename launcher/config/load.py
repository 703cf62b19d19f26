"""From files to one merged tree: the recipe and the recipes it ``extends``, the engine config, overrides.

Merge order, later wins:

    schema defaults <- recipe (and the recipes it ``extends``) <- engine config (``parallel.config``)
    <- ``a.b=v`` overrides from the command line

OmegaConf does the merging of YAML and dotlist overrides; nothing is interpolated (recipes are data). Every
problem is appended to a list with the file or key it concerns, so that all of them are reported at once.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from ..redact import redact_values
from .schema import DS_CONFIG_DIR, ENGINE_CONFIG_FILES, ParallelConfig, Recipe


def _read_yaml(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        problems.append(f"{path}: cannot read ({e.strerror})")
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.append(f"{path}:{where} malformed YAML: {getattr(e, 'problem', e)}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
        return {}
    return data


def _load_recipe_tree(path: Path, problems: list[str], seen: tuple[Path, ...] = ()) -> DictConfig:
    """A recipe file with its ``extends`` chain resolved (paths relative to the extending file)."""
    path = path.resolve()
    if path in seen:
        problems.append(f"{path}: extends itself through {' -> '.join(map(str, seen))}")
        return OmegaConf.create({})
    data = _read_yaml(path, problems)
    parent = data.pop("extends", None)
    tree = _create(data, problems, str(path))
    if parent is None:
        return tree
    if not isinstance(parent, str):
        problems.append(f"{path}: extends: must be a file path, got {parent!r}")
        return tree
    parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
    if not parent_path.is_file():
        problems.append(f"{path}: extends: no such recipe {parent_path}")
        return tree
    return _merge([_load_recipe_tree(parent_path, problems, (*seen, path)), tree], problems, f"{path}: extends")


def _create(data: Any, problems: list[str], where: str) -> DictConfig:
    try:
        tree = OmegaConf.create(data)
    except Exception as e:  # OmegaConf refuses some keys and values with several error types
        problems.append(f"{where}: {e}")
        return OmegaConf.create({})
    if not isinstance(tree, DictConfig):
        problems.append(f"{where}: expected a mapping of sections")
        return OmegaConf.create({})
    return tree


def _merge(trees: list[DictConfig], problems: list[str], where: str) -> DictConfig:
    """Later trees win. A value whose shape cannot be merged (a list over a mapping, say) is a problem named
    here, not a crash."""
    try:
        merged = OmegaConf.merge(*trees)
    except Exception as e:
        problems.append(f"{where}: cannot merge: {e}".replace("\n", " "))
        return trees[0]
    assert isinstance(merged, DictConfig)
    return merged


def resolve_engine_config_path(name: str) -> Path:
    """``parallel.config`` as a path: as given if it exists, else a file in ds_configs/."""
    p = Path(name).expanduser()
    if p.is_file() or p.is_absolute():
        return p
    return DS_CONFIG_DIR / name


def _load_engine_config(tree: DictConfig, problems: list[str]) -> DictConfig:
    """The engine config file named by ``parallel.config``, as a recipe fragment to merge."""
    raw = OmegaConf.to_container(tree, resolve=False)
    parallel = raw.get("parallel") if isinstance(raw, dict) else None
    parallel = parallel if isinstance(parallel, dict) else {}
    name = parallel.get("config", ParallelConfig.config)
    engine = parallel.get("engine", ParallelConfig.engine)
    if not isinstance(name, str) or not name:
        return OmegaConf.create({})
    path = resolve_engine_config_path(name)
    if not path.is_file():
        problems.append(f"parallel.config: no such engine config {path}")
        return OmegaConf.create({})
    engine_of_file, label = ENGINE_CONFIG_FILES.get(path.suffix.lower(), ENGINE_CONFIG_FILES[".yaml"])
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            problems.append(f"{path}: line {e.lineno}, column {e.colno}: malformed JSON: {e.msg}")
            return OmegaConf.create({})
    else:
        data = _read_yaml(path, problems)
    if engine != engine_of_file and data:
        problems.append(f"parallel.config: {path.name} is a{label} config but parallel.engine is {engine!r}")
    return _create({"parallel": {engine_of_file: data}}, problems, str(path))


def parse_overrides(overrides: list[str], problems: list[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o:
            problems.append(f"override {o!r}: expected key=value")
    try:
        return OmegaConf.from_dotlist([o for o in overrides if "=" in o])
    except Exception as e:  # OmegaConf raises several grammar errors
        problems.append(f"overrides: {e}")
        return OmegaConf.create({})


def _check_no_interpolation(node: Any, key: str, problems: list[str]) -> None:
    """Recipes are data: ``${...}`` interpolations and resolvers are not evaluated."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_no_interpolation(v, f"{key}.{k}" if key else str(k), problems)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_no_interpolation(v, f"{key}[{i}]", problems)
    elif isinstance(node, str) and "${" in node and key.split(".")[0] != "parallel":
        problems.append(f"{key}: interpolation {node!r} is not supported in recipes; write the value")


def read_tree(path: Path, overrides: list[str], problems: list[str]) -> dict[str, Any]:
    """The merged recipe tree of ``path`` (which exists) and ``overrides``, as plain Python data."""
    tree = _load_recipe_tree(path, problems)
    cli = parse_overrides(overrides, problems)
    # The engine config is named by the recipe or an override, and merges between the two.
    engine_cfg = _load_engine_config(_merge([tree, cli], [], "overrides"), problems)
    merged = _merge([tree, engine_cfg, cli], problems, "overrides")
    raw = OmegaConf.to_container(merged, resolve=False)
    assert isinstance(raw, dict)
    _check_no_interpolation(raw, "", problems)
    return {str(k): v for k, v in raw.items()}


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, as saved in output_dir/resolved_recipe.yaml and printed by ``cpt plan``.
    Values under secret-looking keys (``api_key``, ``token``, ``password``, ...) are written as ``***``."""
    return OmegaConf.to_yaml(OmegaConf.create(redact_values(to_dict(recipe))))


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)
