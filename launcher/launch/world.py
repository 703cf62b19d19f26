"""The process group and the check that the world is what the launch meant it to be.

Every launcher ends in the same place: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the
environment (see ``env``), then one ``init_process_group`` and a gather of every rank's node, local rank and GPU.
A launch that went wrong (two ranks on one GPU, a node missing, local ranks that collide) stops here with a
:class:`LaunchError` naming the difference, instead of hanging in the first collective of training.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..compat import set_collective_timeout
from .env import apply_launcher_env, expected_nodes, node_key, one_task_per_node, resolves

# The package's loggers, whichever of its modules speaks: ``launcher.launch`` and ``launcher.launch.ranks``.
log = logging.getLogger(__package__)
# One line per rank (host, local rank, device) even where the rank's own logging shows warnings only.
rank_log = logging.getLogger(f"{__package__}.ranks")
rank_log.setLevel(logging.INFO)

# Seconds to form the process group and check the world before giving up (default 300). Every collective after
# that waits at most ``parallel.timeout_minutes`` (default 30) for its peers.
INIT_TIMEOUT_ENV = "CPT_INIT_TIMEOUT"
INIT_TIMEOUT_S = 300.0


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
    if launcher == "slurm" and one_task_per_node(env) and torch.cuda.device_count() > 1:
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
        "node": node_key(env),
        "host": host,
        "local_rank": local_rank,
        "local_world": int(said) if said else None,
        "gpus": gpus,
        "gpu_id": gpu_id,
        "device": str(device),
        "expected_nodes": expected_nodes(env, name),
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
        set_collective_timeout(datetime.timedelta(minutes=timeout_minutes))
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
