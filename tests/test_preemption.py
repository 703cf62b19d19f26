"""Preemption: a signal mid-run leaves a committed checkpoint, exit code 75, and the rerun continues from it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, cpt, read_metrics, tiny_recipe, worker_env, write_recipe

PREEMPTED = 75


def start(recipe: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=REPO, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            pytest.fail(f"run ended early ({proc.returncode}):\n{proc.stdout.read()[-5000:]}")
        if (out / "metrics.jsonl").is_file() and any(m.get("step", 0) >= step and "loss" in m
                                                     for m in read_metrics(out)):  # fmt: skip
            return
        time.sleep(0.2)
    pytest.fail("run did not reach the step in time")


def workers(proc: subprocess.Popen) -> list[psutil.Process]:
    """The training processes under cpt -> torchrun, in rank order (not torchrun, whose command line names the
    module too)."""
    found = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "launcher.train" in " ".join(p.cmdline()) and "RANK" in p.environ():
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return sorted(found, key=lambda p: int(p.environ()["RANK"]))


@pytest.mark.parametrize("engine, config, how", [("deepspeed", "zero3.json", "SIGTERM to cpt"),
                                                 ("fsdp", "fsdp.yaml", "SIGUSR1 to rank 1 only")])  # fmt: skip
def test_signal_checkpoints_and_the_rerun_continues(assets, tmp_path, engine, config, how):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        assets, out, train={"max_steps": 60, "log_every": 1, "schedule": "constant"}, eval={"sets": {}},
        parallel={"engine": engine, "config": config, "nproc_per_node": 2}))  # fmt: skip
    proc = start(recipe)
    wait_for_step(out, 3, proc)
    if how == "SIGTERM to cpt":
        proc.send_signal(signal.SIGTERM)
    else:
        workers(proc)[1].send_signal(signal.SIGUSR1)
    log = proc.communicate(timeout=240)[0]
    assert proc.returncode == PREEMPTED, log[-5000:]
    assert "checkpoint at step" in log and "committed" in log
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    stopped = steps[-1]
    assert 3 <= stopped < 60
    ckpt = out / "checkpoints" / f"step-{stopped}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == stopped
    assert not list((out / "checkpoints").glob("*.tmp"))
    p = cpt("run", str(recipe))
    assert f"resumed from {ckpt}" in p.stderr
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == list(range(1, 61)), "a step was run twice or skipped"
