"""Multi-node launch on a real two-node Slurm cluster (slurm/pretrain.sbatch with torchrun and with deepspeed,
preemption and requeue, ``cpt run`` in an allocation), ``accelerate launch``, and the world check that makes a
bad launch fail fast instead of hanging.

The cluster (tests/slurm_cluster.py) is munged, slurmctld and two slurmd daemons on this machine; Slurm is
installed with apt-get when missing. Its tests skip only where that cannot happen (not root, or no apt-get).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_metrics, run, tiny_recipe, worker_env, write_recipe
from slurm_cluster import SlurmCluster, install_problem

from launcher import launch
from launcher.launch import env as launch_env

SBATCH = REPO / "slurm" / "pretrain.sbatch"
BIN = Path(sys.executable).parent
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = install_problem()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()
    assert not c.step_processes(), "job processes were left running"


def job_env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    return {**worker_env(), **cluster.env, "CPT_PYTHON": sys.executable, "CPT_INIT_TIMEOUT": "120", **extra}


def submit(cluster: SlurmCluster, out: Path, args: list[str], **env: str) -> str:
    p = cluster.run(["sbatch", "--nodes", "2", "--parsable", "--output", str(out), *args],
                    env=job_env(cluster, **env), cwd=REPO)  # fmt: skip
    return p.stdout.strip().split(";")[0]


def wait_for_job(cluster: SlurmCluster, job: str, log: Path, timeout: float = 420) -> dict[str, str]:
    """Poll until the job ends (sbatch --wait backs off to ~30 s between polls). A requeued job waits for the
    credential lifetime (its BeginTime after a requeue; ``AuthInfo=cred_expire``, 10 s in the test cluster instead
    of 120) and that wait is kept: slurmd refuses, for as long, to start a job id it has just killed ("Job N
    already killed, do not launch batch job"), so an earlier start fails at launch."""
    end = time.time() + timeout
    while time.time() < end:
        j = cluster.job(job)
        if j["JobState"] in FINISHED:
            return j
        time.sleep(0.5)
    cluster.run(["scancel", job], check=False)
    pytest.fail(f"job {job} did not finish in {timeout:.0f} s\n{text(log)[-6000:]}\n{cluster.logs()}")


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def steps(out: Path) -> list[int]:
    return [m["step"] for m in read_metrics(out) if "loss" in m] if (out / "metrics.jsonl").is_file() else []


def small(assets, root: Path, num_workers: int = 0, **train) -> tuple[Path, Path]:
    out = root / "out"
    tree = tiny_recipe(
        assets,
        out,
        train={"max_steps": 3, "export_final": False, "log_every": 1, **train},
        data={"num_workers": num_workers},
        eval={"max_blocks": 4},
        parallel={"engine": "deepspeed", "config": "zero2.json", "nproc_per_node": 1},
    )
    return write_recipe(root / "recipe.yaml", tree), out


def assert_two_nodes_trained(log: str, out: Path, launcher: str, max_steps: int = 3) -> None:
    assert "world: 2 node(s) x 1 worker(s) = 2 ranks" in log, log[-6000:]
    assert f"({launcher})" in log
    assert "node1 (" in log and "node2 (" in log, "one rank on each node"
    assert steps(out) == list(range(1, max_steps + 1))
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results) == {"code", "prose"} and results["code"]["perplexity"] > 1
    assert (out / "checkpoints" / f"step-{max_steps}" / "data-rank1.json").is_file()


@pytest.mark.parametrize("launcher, shown", [("torchrun", "torchrun"), ("deepspeed", "slurm")])
def test_sbatch_trains_across_two_nodes(cluster, assets, tmp_path, launcher, shown):
    """`sbatch --nodes 2 slurm/pretrain.sbatch RECIPE`: one worker per node (gloo), rank 0 writes the results.
    With deepspeed, the workers are srun's tasks and say so (slurm)."""
    recipe, out = small(assets, tmp_path)
    log = tmp_path / "job.out"
    job = wait_for_job(cluster, submit(cluster, log, [str(SBATCH), str(recipe)], CPT_LAUNCHER=launcher), log)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{text(log)[-6000:]}"
    assert_two_nodes_trained(text(log), out, shown)
    assert f"on 2 node(s) x 1 worker(s) with {launcher}" in text(log)


@pytest.mark.parametrize(
    "launcher, scancel, via_script",
    [
        # the batch script and every process of the job at once (each worker hears it more than once)
        pytest.param("torchrun", ["--full", "--signal=USR1"], True, id="torchrun-signal-everything"),
        # the workers directly, as `scancel --signal=USR1 JOBID` does
        pytest.param("deepspeed", ["--signal=USR1"], False, id="deepspeed-signal-workers"),
    ],
)
def test_preemption_checkpoints_requeues_and_resumes(cluster, assets, tmp_path, launcher, scancel, via_script):
    """SIGUSR1 (what `--signal=B:USR1@600` sends before the time limit) reaches the workers on both nodes; they
    checkpoint and exit 75, the script requeues the job, the requeued job resumes: every step runs exactly once.
    DataLoader workers (data.num_workers=1) are in the job too and receive the signal as well."""
    recipe, out = small(assets, tmp_path, num_workers=1, max_steps=20, schedule="constant")
    log = tmp_path / "job.out"
    job_id = submit(cluster, log, [str(SBATCH), str(recipe)], CPT_LAUNCHER=launcher)
    end = time.time() + 180
    while not any(s >= 3 for s in steps(out)):
        assert cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), text(log)[-6000:]
        assert time.time() < end, f"no training step 3 in time\n{text(log)[-6000:]}"
        time.sleep(0.2)
    cluster.run(["scancel", *scancel, job_id])
    job = wait_for_job(cluster, job_id, log)
    out_text = text(log)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{out_text[-6000:]}\n{cluster.logs()}"
    assert job["Restarts"] == "1", out_text[-6000:]
    assert ("SIGUSR1 received, passing it to the workers" in out_text) == via_script
    assert "preempted by SIGUSR1: checkpoint at step" in out_text and "requeueing job" in out_text
    committed = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*") if p.name[5:].isdigit())
    stopped = committed[0]
    assert 3 <= stopped < 20 and committed[-1] == 20, committed
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped}'} at step {stopped}" in out_text
    assert "(restart 1)" in out_text
    assert steps(out) == list(range(1, 21)), "a step was run twice or skipped"
    assert (out / "eval_results.json").is_file()


def test_cpt_run_in_an_allocation_starts_itself_on_every_node(cluster, assets, tmp_path):
    """`cpt run` in the shell of a two-node `salloc` runs `srun cpt run` on each node; each starts its node's
    workers through torchrun, which meet in a c10d rendezvous on the first node."""
    recipe, out = small(assets, tmp_path)
    p = cluster.run(["salloc", "--nodes", "2", str(BIN / "cpt"), "run", str(recipe)], check=False, timeout=240,
                    env=job_env(cluster), cwd=REPO)  # fmt: skip
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]
    assert "starting `cpt` on each of its nodes: srun --nodes=2 --ntasks-per-node=1" in log
    assert_two_nodes_trained(log, out, "torchrun")


# ---------------------------------------------------------------------------------------------------------------
# Without Slurm


def test_accelerate_launch(assets, tmp_path):
    """`accelerate launch -m launcher.train RECIPE` sets what torchrun sets; two CPU processes train."""
    recipe, out = small(assets, tmp_path)
    p = run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "launcher.train", str(recipe)],
            HF_HOME=str(tmp_path / "hf"))  # fmt: skip
    assert "rank 0/2" in p.stderr and "rank 1/2" in p.stderr and "(torchrun)" in p.stderr
    assert "world: 1 node(s) x 2 worker(s) = 2 ranks" in p.stderr
    assert steps(out) == [1, 2, 3]
    assert (out / "checkpoints" / "step-3" / "data-rank1.json").is_file()
    assert (out / "eval_results.json").is_file()


def start_ranks(recipe: Path, envs: list[dict[str, str]]) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "launcher.train", str(recipe)], cwd=REPO,
                             env=worker_env(**e), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for e in envs]  # fmt: skip


def finish(procs: list[subprocess.Popen], timeout: float = 90) -> list[str]:
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung instead of failing fast")
    return logs


def test_unresolvable_rendezvous_host_fails_at_once(assets, tmp_path):
    recipe, out = small(assets, tmp_path)
    start = time.time()
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "no-such-host.invalid",
           "MASTER_PORT": "29999"}  # fmt: skip
    [p] = start_ranks(recipe, [env])
    [log] = finish([p])
    assert p.returncode != 0
    assert "the rendezvous host MASTER_ADDR='no-such-host.invalid' does not resolve" in log, log[-3000:]
    assert time.time() - start < 60
    assert not out.exists()


def test_a_missing_rank_fails_after_the_init_timeout(assets, tmp_path):
    """WORLD_SIZE=2 but only rank 0 starts: rank 0 stops after CPT_INIT_TIMEOUT, saying who did not come."""
    recipe, _ = small(assets, tmp_path)
    start = time.time()
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(launch.free_port()), launch.INIT_TIMEOUT_ENV: "5"}  # fmt: skip
    [p] = start_ranks(recipe, [env])
    [log] = finish([p])
    assert p.returncode != 0
    assert "could not form the process group of 2 ranks through 127.0.0.1:" in log, log[-3000:]
    assert "within 5 s" in log
    assert time.time() - start < 60


def test_ranks_that_disagree_on_the_layout_stop_with_the_difference(assets, tmp_path):
    """Two ranks on one host that each believe they are alone on it (local rank 0 of 1)."""
    recipe, out = small(assets, tmp_path)
    port = str(launch.free_port())
    same = {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port, launch.INIT_TIMEOUT_ENV: "30"}  # fmt: skip
    envs = [{**same, "RANK": str(r)} for r in (0, 1)]
    procs = start_ranks(recipe, envs)
    logs = finish(procs)
    assert all(p.returncode != 0 for p in procs)
    for log in logs:
        assert "do not form a consistent world" in log, log[-3000:]
        assert "runs ranks [0, 1] with local ranks [0, 0], but they say LOCAL_WORLD_SIZE=1" in log
    assert not (out / "checkpoints").exists()


def rec(rank: int, node: str, local_rank: int, local_world: int | None, gpus: int = 0, expected: int | None = None,
        gpu_id: str | None = None):  # fmt: skip
    return {"rank": rank, "node": node, "host": node, "local_rank": local_rank, "local_world": local_world,
            "gpus": gpus, "gpu_id": gpu_id, "device": "cpu", "expected_nodes": expected}  # fmt: skip


def test_world_check_names_each_kind_of_mismatch():
    good = [rec(0, "a", 0, 2, 2, 2), rec(1, "a", 1, 2, 2, 2), rec(2, "b", 0, 2, 2, 2), rec(3, "b", 1, 2, 2, 2)]
    assert launch.check_world(good) == []
    assert launch.check_world([rec(0, "a", 0, None), rec(1, "a", 1, None)]) == []
    gpus = [rec(0, "a", 0, 1, 8), rec(1, "b", 0, 1, 4)]
    assert any("nodes have different numbers of GPUs: a=8, b=4" in p for p in launch.check_world(gpus))
    uneven = [rec(0, "a", 0, 2), rec(1, "a", 1, 2), rec(2, "b", 0, 1)]
    assert any("nodes run different numbers of workers: a=2, b=1" in p for p in launch.check_world(uneven))
    shared = [rec(0, "a", 0, 2, 1, gpu_id="GPU-1"), rec(1, "a", 1, 2, 1, gpu_id="GPU-1")]
    assert any("ranks [0, 1] share one GPU (GPU-1)" in p for p in launch.check_world(shared))
    per_task = [rec(0, "a", 0, 2, 1, gpu_id="GPU-1"), rec(1, "a", 1, 2, 1, gpu_id="GPU-2")]  # --gpus-per-task=1
    assert launch.check_world(per_task) == []
    missing = [rec(0, "a", 0, 1, expected=3), rec(1, "b", 0, 1, expected=3)]
    assert any("started 3 node(s) but ranks came from 2" in p for p in launch.check_world(missing))


SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
              "SLURM_NODEID": "1", "SLURMD_NODENAME": "gpu02", "SLURM_STEP_NODELIST": "gpu[01-02]",
              "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_STEP_NUM_NODES": "2"}  # fmt: skip


def test_slurm_environment_mapping():
    assert launch_env.expand_counts("2(x3),1") == [2, 2, 2, 1]
    assert launch_env.hostnames("gpu[01-02],cpu7") == ["gpu01", "gpu02", "cpu7"]
    per_gpu = {**SLURM_STEP, "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
               "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "MASTER_ADDR": "10.0.0.1"}  # fmt: skip
    assert launch.detect_launcher(per_gpu) == "slurm"
    env = launch_env.slurm_env(per_gpu)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "8", "1", "4")
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == str(20000 + 4242 % 10000)
    # One task per node: that task is the node's `cpt run`, which starts the workers with a c10d rendezvous.
    per_node = {**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}
    assert launch.detect_launcher(per_node) is None
    assert launch_env.worker_launcher(per_node) == "slurm"  # but `python -m launcher.train` there is a worker
    args = launch.rendezvous_args(per_node)
    assert "--nnodes=2" in args and "--rdzv-backend=c10d" in args and "--rdzv-id=cpt-4242.0" in args
    assert any(a.startswith("--rdzv-endpoint=") and a.endswith(":24242") for a in args)
    assert any(a.startswith("--rdzv-conf=is_host=0,") for a in args)
    assert launch.rendezvous_args({}) == ["--standalone"]
    assert launch.detect_launcher({**per_gpu, "TORCHELASTIC_RUN_ID": "x"}) == "torchrun"


def test_cpu_workers_per_node_from_the_environment(monkeypatch):
    monkeypatch.setenv(launch.NPROC_ENV, "3")
    assert launch.default_nproc(2) == 3
    monkeypatch.delenv(launch.NPROC_ENV)
    if not torch.cuda.is_available():
        assert launch.default_nproc(2) == 2 and launch.default_nproc(None) == 1


def test_sbatch_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    header = SBATCH.read_text()
    for setting in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "#SBATCH --ntasks-per-node=1", "CPT_PYTHON",
                    "CPT_NPROC_PER_NODE", "CPT_RDZV_PORT", "SBATCH_PARTITION", "SBATCH_TIMELIMIT"):  # fmt: skip
        assert setting in header
    assert os.access(SBATCH, os.X_OK)
