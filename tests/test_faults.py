"""Faults: a dead or hung rank ends the whole job and names itself; nothing is left running; a checkpoint the
storage refuses commits nothing and the rerun resumes from the previous one; bad data is named by file and line;
a preemption signal to every process of the job (DataLoader workers too) still checkpoints."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from conftest import REPO, cpt, read_metrics, tiny_recipe, worker_env, write_recipe
from test_preemption import PREEMPTED, wait_for_step, workers

ENGINES = [("deepspeed", "zero3.json"), ("fsdp", "fsdp.yaml")]


def start(recipe: Path, **env: str) -> subprocess.Popen:
    """``cpt run`` in its own session, so that a test can signal it and everything under it."""
    return subprocess.Popen([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=REPO,
                            env=worker_env(**env), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def family(proc: subprocess.Popen) -> list[psutil.Process]:
    return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]


def left_running(processes: list[psutil.Process]) -> list[str]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(" ".join(p.cmdline()))
        except psutil.NoSuchProcess:
            pass
    return alive


def finish(proc: subprocess.Popen, processes: list[psutil.Process], timeout: float) -> str:
    """The job's output once it has ended by itself; on a timeout, everything is killed and the test fails."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        for p in processes:
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
            except psutil.NoSuchProcess:
                pass
        pytest.fail(f"the job did not end within {timeout:.0f} s:\n{proc.communicate()[0][-5000:]}")


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"run ended early ({proc.returncode}):\n{proc.stdout.read()[-5000:]}")
        if time.time() > end:
            pytest.fail("the run did not get there in time")
        time.sleep(0.05)


def committed_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if p.name[5:].isdigit())


def logged_steps(out: Path) -> list[int]:
    return [m["step"] for m in read_metrics(out) if "loss" in m]


def test_a_rank_killed_mid_step_ends_the_job_within_60_s(assets, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        assets, out, train={"max_steps": 500, "log_every": 1, "save_every": 2}, eval={"sets": {}},
        parallel={"engine": "deepspeed", "config": "zero3.json", "nproc_per_node": 2}))  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=REPO, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    wait_for_step(out, 3, proc)
    processes = family(proc)
    victim = workers(proc)[1]
    killed_at = time.time()
    victim.send_signal(signal.SIGKILL)
    log = proc.communicate(timeout=120)[0]
    elapsed = time.time() - killed_at
    assert proc.returncode not in (0, 75), log[-3000:]
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"
    assert "rank 1" in log or "local_rank: 1" in log, log[-3000:]
    time.sleep(1)
    assert not left_running(processes), f"left behind: {left_running(processes)}"
    committed = sorted((out / "checkpoints").glob("step-*[0-9]"))
    assert committed, "no checkpoint survived"
    last = committed[-1]
    assert (last / "trainer_state.json").is_file() and (last / "manifest.json").is_file()
    assert max(m["step"] for m in read_metrics(out) if "loss" in m) >= int(last.name.split("-")[1])


def test_the_preemption_watchdog_ends_a_step_that_never_finishes():
    """A signal arrives and the step does not finish within the grace: the watchdog ends the process with its
    message. The step here is Python code (a sleep), which the interpreter interrupts to run the signal handler
    that starts the watchdog; a rank blocked inside a real collective is the next test."""
    script = (
        "import os, signal, time, torch\n"
        "import launcher.preemption as p\n"
        "p.MIN_STEP_GRACE_S = 1.0\n"
        "pre = p.Preemption(['SIGTERM'], torch.device('cpu'))\n"
        "pre.note_step(0.1)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(30)\n"
    )
    start = time.time()
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert time.time() - start < 15
    assert "a peer has probably died" in p.stderr


# Two ranks whose every step is one gloo all-reduce, with a collective timeout far beyond the test's patience.
COLLECTIVE_STEPS = """
import datetime, itertools, sys, time, torch, torch.distributed as dist
import launcher.preemption as preemption
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=600))
preemption.MIN_STEP_GRACE_S = 1.0
pre = preemption.Preemption(["SIGTERM"], torch.device("cpu"))
value = torch.ones(1)
for step in itertools.count(1):
    start = time.monotonic()
    dist.all_reduce(value)
    pre.note_step(time.monotonic() - start)
    print(f"step {step}", flush=True)
"""


def test_a_signal_ends_a_rank_blocked_in_a_collective_whose_peer_stopped():
    """Rank 1 is stopped (SIGSTOP) between steps, so rank 0 waits in a real all_reduce that can never complete;
    then rank 0 gets SIGTERM, as torchrun and Slurm send it. Its watchdog should end it within the grace (about a
    second here), long before the 600 s collective timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    ranks = [subprocess.Popen([sys.executable, "-c", COLLECTIVE_STEPS, str(rank), port], cwd=REPO,
                              env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]  # fmt: skip
    try:
        while (line := ranks[0].stdout.readline()) != "step 3\n":
            assert line, f"rank 0 ended before step 3: {ranks[0].communicate()[1][-3000:]}"
        ranks[1].send_signal(signal.SIGSTOP)
        time.sleep(2)  # rank 0 is in the next step's all_reduce by now, and cannot leave it
        assert psutil.Process(ranks[0].pid).status() != psutil.STATUS_ZOMBIE
        signalled = time.time()
        ranks[0].send_signal(signal.SIGTERM)
        try:
            _, err = ranks[0].communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("rank 0 was still blocked in the all_reduce 20 s after SIGTERM")
        assert ranks[0].returncode == 1, err[-3000:]
        assert time.time() - signalled < 20
        assert "a peer has probably died" in err, err[-3000:]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.send_signal(signal.SIGCONT)
                rank.kill()
            rank.communicate()


@pytest.mark.parametrize("engine, config", ENGINES)
def test_a_checkpoint_the_storage_refuses_commits_nothing_and_the_rerun_resumes(assets, tmp_path, engine, config):
    """Mid-run, every rank may no longer write a file past 256 KiB (RLIMIT_FSIZE: EFBIG, even for root), as when
    a disk or quota fills up: the next save fails half-way through its shards."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        assets, out, train={"max_steps": 30, "save_every": 2, "log_every": 1, "schedule": "constant"},
        eval={"sets": {}}, parallel={"engine": engine, "config": config, "nproc_per_node": 2}))  # fmt: skip
    proc = start(recipe)
    wait_until(lambda: (out / "checkpoints" / "step-2" / "trainer_state.json").is_file(), proc)
    for rank in workers(proc):
        resource.prlimit(rank.pid, resource.RLIMIT_FSIZE, (256 << 10, resource.RLIM_INFINITY))
    log = finish(proc, family(proc), timeout=240)
    assert proc.returncode not in (0, PREEMPTED), log[-5000:]
    found = re.search(r"^error: rank \d: could not write checkpoint (\S+)/step-(\d+)\.tmp: \[Errno 27\] File too large",
                      log, re.MULTILINE)  # fmt: skip
    assert found, log[-5000:]
    assert Path(found.group(1)) == out / "checkpoints"
    failed = int(found.group(2))
    kept = committed_steps(out)
    assert kept and kept[-1] < failed, (kept, failed)
    assert not (out / "checkpoints" / f"step-{failed}").exists(), "a half-written checkpoint was committed"
    previous = out / "checkpoints" / f"step-{kept[-1]}"
    assert f"Nothing was committed: the newest committed checkpoint is still {previous}" in log
    assert (out / "checkpoints" / "latest").read_text().strip() == previous.name
    assert not re.search(r"^\[rank\d\]: Traceback", log, re.MULTILINE), "the ranks printed tracebacks"

    p = cpt("run", str(recipe))  # the same command, with room on the disk again
    assert f"resumed from {previous} at step {kept[-1]}" in p.stderr
    assert logged_steps(out) == list(range(1, 31)), "a step was run twice or skipped"
    assert not list((out / "checkpoints").glob("*.tmp")), "the partial checkpoint was not cleaned up"
    assert json.loads((out / "checkpoints" / "step-30" / "trainer_state.json").read_text())["step"] == 30


def test_a_stopped_rank_ends_the_job_after_the_collective_timeout(assets, tmp_path):
    """Rank 1 is stopped (SIGSTOP) mid-training: it neither answers nor closes its connections, so only the
    collective timeout (``parallel.timeout_minutes``) can end the job."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        assets, out, train={"max_steps": 100_000, "log_every": 1, "save_every": 0}, eval={"sets": {}},
        parallel={"engine": "fsdp", "config": "fsdp.yaml", "nproc_per_node": 2, "timeout_minutes": 0.2}))  # fmt: skip
    proc = start(recipe)
    wait_for_step(out, 3, proc)
    processes = family(proc)
    stopped_at = time.time()
    workers(proc)[1].send_signal(signal.SIGSTOP)
    log = finish(proc, processes, timeout=150)
    elapsed = time.time() - stopped_at
    assert proc.returncode not in (0, PREEMPTED), log[-5000:]
    # 12 s of waiting in the collective, then torchrun gives the stopped rank 30 s to exit before it kills it.
    assert elapsed < 100, f"the job took {elapsed:.0f} s to end"
    timed_out = (r"^error: rank 0: collective \w+ in launcher/\S+ \(\w+\).* timed out after 12 s "
                 r"\(parallel\.timeout_minutes=0\.2\): a peer rank stopped answering")  # fmt: skip
    assert re.search(timed_out, log, re.MULTILINE), log[-5000:]
    time.sleep(1)
    assert not left_running(processes), f"left behind: {left_running(processes)}"


def bad_sources(assets, root: Path, bad_line: str) -> Path:
    """Two files, one per rank's DataLoader worker; line 5 of the second is bad. Opening the sources reads only
    the first record of the first file, so only the worker that reads the second file meets it."""
    docs = assets["code_train"].read_text().splitlines()
    root.mkdir()
    (root / "a.jsonl").write_text("\n".join(docs[:12]) + "\n")
    (root / "b.jsonl").write_text("\n".join([*docs[12:16], bad_line, *docs[16:]]) + "\n")
    return root


def test_a_dtensor_collective_that_times_out_is_named_by_the_torch_call_and_our_line():
    """A DTensor collective (FSDP2's gradient norm) is waited on deep inside torch, with no distributed_c10d frame:
    the message names the public torch function our code called and our line. The traceback is a real one, through
    code compiled under torch's file names."""
    from launcher.diagnostics import _PACKAGE_DIR, describe_collective_failure

    def compiled(path: str, source: str, env: dict) -> None:
        exec(compile(source, path, "exec"), env)

    torch_dir = os.path.join(os.sep, "x", "site-packages", "torch")
    env: dict = {}
    compiled(
        os.path.join(torch_dir, "distributed", "_functional_collectives.py"),
        "def wait_tensor():\n    raise RuntimeError('[gloo/tcp.cc:78] Timed out waiting 12000ms for recv')\n",
        env,
    )
    compiled(
        os.path.join(torch_dir, "nn", "utils", "clip_grad.py"),
        "def _no_grad_wrapper():\n    clip_grad_norm_()\ndef clip_grad_norm_():\n    wait_tensor()\n",
        env,
    )
    compiled(os.path.join(_PACKAGE_DIR, "engine", "fsdp.py"), "def train_step():\n    _no_grad_wrapper()\n", env)
    with pytest.raises(RuntimeError) as info:
        env["train_step"]()
    message = describe_collective_failure(info.value, 0.2)
    assert message is not None
    named = "collective clip_grad_norm_ in launcher/engine/fsdp.py:2 (train_step) timed out after 12 s"
    assert message.startswith(named), message


@pytest.mark.parametrize("bad_line, problem", [('{"text": "def f(:", oops', "malformed JSON"),
                                               ('{"content": "no text field"}', "no field 'text'")])  # fmt: skip
def test_bad_data_read_by_a_dataloader_worker_is_named_by_file_and_line(assets, tmp_path, bad_line, problem):
    data = bad_sources(assets, tmp_path / "data", bad_line)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        assets, out, data={"train": [{"path": str(data / "*.jsonl")}], "num_workers": 1}, eval={"sets": {}},
        train={"max_steps": 20, "save_every": 0},
        parallel={"engine": "fsdp", "config": "fsdp.yaml", "nproc_per_node": 2}))  # fmt: skip
    p = subprocess.run([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=REPO, env=worker_env(),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    log = p.stdout + p.stderr
    assert p.returncode not in (0, PREEMPTED), log[-5000:]
    assert f"error: rank 1: {data / '*.jsonl'}: {data / 'b.jsonl'}, line 5: {problem}" in log, log[-5000:]
    assert not re.search(r"^\[rank\d\]: Traceback", log, re.MULTILINE), "the ranks printed tracebacks"
    assert "DataLoader worker" not in log


def test_preemption_signal_to_every_process_of_the_job_with_dataloader_workers(assets, tmp_path):
    """Slurm signals every process of a job: cpt, torchrun, the ranks and their DataLoader workers. The workers
    ignore it and the ranks checkpoint."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        assets, out, data={"num_workers": 1}, train={"max_steps": 60, "log_every": 1, "schedule": "constant"},
        eval={"sets": {}}, parallel={"engine": "fsdp", "config": "fsdp.yaml", "nproc_per_node": 2}))  # fmt: skip
    proc = start(recipe)
    wait_for_step(out, 3, proc)
    processes = family(proc)
    loaders = [c for r in workers(proc) for c in r.children()]
    assert len(loaders) == 2, "each rank should have one DataLoader worker"
    groups = {os.getpgid(p.pid) for p in processes}
    assert {os.getpgid(p.pid) for p in loaders} <= groups
    for group in groups:
        os.killpg(group, signal.SIGTERM)
    log = finish(proc, processes, timeout=240)
    assert proc.returncode == PREEMPTED, log[-5000:]
    assert "preempted by SIGTERM: checkpoint at step" in log
    stopped = logged_steps(out)[-1]
    assert 3 <= stopped < 60
    assert json.loads((out / "checkpoints" / f"step-{stopped}" / "trainer_state.json").read_text())["step"] == stopped
    time.sleep(1)
    assert not left_running(processes), f"left behind: {left_running(processes)}"
