"""Everything checked before a process group exists: the recipe, the engine's config, the batch math for the world
size, and (for a run) the files it names, local or on the Hugging Face hub. One call, every problem at once, each
naming its key or path. Also here: where ``cpt plan`` finds a model's config without waiting on the network."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import RECIPE_DIR, ConfigError, Recipe, build, check_values, read_tree
from .data import check_sources
from .data.sources import source_kind
from .engine import plan_for
from .files import is_hub_id
from .init_from import check_init_from
from .lengths import check_length
from .vocab import check_vocabulary


def load_recipe(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    world_size: int | Callable[[Recipe], int] | None = None,
    check_files: bool = False,
    ask_hub: bool = True,
) -> Recipe:
    """Merge, validate and build the recipe. Raises ConfigError naming every problem at once.

    With ``world_size`` (a number, or a function of the recipe) the batch math and the engine's layout are checked
    for that many ranks; with ``check_files`` the local model and data paths must exist and, with ``ask_hub``, the
    hub's models and datasets be within reach (:func:`check_hub`: one process of a job asks, not every rank)."""
    problems: list[str] = []
    path = Path(path)
    if path.is_dir():
        raise ConfigError([f"{path}: is a directory; pass a recipe file (the shipped ones are in {RECIPE_DIR})"])
    if not path.is_file():
        raise ConfigError([f"{path}: no such recipe file (the shipped ones are in {RECIPE_DIR})"])
    raw = read_tree(path, list(overrides), problems)
    recipe = build(Recipe, raw, "", problems)
    problems += check_values(recipe)
    problems += check_length(recipe)
    n = world_size(recipe) if callable(world_size) else world_size
    problems += plan_for(recipe).check(recipe, n)
    if n is not None and recipe.train.micro_batch_size > 0:
        try:
            recipe.batch_layout(n)
        except ConfigError as e:
            problems += e.problems
    if check_files:
        problems += check_model_paths(recipe)
        problems += check_init_from(recipe)
        problems += check_sources(recipe.data.train + list(recipe.eval.sets.values()))
        problems += check_hub(recipe) if ask_hub else []
        problems += check_resume(recipe)
        problems += check_float8(recipe)
        # The vocabulary's tokenizers are read only once the model's own files are known to be there.
        problems += check_vocabulary(recipe, load=not any(p.startswith("model.") for p in problems))
    if problems:
        raise ConfigError(problems)
    return recipe


def check_float8(r: Recipe) -> list[str]:
    """``train.float8`` needs torchao and a GPU with float8 matrix products on the machine that runs it."""
    if r.train.float8 == "off":
        return []
    from .engine.float8 import float8_problem, gpu_capability

    problem = float8_problem(r, gpu_capability())
    return [problem] if problem else []


def check_resume(r: Recipe) -> list[str]:
    """The checkpoint the run would resume from (the newest complete one in output_dir) must have been written by
    the recipe's engine: each engine reads only its own format. Another world size is fine: the engine reshards."""
    if r.train.max_steps <= 0:
        return []
    from .checkpoint import engine_problem, newest_verified

    try:
        path = newest_verified(r.output_dir)
        problem = engine_problem(path, r.parallel.engine) if path is not None else None
    except (OSError, ValueError):
        return []  # an unreadable checkpoint is skipped by the resume itself, with a warning
    return [f"output_dir: {problem}"] if problem else []


def check_model_paths(r: Recipe) -> list[str]:
    """Local model, config and tokenizer paths the recipe names that do not exist, and what the model's own config
    rules out (hub ids are not contacted)."""
    problems = []
    m = r.model
    for key, value in (("model.name_or_path", m.name_or_path), ("model.from_config", m.from_config),
                       ("model.tokenizer", m.tokenizer)):  # fmt: skip
        if value and not is_hub_id(value) and not Path(value).exists():
            problems.append(f"{key}: no such file or directory {value}")
    source = m.name_or_path or m.from_config
    if not problems and source and not is_hub_id(source):
        problems += _check_model_config(r, Path(source))
    # with model.init_from the starting weights come from there (check_init_from), not from model.name_or_path
    if not problems and m.name_or_path and Path(m.name_or_path).is_dir() and not m.init_from:
        problems += _check_weights(r, Path(m.name_or_path))
    return problems


def _check_weights(r: Recipe, source: Path) -> list[str]:
    """The checkpoint's safetensors against the model its config describes: every file the index lists is there,
    every tensor the model needs is in a header, with the shape the config gives (headers only: no weights read).
    ZeRO 0-2 load through transformers, which also reads PyTorch pickles: only the index is checked for them."""
    from .model import load_config, meta_model
    from .weights import WeightsError, check_weights, weight_files

    try:
        if not plan_for(r).loads_shards(r):
            if (source / "model.safetensors.index.json").is_file():
                weight_files(source)
            return []
        check_weights(source, meta_model(r, load_config(r)))
    except WeightsError as e:
        return [f"model.name_or_path: {e}"]
    return []


def _check_model_config(r: Recipe, source: Path) -> list[str]:
    """What the model's own config rules out: blocks longer than its positions (after ``model.rope_*`` and
    ``model.max_position_embeddings``), RoPE keys for a model they do not fit, a missing config.json."""
    from .model import load_config, position_limit, sets_rope

    path = source if source.is_file() else source / "config.json"
    key = "model.name_or_path" if r.model.name_or_path else "model.from_config"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [f"{key}: cannot read the model config {path} ({e})"]
    cfg = cfg.get("text_config", cfg)
    problems = sequence_parallel_problems(r, cfg, path)
    limit = cfg.get("max_position_embeddings")
    whose = f"max_position_embeddings of {path}"
    if sets_rope(r):
        try:
            limit = position_limit(load_config(r))
        except ValueError as e:  # the model has no RoPE these keys can set
            return [str(e)]
        if r.model.max_position_embeddings is not None:
            whose = "model.max_position_embeddings"
        if (r.model.rope_scaling or {}).get("rope_type") == "dynamic":
            whose += " x model.rope_scaling.factor, dynamic"
    problem = positions_problem(r, limit, whose)
    return problems + ([problem] if problem else [])


def sequence_parallel_problems(r: Recipe, cfg: dict, path: Path) -> list[str]:
    """``parallel.sequence_parallel: N`` splits the attention heads and the key/value heads over N ranks: both
    must be multiples of N (``cfg``: the model's config.json at ``path``)."""
    n = r.parallel.sequence_parallel
    if n <= 1:
        return []
    heads = cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads") or heads
    return [
        f"parallel.sequence_parallel: {n} does not divide the model's {what} ({count}, {key} of {path}): each rank "
        f"attends with 1/N of them"
        for what, key, count in (("attention heads", "num_attention_heads", heads),
                                 ("key/value heads", "num_key_value_heads", kv))
        if isinstance(count, int) and count % n
    ]  # fmt: skip


def positions_problem(r: Recipe, limit: int | None, whose: str) -> str | None:
    """``data.seq_len`` beyond the ``limit`` positions of the model (``whose`` number it is), and what to set."""
    n = r.data.seq_len
    if not isinstance(limit, int) or n <= limit:
        return None
    also = "" if r.model.rope_scaling is not None else " and set model.rope_scaling (with model.rope_theta if you like)"
    return (
        f"data.seq_len: {n:,} is longer than the model's {limit:,} positions ({whose}); to train on longer blocks "
        f"raise model.max_position_embeddings to at least {n:,}{also}"
    )


# ------------------------------------------------------------------------------------------ the Hugging Face hub

HUB_TIMEOUT_S = 5.0
"""How long the hub may take to answer one question before a run is refused (or a plan goes on without it)."""

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer_config.json", "tokenizer.json")


def check_hub(r: Recipe) -> list[str]:
    """Hub models and datasets the recipe names that this machine cannot get: one problem per id, naming its keys.

    A model is there when every file the run loads from it (config, weights, tokenizer) is in the local Hugging Face
    cache; otherwise, and for datasets (streamed from the hub while training, so the cache does not help), the hub
    is asked once per id, for at most :data:`HUB_TIMEOUT_S`. Without this, every worker would retry the download on
    its own and the run fail a minute later with a traceback per rank."""
    hub = _Hub()
    problems = []
    for repo_id, (keys, needs) in _hub_models(r).items():
        missing = _missing_from_cache(repo_id, needs)
        if missing and (why := hub.why_not("model", repo_id)):
            problems.append(
                f"{', '.join(keys)}: {repo_id} is {_cache_state(missing, needs)} and {why}; download it first "
                f"(`hf download {repo_id}`) or pass a local path"
            )
    for repo_id, keys in _hub_datasets(r).items():
        if why := hub.why_not("dataset", repo_id):
            problems.append(
                f"{', '.join(keys)}: {repo_id} is a hub dataset, read from the hub during the run, and {why}; download "
                f"it first (`hf download --repo-type dataset {repo_id} --local-dir DIR`) and pass the local path of "
                "its data files"
            )
    return problems


class _Hub:
    """Asks the hub about ids; after one failed connection the next ids get the same answer without a new wait."""

    def __init__(self) -> None:
        self.unreachable: str | None = None

    def why_not(self, repo_type: str, repo_id: str) -> str | None:
        """Why ``repo_id`` cannot be fetched from the hub now, or None when the hub knows it."""
        from huggingface_hub import HfApi, constants, is_offline_mode
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

        if is_offline_mode():
            return "HF_HUB_OFFLINE is set"
        if self.unreachable:
            return self.unreachable
        api = HfApi()
        ask = api.model_info if repo_type == "model" else api.dataset_info
        try:
            ask(repo_id, timeout=HUB_TIMEOUT_S)
        except GatedRepoError:
            return f"it is gated: accept its licence at {constants.ENDPOINT}/{repo_id} and log in (`hf auth login`)"
        except RepositoryNotFoundError:
            return (
                f"the hub ({constants.ENDPOINT}) has no {repo_type} of that name, or it is private: check the id, "
                "or log in (`hf auth login`)"
            )
        except HfHubHTTPError as e:
            return f"the hub ({constants.ENDPOINT}) answered: {str(e).splitlines()[0]}"
        except Exception as e:  # a refused or timed-out connection, a failed name lookup, a proxy's refusal
            self.unreachable = f"the connection to the hub failed ({constants.ENDPOINT}: {type(e).__name__}: {e})"
            return self.unreachable
        return None


def _hub_models(r: Recipe) -> dict[str, tuple[list[str], set[str]]]:
    """Hub model ids -> (the keys naming them, what the run loads from them: config, weights, tokenizer)."""
    m = r.model
    # The tokenizer comes from model.tokenizer, else from the model (or the config) itself.
    tokenizer = "model.tokenizer" if m.tokenizer else "model.name_or_path" if m.name_or_path else "model.from_config"
    found: dict[str, tuple[list[str], set[str]]] = {}
    # with model.init_from the starting weights come from there: only the model's config is needed
    weights = set() if m.init_from else {"weights"}
    for key, value, needs in (("model.name_or_path", m.name_or_path, {"config", *weights}),
                              ("model.from_config", m.from_config, {"config"}),
                              ("model.tokenizer", m.tokenizer, set())):  # fmt: skip
        if value and is_hub_id(value):
            keys, wanted = found.setdefault(value, ([], set()))
            keys.append(key)
            wanted |= needs | ({"tokenizer"} if key == tokenizer else set())
    return found


def _hub_datasets(r: Recipe) -> dict[str, list[str]]:
    """Hub dataset ids -> the keys naming them."""
    named = [(f"data.train[{i}].path", s.path) for i, s in enumerate(r.data.train)]
    named += [(f"eval.sets.{name}.path", s.path) for name, s in r.eval.sets.items()]
    found: dict[str, list[str]] = {}
    for key, path in named:
        if path and source_kind(path) == "hub":
            found.setdefault(path, []).append(key)
    return found


def _cached(repo_id: str, filename: str) -> str | None:
    """The path of ``filename`` of the hub model ``repo_id`` in the local cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None


def _weights_cached(repo_id: str) -> bool:
    for name in _WEIGHTS:
        if (path := _cached(repo_id, name)) is None:
            continue
        if not name.endswith(".index.json"):
            return True
        try:
            shards = set(json.loads(Path(path).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        if all(_cached(repo_id, shard) for shard in shards):
            return True
    return False


def _missing_from_cache(repo_id: str, needs: set[str]) -> list[str]:
    """What the run needs of ``repo_id`` that the local Hugging Face cache lacks."""
    missing = []
    if "config" in needs and not _cached(repo_id, "config.json"):
        missing.append("config.json")
    if "weights" in needs and not _weights_cached(repo_id):
        missing.append("weights")
    if "tokenizer" in needs and not any(_cached(repo_id, f) for f in _TOKENIZER):
        missing.append("tokenizer")
    return missing


def _cache_state(missing: list[str], needs: set[str]) -> str:
    from huggingface_hub import constants

    where = f"the local Hugging Face cache ({constants.HF_HUB_CACHE}"
    if len(missing) < len(needs):
        return f"only partly in {where}: no {', no '.join(missing)})"
    return f"not in {where})"


def shipped_model_config(repo_id: str) -> Path | None:
    """The config.json of hub model ``repo_id`` shipped in ``recipes/models/`` (listed in its ``index.json``), so
    that planning works where the hub cannot be reached; None when none is shipped."""
    index = RECIPE_DIR / "models" / "index.json"
    try:
        names = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    name = names.get(repo_id) if isinstance(names, dict) else None
    path = index.parent / name if isinstance(name, str) else None
    return path if path is not None and path.is_file() else None


def planned_vocabulary(r: Recipe, config: Any) -> tuple[Any, str | None]:
    """``config`` with the vocabulary a run of ``r`` grows to (``model.add_tokens``, an extending ``model.tokenizer``)
    and a line saying so, or ``config`` and None when nothing grows. Without the tokenizers at hand, every added
    token is counted as new."""
    from .vocab import PAD_TO, extend_vocabulary

    m = r.model
    if not (m.add_tokens or m.tokenizer):
        return config, None
    from .model import load_tokenizer, weights_source

    rows = int(config.get_text_config().vocab_size)
    sources = [x for x in (m.tokenizer or m.name_or_path or m.from_config, weights_source(r)) if x]
    # a hub tokenizer not downloaded here is not fetched: transformers would retry the network for half a minute
    here = all(not is_hub_id(x) or _cached(x, "tokenizer_config.json") is not None for x in sources)
    try:
        if not here:
            raise OSError("a tokenizer is not here")
        grown = extend_vocabulary(r, load_tokenizer(r), config).config
        how = "from the tokenizers"
    except (ConfigError, OSError, ValueError):
        grown = copy.deepcopy(config)
        grown.get_text_config().vocab_size = math.ceil((rows + len(m.add_tokens)) / PAD_TO) * PAD_TO
        how = f"counting all {len(m.add_tokens)} model.add_tokens as new: the tokenizers are not here"
    new_rows = int(grown.get_text_config().vocab_size)
    if new_rows == rows:
        return config, None
    return grown, f"embeddings grow from {rows:,} to {new_rows:,} rows ({how})"


def plan_model_config(r: Recipe) -> tuple[Any, str | None]:
    """The model config ``cpt plan`` computes with, and a note on where it came from (or why there is none).

    A hub model's config is read from the local cache, else fetched if the hub answers within
    :data:`HUB_TIMEOUT_S`, else taken from ``recipes/models/`` when a copy is shipped there: transformers alone
    would retry the network for half a minute and then give up."""
    from .model import config_source, load_config

    source = config_source(r)
    key = "model.name_or_path" if r.model.name_or_path else "model.from_config"

    def read(path: str) -> Any:
        if path == source:
            return load_config(r)
        return load_config(
            dataclasses.replace(r, model=dataclasses.replace(r.model, name_or_path=None, from_config=path))
        )

    if not is_hub_id(source):
        return read(source), None
    cached = _cached(source, "config.json")
    if cached is not None:
        return read(os.path.dirname(cached)), None
    why = _Hub().why_not("model", source)
    if why is None:
        try:
            return read(source), None
        except (OSError, ValueError) as e:
            why = f"its config could not be read ({str(e).splitlines()[0]})"
    shipped = shipped_model_config(source)
    if shipped is not None:
        return read(str(shipped)), (
            f"{_relative(shipped)}, shipped with cpt: {source} is not in the local Hugging Face cache and {why}"
        )
    return None, (
        f"{key}: {source} is not in the local Hugging Face cache and {why}; no model numbers without its config: "
        f"download it (`hf download {source} config.json`) or pass model.from_config=<a local config.json>"
    )


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
