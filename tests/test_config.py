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
    # DeepSpeed's 5e8 elements, but never more than a rank's share of the 1.1B model (16 ranks: 68.8M): the bucket
    # is allocated whole on every rank
    assert ds["zero_optimization"]["reduce_bucket_size"] == -(-counts.total // 16) < 500_000_000
    two = fill_auto(r, r.batch_layout(2), *model, dtype=torch.bfloat16, cuda=True)
    assert two["zero_optimization"]["reduce_bucket_size"] == 500_000_000
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
        "train": {"max_step": 3, "lr": "fast", "micro_batch_size": 4, "global_batch_size": 6, "schedule": "exp",
                  "gc_every": -1},
        "parallel": {"engine": "deepspeed", "config": "zero3.json"},
    }))  # fmt: skip
    problems = "\n".join(problems_of(bad, ["parallel.deepspeed.gradient_clipping=5.0"]))
    for needle in [
        "modle: unknown key (did you mean 'model'?)",
        "train.max_step: unknown key (did you mean 'max_steps'?)",
        "train.lr: expected float, got 'fast'",
        "train.schedule: 'exp' is not one of",
        "train.gc_every: steps between garbage collections, 0 or more, got -1",
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


# ------------------------------------------------------------------------------- numbers as a file and a shell mean


def _float_paths(tp=Recipe, prefix: tuple = ()) -> list[tuple]:
    """Every float (or list of floats) in the schema, as a path of keys and list indices; one entry stands for
    the items of a list of sections or a mapping of them."""
    import dataclasses
    import types
    import typing

    paths = []
    for f in dataclasses.fields(tp):
        hint = typing.get_type_hints(tp)[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and (len(args) == 1 or float in args):
            hint = args[0]  # float | {int: float}: a number, or a schedule of numbers
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        here = (*prefix, f.name)
        if hint is float or (origin is list and args[0] is float):
            paths.append(here)
        elif dataclasses.is_dataclass(hint):
            paths += _float_paths(hint, here)
        elif origin is list and dataclasses.is_dataclass(args[0]):
            paths += _float_paths(args[0], (*here, 0))
        elif origin is dict and dataclasses.is_dataclass(args[1]):
            paths += _float_paths(args[1], (*here, "x"))
    return paths


def _get(obj, path: tuple):
    for k in path:
        obj = obj[k] if isinstance(k, int) or isinstance(obj, dict) else getattr(obj, k)
    return obj


def test_every_float_field_reads_scientific_notation_in_a_recipe_file(tmp_path):
    paths = _float_paths()
    assert {("train", "lr"), ("train", "eps"), ("train", "betas"), ("data", "train", 0, "weight")} <= set(paths)
    # (a WSD schedule, whose decay_fraction is a float field too)
    tree = {"model": {"name_or_path": "org/m"}, "data": {"train": [{"path": "org/d"}]},
            "eval": {"sets": {"x": {"path": "org/e"}}}, "train": {"schedule": "wsd"}}  # fmt: skip
    for path in paths:
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {}) if not isinstance(k, int) else node[k]
        node[path[-1]] = ["SCI", "SCI"] if path[-1] == "betas" else "SCI"
    text = yaml.safe_dump(tree).replace("SCI", "1e-4")
    assert "lr: 1e-4" in text and "SCI" not in text
    saved = tmp_path / "r.yaml"
    saved.write_text(text)
    r = load_recipe(saved)
    for path in paths:
        assert _get(r, path) == ([0.0001, 0.0001] if path[-1] == "betas" else 0.0001), path
    # The other spellings of YAML 1.2 and of the override grammar.
    saved.write_text("model: {name_or_path: org/m}\ntrain: {weight_decay: -1.5e-2}\n")
    with pytest.raises(ConfigError, match=r"train.weight_decay: must be >= 0, got -0.015"):
        load_recipe(saved)
    saved.write_text("model: {name_or_path: org/m}\ntrain: {max_steps: 0, lr: 5E+3, eps: .5e-3, min_lr_ratio: 25e-2}\n")
    t = load_recipe(saved).train
    assert (t.lr, t.eps, t.min_lr_ratio) == (5000.0, 0.0005, 0.25)
    assert load_recipe(saved, ["train.lr=1e-4"]).train.lr == 0.0001


@pytest.mark.parametrize(("text", "value"), [("1e3", 1000), ("1.5E+1", 15), ("2.5", None), ("1e-3", None)])
def test_an_int_field_reads_a_number_alike_from_a_file_and_an_override(tmp_path, text, value):
    """A whole number written as a float (``1e3``) is taken, in a file and on the command line alike; a fraction
    is refused alike, naming the key."""
    results = []
    for how in ("file", "override"):
        saved = tmp_path / f"{how}.yaml"
        steps = f"train: {{max_steps: {text}}}\n" if how == "file" else ""
        saved.write_text("model: {name_or_path: org/m}\ndata: {train: [{path: org/d}]}\n" + steps)
        overrides = [f"train.max_steps={text}"] if how == "override" else []
        try:
            results.append(load_recipe(saved, overrides).train.max_steps)
        except ConfigError as e:
            results.append([p for p in e.problems if p.startswith("train.max_steps")])
    assert results[0] == results[1]
    if value is not None:
        assert results[0] == value
    else:
        assert results[0] == [f"train.max_steps: expected int, got {float(text)}"]


def test_a_string_field_keeps_a_number_as_written(tmp_path):
    saved = tmp_path / "r.yaml"
    saved.write_text("output_dir: 1e-4\nmodel: {name_or_path: org/m}\ntrain: {max_steps: 0}\n"
                     "logging: {run_name: 007, tags: [1e-4, 1.50]}\n")  # fmt: skip
    r = load_recipe(saved)
    assert (r.output_dir, r.logging.run_name, r.logging.tags) == ("1e-4", "007", ["1e-4", "1.50"])
    r = load_recipe(saved, ["output_dir=5E+3", "logging.run_name=0.10", "eval.sets.x.path=1e3"])
    assert (r.output_dir, r.logging.run_name, r.eval.sets["x"].path) == ("5E+3", "0.10", "1e3")
    assert load_recipe(saved, ["model.tokenizer=null"]).model.tokenizer is None
    # And the saved recipe reads back the same.
    saved.write_text(to_yaml(r))
    assert load_recipe(saved) == r


# ------------------------------------------------------------------------------------ the printed recipe


def test_the_resolved_recipe_shows_what_applies(tmp_path):
    ds = yaml.safe_load(to_yaml(load_recipe(RECIPE_DIR / "llama-1b-zero3.yaml")))
    assert "fsdp" not in ds["parallel"] and ds["parallel"]["deepspeed"]["zero_optimization"]["stage"] == 3
    fsdp = yaml.safe_load(to_yaml(load_recipe(RECIPE_DIR / "llama-1b-fsdp.yaml")))
    assert "deepspeed" not in fsdp["parallel"] and fsdp["parallel"]["fsdp"]["reshard_after_forward"] is True
    assert fsdp["data"]["train"][0]["split"] == "train" and fsdp["data"]["train"][0]["name"] == "sample-10BT"

    saved = tmp_path / "r.yaml"
    saved.write_text(yaml.safe_dump({
        "model": {"name_or_path": "org/m"},
        "data": {"train": [{"path": str(tmp_path / "a.jsonl")}, {"path": "s3://b/x/*.jsonl", "split": "extra"},
                           {"path": "org/hub-data"}]},
        "eval": {"sets": {"local": {"path": str(tmp_path / "e.jsonl")}, "hub": {"path": "org/e", "split": "test"}}},
    }))  # fmt: skip
    r = load_recipe(saved)
    tree = yaml.safe_load(to_yaml(r))
    local, url, hub = tree["data"]["train"]
    assert "split" not in local and "name" not in local and local["weight"] == 1.0
    assert url["split"] == "extra" and "name" not in url  # set, so written: the saved file gives the same recipe
    assert hub["split"] == "train" and "name" in hub
    assert tree["eval"]["sets"]["local"] == {"path": str(tmp_path / "e.jsonl"), "text_field": "text"}
    assert tree["eval"]["sets"]["hub"] == {"path": "org/e", "name": None, "split": "test", "text_field": "text"}
    saved.write_text(to_yaml(r))
    assert load_recipe(saved) == r
    # Settings of the engine not in use that someone did set are written too.
    odd = load_recipe(RECIPE_DIR / "llama-1b-zero3.yaml", ["parallel.fsdp.prefetch_layers=2"])
    assert yaml.safe_load(to_yaml(odd))["parallel"]["fsdp"]["prefetch_layers"] == 2
