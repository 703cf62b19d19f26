"""Where am I and who are my peers: torchrun, the deepspeed launcher, Slurm's srun, or nothing at all.

Every launcher ends in the same place: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the
environment, then one ``init_process_group``. When nothing launched us, ``cpt run`` starts the workers itself
through torchrun, so the one-node path is the multi-node path with ``--standalone``.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# How long torchrun waits for workers to checkpoint after a preemption signal before it kills them.
SHUTDOWN_TIMEOUT_S = 600
# Where workers started by ``cpt run`` leave their exit code for it.
EXIT_STATUS_ENV = "CPT_EXIT_STATUS_FILE"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_launcher(env: dict[str, str] | None = None) -> str | None:
    """Name of whatever started this process as one of several workers, or None."""
    env = dict(os.environ if env is None else env)
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "RANK" in env and "WORLD_SIZE" in env:
        # The deepspeed launcher sets these (and passes --local_rank); so do accelerate and mpirun wrappers.
        return "deepspeed" if "CROSS_RANK" in env or "DS_LAUNCHER" in env else "env"
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return "slurm"
    return None


def _slurm_env(env: dict[str, str]) -> dict[str, str]:
    """torch.distributed variables for ``srun`` with one task per GPU (or per CPU worker)."""
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
    try:
        head = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], check=True, capture_output=True, text=True
        ).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        head = nodes.split(",")[0]
    job = int(env.get("SLURM_JOB_ID", "0"))
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": env.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0],
        "MASTER_ADDR": env.get("MASTER_ADDR", head),
        "MASTER_PORT": env.get("MASTER_PORT", str(20000 + job % 20000)),
    }


def use_cpu_accelerator_if_no_gpu() -> None:
    """DeepSpeed picks its accelerator at import; without CUDA it must be told to use the CPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(timeout_minutes: float) -> DistInfo:
    """Create the process group from the launcher's environment (a world of one when there is none)."""
    launcher = detect_launcher()
    if launcher == "slurm":
        os.environ.update(_slurm_env(dict(os.environ)))
    if launcher is None:
        os.environ.update(
            {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        )
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(torch.cuda.device_count() or 1)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    info = DistInfo(rank, world, local_rank, local_world, device, launcher or "none")
    log.info(
        "rank %d/%d on %s local_rank %d device %s (%s)",
        rank,
        world,
        socket.gethostname(),
        local_rank,
        device,
        info.launcher,
    )
    return info


def teardown() -> None:
    """Barrier then destroy, so no rank exits while a peer still talks to it (gloo aborts otherwise)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_nproc(nproc_per_node: int | None) -> int:
    """One worker per GPU; without GPUs, ``parallel.nproc_per_node`` CPU workers (default 1)."""
    if torch.cuda.is_available():
        return nproc_per_node or torch.cuda.device_count()
    return nproc_per_node or 1


def spawn_workers(module: str, args: list[str], nproc: int, preempt_signals: Sequence[str] = ()) -> int:
    """Run ``python -m module args`` in ``nproc`` workers on this machine through torchrun; its exit code.

    Preemption signals sent to this process go to the workers (torchrun forwards them and waits for the
    checkpoint). torchrun reports any non-zero worker exit as 1, so the workers leave their exit code in a
    file and a preempted run exits here with the requeue code, whoever received the signal."""
    from .preemption import PREEMPTED_EXIT_CODE

    forward = sorted({"SIGTERM", "SIGINT", *preempt_signals})
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        f"--signals-to-handle={','.join(forward)}", f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
        "--module", module, *args,
    ]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    status = Path(tempfile.mkdtemp(prefix="cpt-")) / "exit_code"
    env[EXIT_STATUS_ENV] = str(status)
    proc = subprocess.Popen(cmd, env=env)
    received: list[str] = []

    def relay(signum: int, frame) -> None:
        received.append(signal.Signals(signum).name)
        proc.send_signal(signum)

    previous = {name: signal.signal(getattr(signal, name), relay) for name in forward}
    try:
        rc = proc.wait()
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
    preempted = status.is_file() and status.read_text().strip() == str(PREEMPTED_EXIT_CODE)
    if preempted or any(name in preempt_signals for name in received):
        rc = PREEMPTED_EXIT_CODE
    shutil.rmtree(status.parent, ignore_errors=True)
    return rc
