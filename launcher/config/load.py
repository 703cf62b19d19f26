"""From files to one merged tree: the recipe and the recipes it ``extends``, the engine config, overrides.

Merge order, later wins:

    schema defaults <- recipe (and the recipes it ``extends``) <- engine config (``parallel.config``)
    <- ``a.b=v`` overrides from the command line

OmegaConf does the merging of YAML and dotlist overrides; nothing is interpolated (recipes are data). Every
problem is appended to a list with the file or key it concerns, so that all of them are reported at once.

Numbers mean the same in a file and on the command line: ``1e-4``, ``5E+3`` and ``.5e-3`` are floats in both
(YAML 1.1, which PyYAML reads, would make them strings in a file), and a string key given something that looks
like a number (``output_dir: 1e-4``, ``logging.run_name=007``) keeps the text as written.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..redact import redact_values
from .schema import DS_CONFIG_DIR, ENGINE_CONFIG_FILES, FsdpConfig, ParallelConfig, Recipe, SourceConfig, source_kind

_SCIENTIFIC = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+")
"""A float in scientific notation as YAML 1.2 and the override grammar read it; YAML 1.1 wants a dot and a signed
exponent (``1.0e-4``) and reads the rest as strings."""
_NUMBER = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?")
_STR, _INT, _FLOAT = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float"))


def _child_type(tp: Any, key: str) -> Any:
    """The schema type under ``key`` (a field, list index or mapping key) of ``tp``; None where the schema does not
    say (an unknown key, a free-form mapping)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if dataclasses.is_dataclass(tp):
        return typing.get_type_hints(tp).get(key)
    origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0]
    if origin is dict:
        return typing.get_args(tp)[1]
    return None


def _is_str(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def _type_at(key: str, root: Any = Recipe) -> Any:
    """The schema type of a dotted override key (``data.train[0].path``, ``eval.sets.web.path``)."""
    tp = root
    for part in re.findall(r"[^.\[\]]+", key):
        tp = _child_type(tp, part)
        if tp is None:
            return None
    return tp


def _retag(node: yaml.Node, tp: Any) -> None:
    """Numbers as the schema reads them, before the YAML nodes become values: a plain (unquoted) scalar in
    scientific notation is a float, except where the schema wants a string; there a plain number keeps its text
    (``007`` stays ``007``, not 7)."""
    if isinstance(node, yaml.MappingNode):
        numbered = any(
            typing.get_origin(a) is dict and typing.get_args(a)[0] is int for a in (tp, *typing.get_args(tp))
        )
        for k, v in node.value:
            if numbered:  # a schedule's steps: ``{0: 0.5, 2e3: 0.1}``
                _retag(k, int)
            _retag(v, _child_type(tp, k.value) if isinstance(k, yaml.ScalarNode) else None)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _retag(item, _child_type(tp, "0"))
    elif isinstance(node, yaml.ScalarNode) and node.style is None:
        if _is_str(tp):
            if node.tag in (_INT, _FLOAT):
                node.tag = _STR
        elif node.tag == _STR and _SCIENTIFIC.fullmatch(node.value):
            node.tag = _FLOAT


def _parse_yaml(text: str, schema: Any) -> Any:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _retag(node, schema)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_yaml(path: Path, problems: list[str], schema: Any = Recipe) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        problems.append(f"{path}: cannot read ({e.strerror})")
        return {}
    try:
        data = _parse_yaml(text, schema)
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
        data = _read_yaml(path, problems, FsdpConfig)
    if engine != engine_of_file and data:
        problems.append(f"parallel.config: {path.name} is a{label} config but parallel.engine is {engine!r}")
    return _create({"parallel": {engine_of_file: data}}, problems, str(path))


def _keep_text(override: str) -> str:
    """``key=value`` with a number-like value quoted where the key is a string (``output_dir=1e-4`` names the
    directory ``1e-4``, not ``0.0001``), as in a recipe file."""
    key, _, value = override.partition("=")
    if _NUMBER.fullmatch(value) and _is_str(_type_at(key)):
        return f"{key}='{value}'"
    return override


def parse_overrides(overrides: list[str], problems: list[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o:
            problems.append(f"override {o!r}: expected key=value")
    try:
        return OmegaConf.from_dotlist([_keep_text(o) for o in overrides if "=" in o])
    except Exception as e:  # OmegaConf raises several grammar errors
        problems.append(f"overrides: {e}")
        return OmegaConf.create({})


def _list_item_key(key: str) -> list[tuple[str, bool]] | None:
    """The parts of an override key that reaches into an item of a list of the schema (``data.train.0.weight``
    or ``data.train[0].weight``), each with whether it indexes a list; None for any other key."""
    parts, tp, into = [], Recipe, False
    for part in re.findall(r"[^.\[\]]+", key):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
            tp = args[0]
        index = typing.get_origin(tp) is list
        into = into or index
        parts.append((part, index))
        tp = _child_type(tp, part)
        if tp is None:
            break
    return parts if into else None


def _set_list_item(tree: DictConfig, override: str, problems: list[str]) -> None:
    """Apply ``key=value`` where the key reaches into a list item (``data.train.0.weight='{0: 0.5, 100: 0.1}'``)
    to the merged tree: a merge of dotted overrides would replace the list by a mapping. The item must exist."""
    key, _, _ = override.partition("=")
    parts = _list_item_key(key)
    assert parts is not None
    try:
        problem = _missing_item(tree, parts)
        if problem:
            problems.append(f"{key}: {problem}")
            return
        value: Any = OmegaConf.to_container(OmegaConf.from_dotlist([_keep_text(override)]), resolve=False)
        for part, _ in parts:
            value = value[part]
        OmegaConf.update(tree, ".".join(p for p, _ in parts), value, merge=False)
    except Exception as e:  # OmegaConf raises several grammar and structure errors
        problems.append(f"override {override!r}: {e}".replace("\n", " "))


def _missing_item(tree: DictConfig, parts: list[tuple[str, bool]]) -> str | None:
    """Why the list item that ``parts`` (see :func:`_list_item_key`) names is not in ``tree``, or None."""
    node: Any = tree
    for i, (part, index) in enumerate(parts):
        if not any(x for _, x in parts[i:]):
            return None  # the rest are keys, which the update creates where missing
        where = ".".join(p for p, _ in parts[:i])
        if index and not isinstance(node, ListConfig):
            return f"{where} is not a list in this recipe, so it has no item {part}; set the whole list"
        if index and not (part.isdigit() and int(part) < len(node)):
            return f"{where} has {len(node)} item(s), numbered from 0; to add one, set the whole list"
        if not index and not (isinstance(node, DictConfig) and part in node):
            what = ".".join(p for p, _ in parts[: i + 1])
            return f"{what} is not in this recipe, so it has no items; set the whole list"
        node = node[int(part)] if index else node[part]
    return None


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
    """The merged recipe tree of ``path`` (which exists) and ``overrides``, as plain Python data. An override of an
    item of a list (``data.train.0.weight=2``) is applied after the others, to the item the merged tree has."""
    tree = _load_recipe_tree(path, problems)
    items = [o for o in overrides if "=" in o and _list_item_key(o.partition("=")[0]) is not None]
    cli = parse_overrides([o for o in overrides if o not in items], problems)
    # The engine config is named by the recipe or an override, and merges between the two.
    engine_cfg = _load_engine_config(_merge([tree, cli], [], "overrides"), problems)
    merged = _merge([tree, engine_cfg, cli], problems, "overrides")
    for o in items:
        _set_list_item(merged, o, problems)
    raw = OmegaConf.to_container(merged, resolve=False)
    assert isinstance(raw, dict)
    _check_no_interpolation(raw, "", problems)
    return {str(k): v for k, v in raw.items()}


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, as saved in output_dir/resolved_recipe.yaml and printed by ``cpt plan``.
    Values under secret-looking keys (``api_key``, ``token``, ``password``, ...) are written as ``***``.

    Keys that do not apply to this recipe are left out while they hold their defaults: the section of the engine
    not in use, ``name`` and ``split`` of local files and URLs (only hub datasets have them), and the keys of eval
    sets that only training sources use. A value someone did set is written, so the file loads back to the same
    recipe."""
    tree = to_dict(recipe)
    unused = "fsdp" if recipe.parallel.engine == "deepspeed" else "deepspeed"
    if tree["parallel"][unused] == _DEFAULTS["parallel"][unused]:
        del tree["parallel"][unused]
    for source in tree["data"]["train"]:
        _drop_defaults(source, _HUB_ONLY if source_kind(source["path"]) != "hub" else ())
    for source in tree["eval"]["sets"].values():
        _drop_defaults(source, _TRAINING_ONLY + (_HUB_ONLY if source_kind(source["path"]) != "hub" else ()))
    return OmegaConf.to_yaml(OmegaConf.create(redact_values(tree)))


_DEFAULTS = dataclasses.asdict(Recipe())
_SOURCE_DEFAULTS = dataclasses.asdict(SourceConfig())
_HUB_ONLY = ("name", "split")
_TRAINING_ONLY = ("weight", "token_budget", "label", "holdout_documents")


def _drop_defaults(source: dict[str, Any], keys: tuple[str, ...]) -> None:
    for k in keys:
        if source[k] == _SOURCE_DEFAULTS[k]:
            del source[k]


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)
