"""Pretrained weights in, rank by rank: each rank of FSDP2 and ZeRO-3 reads only its share of a sharded safetensors
checkpoint and a zero-step run exports exactly what it read; a random start is the same on any world size and
engine; a broken checkpoint is refused before any worker starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, cpt, tiny_recipe, worker_env, write_recipe
from conftest import run as run_command
from safetensors import safe_open
from safetensors.torch import save_file

ENGINES = [("deepspeed", "zero3.json"), ("fsdp", "fsdp.yaml")]


def tensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return out


@pytest.fixture(scope="module")
def bf16_checkpoint(assets, tmp_path_factory) -> Path:
    """The tiny base model as bf16 safetensors in several shards, with an index, as the hub ships large models."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bf16") / "model"
    model = AutoModelForCausalLM.from_pretrained(assets["base"], dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="40KB")
    for f in assets["base"].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    assert len(list(out.glob("*.safetensors"))) > 2, "the checkpoint must have several shards"
    return out


def still_recipe(assets, tmp_path: Path, name: str, engine: str, config: str, model: dict, nproc: int = 2):
    """One step at a learning rate far below what moves an fp32 weight: the run loads, builds, trains and exports,
    and its final/ holds the weights it started from."""
    out = tmp_path / name
    train = {"max_steps": 1, "lr": 1e-30, "warmup_steps": 0, "weight_decay": 0.0}
    tree = tiny_recipe(assets, out, model=model, train=train, eval={"sets": {}},
                       parallel={"engine": engine, "config": config, "nproc_per_node": nproc})  # fmt: skip
    return write_recipe(tmp_path / f"{name}.yaml", tree), out


@pytest.mark.parametrize("engine, config", ENGINES)
def test_a_run_exports_exactly_the_weights_it_read(assets, tmp_path, bf16_checkpoint, engine, config):
    recipe, out = still_recipe(assets, tmp_path, "run", engine, config, {"name_or_path": str(bf16_checkpoint)})
    log = cpt("run", str(recipe)).stderr
    assert "reads its" in log  # each rank reads its own shards or partition, not the whole model
    source = tensors_of(bf16_checkpoint)
    exported = tensors_of(out / "final")
    assert set(exported) == set(source)
    for name, value in source.items():
        # bf16 -> fp32 (the CPU training dtype) is exact, so the export holds the checkpoint's values bit for bit.
        assert_unmoved(exported[name], value.to(exported[name].dtype), name)


def assert_unmoved(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """``got`` is ``want`` after one step at a learning rate of 1e-30: equal, except that weights that are exactly
    0 (the padding row of the embedding) move by about the learning rate."""
    zero = want.abs() < 1e-20
    assert torch.equal(got[~zero], want[~zero]), name
    if zero.any():
        assert got[zero].abs().max().item() < 1e-28, name


def launch(recipe: Path, nproc: int, *overrides: str) -> None:
    """``cpt run`` on ``nproc`` ranks; a world of one is the worker entry point run by itself (as in test_branch.py),
    which spares the cpt and torchrun processes around it: what these runs check is the start the engine makes,
    not the launch."""
    if nproc == 1:
        run_command([sys.executable, "-m", "launcher.train", str(recipe), *overrides])
    else:
        cpt("run", str(recipe), *overrides)


def test_a_random_start_is_the_same_on_any_world_size_and_engine(assets, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = {"name_or_path": None, "from_config": str(assets["config"]), "tokenizer": str(assets["base"])}
    runs = {}
    for name, engine, config, nproc in [("fsdp1", "fsdp", "fsdp.yaml", 1), ("fsdp2", "fsdp", "fsdp.yaml", 2),
                                        ("zero3", "deepspeed", "zero3.json", 2),
                                        ("zero2", "deepspeed", "zero2.json", 1)]:  # fmt: skip
        recipe, out = still_recipe(assets, tmp_path, name, engine, config, model, nproc)
        launch(recipe, nproc)
        runs[name] = tensors_of(out / "final")
    first = runs["fsdp1"]
    for name, tensors in runs.items():
        assert set(tensors) == set(first), name
        for key, value in first.items():
            assert_unmoved(tensors[key], value, f"{name}: {key} (against the 1-rank FSDP2 start)")
    # The values follow the architecture's own rule: transformers' from_config draws other numbers from the same
    # distributions (normal with the config's initializer_range for matrices, ones for norms).
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(assets["config"])).state_dict()
    for key, value in first.items():
        ref = reference[key].float()
        if ref.numel() > 1000:
            assert not torch.equal(value, ref), key
            assert abs(value.std().item() / ref.std().item() - 1) < 0.1, key
            assert abs(value.mean().item() - ref.mean().item()) < 0.01, key
        elif "norm" in key:
            assert torch.equal(value, ref), key
    # Another seed, other weights.
    recipe, out = still_recipe(assets, tmp_path, "seed", "fsdp", "fsdp.yaml", model, 1)
    launch(recipe, 1, "train.seed=4")
    other = tensors_of(out / "final")
    assert not torch.equal(other["model.embed_tokens.weight"], first["model.embed_tokens.weight"])


def broken(bf16_checkpoint: Path, tmp_path: Path, how: str) -> Path:
    bad = tmp_path / how
    bad.mkdir()
    for f in bf16_checkpoint.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    if how == "no-safetensors":
        for f in bad.glob("*.safetensors*"):
            f.unlink()
    elif how == "missing-shard":
        (bad / sorted(set(index["weight_map"].values()))[1]).unlink()
    elif how == "wrong-shape":
        name = "model.layers.0.mlp.up_proj.weight"
        file = bad / index["weight_map"][name]
        tensors = {k: v for k, v in tensors_of_file(file).items()}
        tensors[name] = torch.zeros(tensors[name].shape[0] + 8, tensors[name].shape[1], dtype=torch.bfloat16)
        save_file(tensors, str(file), metadata={"format": "pt"})
    return bad


def tensors_of_file(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118


@pytest.mark.parametrize(
    "how, expected",
    [
        ("no-safetensors", "no safetensors weights"),
        ("missing-shard", "shard(s) that are not in"),
        ("wrong-shape", "model.layers.0.mlp.up_proj.weight: [136, 64]"),
    ],
)
@pytest.mark.parametrize("engine, config", ENGINES)
def test_a_broken_checkpoint_is_refused_before_any_worker_starts(
    assets, tmp_path, bf16_checkpoint, how, expected, engine, config
):
    bad = broken(bf16_checkpoint, tmp_path, how)
    recipe, out = still_recipe(assets, tmp_path, "run", engine, config, {"name_or_path": str(bad)})
    p = subprocess.run([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=REPO, env=worker_env(),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode != 0
    assert expected in p.stderr and "model.name_or_path" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert "rank0" not in p.stderr, "refused by the workers, not before them"
    assert not (out / "checkpoints").exists() and not (out / "final").exists()


def host_peak_gib(output: str) -> float:
    line = next(x for x in output.splitlines() if x.strip().startswith("peak per rank:"))
    return float(line.split(":")[1].split()[0])


@pytest.mark.parametrize(
    "engine, config, run",
    [("fsdp", "fsdp.yaml", "new-fsdp"), ("deepspeed", "zero3.json", "new-deepspeed")],
)
def test_cpt_plan_host_memory_matches_the_measured_8b_load(engine, config, run):
    """cpt plan's host memory per rank for the Llama-3 8B shape on one GPU, against the peak measured on an H200
    (benchmarks/load_gpu.py: the peak of the pretrained load minus the same shape's random start, which reads
    nothing)."""
    measured = json.loads((REPO / "benchmarks/results/2026-12-01-load-1gpu-NVIDIA-H200.json").read_text())["runs"]
    grown = measured[run]["peak_rss_gb_by_rank"]["0"] - measured[f"random-{engine}"]["peak_rss_gb_by_rank"]["0"]
    if engine == "deepspeed":
        # DeepSpeed's start-up copy of the partition is there with or without a load: the random start has it too
        grown = measured[run]["peak_rss_gb_by_rank"]["0"] - measured["random-fsdp"]["peak_rss_gb_by_rank"]["0"]
    # The load was measured without a training step, so without the host copy that background saves (FSDP2's
    # default on GPUs) keep from the first step on: the plan of a run that saves synchronously.
    p = cpt("plan", str(REPO / "recipes/llama-3.1-8b-fsdp.yaml"), f"parallel.engine={engine}",
            f"parallel.config={config}", "train.async_save=false", "--gpus-per-node", "1",
            "--gpu-memory-gib", "139")  # fmt: skip
    planned = host_peak_gib(p.stdout) * 2**30 / 1e9
    assert abs(planned - grown) / grown < 0.15, (planned, grown, p.stdout[-1500:])
    assert "load reads per node" in p.stdout


def test_cpt_plan_says_zero2_loads_the_whole_model_on_every_rank():
    p = cpt("plan", str(REPO / "recipes/llama-3.1-8b-fsdp.yaml"), "parallel.engine=deepspeed",
            "parallel.config=zero2.json", "--gpus-per-node", "8", "--gpu-memory-gib", "139")  # fmt: skip
    assert "keep a whole model on every rank by design" in p.stdout
    # every rank loads the whole bf16 checkpoint (16.06 GB measured on disk), whatever the number of ranks
    size = json.loads((REPO / "benchmarks/results/2026-12-01-load-1gpu-NVIDIA-H200.json").read_text())["checkpoint_gb"]
    assert abs(host_peak_gib(p.stdout) * 2**30 / 1e9 - size) / size < 0.02


@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_the_exported_model_is_the_model_that_was_trained(assets, tmp_path, config):
    """A random start trained a few steps: its final/ evaluates, in a new run, to exactly the perplexity the run
    measured at its end (a tied output projection trained as a separate matrix would not survive the export)."""
    out = tmp_path / "trained"
    model = {"name_or_path": None, "from_config": str(assets["config"]), "tokenizer": str(assets["base"])}
    parallel = {"engine": "deepspeed", "config": config, "nproc_per_node": 2}
    tree = tiny_recipe(assets, out, model=model, train={"max_steps": 3, "lr": 3e-3}, parallel=parallel)
    cpt("run", str(write_recipe(tmp_path / "trained.yaml", tree)))
    again = tmp_path / "again"
    tree = tiny_recipe(assets, again, model={"name_or_path": str(out / "final")}, train={"max_steps": 0},
                       parallel=parallel)  # fmt: skip
    cpt("run", str(write_recipe(tmp_path / "again.yaml", tree)))
    trained = json.loads((out / "eval_results.json").read_text())
    reloaded = json.loads((again / "eval_results.json").read_text())
    assert reloaded.keys() == trained.keys() == {"code", "prose"}
    for name in trained:
        assert reloaded[name]["loss"] == pytest.approx(trained[name]["loss"], abs=1e-6), name
