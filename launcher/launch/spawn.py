"""``cpt run`` starting the workers itself, when nothing else did: through torchrun, ``--standalone`` on one
machine, a c10d rendezvous on the first node when Slurm started one ``cpt run`` per node, and ``srun`` first
when ``cpt run`` is typed in an allocation's shell.

Preemption signals (``train.preempt_signals``) go straight to the workers, never through torchrun: Slurm
delivers a job's signals to every process of a step, and torchrun abandons its graceful shutdown when a
second signal arrives, so torchrun is made to ignore them and ``cpt run`` relays them to the workers itself.
torchrun reports any failed worker as exit code 1, so the workers leave their own exit code in a file
(:func:`leave_exit_status`) for ``cpt run`` to return.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..preemption import PREEMPTED_EXIT_CODE
from .env import expand_counts, hostnames, in_step, job_port, node_address, one_task_per_node, step_counts
from .lifeline import die_with_parent

log = logging.getLogger(__package__)

# How long torchrun waits for workers to checkpoint after a preemption signal before it kills them.
SHUTDOWN_TIMEOUT_S = 600
# Where workers started by ``cpt run`` leave their exit code for it.
EXIT_STATUS_ENV = "CPT_EXIT_STATUS_FILE"
# Workers per node; overrides the GPU count and ``parallel.nproc_per_node``.
NPROC_ENV = "CPT_NPROC_PER_NODE"
# Multi-node ``cpt run`` under Slurm: the c10d rendezvous port on the first node and how long every node
# has to join (seconds).
RDZV_PORT_ENV = "CPT_RDZV_PORT"
RDZV_TIMEOUT_ENV = "CPT_RDZV_TIMEOUT"
RDZV_TIMEOUT_S = 300
# ``0`` stops ``cpt run`` in an allocation's shell from starting itself on every node with srun.
SRUN_ENV = "CPT_SRUN"
_TORCHRUN_HANDLES = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


def default_nproc(nproc_per_node: int | None) -> int:
    """Workers per node: ``CPT_NPROC_PER_NODE`` when set; else one per GPU (``parallel.nproc_per_node`` of
    them when given); without GPUs, ``parallel.nproc_per_node`` CPU workers (default 1)."""
    if os.environ.get(NPROC_ENV):
        return int(os.environ[NPROC_ENV])
    if torch.cuda.is_available():
        return nproc_per_node or torch.cuda.device_count()
    return nproc_per_node or 1


def leave_exit_status(code: int) -> None:
    """A worker's exit code for the ``cpt run`` that started it (nothing when something else did). Call it before
    the process group is torn down, so that ``cpt run`` never sees the workers gone and the file not yet there."""
    path = os.environ.get(EXIT_STATUS_ENV)
    if path:
        Path(path).write_text(str(code))


def _torchrun_options(candidates: Sequence[str]) -> set[str]:
    """Which of ``candidates`` (``--option=value``) this torch's torchrun knows: signal forwarding and the shutdown
    timeout are recent additions."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.allow_abbrev = False  # an option that is missing must not pass as the prefix of a longer one
    _, unknown = parser.parse_known_args([*candidates, "script.py"])
    return {c.split("=")[0] for c in candidates if c not in unknown}


def rendezvous_args(env: dict[str, str] | None = None) -> list[str]:
    """torchrun's rendezvous for this node: a c10d rendezvous hosted by the first node of the step when Slurm
    started one ``cpt run`` on each of several nodes; ``--standalone`` otherwise."""
    env = dict(os.environ if env is None else env)
    tasks, nodes = step_counts(env)
    if not (one_task_per_node(env) and nodes > 1):
        return ["--standalone"]
    head = hostnames(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])[0]
    here = env.get("SLURMD_NODENAME")
    is_host = here == head if here else env.get("SLURM_NODEID", "0") == "0"
    port = env.get(RDZV_PORT_ENV) or str(job_port(env))
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
    if "SLURM_JOB_ID" not in env or in_step(env) or env.get(SRUN_ENV, "1") == "0" or not shutil.which("srun"):
        return None
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    if nodes == 1 and "SLURMD_NODENAME" in env:
        return None
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if not (Path(sys.argv[0]).name == "cpt" or (spec is not None and spec.name in ("launcher", "launcher.__main__"))):
        return None  # not the cpt command line: nothing to start again on each node
    cmd = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=0"]
    cpus = expand_counts(env.get("SLURM_JOB_CPUS_PER_NODE", ""))
    if cpus:
        cmd.append(f"--cpus-per-task={min(cpus)}")
    if env.get("SLURM_GPUS_PER_NODE"):
        cmd.append(f"--gpus-per-node={env['SLURM_GPUS_PER_NODE']}")
    return [*cmd, sys.executable, "-m", "launcher", *sys.argv[1:]]


def _torchrun_preexec(ignored: Sequence[str]) -> Callable[[], None]:
    """torchrun ignores the preemption signals (they are relayed to the workers) and dies with ``cpt run``."""

    def preexec() -> None:
        die_with_parent()
        for name in ignored:
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
    preempt = sorted(set(preempt_signals))
    srun = _srun_command(dict(os.environ))
    if srun is not None:
        log.warning("in Slurm allocation %s: starting `cpt` on each of its nodes: %s", os.environ["SLURM_JOB_ID"],
                    " ".join(srun))  # fmt: skip
        return _run_relaying(srun, dict(os.environ), sorted({"SIGTERM", "SIGINT", *preempt}), preempt, None)

    handles = [s for s in _TORCHRUN_HANDLES if s not in preempt]
    optional = [f"--signals-to-handle={','.join(handles)}", f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}"]
    known = _torchrun_options(optional)
    cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous_args(), f"--nproc-per-node={nproc}"]
    cmd += [option for option in optional if option.split("=")[0] in known]
    cmd += ["--module", module, *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    status = Path(tempfile.mkdtemp(prefix="cpt-")) / "exit_code"
    env[EXIT_STATUS_ENV] = str(status)
    try:
        rc = _run_relaying(cmd, env, sorted({"SIGTERM", "SIGINT", *preempt}), preempt, _torchrun_preexec(preempt))
        if status.is_file() and status.read_text().strip() == str(PREEMPTED_EXIT_CODE):
            rc = PREEMPTED_EXIT_CODE
    finally:
        shutil.rmtree(status.parent, ignore_errors=True)
    return rc


def _run_relaying(
    cmd: list[str], env: dict[str, str], relay: list[str], preempt: list[str], preexec: Callable[[], None] | None
) -> int:
    """Run ``cmd``, passing the ``relay`` signals on: preemption signals to the workers under it (or to it, for
    srun, which passes them to every task), the rest to it. The requeue code when a preemption signal came."""
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
