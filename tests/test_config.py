"""Every recipe and engine config loads; bad recipes fail with every problem named by its dotted key."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from launcher.config import DS_CONFIG_DIR, RECIPE_DIR, ConfigError, Recipe, to_yaml
from launcher.preflight import load_recipe

RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))
ENGINE_CONFIGS = sorted(p for p in DS_CONFIG_DIR.iterdir() if p.suffix in (".json", ".yaml"))


def problems_of(path: Path, overrides: list[str] = ()) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_recipe(path, list(overrides))
    return e.value.problems


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_round_trips(path, tmp_path):
    r = load_recipe(path)
    assert isinstance(r, Recipe)
    assert r.parallel.engine in ("deepspeed", "fsdp")
    assert (r.parallel.deepspeed != {}) == (r.parallel.engine == "deepspeed")
    # The saved resolved recipe is itself a valid recipe that resolves to the same object.
    saved = tmp_path / "resolved.yaml"
    saved.write_text(to_yaml(r))
    assert load_recipe(saved) == r


@pytest.mark.parametrize("path", ENGINE_CONFIGS, ids=lambda p: p.name)
def test_every_engine_config_loads(path, tmp_path):
    engine = "deepspeed" if path.suffix == ".json" else "fsdp"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": "org/model"}, "train": {"max_steps": 0},
                                      "parallel": {"engine": engine, "config": path.name}}))  # fmt: skip
    r = load_recipe(recipe)
    if engine == "deepspeed":
        assert r.parallel.deepspeed == json.loads(path.read_text())
    else:
        assert r.parallel.fsdp.__dict__ == {**r.parallel.fsdp.__dict__, **yaml.safe_load(path.read_text())}


def test_deepspeed_auto_values_are_filled_from_the_recipe(tmp_path):
    import torch
    from transformers import AutoConfig

    from launcher.engine.deepspeed_plan import fill_auto
    from launcher.model import param_counts

    r = load_recipe(RECIPE_DIR / "llama-1b-zero3.yaml", ["train.grad_clip=0.5", "train.lr=2e-4"])
    layout = r.batch_layout(16)
    config = AutoConfig.from_pretrained(RECIPE_DIR / "models" / "llama-1b.json")
    counts = param_counts(config)
    model = (counts.total, counts.layer, config.hidden_size)
    ds = fill_auto(r, layout, *model, dtype=torch.bfloat16, cuda=True)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 512 // (8 * 16) == layout.grad_accum
    assert ds["train_batch_size"] == 512
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and ds["optimizer"]["params"]["fused"] is True
    assert ds["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    # q and o, k and v (4 KV heads of 64), MLP, two norms
    layer = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 2 * 2048
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 2 * layer
    assert "auto" not in json.dumps(ds)
    # torch's linear, so that torch.compile compiles one decoder layer function for all layers
    assert ds["zero_optimization"]["memory_efficient_linear"] is False
    kept = load_recipe(
        RECIPE_DIR / "llama-1b-zero3.yaml", ["parallel.deepspeed.zero_optimization.memory_efficient_linear=true"]
    )
    assert fill_auto(kept, layout, *model, torch.bfloat16, True)["zero_optimization"]["memory_efficient_linear"]
    off = load_recipe(RECIPE_DIR / "llama-1b-zero3.yaml", ["parallel.config=zero3-offload.json"])
    ds = fill_auto(off, off.batch_layout(8), *model, dtype=torch.float32, cuda=False)
    assert ds["optimizer"]["params"]["torch_adam"] is False  # offloaded states need DeepSpeedCPUAdam
    assert ds["bf16"]["enabled"] is False


def test_merge_order_recipe_then_engine_config_then_overrides(tmp_path):
    parent = tmp_path / "parent.yaml"
    parent.write_text(yaml.safe_dump({"output_dir": "a", "model": {"name_or_path": "org/m"},
                                      "train": {"max_steps": 0, "lr": 0.1, "seed": 1}}))  # fmt: skip
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"extends": "parent.yaml", "train": {"seed": 2},
                                     "parallel": {"engine": "fsdp", "config": "fsdp-offload.yaml"}}))  # fmt: skip
    r = load_recipe(child, ["train.seed=3", "parallel.fsdp.reshard_after_forward=false"])
    assert (r.output_dir, r.train.lr, r.train.seed) == ("a", 0.1, 3)
    assert r.parallel.fsdp.cpu_offload is True  # from the engine config
    assert r.parallel.fsdp.reshard_after_forward is False  # the override wins over the engine config
    r = load_recipe(child, ["parallel.engine=deepspeed", "parallel.config=zero2.json"])
    assert r.parallel.deepspeed["zero_optimization"]["stage"] == 2


def test_bad_recipe_reports_every_problem_with_its_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "output_dir": "x",
        "modle": {},
        "model": {"name_or_path": "org/m"},
        "data": {"train": [{"path": "a.jsonl", "weight": -1}], "seq_len": 0},
        "train": {"max_step": 3, "lr": "fast", "micro_batch_size": 4, "global_batch_size": 6, "schedule": "exp"},
        "parallel": {"engine": "deepspeed", "config": "zero3.json"},
    }))  # fmt: skip
    problems = "\n".join(problems_of(bad, ["parallel.deepspeed.gradient_clipping=5.0"]))
    for needle in [
        "modle: unknown key (did you mean 'model'?)",
        "train.max_step: unknown key (did you mean 'max_steps'?)",
        "train.lr: expected float, got 'fast'",
        "train.schedule: 'exp' is not one of",
        "data.seq_len: must be positive",
        "data.train[0].weight: must be a positive number",
        "train.global_batch_size: 6 is not a multiple of train.micro_batch_size 4",
        "parallel.deepspeed.gradient_clipping: 5.0 contradicts the recipe's value 1.0",
    ]:
        assert needle in problems, f"{needle!r} not in:\n{problems}"


def test_batch_that_does_not_divide_the_world_names_the_keys():
    r = load_recipe(RECIPE_DIR / "llama-1b-zero3.yaml")
    assert r.batch_layout(64).grad_accum == 1
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 512 is not a multiple of .* x world size \(48\)"):
        r.batch_layout(48)


@pytest.mark.parametrize(
    "value, needle",
    [
        ("[3]", r"train.profile_steps: \[first, last\] with 1 <= first <= last, got \[3\]"),
        ("[5,2]", r"train.profile_steps: \[first, last\] with 1 <= first <= last, got \[5, 2\]"),
        ("[0,1]", r"got \[0, 1\]"),
        ("[1,3000]", r"train.profile_steps: step 3000 is after train.max_steps=2000"),
        ("[a,b]", r"train.profile_steps\[0\]: expected int"),
    ],
)
def test_bad_profile_steps_are_named(value, needle):
    problems = "\n".join(problems_of(RECIPE_DIR / "llama-1b-zero3.yaml", [f"train.profile_steps={value}"]))
    assert re.search(needle, problems), problems


@pytest.mark.parametrize(
    "content, needle",
    [
        ("train: {max_steps: [1, 2}", "line 1"),
        ("- just\n- a list\n", "a recipe must be a mapping"),
        ("extends: missing.yaml\n", "extends: no such recipe"),
    ],
)
def test_malformed_files_are_named(tmp_path, content, needle):
    p = tmp_path / "r.yaml"
    p.write_text(content)
    assert any(needle in x and "r.yaml" in x for x in problems_of(p)), problems_of(p)


def test_engine_config_that_contradicts_the_recipe(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"fp16": {"enabled": True}, "zero_optimization": {"stage": 5}, "scheduler": {}}))
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 3,}}')
    recipe = RECIPE_DIR / "llama-1b-zero3.yaml"
    problems = "\n".join(problems_of(recipe, [f"parallel.config={bad}"]))
    assert "parallel.deepspeed.fp16.enabled: true contradicts train.precision='auto'" in problems
    assert "parallel.deepspeed.zero_optimization.stage: must be 0, 1, 2 or 3, got 5" in problems
    assert "parallel.deepspeed.scheduler" in problems
    assert any("broken.json: line 1" in p for p in problems_of(recipe, [f"parallel.config={broken}"]))
    assert any("is a DeepSpeed config but parallel.engine is 'fsdp'" in p
               for p in problems_of(recipe, ["parallel.engine=fsdp"]))  # fmt: skip


def test_interpolations_are_not_evaluated(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: {name_or_path: '${oc.env:HOME}'}\ntrain: {max_steps: 0}\n")
    assert any("model.name_or_path: interpolation" in x for x in problems_of(p))


def test_cli_plan_prints_layout_and_exits_nonzero_on_bad_input(tmp_path):
    import subprocess

    ok = subprocess.run(
        [sys.executable, "-m", "launcher", "plan", str(RECIPE_DIR / "llama-1b-scratch.yaml"), "--nodes", "4",
         "--gpus-per-node", "8"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "4 node(s) x 8 worker(s) = 32 ranks" in ok.stdout
    assert "gradient accumulation: 2" in ok.stdout
    assert "512 sequences = 1,048,576 tokens per step" in ok.stdout
    assert "1.100B parameters" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "launcher", "plan", str(RECIPE_DIR / "llama-1b-zero3.yaml"), "train.seq_len=3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "train.seq_len: unknown key (did you mean 'data.seq_len'?)" in bad.stderr
