"""Every recipe loads and plans offline with the model configs shipped in recipes/models/, and each shipped config is
the published model: it builds with transformers and has the published number of parameters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import cpt

from launcher.config import RECIPE_DIR
from launcher.files import is_hub_id
from launcher.preflight import load_recipe

MODELS = RECIPE_DIR / "models"
INDEX = {k: v for k, v in json.loads((MODELS / "index.json").read_text()).items() if not k.startswith("_")}
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))
GIB = 2**30
H200_GIB = 141

# Parameter counts as their publishers state them (model cards, technical reports), to the digits they give.
PUBLISHED = {
    "TinyLlama/TinyLlama_v1.1": 1.1e9,
    "meta-llama/Meta-Llama-3-8B": 8.03e9,
    "meta-llama/Llama-3.1-8B": 8.03e9,
    "meta-llama/Llama-3.1-70B": 70.6e9,
    "meta-llama/Llama-3.2-3B": 3.21e9,
    "Qwen/Qwen3-8B": 8.19e9,
    "Qwen/Qwen3-8B-Base": 8.19e9,
    "Qwen/Qwen3-32B": 32.8e9,
    "mistralai/Mistral-7B-v0.3": 7.25e9,
}

# The models people continue to pretrain, each with the layout its recipe is planned for: (nodes, GPUs per node).
MODEL_RECIPES = {
    "llama-3.1-8b-fsdp.yaml": (1, 8),
    "llama-3.1-70b-fsdp.yaml": (8, 8),
    "qwen3-8b-fsdp.yaml": (1, 8),
    "qwen3-32b-fsdp.yaml": (1, 8),
    "mistral-7b-zero3.yaml": (1, 8),
    "llama3-8b-longctx.yaml": (1, 8),
}


@pytest.fixture(scope="module")
def quickstart_config(tmp_path_factory, assets) -> Path:
    """The quickstart's model config as ``cpt quickstart`` builds it (the size of the demo, the test tokenizer)."""
    from launcher.quickstart_assets import build_base_config

    return build_base_config(tmp_path_factory.mktemp("qs") / "base-config", assets["tokenizer"])


def planning_overrides(path: Path, quickstart_config: Path) -> list[str]:
    """Overrides that point a recipe at a config this machine has: the shipped copy of a hub model's config, the
    shipped file a recipe names, or (for the quickstart, whose model is built when it runs) the quickstart's."""
    m = load_recipe(path).model
    source = m.name_or_path or m.from_config or ""
    if is_hub_id(source):
        assert source in INDEX, f"{path.name}: {source} has no config in recipes/models/index.json"
        return ["model.name_or_path=null", f"model.from_config={MODELS / INDEX[source]}",
                f"model.tokenizer={m.tokenizer or source}"]  # fmt: skip
    shipped = RECIPE_DIR.parent / source
    if shipped.is_file():
        return [f"model.from_config={shipped}"]
    assert path.name.startswith("quickstart"), f"{path.name}: model {source} is neither shipped nor built here"
    return ["model.name_or_path=null", f"model.from_config={quickstart_config}"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_plans_offline_with_a_shipped_config(path, quickstart_config):
    from launcher.memory import estimate
    from launcher.model import load_config

    nodes, gpus = MODEL_RECIPES.get(path.name, (1, 8))
    world = load_recipe(path).parallel.nproc_per_node or gpus * nodes  # the quickstart's CPU workers, else GPUs
    recipe = load_recipe(path, planning_overrides(path, quickstart_config), world_size=world)
    config = load_config(recipe)
    assert recipe.data.seq_len <= config.max_position_embeddings
    total = estimate(recipe, config, world).total / GIB
    assert total > 0
    if path.name in MODEL_RECIPES:
        # `cpt plan` warns from 90% of the GPU: the recipe's engine and micro-batch leave that room on an H200.
        assert total <= 0.9 * H200_GIB, f"{path.name}: {total:.1f} GiB per GPU on {nodes} x {gpus}"


@pytest.mark.parametrize("name", MODEL_RECIPES)
def test_model_recipes_continue_a_shipped_hub_model_and_evaluate_on_held_out_data(name):
    r = load_recipe(RECIPE_DIR / name)
    assert r.model.name_or_path in INDEX
    assert r.train.max_tokens, "continual pretraining is budgeted in tokens"
    trained = {(s.path, s.name, s.split) for s in r.data.train}
    for set_name, s in r.eval.sets.items():
        assert (s.path, s.name, s.split) not in trained, f"eval.sets.{set_name} reads a training source"
    assert r.eval.sets and r.eval.at_start


@pytest.mark.parametrize("repo_id", sorted(INDEX))
def test_every_shipped_config_builds_and_has_the_published_size(repo_id):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.model import count_parameters

    path = MODELS / INDEX[repo_id]
    fields = json.loads(path.read_text())
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == fields["model_type"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == fields["architectures"][0]
    n = count_parameters(model)
    assert math.isclose(n, PUBLISHED[repo_id], rel_tol=0.01), f"{repo_id}: {n / 1e9:.3f}B parameters"


def test_the_index_names_every_shipped_config_and_nothing_else():
    shipped = {p.name for p in MODELS.glob("*.json")} - {"index.json"}
    assert set(INDEX.values()) == shipped
    assert set(INDEX) == set(PUBLISHED)


def test_llama_3_1_keeps_its_long_context_rope():
    """Llama 3.1 reaches 128K positions through its rope scaling; a config without it is Llama 3 with a longer
    limit, and continued pretraining would learn different positions."""
    for name in ("llama-3.1-8b.json", "llama-3.1-70b.json"):
        cfg = json.loads((MODELS / name).read_text())
        assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0
        assert cfg["max_position_embeddings"] == 131072 and cfg["rope_theta"] == 500000.0


def test_cpt_plan_prints_the_memory_of_the_70b_recipe_offline():
    overrides = ["model.name_or_path=null", f"model.from_config={MODELS / 'llama-3.1-70b.json'}",
                 "model.tokenizer=meta-llama/Llama-3.1-70B"]  # fmt: skip
    layout = ["--nodes", "8", "--gpus-per-node", "8", "--gpu-memory-gib", "141"]
    p = cpt("plan", str(RECIPE_DIR / "llama-3.1-70b-fsdp.yaml"), *overrides, *layout, timeout=120, HF_HUB_OFFLINE="1")
    assert "70.554B parameters" in p.stdout
    assert "64 ranks" in p.stdout and "micro batch: 4 sequences per rank" in p.stdout
    assert "(59% used)" in p.stdout, p.stdout[-2000:]
