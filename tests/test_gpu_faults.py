"""Faults on GPUs, under NCCL: a rank killed mid-run ends the whole job within a bounded time, the log names the
dead rank, and the newest checkpoint verifies and resumes; a preemption signal commits a checkpoint, exits with
code 75, and the rerun continues the steps. tests/test_faults.py and tests/test_preemption.py prove the same under
gloo, where a dead peer's closed socket fails the survivor's collective at once. An NCCL collective waiting for a
dead peer does not fail by itself within the default collective timeout (30 minutes): what ends the survivor is
torchrun's SIGTERM and the launcher's preemption watchdog (launcher/preemption.py)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    cpt,
    job_output,
    kill_whole_job,
    read_metrics,
    start_job,
    tiny_recipe,
    write_recipe,
)
from test_faults import family, left_running
from test_preemption import PREEMPTED, workers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: NCCL and CUDA streams on a card"),
]

CUDA = {"DS_ACCELERATOR": "cuda"}
ENGINES = [("deepspeed", "zero3.json"), ("fsdp", "fsdp.yaml")]


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Until metrics.jsonl has a training line at ``step`` or later. Steps take milliseconds here, so the line
    being written may be read half-way: a line that does not parse is not counted yet."""
    end = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < end:
        if proc.poll() is not None:
            pytest.fail(f"the run ended early ({proc.returncode}):\n{log.read_text()[-5000:]}")
        for line in metrics.read_text().splitlines() if metrics.is_file() else []:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "loss" in record and record["step"] >= step:
                return
        time.sleep(0.2)
    pytest.fail(f"the run did not reach step {step} in {timeout:.0f} s:\n{log.read_text()[-5000:]}")


def logged_steps(out: Path) -> list[int]:
    return [m["step"] for m in read_metrics(out) if "loss" in m]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: a rank dying under NCCL between ranks")
@pytest.mark.parametrize("engine, config", ENGINES)
def test_a_rank_killed_under_nccl_ends_the_job_and_the_last_checkpoint_resumes(assets, tmp_path, engine, config):
    from launcher.checkpoint import complete_checkpoints, verify
    from launcher.preemption import MIN_STEP_GRACE_S

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        assets, out, train={"max_steps": 100_000, "log_every": 1, "save_every": 2, "schedule": "constant",
                            "precision": "bf16"},
        eval={"sets": {}}, parallel={"engine": engine, "config": config, "nproc_per_node": 2}))  # fmt: skip
    # torchrun sees the worker die and sends SIGTERM to the other; that rank's current collective never completes
    # under NCCL, so the launcher's watchdog ends it once the step has run MIN_STEP_GRACE_S (4x the longest step,
    # if more: milliseconds here) past the signal. The minute beyond that is for torchrun to notice the death and
    # to reap the workers, and for the CUDA contexts to be torn down.
    bound = MIN_STEP_GRACE_S + 60
    log_file = tmp_path / "job.log"
    proc = start_job(recipe, log_file, **CUDA)
    try:
        wait_for_step(out, 5, proc, log_file)  # checkpoints step-2 and step-4 are committed by now
        processes = family(proc)
        victim = workers(proc)[1]
        killed_at = time.time()
        victim.send_signal(signal.SIGKILL)
        log = job_output(proc, log_file, timeout=bound + 120)
        elapsed = time.time() - killed_at
    finally:
        if proc.poll() is None:
            kill_whole_job(proc)
    assert proc.returncode not in (0, PREEMPTED), log[-5000:]
    assert elapsed < bound, f"the job took {elapsed:.0f} s to end after rank 1 died:\n{log[-5000:]}"
    # torchrun's failure report: rank 1, killed by signal 9
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9\b", log), log[-5000:]
    time.sleep(1)
    assert not left_running(processes), f"left behind: {left_running(processes)}"

    kept = complete_checkpoints(out)
    assert kept, "no checkpoint survived"
    last = kept[-1]
    assert verify(last) is None, f"{last}: {verify(last)}"
    step = json.loads((last / "trainer_state.json").read_text())["step"]
    assert step >= 4 and max(logged_steps(out)) >= step

    p = cpt("run", str(recipe), f"train.max_steps={step + 2}", **CUDA)
    assert f"resumed from {last} at step {step}" in p.stderr
    assert logged_steps(out) == list(range(1, step + 3)), "a step was run twice or skipped"
    assert not list((out / "checkpoints").glob("*.tmp")), "a save cut short by the kill was not cleaned up"


@pytest.mark.parametrize("engine, config", ENGINES)
def test_sigterm_to_cpt_checkpoints_exits_75_and_the_rerun_continues(assets, tmp_path, engine, config):
    """Every rank finishes its step, agrees on the signal over NCCL, commits the checkpoint, and the job exits
    with the requeue code; the same command resumes and runs every step exactly once."""
    from launcher.checkpoint import verify

    gpus = min(2, torch.cuda.device_count())
    out = tmp_path / "run"
    # more steps than the run can reach before the signal: a step of this model takes milliseconds on a GPU
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        assets, out, train={"max_steps": 100_000, "log_every": 1, "schedule": "constant", "precision": "bf16"},
        eval={"sets": {}}, parallel={"engine": engine, "config": config, "nproc_per_node": gpus}))  # fmt: skip
    log_file = tmp_path / "job.log"
    proc = start_job(recipe, log_file, **CUDA)
    try:
        wait_for_step(out, 3, proc, log_file)
        proc.send_signal(signal.SIGTERM)
        log = job_output(proc, log_file, timeout=240)
    finally:
        if proc.poll() is None:
            kill_whole_job(proc)
    assert proc.returncode == PREEMPTED, log[-5000:]
    found = re.search(r"preempted by SIGTERM: checkpoint at step (\d+) committed", log)
    assert found, log[-5000:]
    stopped = int(found.group(1))
    assert logged_steps(out)[-1] == stopped >= 3
    ckpt = out / "checkpoints" / f"step-{stopped}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == stopped
    assert verify(ckpt) is None, verify(ckpt)
    assert not list((out / "checkpoints").glob("*.tmp"))

    p = cpt("run", str(recipe), f"train.max_steps={stopped + 3}", **CUDA)
    assert f"resumed from {ckpt} at step {stopped}" in p.stderr
    assert logged_steps(out) == list(range(1, stopped + 4)), "a step was run twice or skipped"
