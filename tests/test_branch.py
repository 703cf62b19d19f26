"""Branching a new run from another run's checkpoint (``model.init_from``, ``model.init_optimizer``,
``model.init_data``), in real ``cpt run`` launches.

The use case is a WSD schedule: run A holds the learning rate after its warmup and decays it over its last K steps;
run B starts from A's checkpoint at step N (weights, Adam state, data position) with a schedule of K steps that is
all decay. B must then train exactly as A did from step N on: the same learning rates, the same losses, the same
final weights. On CPU in fp32 on the same world size the two come out bit for bit equal under FSDP2 and ZeRO-3
(same weights, same Adam state, same batches, same reductions); the tolerance of 1e-6 only leaves room for another
platform's kernels. A branch that took a fresh Adam state instead moves the losses from the second step on by
about 1e-3, one that read the data from the start moves the first loss, one that took A's schedule moves the
learning rates, each far outside it.

One chain per engine, each run shared by several tests: A on 2 ranks (checkpoints at N and N + K, evaluated at
both), B branched from A's step N on 2 ranks. DeepSpeed also branches on 1 rank (through its universal checkpoint)
with other optimizer settings; FSDP2's B is run a second time (it resumes itself), and A's ``final/`` seeds an
evaluation-only run. The refusals run before any worker starts: one through ``cpt run`` (exit code, nothing
written), the others through the same pre-flight check in this process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO, cpt, read_metrics, tiny_recipe, worker_env, write_recipe
from conftest import run as run_command

N, K = 3, 3
"""A trains N + K steps and decays over the last K; B branches at step N and trains the K steps of the decay."""
GLOBAL_BATCH = 8  # 2 ranks x micro-batch 2 x accumulation 2; 1 rank x 2 x 4
TOLERANCE = 1e-6


@dataclass
class Run:
    out: Path
    recipe: Path
    log: str = ""

    def steps(self) -> dict[int, dict]:
        return {m["step"]: m for m in read_metrics(self.out) if "loss" in m}

    def evals(self) -> dict[int, dict]:
        return {m["step"]: m["eval"] for m in read_metrics(self.out) if "eval" in m}

    def checkpoint(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step-{step}"


def _tree(assets, out: Path, engine: str, config: str, ranks: int, **sections) -> dict:
    tree = tiny_recipe(
        assets, out,
        train={"max_steps": N + K, "global_batch_size": GLOBAL_BATCH, "schedule": "wsd", "decay_steps": K,
               "warmup_steps": 1, "precision": "fp32", "save_every": N, "keep_last": 5},
        eval={"max_blocks": 4, "every": N},
        parallel={"engine": engine, "config": config, "nproc_per_node": ranks},
    )  # fmt: skip
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values}
    return tree


def _launch(run: Run, ranks: int = 2, *overrides: str) -> Run:
    """``cpt run`` on 2 ranks; one rank runs the worker entry point itself, a world of one (no second process)."""
    if ranks == 1:
        p = run_command([sys.executable, "-m", "launcher.train", str(run.recipe), *overrides])
    else:
        p = cpt("run", str(run.recipe), *overrides)
    run.log = p.stdout + p.stderr
    return run


def _recipe(root: Path, name: str, tree: dict) -> Run:
    return Run(Path(tree["output_dir"]), write_recipe(root / f"{name}.yaml", tree))


def _branch_tree(assets, a: Run, root: Path, engine: str, config: str, ranks: int = 2, **train) -> dict:
    """B: from A's step N, its optimizer state and data position, a K-step schedule that is all decay."""
    return _tree(
        assets, root / f"b{ranks}", engine, config, ranks,
        model={"init_from": str(a.checkpoint(N)), "init_optimizer": True, "init_data": True},
        train={"max_steps": K, "decay_steps": K, "warmup_steps": 0, "save_every": 0, **train},
        eval={"every": 0},
    )  # fmt: skip


def _chain(assets, root: Path, engine: str, config: str) -> dict[str, Run]:
    a = _launch(_recipe(root, "a", _tree(assets, root / "a", engine, config, 2)))
    b = _launch(_recipe(root, "b", _branch_tree(assets, a, root, engine, config)))
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def fsdp_runs(assets, tmp_path_factory) -> dict[str, Run]:
    return _chain(assets, tmp_path_factory.mktemp("fsdp"), "fsdp", "fsdp.yaml")


@pytest.fixture(scope="module")
def deepspeed_runs(assets, tmp_path_factory) -> dict[str, Run]:
    return _chain(assets, tmp_path_factory.mktemp("deepspeed"), "deepspeed", "zero3.json")


@pytest.fixture(params=["fsdp", "deepspeed"])
def runs(request) -> dict[str, Run]:
    return request.getfixturevalue(f"{request.param}_runs")


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        found.update(load_file(f))
    return found


def test_a_wsd_branch_trains_step_for_step_as_the_run_it_came_from(runs):
    a, b = runs["a"].steps(), runs["b"].steps()
    assert sorted(a) == list(range(1, N + K + 1)) and sorted(b) == list(range(1, K + 1))
    for step in range(1, K + 1):
        assert b[step]["lr"] == pytest.approx(a[N + step]["lr"], rel=1e-12), f"learning rate at step {step}"
        assert b[step]["loss"] == pytest.approx(a[N + step]["loss"], rel=TOLERANCE), f"loss at step {step}"
    # the losses move by far more than the tolerance over these steps
    assert abs(a[N + K]["loss"] / a[N + 1]["loss"] - 1) > 1000 * TOLERANCE
    # a new run: its step count and tokens start at 0
    per_step = a[1]["tokens_seen"]
    assert [b[s]["tokens_seen"] for s in sorted(b)] == [per_step * s for s in range(1, K + 1)]
    mine, theirs = _weights(runs["b"].out / "final"), _weights(runs["a"].out / "final")
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        torch.testing.assert_close(value, theirs[key], rtol=TOLERANCE, atol=TOLERANCE, msg=key)
    log = runs["b"].log
    assert f"initialised from {runs['a'].checkpoint(N)}: weights, optimizer state, data position" in log, log[-3000:]
    assert "reads its shards of" not in log and "reads its partition of" not in log, "the base weights were read"


@pytest.fixture(scope="module")
def deepspeed_one_rank(deepspeed_runs, assets, tmp_path_factory) -> Run:
    """B on 1 rank (A had 2), with this recipe's own warmup, decay, betas, eps and weight decay."""
    root = tmp_path_factory.mktemp("deepspeed-one")
    tree = _branch_tree(
        assets, deepspeed_runs["a"], root, "deepspeed", "zero3.json", ranks=1,
        warmup_steps=1, decay_steps=K - 1, betas=[0.9, 0.96], eps=1e-7, weight_decay=0.05,
    )  # fmt: skip
    tree["eval"]["at_start"] = True
    return _launch(_recipe(root, "b1", tree), ranks=1)


def test_a_branch_on_another_world_size_continues(deepspeed_one_rank, deepspeed_runs):
    """ZeRO-3 from 2 ranks to 1: weights, Adam state and data position re-partitioned through the universal
    checkpoint; the optimizer's settings are this recipe's, the Adam step count continues."""
    from launcher.engine.deepspeed_checkpoint import weights_only_loading

    one, a = deepspeed_one_rank, deepspeed_runs["a"]
    log = one.log
    assert "was saved by 2 ranks, this run has 1" in log and "re-divided from 2 old readers" in log, log[-3000:]
    # the weights: the evaluation before the first step is A's at step N (up to the order of the sums)
    start, reference = one.evals()[0], a.evals()[N]
    for name, result in reference.items():
        assert start[name]["loss"] == pytest.approx(result["loss"], rel=1e-5), name
    # the losses go on from where A stood, not from where A started (another batch division: not equal)
    got, want = one.steps(), a.steps()
    assert abs(got[1]["loss"] / want[N + 1]["loss"] - 1) < 0.005
    assert abs(want[1]["loss"] / want[N + 1]["loss"] - 1) > 0.005
    # the first step's learning rate is this recipe's warmup (half of train.lr), not the lr A's optimizer held
    assert want[N + 1]["lr"] == pytest.approx(1e-3)
    assert got[1]["lr"] == pytest.approx(0.5e-3, rel=1e-12)
    with weights_only_loading():
        saved = torch.load(one.checkpoint(K) / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=True)
    optimizer = saved["optimizer_state_dict"]["optimizer_state_dict"]
    # Adam's step count went on from A's N, once per step in every group
    assert [int(s["step"]) for s in optimizer["state"].values()] == [N + K, N + K]
    groups = optimizer["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0], "each group keeps its own weight decay"
    assert {(tuple(g["betas"]), g["eps"], g["initial_lr"]) for g in groups} == {((0.9, 0.96), 1e-7, 1e-3)}


@pytest.fixture(scope="module")
def from_final(fsdp_runs, assets, tmp_path_factory) -> Run:
    """An evaluation-only run of A's exported model, on 1 rank."""
    root = tmp_path_factory.mktemp("final")
    tree = _tree(assets, root / "c", "fsdp", "fsdp.yaml", 1, model={"init_from": str(fsdp_runs["a"].out / "final")},
                 train={"max_steps": 0})  # fmt: skip
    return _launch(_recipe(root, "c", tree), ranks=1)


def test_init_from_a_hugging_face_model_starts_from_its_weights(from_final, fsdp_runs):
    final = fsdp_runs["a"].out / "final"
    assert f"every rank reads its shards of {final}" in from_final.log
    assert f"initialised from {final}: weights" in from_final.log
    got = json.loads((from_final.out / "eval_results.json").read_text())
    want = json.loads((fsdp_runs["a"].out / "eval_results.json").read_text())
    assert got.keys() == want.keys()
    for name in want:
        assert got[name]["perplexity"] == pytest.approx(want[name]["perplexity"], rel=1e-5), name


def test_a_restarted_branch_resumes_itself(fsdp_runs, tmp_path):
    """B has finished: run again (here on 1 rank), it resumes its own checkpoint (nothing left to do), not A's step
    N, and needs nothing from there: here the checkpoint it came from is gone (pruned, say)."""
    b = fsdp_runs["b"]
    before = read_metrics(b.out)
    gone = tmp_path / "pruned" / f"step-{N}"
    log = _launch(Run(b.out, b.recipe), 1, f"model.init_from={gone}").log
    assert f"resuming this run's own checkpoint {b.checkpoint(K)}; model.init_from ({gone}) is not used" in log, log
    assert "initialised from" not in log
    assert "already reached train.max_steps" in log
    assert read_metrics(b.out) == before


# --------------------------------------------------------------------------------------- refused before any worker


def test_a_missing_init_from_is_refused_before_any_worker_starts(assets, tmp_path):
    out = tmp_path / "out"
    tree = _tree(assets, out, "fsdp", "fsdp.yaml", 2, model={"init_from": str(tmp_path / "nowhere")})
    cmd = [sys.executable, "-m", "launcher", "run", str(write_recipe(tmp_path / "r.yaml", tree))]
    p = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"model.init_from: no such directory {tmp_path / 'nowhere'}" in p.stderr
    assert not out.exists(), "something was written to output_dir"


@pytest.fixture(scope="module")
def other_model(assets, tmp_path_factory) -> dict[str, Path]:
    """A model of another hidden size: its config (with the tokenizer) and a saved Hugging Face model of it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.quickstart_assets import build_base_config

    root = tmp_path_factory.mktemp("other-model")
    config = build_base_config(root / "config", assets["tokenizer"], hidden_size=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, intermediate_size=64, max_position_embeddings=256)  # fmt: skip
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config)).save_pretrained(root / "model")
    return {"config": config, "model": root / "model"}


def _problems(assets, tmp_path: Path, engine: str = "fsdp", out: Path | None = None, **model) -> list[str]:
    """The pre-flight check's problems with a recipe whose model section has ``model`` (what ``cpt run`` and every
    worker run before anything else); none of them may write to output_dir."""
    from launcher.config import ConfigError
    from launcher.preflight import load_recipe

    out = out or tmp_path / "out"
    config = "fsdp.yaml" if engine == "fsdp" else "zero3.json"
    tree = _tree(assets, out, engine, config, 2)
    tree["model"] = {k: v for k, v in {**tree["model"], **model}.items() if v is not None}
    existed = out.exists()
    try:
        load_recipe(write_recipe(tmp_path / "r.yaml", tree), world_size=2, check_files=True, ask_hub=False)
    except ConfigError as e:
        return e.problems
    finally:
        assert existed or not out.exists(), "something was written to output_dir"
    return []


def _one(problems: list[str], key: str, *words: str) -> str:
    found = [p for p in problems if p.startswith(f"{key}: ")]
    assert len(found) == 1, problems
    for word in words:
        assert word in found[0], found[0]
    return found[0]


def test_a_checkpoint_of_another_architecture_is_refused(fsdp_runs, other_model, assets, tmp_path):
    ckpt = fsdp_runs["a"].checkpoint(N)
    problems = _problems(assets, tmp_path, name_or_path=None, from_config=str(other_model["config"]),
                         init_from=str(ckpt))  # fmt: skip
    _one(problems, "model.init_from", str(ckpt), "another architecture", "[512, 64] there, [512, 32] here")


def test_a_hugging_face_model_of_another_architecture_is_refused(other_model, assets, tmp_path):
    problems = _problems(assets, tmp_path, init_from=str(other_model["model"]))
    _one(problems, "model.init_from", str(other_model["model"]), "the config gives")


def test_a_checkpoint_of_the_other_engine_is_refused(fsdp_runs, assets, tmp_path):
    ckpt = fsdp_runs["a"].checkpoint(N)
    problems = _problems(assets, tmp_path, engine="deepspeed", init_from=str(ckpt), init_optimizer=True)
    _one(problems, "model.init_from", "written by the fsdp engine", f"cpt export {ckpt} DIR", "model.init_from=DIR")


def test_init_optimizer_and_init_data_need_a_checkpoint(fsdp_runs, assets, tmp_path):
    for key in ("init_optimizer", "init_data"):
        _one(_problems(assets, tmp_path, **{key: True}), f"model.{key}", "model.init_from")
        final = fsdp_runs["a"].out / "final"
        _one(_problems(assets, tmp_path, init_from=str(final), **{key: True}), f"model.{key}", "Hugging Face model")


def test_what_is_neither_a_checkpoint_nor_a_model_is_refused(fsdp_runs, assets, tmp_path):
    a = fsdp_runs["a"]
    problems = _problems(assets, tmp_path, init_from=str(a.out))
    _one(problems, "model.init_from", "a run's output_dir", f"the newest is {a.checkpoint(N + K)}")
    # a checkpoint with a truncated file
    broken = tmp_path / "broken" / "step-3"
    shutil.copytree(a.checkpoint(N), broken)
    shard = next(broken.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    _one(_problems(assets, tmp_path, init_from=str(broken)), "model.init_from", "not a complete checkpoint",
         shard.name)  # fmt: skip


def test_init_optimizer_needs_the_same_parameter_groups(fsdp_runs, assets, tmp_path):
    from launcher.config import ConfigError
    from launcher.preflight import load_recipe

    tree = _tree(assets, tmp_path / "out", "fsdp", "fsdp.yaml", 2, train={"weight_decay_exclude": ["bias"]},
                 model={"init_from": str(fsdp_runs["a"].checkpoint(N)), "init_optimizer": True})  # fmt: skip
    with pytest.raises(ConfigError) as e:
        load_recipe(write_recipe(tmp_path / "r.yaml", tree), world_size=2, check_files=True, ask_hub=False)
    _one(e.value.problems, "model.init_optimizer", "other parameter groups", "train.weight_decay_exclude")


def test_a_run_with_a_checkpoint_of_its_own_does_not_need_init_from(fsdp_runs, assets, tmp_path):
    """What a restarted branch came from may be gone by then (pruned, moved): it resumes itself regardless."""
    assert _problems(assets, tmp_path, out=fsdp_runs["b"].out, init_from=str(tmp_path / "gone")) == []
