"""The same worker entry point under every launcher, and bad input stopped before any process group exists."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, cpt, read_metrics, run, tiny_recipe, worker_env, write_recipe

BIN = Path(sys.executable).parent


def small(assets, out: Path, **parallel) -> Path:
    parallel = {"engine": "deepspeed", "config": "zero3.json", "nproc_per_node": 2, **parallel}
    tree = tiny_recipe(assets, out, train={"max_steps": 2, "export_final": False}, eval={"max_blocks": 4},
                       parallel=parallel)  # fmt: skip
    return write_recipe(out.with_suffix(".yaml"), tree)


FSDP = {"engine": "fsdp", "config": "fsdp.yaml"}
"""The engine of the tests below that train: what they check (the launcher each worker finds, the ranks, a
checkpoint of each rank's data position) is the launch, the same whichever engine trains, and FSDP2 starts faster
than DeepSpeed (no shared-memory op, no engine set-up). ZeRO-3 under the deepspeed CLI trains in test_lifeline.py
(the deepspeed launcher killed mid-run), under torchrun in every ``cpt run`` of a ZeRO recipe."""


def assert_trained_on_two_ranks(out: Path, log: str) -> None:
    assert "rank 0/2" in log, log[-3000:]
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == [1, 2]
    assert (out / "checkpoints" / "step-2" / "data-rank1.json").is_file()


def test_torchrun_cli(assets, tmp_path):
    out = tmp_path / "torchrun"
    p = run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "launcher.train",
             str(small(assets, out, **FSDP))])  # fmt: skip
    assert_trained_on_two_ranks(out, p.stderr)
    assert "(torchrun)" in p.stderr


def test_deepspeed_cli_passes_local_rank(assets, tmp_path):
    out = tmp_path / "ds"
    p = run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29517", "--module", "launcher.train",
             str(small(assets, out, **FSDP))])  # fmt: skip
    assert "--local_rank=1" in p.stdout + p.stderr
    assert_trained_on_two_ranks(out, p.stdout + p.stderr)


def test_cpt_run_inside_torchrun_does_not_spawn_again(assets, tmp_path):
    out = tmp_path / "nested"
    p = run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "launcher", "run",
             str(small(assets, out, **FSDP))])  # fmt: skip
    assert_trained_on_two_ranks(out, p.stderr)


def test_bad_recipe_fails_fast_with_the_key_named(assets, tmp_path):
    recipe = small(assets, tmp_path / "bad")
    start = time.time()
    p = subprocess.run([sys.executable, "-m", "launcher", "run", str(recipe), "train.micro_batch_size=0",
                        "data.train=[{path: /nonexistent/*.jsonl}]", "train.global_batch_size=3"],
                       cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2
    assert "train.micro_batch_size: must be positive, got 0" in p.stderr
    assert "/nonexistent/*.jsonl" in p.stderr
    assert "process group" not in p.stderr and "rank 0/" not in p.stderr
    assert not (tmp_path / "bad").exists(), "nothing is written for a recipe that does not validate"
    assert time.time() - start < 60


def test_batch_that_does_not_divide_the_world_is_refused_before_launch(assets, tmp_path):
    recipe = small(assets, tmp_path / "div")
    p = subprocess.run([sys.executable, "-m", "launcher", "run", str(recipe), "train.global_batch_size=6"],
                       cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2
    assert "train.global_batch_size: 6 is not a multiple of train.micro_batch_size (2) x world size (2)" in p.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="checks the CPU worker count")
def test_cpt_plan_without_gpus(assets, tmp_path):
    p = cpt("plan", str(small(assets, tmp_path / "plan")))
    assert "1 node(s) x 2 worker(s) = 2 ranks" in p.stdout
    assert "output_dir:" in p.stdout and not (tmp_path / "plan").exists()
