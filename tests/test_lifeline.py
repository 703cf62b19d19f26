"""Workers die with their launcher, and one output_dir has one live job: real launchers (cpt run, torchrun, the
deepspeed CLI), killed with SIGKILL mid-training, and two jobs started on one output_dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, cpt, read_metrics, tiny_recipe, worker_env, write_recipe
from test_faults import committed_steps, logged_steps
from test_preemption import wait_for_step

from launcher.checkpoint import verify

BIN = Path(sys.executable).parent
ENGINES = [("deepspeed", "zero3.json"), ("fsdp", "fsdp.yaml")]


def long_recipe(assets, tmp_path: Path, engine: str, config: str, max_steps: int = 100_000) -> tuple[Path, Path]:
    out = tmp_path / "run"
    train = {"max_steps": max_steps, "save_every": 2, "log_every": 1, "schedule": "constant", "export_final": False}
    parallel = {"engine": engine, "config": config, "nproc_per_node": 2}
    tree = tiny_recipe(assets, out, train=train, eval={"sets": {}}, parallel=parallel)
    return write_recipe(tmp_path / "recipe.yaml", tree), out


def launch(kind: str, recipe: Path, port: int) -> subprocess.Popen:
    """The job as a user starts it, in its own session (so the test can find and clean up all of it)."""
    cmd = {
        "cpt": [sys.executable, "-m", "launcher", "run", str(recipe)],
        "deepspeed": [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module",
                      "launcher.train", str(recipe)],
    }[kind]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=worker_env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def of_the_job(recipe: Path) -> list[psutil.Process]:
    """Every process in the process table whose command line names this job's (unique) recipe."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(recipe) in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def the_launcher(kill: str, proc: subprocess.Popen) -> psutil.Process:
    """The process to kill: ``cpt run`` itself, the torchrun agent it started, or the deepspeed runner."""
    if kill == "torchrun-agent":
        return next(c for c in psutil.Process(proc.pid).children(recursive=True)
                    if "torch.distributed.run" in " ".join(c.cmdline()))  # fmt: skip
    return psutil.Process(proc.pid)


# each launcher once, each engine at least once: the lifeline watches the launcher, whichever engine trains
@pytest.mark.parametrize(
    "kill, engine, config",
    [("cpt", *ENGINES[1]), ("torchrun-agent", *ENGINES[0]), ("deepspeed", *ENGINES[0])],
)
def test_killing_the_launcher_leaves_no_worker_and_the_rerun_resumes(assets, tmp_path, kill, engine, config):
    recipe, out = long_recipe(assets, tmp_path, engine, config)
    proc = launch("deepspeed" if kill == "deepspeed" else "cpt", recipe, 29531)
    try:
        wait_for_step(out, 3, proc)
        assert len(of_the_job(recipe)) >= 3, "the workers are not running"
        the_launcher(kill, proc).kill()
        deadline = time.time() + 30
        while of_the_job(recipe) and time.time() < deadline:
            time.sleep(0.5)
        left = [" ".join(p.cmdline()) for p in of_the_job(recipe)]
        assert not left, f"still running 30 s after the launcher was killed: {left}"
        log = proc.communicate(timeout=30)[0]
    finally:
        for p in of_the_job(recipe):
            p.kill()
    assert "is gone; stopping without saving" in log, log[-4000:]
    kept = committed_steps(out)
    assert kept, "no checkpoint was committed before the kill"
    last = out / "checkpoints" / f"step-{kept[-1]}"
    assert verify(last) is None
    newest = max(logged_steps(out))

    p = cpt("run", str(recipe), f"train.max_steps={newest + 2}")
    assert f"resumed from {last} at step {kept[-1]}" in p.stderr
    steps = logged_steps(out)
    assert steps == list(range(1, newest + 3)), steps


@pytest.fixture(scope="module")
def live_run(assets, tmp_path_factory) -> dict:
    """One FSDP2 run on 2 ranks serving the two tests that need a live run: at step 3, ``cpt status`` reads it and a
    second ``cpt run`` on its output_dir is refused; the run trains on for 2 more steps, is then preempted (SIGTERM
    to cpt) and lets go of its lock. What each test checks is taken when it happened (the steps logged right after
    ``cpt status`` returned, the lock record before the second run), so that one run proves both."""
    tmp_path = tmp_path_factory.mktemp("live")
    recipe, out = long_recipe(assets, tmp_path, "fsdp", "fsdp.yaml")
    first = launch("cpt", recipe, 0)
    try:
        wait_for_step(out, 3, first)
        status = cpt("status", str(out)).stdout
        logged_at_status = max(logged_steps(out))
        owner = json.loads((out / ".cpt-owner.json").read_text())
        start = time.time()
        second = subprocess.run([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=REPO, env=worker_env(),
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        refused_in = time.time() - start
        # the first run trains on (however fast its steps are), then ends as a preempted job does and lets go
        wait_for_step(out, max(logged_steps(out)) + 2, first)
        first.send_signal(signal.SIGTERM)
        log = first.communicate(timeout=300)[0]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    return {"out": out, "first": first, "log": log, "status": status, "logged_at_status": logged_at_status,
            "owner": owner, "second": second, "refused_in": refused_in}  # fmt: skip


def test_a_second_run_on_the_same_output_dir_is_refused_and_the_first_goes_on(live_run):
    out, first, second = live_run["out"], live_run["first"], live_run["second"]
    assert live_run["owner"]["pid"] == first.pid
    assert second.returncode == 2, second.stderr[-3000:]
    assert live_run["refused_in"] < 30
    assert f"output_dir {out} is in use by another run: pid {first.pid} on " in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 75, live_run["log"][-4000:]
    steps = logged_steps(out)
    assert steps == list(range(1, len(steps) + 1)), steps
    assert steps[-1] >= live_run["logged_at_status"] + 2, "the first run did not train on after the refusal"
    assert not (out / ".cpt-owner.json").exists(), "the run did not give its lock up"


def test_a_lock_left_by_a_killed_job_does_not_block_the_next(assets, tmp_path):
    # FSDP2 (the lock is cpt's, whichever engine trains; ZeRO-3 workers dying with their launcher are the kill tests
    # above): it starts faster than DeepSpeed
    recipe, out = long_recipe(assets, tmp_path, "fsdp", "fsdp.yaml")
    proc = launch("cpt", recipe, 0)
    try:
        wait_for_step(out, 3, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # cpt run and torchrun at once: nothing gets to clean up
        proc.communicate()
    assert json.loads((out / ".cpt-owner.json").read_text())["pid"] == proc.pid
    deadline = time.time() + 30
    while of_the_job(recipe) and time.time() < deadline:  # the workers (in sessions of their own) follow
        time.sleep(0.5)
    status = cpt("status", str(out))
    assert "not running" in status.stdout, status.stdout
    done = max(committed_steps(out))
    p = cpt("run", str(recipe), f"train.max_steps={done + 1}")
    assert "taking over the lock of a job that is gone" in p.stderr
    assert [m["step"] for m in read_metrics(out) if "loss" in m][-1] == done + 1


def test_status_names_the_owner_and_the_progress_of_a_live_run(live_run):
    out, text = live_run["out"], live_run["status"]
    assert f"running: pid {live_run['first'].pid} on " in text, text
    fields = dict(line.strip().split(": ", 1) for line in text.splitlines())
    # the run went on while status read it: what it reports lies between the step waited for and the last one
    assert 3 <= int(fields["last step"]) <= live_run["logged_at_status"], text
    step = int(fields["last checkpoint"].rsplit("step-", 1)[1])
    assert fields["last checkpoint"] == str(out / "checkpoints" / f"step-{step}") and step % 2 == 0, text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the clock-tick start time is Linux's /proc")
def test_a_step_of_the_wall_clock_does_not_make_the_launcher_look_gone(monkeypatch):
    """An NTP step of the wall clock moves every process's start time as psutil gives it (boot time + ticks since
    boot): the watch must not take that for its launcher having been replaced, and stop every worker of a job."""
    import psutil._pslinux

    from launcher.launch import lifeline

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mark = lifeline._start_mark(child.pid)
        before = psutil.Process(child.pid).create_time()
        real = psutil._pslinux.boot_time
        monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: real() + 5.0)  # the clock stepped 5 s ahead
        assert psutil.Process(child.pid).create_time() == pytest.approx(before + 5.0)
        assert not lifeline._gone(child.pid, mark)
    finally:
        child.kill()
        child.wait()
    assert lifeline._gone(child.pid, mark)
