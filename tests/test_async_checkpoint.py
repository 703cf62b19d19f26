"""Checkpoints written in the background (``train.async_save``, FSDP2): the same checkpoints as a synchronous save,
a preemption that waits for the write in flight, a write the storage refuses, and DeepSpeed refused up front."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    cpt,
    job_output,
    kill_whole_job,
    read_metrics,
    start_job,
    tiny_recipe,
    train_losses,
    worker_env,
    write_recipe,
)
from test_preemption import PREEMPTED, workers

from launcher.checkpoint import verify
from launcher.config import ConfigError
from launcher.preflight import load_recipe

FSDP = {"engine": "fsdp", "config": "fsdp.yaml", "nproc_per_node": 2}


def recipe_for(assets, tmp_path: Path, name: str, **train) -> tuple[Path, Path]:
    out = tmp_path / name
    train = {"max_steps": 6, "save_every": 2, "keep_last": 3, "log_every": 1, "schedule": "constant", **train}
    tree = tiny_recipe(assets, out, train=train, eval={"sets": {}}, parallel=FSDP)
    return write_recipe(tmp_path / f"{name}.yaml", tree), out


def last_step(out: Path) -> int:
    if not (out / "metrics.jsonl").is_file():
        return 0
    return max((m["step"] for m in read_metrics(out) if "loss" in m), default=0)


def same(a, b) -> bool:
    """Equal, tensors element by element."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def committed(out: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*") if p.name[5:].isdigit())


def files_of(checkpoint: Path) -> set[str]:
    return {str(f.relative_to(checkpoint)) for f in checkpoint.rglob("*") if f.is_file()}


def dcp_tensors(checkpoint: Path, into: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch.distributed.checkpoint directory, by its flattened key, read in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, into)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)

    walk("", torch.load(into, weights_only=True))
    return flat


F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)  # Linux's value, for a Python whose fcntl does not name it


@contextlib.contextmanager
def held_open(path: Path) -> Iterator[bool]:
    """Hold the first open for writing of ``path``, a file not there yet, until the block ends: a read lease (an OS
    lease, as a file server grants) makes another process's open for writing wait until the lease is given up.
    Yields False when ``path`` was already there: its writer got there first."""
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the lease holder is told of the opener by SIGIO
    fd = None
    try:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDONLY, 0o644)
        except (FileExistsError, FileNotFoundError):  # written already, or its checkpoint committed already
            yield False
            return
        try:
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
        except BlockingIOError:  # the writer opened it meanwhile
            yield False
            return
        yield os.fstat(fd).st_size == 0
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
            os.close(fd)
        signal.signal(signal.SIGIO, previous)


@contextlib.contextmanager
def a_held_write(proc: subprocess.Popen, out: Path, saves: range, log: Path, rank: int = 1) -> Iterator[int]:
    """Hold ``rank``'s shard file of the first of the background saves at ``saves`` (steps) that the test gets to
    before the save opens it: the save cannot write it until the block ends. Yields that save's step."""
    ckpts = out / "checkpoints"
    for step in saves:
        tmp = ckpts / f"step-{step}.tmp"
        while not tmp.is_dir() and not (ckpts / f"step-{step}").is_dir():
            assert proc.poll() is None, log.read_text()[-5000:]
            time.sleep(0.001)
        with held_open(tmp / f"__{rank}_0.distcp") as caught:
            if caught:
                yield step
                return
    pytest.fail("every save opened its files before the test could hold one")


def wait_for_step(out: Path, step: int, timeout: float = 60) -> None:
    """Until the metrics show ``step`` taken: training goes on while a held write waits."""
    end = time.time() + timeout
    while last_step(out) < step:
        assert time.time() < end, f"training did not reach step {step} while a checkpoint was being written"
        time.sleep(0.05)


def run_holding_a_save(recipe: Path, out: Path, log: Path, rank: int = 1, **env: str) -> tuple[int, str]:
    """Run ``recipe`` to its end with one of its background saves at steps 2 or 4 held (``rank``'s shard file) until
    the optimizer step after it has changed the model: what it writes must still be the state of its own step.
    The held save's step and the job's output."""
    proc = start_job(recipe, log, **env)
    try:
        with a_held_write(proc, out, range(2, 5, 2), log, rank) as held:
            wait_for_step(out, held + 1)
        output = job_output(proc, log, timeout=300)
    finally:
        if proc.poll() is None:
            kill_whole_job(proc)
    assert proc.returncode == 0, output[-5000:]
    return held, output


def test_background_saves_commit_what_synchronous_saves_do_and_resume_bit_exactly(assets, tmp_path):
    sync_recipe, sync = recipe_for(assets, tmp_path, "sync")
    cpt("run", str(sync_recipe))
    async_recipe, background = recipe_for(assets, tmp_path, "async", async_save=True)
    held, log = run_holding_a_save(async_recipe, background, tmp_path / "log")
    stall = rf"checkpoint step-{held}: training stalled [\d.]+ s, written in background in [\d.]+ s"
    assert re.search(stall, log), log[-5000:]
    # the host copy is made after the first step, in a thread, not by the first save
    assert re.search(r"host copy for background checkpoints: [\d.]+ GiB, made in [\d.]+ s", log), log[-5000:]

    assert committed(background) == committed(sync) == [2, 4, 6]
    for step in (2, 4):  # written in the background (the last one, at the end, is synchronous in both)
        a, b = sync / "checkpoints" / f"step-{step}", background / "checkpoints" / f"step-{step}"
        assert files_of(b) == files_of(a), step
        assert verify(b) is None
        for name in ["trainer_state.json", *(f"data-rank{r}.json" for r in range(2))]:
            assert (b / name).read_text() == (a / name).read_text(), name
        schedules = (torch.load(c / "scheduler.pt", weights_only=True) for c in (a, b))
        assert same(*schedules)
        for r in range(2):
            # Two runs' RNG states differ from the start (Python's is seeded by the OS): only their form compares.
            ra, rb = (torch.load(c / f"rng-rank{r}.pt", weights_only=True) for c in (a, b))
            assert ra.keys() == rb.keys() and ra["torch"].shape == rb["torch"].shape
        ta, tb = dcp_tensors(a, tmp_path / "a.pt"), dcp_tensors(b, tmp_path / "b.pt")
        assert tb.keys() == ta.keys() and any(".exp_avg_sq" in k for k in ta)
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (step, key)

    losses = train_losses(sync)
    assert train_losses(background) == losses, "saving in the background changed the training"
    # Each commit's stall goes into the next metrics line: the synchronous saves at steps 2 and 4 into 3 and 5.
    assert [m["step"] for m in read_metrics(sync) if "checkpoint_stall_s" in m] == [3, 5]
    stalls = [m["checkpoint_stall_s"] for m in read_metrics(background) if "checkpoint_stall_s" in m]
    assert stalls and all(s >= 0 for s in stalls)

    # Resume the background run from its step 4 (a synchronous resume is bit-exact with the uninterrupted run,
    # tests/test_checkpoint.py): steps 5 and 6 again, with the losses the synchronous run had.
    for gone in ("checkpoints/step-6", "final"):
        shutil.rmtree(background / gone)
    p = cpt("run", str(async_recipe))
    assert f"resumed from {background / 'checkpoints' / 'step-4'} at step 4" in p.stderr
    resumed = [m for m in read_metrics(background) if "loss" in m][-2:]
    assert {m["step"]: m["loss"] for m in resumed} == {5: losses[5], 6: losses[6]}


def test_a_preemption_waits_for_the_write_in_flight_and_commits_it(assets, tmp_path):
    """Rank 1's shard file of one background save cannot be opened for writing until the test lets it: the save
    stays in flight while training goes on and the job is told to stop. The job must wait for it, commit it, then
    commit the preemption's own checkpoint and exit with 75; the rerun resumes from that."""
    # Saves every 3 steps: the signal comes a step after the held save, before the next save would wait for it.
    recipe, out = recipe_for(assets, tmp_path, "run", max_steps=16, save_every=3, async_save=True)
    proc = start_job(recipe, tmp_path / "log")
    ckpts = out / "checkpoints"
    try:
        with a_held_write(proc, out, range(3, 13, 3), tmp_path / "log") as held:
            wait_for_step(out, held + 1)
            proc.send_signal(signal.SIGTERM)
            time.sleep(3)
            assert proc.poll() is None, "the job exited with a checkpoint still being written"
            assert max(committed(out), default=0) < held and (ckpts / f"step-{held}.tmp").is_dir()
        log = job_output(proc, tmp_path / "log", timeout=120)
    finally:
        if proc.poll() is None:
            kill_whole_job(proc)
    assert proc.returncode == PREEMPTED, log[-5000:]
    assert f"checkpoint step-{held}: waiting for its background write to finish" in log
    stopped = last_step(out)
    assert held < stopped <= held + 3
    assert committed(out)[-2:] == [held, stopped]
    for step in (held, stopped):
        assert verify(ckpts / f"step-{step}") is None, step
    assert (ckpts / "latest").read_text().strip() == f"step-{stopped}"
    assert not list(ckpts.glob("*.tmp"))

    p = cpt("run", str(recipe))
    assert f"resumed from {ckpts / f'step-{stopped}'} at step {stopped}" in p.stderr
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == list(range(1, 17)), "a step was run twice or skipped"


def test_a_background_write_the_storage_refuses_commits_nothing(assets, tmp_path):
    """Mid-run, no rank may write a file past 256 KiB (RLIMIT_FSIZE: EFBIG, even for root): the next background
    write fails in its shard file; the step boundary that finds it ends the run with the storage's error."""
    recipe, out = recipe_for(assets, tmp_path, "run", max_steps=30, async_save=True)
    proc = start_job(recipe, tmp_path / "log")
    end = time.time() + 240
    while not (out / "checkpoints" / "step-2" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < end, (tmp_path / "log").read_text()[-5000:]
        time.sleep(0.05)
    for rank in workers(proc):
        resource.prlimit(rank.pid, resource.RLIMIT_FSIZE, (256 << 10, resource.RLIM_INFINITY))
    log = job_output(proc, tmp_path / "log", timeout=240)
    assert proc.returncode not in (0, PREEMPTED), log[-5000:]
    found = re.search(r"^error: rank \d: could not write checkpoint (\S+)/step-(\d+)\.tmp: \[Errno 27\] File too "
                      r"large: '\S+/__\d_0\.distcp'", log, re.MULTILINE)  # fmt: skip
    assert found, log[-5000:]
    assert Path(found.group(1)) == out / "checkpoints"
    failed = int(found.group(2))
    # A save in the background failed (not the synchronous one at the end), and the first step boundary after its
    # write ended (at the latest, the next save's) stopped the run.
    assert failed < 30 and last_step(out) <= failed + 2, (failed, last_step(out))
    kept = committed(out)
    assert kept and kept[-1] == failed - 2, (kept, failed)
    previous = out / "checkpoints" / f"step-{kept[-1]}"
    assert f"Nothing was committed: the newest committed checkpoint is still {previous}" in log
    assert verify(previous) is None
    assert (out / "checkpoints" / "latest").read_text().strip() == previous.name
    assert not re.search(r"^\[rank\d\]: Traceback", log, re.MULTILINE), "the ranks printed tracebacks"


def test_deepspeed_with_async_save_is_refused_before_any_worker_starts(assets, tmp_path):
    out = tmp_path / "run"
    tree = tiny_recipe(assets, out, train={"async_save": True, "save_every": 2})  # tiny_recipe's engine: ZeRO-3
    recipe = write_recipe(tmp_path / "r.yaml", tree)
    with pytest.raises(ConfigError, match=r"train\.async_save: background checkpoints are FSDP2-only"):
        load_recipe(recipe)
    load_recipe(recipe, ["parallel.engine=fsdp", "parallel.config=fsdp.yaml"])
    p = subprocess.run([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=REPO, env=worker_env(),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2 and "train.async_save" in p.stderr, p.stderr[-3000:]
    assert not out.exists(), "a worker started"


def test_the_host_copy_is_made_once_and_each_save_copies_the_state_of_its_own_moment():
    """The stager's copy of a state dict (single process, no GPU): independent of the live tensors, the same host
    memory at every save (also when reserved ahead), and the values of the moment of each save, the non-tensor
    entries included."""
    from launcher.engine.background_save import HostStager

    weight, moment = torch.arange(6.0).reshape(2, 3), torch.ones(4, dtype=torch.bfloat16)
    group = {"lr": 0.1, "params": ["w"]}
    state = {"model": {"w": weight}, "optim": {"state": {"w": {"exp_avg": moment}}, "param_groups": [group]}}
    stager = HostStager(torch.device("cpu"))
    stager.reserve(state)
    first = stager.stage(state).result()
    w1, m1 = first["model"]["w"], first["optim"]["state"]["w"]["exp_avg"]
    assert torch.equal(w1, torch.arange(6.0).reshape(2, 3)) and m1.dtype == torch.bfloat16
    assert w1.data_ptr() != weight.data_ptr() and m1.data_ptr() != moment.data_ptr()
    weight.add_(10)  # the next optimizer step
    moment.mul_(3)
    group["lr"] = 0.05
    assert torch.equal(w1, torch.arange(6.0).reshape(2, 3)), "the copy follows the live tensor"
    assert first["optim"]["param_groups"] == [{"lr": 0.1, "params": ["w"]}]
    second = stager.stage(state).result()
    w2, m2 = second["model"]["w"], second["optim"]["state"]["w"]["exp_avg"]
    assert w2.data_ptr() == w1.data_ptr() and m2.data_ptr() == m1.data_ptr(), "a save allocated a new host copy"
    assert torch.equal(w2, torch.arange(6.0).reshape(2, 3) + 10) and torch.equal(m2, torch.full((4,), 3.0).bfloat16())
    assert second["optim"]["param_groups"] == [{"lr": 0.05, "params": ["w"]}]
    stager.close()


@pytest.mark.parametrize(
    "setting, engine, device, offload, save_every, expected",
    [
        ("auto", "fsdp", "cuda", False, 5, True),  # the measured case: 0.72 s per 3B save against 45.8 s
        ("auto", "fsdp", "cpu", False, 5, False),
        ("auto", "fsdp", "cuda", True, 5, False),  # offloaded shards are in host memory already
        ("auto", "deepspeed", "cuda", False, 5, False),
        (True, "fsdp", "cpu", False, 5, True),
        (False, "fsdp", "cuda", False, 5, False),
        ("auto", "fsdp", "cuda", False, 0, False),  # no save_every: no host copy to make
        (True, "fsdp", "cuda", False, 0, False),
    ],
)
def test_async_save_auto_writes_in_the_background_for_fsdp2_on_gpus_without_offload(
    assets, tmp_path, setting, engine, device, offload, save_every, expected
):
    from launcher.engine.background_save import background_saves

    config = {"fsdp": "fsdp-offload.yaml" if offload else "fsdp.yaml", "deepspeed": "zero3.json"}[engine]
    train = {"save_every": save_every} | ({} if setting == "auto" else {"async_save": setting})
    tree = tiny_recipe(assets, tmp_path / "out", train=train, parallel={"engine": engine, "config": config})
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tree), check_files=False)
    assert recipe.parallel.fsdp.cpu_offload is offload
    assert recipe.train.async_save == setting
    assert background_saves(recipe, device) is expected


def test_async_save_takes_auto_true_or_false_and_names_the_key_otherwise(assets, tmp_path):
    tree = tiny_recipe(assets, tmp_path / "out", train={"async_save": "sometimes"}, parallel=FSDP)
    with pytest.raises(ConfigError, match=r"train\.async_save: 'sometimes' is not one of 'auto' \| True \| False"):
        load_recipe(write_recipe(tmp_path / "r.yaml", tree), check_files=False)
