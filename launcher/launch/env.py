"""Which launcher started this process, and what its environment says: torchrun, the deepspeed launcher, Slurm's
srun, or nothing at all.

Every launcher names the world differently (torchrun's GROUP_RANK, deepspeed's CROSS_RANK, Slurm's SLURM_PROCID
and compressed node lists); this module reads them all, and for a worker started by srun or by nothing puts
torch.distributed's own variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) in the environment.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess

import torch

# Step ids Slurm gives the shell of an allocation (``salloc`` with ``use_interactive_step``).
_INTERACTIVE_STEPS = {"interactive", "4294967290"}


def expand_counts(spec: str) -> list[int]:
    """Slurm's compressed per-node counts: ``2(x3),1`` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m:
            out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def in_step(env: dict[str, str]) -> bool:
    """Inside a job step started by srun (not the batch script or an allocation's shell)."""
    return env.get("SLURM_STEP_ID", "") not in ("", *_INTERACTIVE_STEPS)


def step_counts(env: dict[str, str]) -> tuple[int, int]:
    """(tasks, nodes) of the current step."""
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    return tasks, nodes


def one_task_per_node(env: dict[str, str]) -> bool:
    """A step with one task on each of its nodes: each task is a node's launcher, not a worker."""
    if not in_step(env) or "SLURM_PROCID" not in env:
        return False
    tasks, nodes = step_counts(env)
    return tasks == nodes


def hostnames(nodelist: str) -> list[str]:
    """Expand a Slurm node list (``node[01-04],gpu7``) with scontrol; a simple expansion without it."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True, timeout=30
        ).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"(.*)\[([^\]]*)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        for rng in m.group(2).split(","):
            lo, _, hi = rng.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{m.group(1)}{i:0{len(lo)}d}{m.group(3)}")
    return hosts


def resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except (OSError, UnicodeError):
        return False


def node_address(node: str) -> str:
    """An address for a Slurm node: its name when that resolves, else the NodeAddr Slurm reaches it by."""
    if resolves(node):
        return node
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", "-o", node], check=True, capture_output=True, text=True, timeout=30
        ).stdout
        m = re.search(r"\bNodeAddr=(\S+)", out)
        if m and m.group(1) not in ("", "(null)"):
            return m.group(1)
    except (OSError, subprocess.SubprocessError):
        pass
    return node


def job_port(env: dict[str, str]) -> int:
    """A port for this job's rendezvous: the same on every node, different for jobs sharing a node."""
    return 20000 + int(env.get("SLURM_JOB_ID") or 0) % 10000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(env: dict[str, str]) -> dict[str, str]:
    """torch.distributed variables for ``srun`` with one task per worker (GPU or CPU process)."""
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
    head = (hostnames(nodes) or ["localhost"])[0]
    per_node = expand_counts(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1")
    node_id = int(env.get("SLURM_NODEID") or 0)
    tasks, _ = step_counts(env)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(per_node[node_id] if node_id < len(per_node) else per_node[0] if per_node else 1),
        "MASTER_ADDR": env.get("MASTER_ADDR") or node_address(head),
        "MASTER_PORT": env.get("MASTER_PORT") or str(job_port(env)),
    }


def detect_launcher(env: dict[str, str] | None = None) -> str | None:
    """Name of whatever started this process as one of several workers; None when nothing did and ``cpt run``
    starts the workers itself. A Slurm step with one task per node counts as nothing: the task is that node's
    ``cpt run``, which starts the node's workers (one per GPU)."""
    env = dict(os.environ if env is None else env)
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "RANK" in env and "WORLD_SIZE" in env:
        # The deepspeed launcher sets these (and passes --local_rank); so do accelerate and mpirun wrappers.
        return "deepspeed" if "CROSS_RANK" in env or "DS_LAUNCHER" in env else "env"
    if worker_launcher(env) == "slurm" and not one_task_per_node(env):
        return "slurm"
    return None


def worker_launcher(env: dict[str, str]) -> str | None:
    """As :func:`detect_launcher`, for a process that is a worker (``launcher.train``): every task of a
    multi-task srun step is one."""
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env):
        return detect_launcher(env)
    if in_step(env) and "SLURM_PROCID" in env and step_counts(env)[0] > 1:
        return "slurm"
    return None


_applied: list[str | None] = []  # what apply_launcher_env found, once per process


def apply_launcher_env() -> str | None:
    """Put RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment of a
    worker whatever launched it (Slurm's srun sets only its own variables; nothing at all: a world of one) and
    return the launcher's name (None: nothing). Once per process; a worker may call it before it reads RANK."""
    if _applied:
        return _applied[0]
    env = dict(os.environ)
    launcher = worker_launcher(env)
    if launcher == "slurm":
        os.environ.update(slurm_env(env))
    if launcher is None:
        os.environ.update(
            {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        )
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    _applied.append(launcher)
    return launcher


def node_key(env: dict[str, str]) -> str:
    """Which node a rank is on: Slurm's node name or the host name, told apart per node launcher (two torchrun
    agents on one host are two nodes of the world)."""
    key = env.get("SLURMD_NODENAME") or socket.gethostname()
    group = env.get("GROUP_RANK") if "TORCHELASTIC_RUN_ID" in env else env.get("CROSS_RANK")
    return f"{key}#{group}" if group is not None else key


def expected_nodes(env: dict[str, str], launcher: str) -> int | None:
    """How many nodes the launcher says the world spans, where it says so."""
    value = {
        "torchrun": env.get("GROUP_WORLD_SIZE"),
        "deepspeed": env.get("CROSS_SIZE"),
        "slurm": env.get("SLURM_STEP_NUM_NODES"),
    }.get(launcher)
    return int(value) if value else None


def use_cpu_accelerator_if_no_gpu() -> None:
    """DeepSpeed picks its accelerator at import; without CUDA it must be told to use the CPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
