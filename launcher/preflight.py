"""Everything checked before a process group exists: the recipe, the engine's config, the batch math for the world
size, and (for a run) the local files it names. One call, every problem at once, each naming its key or path."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import ConfigError, Recipe, build, check_values, read_tree
from .data import check_sources
from .engine import plan_for
from .files import is_hub_id


def load_recipe(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    world_size: int | Callable[[Recipe], int] | None = None,
    check_files: bool = False,
) -> Recipe:
    """Merge, validate and build the recipe. Raises ConfigError naming every problem at once.

    With ``world_size`` (a number, or a function of the recipe) the batch math and the engine's layout are checked
    for that many ranks; with ``check_files`` the local model and data paths must exist."""
    problems: list[str] = []
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such recipe file"])
    raw = read_tree(path, list(overrides), problems)
    recipe = build(Recipe, raw, "", problems)
    problems += check_values(recipe)
    n = world_size(recipe) if callable(world_size) else world_size
    problems += plan_for(recipe).check(recipe, n)
    if n is not None and recipe.train.micro_batch_size > 0:
        try:
            recipe.batch_layout(n)
        except ConfigError as e:
            problems += e.problems
    if check_files:
        problems += check_model_paths(recipe)
        problems += check_sources(recipe.data.train + list(recipe.eval.sets.values()))
    if problems:
        raise ConfigError(problems)
    return recipe


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
    return problems


def _check_model_config(r: Recipe, source: Path) -> list[str]:
    """What the model's own config rules out: blocks longer than its positions, a missing config.json."""
    path = source if source.is_file() else source / "config.json"
    key = "model.name_or_path" if r.model.name_or_path else "model.from_config"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [f"{key}: cannot read the model config {path} ({e})"]
    cfg = cfg.get("text_config", cfg)
    limit = cfg.get("max_position_embeddings")
    if isinstance(limit, int) and r.data.seq_len > limit:
        return [f"data.seq_len: {r.data.seq_len} is longer than the model's max_position_embeddings {limit} ({path})"]
    return []
