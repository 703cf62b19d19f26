"""The output_dir lock's decisions: a live holder (a real process), a record from another host with a fresh or a
stale heartbeat, and a requeued Slurm job that finds its own record."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import REPO

import launcher.launch.lock as lock_module
from launcher.launch.lock import OWNER_FILE, STALE_AFTER_S, LockHeld, RunLock, job_token, read_owner

HOLD = """
import sys, time
import launcher.launch.lock as lock_module
from launcher.launch.lock import RunLock
RunLock(sys.argv[1], "holder").acquire()
print("held", flush=True)
time.sleep(120)
"""


def record(out, **fields) -> None:
    now = time.time()
    owner = {"host": "node-elsewhere", "pid": 4242, "token": "slurm-77", "since": now - 600, "heartbeat": now,
             "job_id": "77", "pid_started": None, **fields}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / OWNER_FILE).write_text(json.dumps(owner))


def test_a_live_holder_refuses_others_until_it_and_its_job_are_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "DYING_WAIT_S", 1.0)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(LockHeld, match=rf"in use by another run: pid {holder.pid} on "):
            RunLock(tmp_path, "another-job").acquire()
        worker = RunLock(tmp_path, "holder")  # a process of the same job (a worker of cpt run) shares the lock
        assert worker.acquire() is False
    finally:
        holder.kill()
        holder.wait()
    # The owner is gone but a process of its job still runs: a new job waits for it, then refuses.
    with pytest.raises(LockHeld, match=rf"pid {holder.pid} on "):
        RunLock(tmp_path, "another-job").acquire()
    worker.release()
    assert (tmp_path / OWNER_FILE).exists(), "a process that shared the lock removed the owner's record"
    lock = RunLock(tmp_path, "another-job")
    assert lock.acquire() is True
    assert read_owner(tmp_path).token == "another-job"
    lock.release()
    assert not (tmp_path / OWNER_FILE).exists()


def test_another_hosts_fresh_heartbeat_refuses_and_a_stale_one_is_taken_over(tmp_path, caplog):
    record(tmp_path)
    with pytest.raises(LockHeld, match=r"Slurm job 77, pid 4242 on node-elsewhere.*scancel 77"):
        RunLock(tmp_path, "mine").acquire()
    record(tmp_path, heartbeat=time.time() - STALE_AFTER_S - 1)
    lock = RunLock(tmp_path, "mine")
    assert lock.acquire() is True
    assert "taking over the lock of a job that is gone" in caplog.text
    lock.release()


def test_a_requeued_slurm_job_takes_its_own_fresh_lock(tmp_path):
    record(tmp_path)  # written by the preempted instance of job 77 on another node, moments ago
    token = job_token({"SLURM_JOB_ID": "77"})
    assert token == "slurm-77"
    lock = RunLock(tmp_path, token)
    assert lock.acquire() is True
    assert read_owner(tmp_path).pid != 4242
    lock.release()
