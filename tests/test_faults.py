"""Faults: a dead rank ends the whole job quickly and names itself; nothing is left running; checkpoints survive."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
from conftest import REPO, read_metrics, tiny_recipe, worker_env, write_recipe
from test_preemption import wait_for_step, workers


def test_a_rank_killed_mid_step_ends_the_job_within_60_s(assets, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        assets, out, train={"max_steps": 500, "log_every": 1, "save_every": 2}, eval={"sets": {}},
        parallel={"engine": "deepspeed", "config": "zero3.json", "nproc_per_node": 2}))  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=REPO, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    wait_for_step(out, 3, proc)
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    victim = workers(proc)[1]
    killed_at = time.time()
    victim.send_signal(signal.SIGKILL)
    log = proc.communicate(timeout=120)[0]
    elapsed = time.time() - killed_at
    assert proc.returncode not in (0, 75), log[-3000:]
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"
    assert "rank 1" in log or "local_rank: 1" in log, log[-3000:]
    time.sleep(1)
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
    committed = sorted((out / "checkpoints").glob("step-*[0-9]"))
    assert committed, "no checkpoint survived"
    last = committed[-1]
    assert (last / "trainer_state.json").is_file() and (last / "manifest.json").is_file()
    assert max(m["step"] for m in read_metrics(out) if "loss" in m) >= int(last.name.split("-")[1])


def test_a_stopped_rank_stuck_in_a_collective_exits_by_itself(tmp_path):
    """A signal arrives while the step can never finish (its peer is gone): the watchdog ends the process."""
    script = (
        "import os, signal, time, torch\n"
        "import launcher.preemption as p\n"
        "p.MIN_STEP_GRACE_S = 1.0\n"
        "pre = p.Preemption(['SIGTERM'], torch.device('cpu'))\n"
        "pre.note_step(0.1)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(30)\n"  # stands for a collective that never returns
    )
    start = time.time()
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert time.time() - start < 15
    assert "a peer has probably died" in p.stderr
