"""Where am I and who are my peers: torchrun, the deepspeed launcher, Slurm's srun, or nothing at all.

Every launcher ends in the same place: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the
environment, then one ``init_process_group`` and a check that the world is what the launch meant it to be.
When nothing launched us, ``cpt run`` starts the workers itself through torchrun: ``--standalone`` on one
machine, a c10d rendezvous on the first node when Slurm started one ``cpt run`` per node, and ``srun`` first
when ``cpt run`` is typed in an allocation's shell.

Preemption signals (``train.preempt_signals``) go straight to the workers, never through torchrun: Slurm
delivers a job's signals to every process of a step, and torchrun abandons its graceful shutdown when a
second signal arrives, so torchrun is made to ignore them and ``cpt run`` relays them to the workers itself.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
# One line per rank (host, local rank, device) even where the rank's own logging shows warnings only.
rank_log = logging.getLogger(__name__ + ".ranks")
rank_log.setLevel(logging.INFO)

# How long torchrun waits for workers to checkpoint after a preemption signal before it kills them.
SHUTDOWN_TIMEOUT_S = 600
# Where workers started by ``cpt run`` leave their exit code for it.
EXIT_STATUS_ENV = "CPT_EXIT_STATUS_FILE"
# Workers per node; overrides the GPU count and ``parallel.nproc_per_node``.
NPROC_ENV = "CPT_NPROC_PER_NODE"
# Seconds to form the process group and check the world before giving up (default 300). Every collective after
# that waits at most ``parallel.timeout_minutes`` (default 30) for its peers.
INIT_TIMEOUT_ENV = "CPT_INIT_TIMEOUT"
INIT_TIMEOUT_S = 300.0
# Multi-node ``cpt run`` under Slurm: the c10d rendezvous port on the first node and how long every node
# has to join (seconds).
RDZV_PORT_ENV = "CPT_RDZV_PORT"
RDZV_TIMEOUT_ENV = "CPT_RDZV_TIMEOUT"
RDZV_TIMEOUT_S = 300
# ``0`` stops ``cpt run`` in an allocation's shell from starting itself on every node with srun.
SRUN_ENV = "CPT_SRUN"
# Step ids Slurm gives the shell of an allocation (``salloc`` with ``use_interactive_step``).
_INTERACTIVE_STEPS = {"interactive", "4294967290"}
_TORCHRUN_HANDLES = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


class LaunchError(RuntimeError):
    """The workers cannot form the world the launch describes; the message says what differs and where."""


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


# ---------------------------------------------------------------------------------------------------------------
# Slurm


def _expand_counts(spec: str) -> list[int]:
    """Slurm's compressed per-node counts: ``2(x3),1`` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m:
            out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _in_step(env: dict[str, str]) -> bool:
    """Inside a job step started by srun (not the batch script or an allocation's shell)."""
    return env.get("SLURM_STEP_ID", "") not in ("", *_INTERACTIVE_STEPS)


def _step_counts(env: dict[str, str]) -> tuple[int, int]:
    """(tasks, nodes) of the current step."""
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    return tasks, nodes


def _one_task_per_node(env: dict[str, str]) -> bool:
    """A step with one task on each of its nodes: each task is a node's launcher, not a worker."""
    if not _in_step(env) or "SLURM_PROCID" not in env:
        return False
    tasks, nodes = _step_counts(env)
    return tasks == nodes


def _hostnames(nodelist: str) -> list[str]:
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


def _job_port(env: dict[str, str]) -> int:
    """A port for this job's rendezvous: the same on every node, different for jobs sharing a node."""
    return 20000 + int(env.get("SLURM_JOB_ID") or 0) % 10000


def _slurm_env(env: dict[str, str]) -> dict[str, str]:
    """torch.distributed variables for ``srun`` with one task per worker (GPU or CPU process)."""
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
    head = (_hostnames(nodes) or ["localhost"])[0]
    per_node = _expand_counts(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1")
    node_id = int(env.get("SLURM_NODEID") or 0)
    tasks, _ = _step_counts(env)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(per_node[node_id] if node_id < len(per_node) else per_node[0] if per_node else 1),
        "MASTER_ADDR": env.get("MASTER_ADDR") or node_address(head),
        "MASTER_PORT": env.get("MASTER_PORT") or str(_job_port(env)),
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
    if _worker_launcher(env) == "slurm" and not _one_task_per_node(env):
        return "slurm"
    return None


def _worker_launcher(env: dict[str, str]) -> str | None:
    """As :func:`detect_launcher`, for a process that is a worker (``launcher.train``): every task of a
    multi-task srun step is one."""
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env):
        return detect_launcher(env)
    if _in_step(env) and "SLURM_PROCID" in env and _step_counts(env)[0] > 1:
        return "slurm"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Process group and the world check


def use_cpu_accelerator_if_no_gpu() -> None:
    """DeepSpeed picks its accelerator at import; without CUDA it must be told to use the CPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _node_key(env: dict[str, str]) -> str:
    """Which node a rank is on: Slurm's node name or the host name, told apart per node launcher (two torchrun
    agents on one host are two nodes of the world)."""
    key = env.get("SLURMD_NODENAME") or socket.gethostname()
    group = env.get("GROUP_RANK") if "TORCHELASTIC_RUN_ID" in env else env.get("CROSS_RANK")
    return f"{key}#{group}" if group is not None else key


def _expected_nodes(env: dict[str, str], launcher: str) -> int | None:
    """How many nodes the launcher says the world spans, where it says so."""
    value = {
        "torchrun": env.get("GROUP_WORLD_SIZE"),
        "deepspeed": env.get("CROSS_SIZE"),
        "slurm": env.get("SLURM_STEP_NUM_NODES"),
    }.get(launcher)
    return int(value) if value else None


def _labels(keys: Sequence[str]) -> dict[str, str]:
    """Display names for node keys: the node name, with the launcher's node rank where names repeat."""
    names = [k.split("#")[0] for k in keys]
    return {k: (k.replace("#", " agent ") if names.count(n) > 1 else n) for k, n in zip(keys, names)}


def check_world(records: list[dict[str, Any]]) -> list[str]:
    """Problems with the world layout gathered from every rank (empty when it is consistent).

    Each record: rank, node, host, local_rank, local_world (None: not given), gpus (CUDA devices visible),
    gpu_id (the GPU's UUID, None on CPU), device, expected_nodes (None: not given)."""
    problems: list[str] = []
    nodes: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        nodes.setdefault(r["node"], []).append(r)
    label = _labels(list(nodes))
    for node, members in nodes.items():
        where = f"node {label[node]} (host {members[0]['host']})"
        said = sorted({m["local_world"] for m in members if m["local_world"] is not None})
        local_ranks = sorted(m["local_rank"] for m in members)
        if (said and said != [len(members)]) or local_ranks != list(range(len(members))):
            problems.append(
                f"{where} runs ranks {[m['rank'] for m in members]} with local ranks {local_ranks}"
                + (f", but they say LOCAL_WORLD_SIZE={'/'.join(map(str, said))}" if said else "")
            )
        gpus = sorted({m["gpus"] for m in members})
        if len(gpus) > 1:
            problems.append(f"{where}: ranks see different numbers of GPUs ({gpus})")
        users: dict[str, list[int]] = {}
        for m in members:
            if m.get("gpu_id"):
                users.setdefault(m["gpu_id"], []).append(m["rank"])
        for gpu, ranks in users.items():
            if len(ranks) > 1:
                problems.append(f"{where}: ranks {ranks} share one GPU ({gpu}); start one worker per GPU")
    per_node = {n: len(m) for n, m in nodes.items()}
    if len(set(per_node.values())) > 1:
        problems.append(
            "nodes run different numbers of workers: "
            + ", ".join(f"{label[n]}={c}" for n, c in sorted(per_node.items()))
        )
    gpu_counts = {n: m[0]["gpus"] for n, m in nodes.items()}
    if len(set(gpu_counts.values())) > 1:
        problems.append(
            "nodes have different numbers of GPUs: "
            + ", ".join(f"{label[n]}={c}" for n, c in sorted(gpu_counts.items()))
        )
    expected = sorted({r["expected_nodes"] for r in records if r["expected_nodes"] is not None})
    if len(expected) > 1:
        problems.append(f"ranks disagree on the number of nodes: {expected}")
    elif expected and expected[0] != len(nodes):
        problems.append(f"the launcher started {expected[0]} node(s) but ranks came from {len(nodes)}: {sorted(nodes)}")
    return problems


def describe_world(records: list[dict[str, Any]], backend: str, launcher: str) -> str:
    nodes: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        nodes.setdefault(r["node"], []).append(r)
    per_node = sorted({len(m) for m in nodes.values()})
    label = _labels(list(nodes))
    ranks = f"{len(records)} rank" + ("s" if len(records) != 1 else "")
    lines = [
        f"world: {len(nodes)} node(s) x {'/'.join(map(str, per_node))} worker(s) = {ranks} ({launcher}, {backend})"
    ]
    for node, members in nodes.items():
        members = sorted(members, key=lambda m: m["rank"])
        lines.append(
            f"  {label[node]} ({members[0]['host']}): ranks " + ", ".join(f"{m['rank']}:{m['device']}" for m in members)
        )
    return "\n".join(lines)


def _init_timeout(env: dict[str, str]) -> float:
    value = env.get(INIT_TIMEOUT_ENV, "").strip()
    if not value:
        return INIT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise LaunchError(f"{INIT_TIMEOUT_ENV}={value!r}: expected a positive number of seconds")
    return seconds


def set_collective_timeout(minutes: float) -> None:
    """How long every collective waits for its peers from now on: the world's, and that of every group created
    later (DeepSpeed's and FSDP's own groups would otherwise get torch's default of 30 or 10 minutes)."""
    timeout = datetime.timedelta(minutes=minutes)
    c10d = dist.distributed_c10d
    c10d._set_pg_timeout(timeout)
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout


_C10D_FILE = os.path.join("torch", "distributed", "distributed_c10d.py")
_FUNCOL_FILE = os.path.join("torch", "distributed", "_functional_collectives.py")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_PEER_TROUBLE = r"time[sd]? ?out|connection|closed|reset by peer|broken pipe|/gloo/|nccl"


def describe_collective_failure(error: BaseException, timeout_minutes: float) -> str | None:
    """A message for a collective that failed because a peer stopped answering (it hangs, was stopped or died):
    which collective, called from where, and why. None when ``error`` did not come from a collective."""
    import traceback

    text = str(error)
    if not isinstance(error, RuntimeError) or not (
        isinstance(error, dist.DistError) or re.search(_PEER_TROUBLE, text, re.IGNORECASE)
    ):
        return None
    frames = traceback.extract_tb(error.__traceback__)
    # The outermost torch.distributed call is the collective the caller asked for (broadcast_object_list, not the
    # broadcast inside it).
    at = next((i for i, f in enumerate(frames) if f.filename.endswith(_C10D_FILE)), None)
    funcol = next((i for i, f in enumerate(frames) if f.filename.endswith(_FUNCOL_FILE)), None)
    if at is None and funcol is not None:
        # DTensor collectives (a gradient norm, full_tensor) are issued and waited deep inside torch: name the
        # public torch function that our code called.
        ours_at = max((i for i, f in enumerate(frames[:funcol]) if f.filename.startswith(_PACKAGE_DIR + os.sep)),
                      default=-1)  # fmt: skip
        at = next((i for i in range(ours_at + 1, funcol) if not frames[i].name.startswith("_")), funcol)
    if at is None and not isinstance(error, dist.DistError) and "/gloo/" not in text:
        return None
    what = f"collective {frames[at].name}" if at is not None else "a collective"
    callers = frames[:at]
    ours = next((f for f in reversed(callers) if f.filename.startswith(_PACKAGE_DIR + os.sep)), None)
    library = next((f for f in reversed(callers) if f"{os.sep}site-packages{os.sep}" in f.filename
                    and f"{os.sep}torch{os.sep}" not in f.filename), None)  # fmt: skip
    if ours is not None:
        what += f" in {_short(ours.filename)}:{ours.lineno} ({ours.name})"
    if library is not None and (ours is None or callers.index(library) > callers.index(ours)):
        what += f", via {_short(library.filename)}:{library.lineno} ({library.name})"
    detail = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    detail = re.sub(r"^\[[^\]]*:\d+\]\s*", "", detail)  # the C++ source position gloo puts first
    setting = f"parallel.timeout_minutes={timeout_minutes:g}"
    if re.search(r"time[sd]? ?out", detail, re.IGNORECASE):
        why = (
            f"timed out after {timeout_minutes * 60:g} s ({setting}): a peer rank stopped answering (it hangs, was "
            "stopped, or died without closing its connections)"
        )
    else:
        why = f"failed: a peer rank went away (it exited or died); collectives wait up to {setting} for peers"
    return f"{what} {why}: {detail}"


def _short(filename: str) -> str:
    """A source path from its package directory on: ``launcher/loop.py``, ``deepspeed/runtime/engine.py``."""
    parts = filename.split(os.sep)
    if filename.startswith(_PACKAGE_DIR + os.sep):
        return os.path.relpath(filename, os.path.dirname(_PACKAGE_DIR))
    if "site-packages" in parts:
        return os.sep.join(parts[len(parts) - parts[::-1].index("site-packages") :])
    return filename


_applied: list[str | None] = []  # what apply_launcher_env found, once per process


def apply_launcher_env() -> str | None:
    """Put RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment of a
    worker whatever launched it (Slurm's srun sets only its own variables; nothing at all: a world of one) and
    return the launcher's name (None: nothing). Once per process; a worker may call it before it reads RANK."""
    if _applied:
        return _applied[0]
    env = dict(os.environ)
    launcher = _worker_launcher(env)
    if launcher == "slurm":
        os.environ.update(_slurm_env(env))
    if launcher is None:
        os.environ.update(
            {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        )
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    _applied.append(launcher)
    return launcher


def init_distributed(timeout_minutes: float) -> DistInfo:
    """Create the process group from the launcher's environment (a world of one when there is none), then check
    that every rank agrees on the layout. Raises LaunchError, naming what differs, instead of hanging.

    Forming the group and the check wait at most ``CPT_INIT_TIMEOUT`` seconds (default 300) for every rank to
    arrive; after that every collective waits at most ``timeout_minutes`` for its peers."""
    launcher = apply_launcher_env()
    env = dict(os.environ)
    rank = int(env["RANK"])
    world = int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", "0"))
    said = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE")  # LOCAL_SIZE: the deepspeed launcher's name
    host = socket.gethostname()
    name = launcher or "none"
    if launcher == "slurm" and _one_task_per_node(env) and torch.cuda.device_count() > 1:
        log.warning(
            "srun started one task per node but %d GPUs are visible: only one is used per node; use "
            "`srun cpt run ...` (one task per node) or one task per GPU",
            torch.cuda.device_count(),
        )
    master = env.get("MASTER_ADDR", "")
    if world > 1 and not resolves(master):
        raise LaunchError(
            f"rank {rank} on {host}: the rendezvous host MASTER_ADDR={master!r} does not resolve here ({name}); "
            "set MASTER_ADDR to an address every node can reach"
        )
    gpu_id: str | None = None
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        # One GPU visible per task (srun --gpus-per-task=1) is cuda:0 for every local rank.
        device = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
        with contextlib.suppress(Exception):
            gpu_id = str(torch.cuda.get_device_properties(device).uuid)
    else:
        gpus = 0
        device = torch.device("cpu")
        backend = "gloo"
    rank_log.info("rank %d/%d on %s local_rank %d device %s (%s)", rank, world, host, local_rank, device, name)
    record = {
        "rank": rank,
        "node": _node_key(env),
        "host": host,
        "local_rank": local_rank,
        "local_world": int(said) if said else None,
        "gpus": gpus,
        "gpu_id": gpu_id,
        "device": str(device),
        "expected_nodes": _expected_nodes(env, name),
    }
    records: list[Any] = [record]
    if not dist.is_initialized():
        init_s = _init_timeout(env)
        where = f"{master}:{env.get('MASTER_PORT')}"
        try:
            dist.init_process_group(
                backend=backend,
                timeout=datetime.timedelta(seconds=init_s),
                device_id=device if device.type == "cuda" else None,
            )
        except Exception as e:  # the store and the backends raise many types; all mean the same here
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise LaunchError(
                f"rank {rank} on {host}: could not form the process group of {world} ranks through {where} "
                f"within {init_s:.0f} s ({name}): {type(e).__name__}: {first}. Check that every node started, "
                f"that {master} is reachable from {host} and that the port is free ({INIT_TIMEOUT_ENV} sets "
                "this wait)"
            ) from e
        records = [None] * world
        try:
            dist.all_gather_object(records, record)
        except Exception as e:
            raise LaunchError(f"rank {rank} on {host}: the world check across {world} ranks failed: {e}") from e
        problems = check_world(records)
        if problems:
            raise LaunchError(
                f"the {world} ranks do not form a consistent world ({name}):\n  "
                + "\n  ".join(problems)
                + "\n"
                + describe_world(records, backend, name)
            )
        if rank == 0:
            log.info("%s", describe_world(records, backend, name))
        set_collective_timeout(timeout_minutes)
    local_world = int(said) if said else sum(r["node"] == record["node"] for r in records)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return DistInfo(rank, world, local_rank, local_world, device, name)


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
    """Workers per node: ``CPT_NPROC_PER_NODE`` when set; else one per GPU (``parallel.nproc_per_node`` of
    them when given); without GPUs, ``parallel.nproc_per_node`` CPU workers (default 1)."""
    if os.environ.get(NPROC_ENV):
        return int(os.environ[NPROC_ENV])
    if torch.cuda.is_available():
        return nproc_per_node or torch.cuda.device_count()
    return nproc_per_node or 1


# ---------------------------------------------------------------------------------------------------------------
# Starting workers: cpt run


def _torchrun_options() -> set[str]:
    """The command-line options this torch's torchrun knows (signal forwarding and the shutdown timeout are
    recent additions)."""
    from torch.distributed.run import get_args_parser

    return set(get_args_parser()._option_string_actions)


def rendezvous_args(env: dict[str, str] | None = None) -> list[str]:
    """torchrun's rendezvous for this node: a c10d rendezvous hosted by the first node of the step when Slurm
    started one ``cpt run`` on each of several nodes; ``--standalone`` otherwise."""
    env = dict(os.environ if env is None else env)
    tasks, nodes = _step_counts(env)
    if not (_one_task_per_node(env) and nodes > 1):
        return ["--standalone"]
    head = _hostnames(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])[0]
    here = env.get("SLURMD_NODENAME")
    is_host = here == head if here else env.get("SLURM_NODEID", "0") == "0"
    port = env.get(RDZV_PORT_ENV) or str(_job_port(env))
    join = env.get(RDZV_TIMEOUT_ENV) or str(RDZV_TIMEOUT_S)
    return [
        f"--nnodes={nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={node_address(head)}:{port}",
        f"--rdzv-id=cpt-{env.get('SLURM_JOB_ID', '0')}.{env.get('SLURM_STEP_ID', '0')}",
        f"--rdzv-conf=is_host={int(is_host)},join_timeout={join}",
    ]  # fmt: skip


def _srun_command(env: dict[str, str]) -> list[str] | None:
    """In an allocation's shell (``salloc``, or a batch script) that spans several nodes or is not on one of
    them: the same ``cpt`` command once per node through srun. None where ``cpt run`` should start the
    workers right here."""
    if "SLURM_JOB_ID" not in env or _in_step(env) or env.get(SRUN_ENV, "1") == "0" or not shutil.which("srun"):
        return None
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    if nodes == 1 and "SLURMD_NODENAME" in env:
        return None
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if not (Path(sys.argv[0]).name == "cpt" or (spec is not None and spec.name in ("launcher", "launcher.__main__"))):
        return None  # not the cpt command line: nothing to start again on each node
    cmd = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=0"]
    cpus = _expand_counts(env.get("SLURM_JOB_CPUS_PER_NODE", ""))
    if cpus:
        cmd.append(f"--cpus-per-task={min(cpus)}")
    if env.get("SLURM_GPUS_PER_NODE"):
        cmd.append(f"--gpus-per-node={env['SLURM_GPUS_PER_NODE']}")
    return [*cmd, sys.executable, "-m", "launcher", *sys.argv[1:]]


def _ignore(names: Sequence[str]):
    def preexec() -> None:
        for name in names:
            signal.signal(getattr(signal, name), signal.SIG_IGN)

    return preexec


def spawn_workers(module: str, args: list[str], nproc: int, preempt_signals: Sequence[str] = ()) -> int:
    """Run ``python -m module args`` in ``nproc`` workers on this node through torchrun; its exit code.

    Multi-node under Slurm: one such call per node (``srun cpt run ...``) joins a c10d rendezvous on the step's
    first node; in an allocation's shell this call first starts itself on every node with srun.

    Preemption signals sent to this process go to the workers, which finish their step and checkpoint; torchrun
    ignores them (Slurm signals every process of a step, and a second signal makes torchrun give up waiting for
    the checkpoint). torchrun reports any non-zero worker exit as 1, so the workers leave their exit code in a
    file and a preempted run exits here with the requeue code, whoever received the signal."""
    from .preemption import PREEMPTED_EXIT_CODE

    preempt = sorted(set(preempt_signals))
    srun = _srun_command(dict(os.environ))
    if srun is not None:
        log.warning("in Slurm allocation %s: starting `cpt` on each of its nodes: %s", os.environ["SLURM_JOB_ID"],
                    " ".join(srun))  # fmt: skip
        return _run_relaying(srun, dict(os.environ), sorted({"SIGTERM", "SIGINT", *preempt}), preempt, None)

    options = _torchrun_options()
    cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous_args(), f"--nproc-per-node={nproc}"]
    handles = [s for s in _TORCHRUN_HANDLES if s not in preempt]
    if "--signals-to-handle" in options:
        cmd.append(f"--signals-to-handle={','.join(handles)}")
    if "--shutdown-timeout" in options:
        cmd.append(f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}")
    cmd += ["--module", module, *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    status = Path(tempfile.mkdtemp(prefix="cpt-")) / "exit_code"
    env[EXIT_STATUS_ENV] = str(status)
    try:
        rc = _run_relaying(cmd, env, sorted({"SIGTERM", "SIGINT", *preempt}), preempt, _ignore(preempt))
        if status.is_file() and status.read_text().strip() == str(PREEMPTED_EXIT_CODE):
            rc = PREEMPTED_EXIT_CODE
    finally:
        shutil.rmtree(status.parent, ignore_errors=True)
    return rc


def _run_relaying(cmd: list[str], env: dict[str, str], relay: list[str], preempt: list[str], preexec) -> int:
    """Run ``cmd``, passing the ``relay`` signals on: preemption signals to the workers under it (or to it, for
    srun, which passes them to every task), the rest to it. The requeue code when a preemption signal came."""
    from .preemption import PREEMPTED_EXIT_CODE

    proc = subprocess.Popen(cmd, env=env, preexec_fn=preexec)
    received: list[str] = []

    def targets(signum: int) -> list[tuple[int, int]]:
        """(pid, signal) pairs to send."""
        if signal.Signals(signum).name not in preempt or preexec is None:
            return [(proc.pid, signum)]
        try:
            import psutil  # a dependency of deepspeed

            workers = [c.pid for c in psutil.Process(proc.pid).children()]
        except Exception:
            workers = []
        # No workers yet (torchrun is still at the rendezvous): nothing to checkpoint, so stop torchrun.
        return [(pid, signum) for pid in workers] or [(proc.pid, signal.SIGINT)]

    def handler(signum: int, frame) -> None:
        received.append(signal.Signals(signum).name)
        for pid, sig in targets(signum):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    previous = {name: signal.signal(getattr(signal, name), handler) for name in relay}
    try:
        rc = proc.wait()
    finally:
        for name, old in previous.items():
            signal.signal(getattr(signal, name), old)
    if any(name in preempt for name in received) and rc != 0:
        rc = PREEMPTED_EXIT_CODE
    return rc
