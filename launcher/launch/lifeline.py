"""Workers die with their launcher.

A worker started by torchrun, the deepspeed launcher, srun or ``cpt run`` must not outlive it: killed outright
(SIGKILL, the OOM killer, a lost node agent), a launcher cannot stop its workers, which torchrun starts in
sessions of their own, and they would go on training, and writing checkpoints, next to the job that replaces
them. So every worker watches the launch processes above it (its parent, and further ancestors that are part of
the launch: ``cpt run``, torchrun, the deepspeed runner) from a thread, which runs even while the training thread
is blocked inside a collective, and exits within about a second once one is gone, without saving: the job is
being torn down by someone else. Unless a preemption signal came first: then the rank is saving a checkpoint that
the next job resumes from, and its own watchdog bounds how long that may take.

``cpt run`` in turn asks the kernel to kill torchrun when it dies (``PR_SET_PDEATHSIG``, Linux).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

POLL_S = 0.5
GONE_EXIT_CODE = 1
_LAUNCH_COMMANDS = ("torch.distributed.run", "torchrun", "deepspeed", "-m launcher", "/cpt ", "launcher.train")


def _is_launch(command: str) -> bool:
    return any(word in f" {command} " for word in _LAUNCH_COMMANDS)


def _start_mark(pid: int) -> tuple[str, float]:
    """When process ``pid`` started, as a mark that tells it from a later process of the same pid: on Linux its start
    in clock ticks since boot (``/proc/<pid>/stat``), which no clock change moves; elsewhere psutil's start time
    (seconds since the epoch: an NTP step of the wall clock moves it). Raises psutil.NoSuchProcess if it is gone."""
    import psutil

    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return "ticks", float(fields[19])  # field 22, starttime (fields[0] is field 3, the state)
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            raise psutil.NoSuchProcess(pid) from None
    except (OSError, IndexError, ValueError):
        pass
    return "time", psutil.Process(pid).create_time()


def _launch_ancestors() -> list[tuple[int, tuple[str, float], str]]:
    """(pid, start mark, command) of the parent, and of the ancestors above it while they are launch processes
    (a user's shell or scheduler above the launch is not watched)."""
    import psutil

    chain: list[tuple[int, tuple[str, float], str]] = []
    proc = psutil.Process(os.getpid()).parent()
    while proc is not None and proc.pid > 1:
        try:
            command, started, parent = " ".join(proc.cmdline()), _start_mark(proc.pid), proc.parent()
        except psutil.Error:
            break
        if chain and not _is_launch(command):
            break
        chain.append((proc.pid, started, command))
        proc = parent
    return chain


def _gone(pid: int, started: tuple[str, float]) -> bool:
    """Whether the process that had ``pid`` and start mark ``started`` has exited (or is a zombie). A pid taken by
    a new process has another start; the wall clock stepping (NTP) does not count as one."""
    import psutil

    try:
        kind, value = _start_mark(pid)
        if kind != started[0] or abs(value - started[1]) > (0 if kind == "ticks" else 1.0):
            return True
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def watch_launcher(rank: int, launcher: str, saving: Callable[[], bool]) -> None:
    """Exit this worker once a launch process above it is gone, unless ``saving()`` (a preemption signal asked
    for a checkpoint). Nothing to watch when no launcher started us or our parent is init already."""
    ancestors = _launch_ancestors()
    if not ancestors:
        return

    def watch() -> None:
        while True:
            for pid, started, command in ancestors:
                if _gone(pid, started):
                    if saving():
                        return
                    name = command.split()[0] if command else "launcher"
                    sys.stderr.write(
                        f"error: rank {rank}: the {launcher} process that started this worker (pid {pid}, "
                        f"{os.path.basename(name)}) is gone; stopping without saving. Running the same command "
                        "again resumes from the newest committed checkpoint.\n"
                    )
                    sys.stderr.flush()
                    logging.shutdown()
                    os._exit(GONE_EXIT_CODE)
            threading.Event().wait(POLL_S)

    threading.Thread(target=watch, daemon=True, name="launcher-lifeline").start()


def die_with_parent() -> None:
    """For a child about to exec (``preexec_fn``): the kernel kills it when the process that started it dies
    (``PR_SET_PDEATHSIG`` with SIGKILL; Linux only, elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
