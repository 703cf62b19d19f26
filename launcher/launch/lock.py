"""One live job per ``output_dir``: two jobs writing and pruning the same checkpoints would lose them.

The job that starts first takes the lock: an OS lock (``flock``) on ``output_dir/.cpt-lock``, held for the life of
the process that took it and released by the kernel however it ends, and a record of who holds it in
``output_dir/.cpt-owner.json`` (host, pid, Slurm job id, since when) with a heartbeat refreshed every
``HEARTBEAT_S``. A second job on the same ``output_dir`` is refused before it touches anything, naming the owner.

A lock whose owner is gone is taken over with a warning: on this host the OS lock is free and the recorded
process is dead; from another host (where a shared filesystem may not carry the OS lock) the heartbeat is older
than ``STALE_AFTER_S``. The processes of one job share a token: ``cpt run`` passes its own to the workers it
starts, and every process of a Slurm job (a requeued one included) uses the job id, so a job never refuses itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import atomic_write

log = logging.getLogger(__name__)

LOCK_FILE = ".cpt-lock"
OWNER_FILE = ".cpt-owner.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 4 * HEARTBEAT_S
RECORD_WAIT_S = 5.0
DYING_WAIT_S = 30.0
"""How long a new job waits for the processes of one whose owner is gone to end (they stop within seconds)."""
TOKEN_ENV = "CPT_RUN_TOKEN"
"""Set by ``cpt run`` for the workers it starts: they belong to the job that holds the lock."""


class LockHeld(RuntimeError):
    """Another live job holds ``output_dir``; the message names it and says what to do."""


@dataclass
class Owner:
    host: str
    pid: int
    token: str
    since: float
    heartbeat: float
    job_id: str | None = None
    pid_started: float | None = None

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        who = f"Slurm job {self.job_id}, " if self.job_id else ""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"{who}pid {self.pid} on {self.host}, since {started} (last heartbeat {now - self.heartbeat:.0f} s ago)"


def job_token(env: dict[str, str] | None = None) -> str:
    """What identifies this job across its processes: the token ``cpt run`` passed down, the Slurm job id (the
    same after a requeue), torchrun's run id, or a new one."""
    env = dict(os.environ if env is None else env)
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV]
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}"
    if env.get("TORCHELASTIC_RUN_ID") and env["TORCHELASTIC_RUN_ID"] != "none":
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    return uuid.uuid4().hex


def _process_started(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


def _alive_here(owner: Owner) -> bool:
    """Whether the recorded process still runs on this host (the same process: its start time matches)."""
    started = _process_started(owner.pid)
    if started is None:
        return False
    return owner.pid_started is None or abs(started - owner.pid_started) < 1.0


def _try_flock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return False


def read_owner(output_dir: str | Path) -> Owner | None:
    try:
        data = json.loads((Path(output_dir) / OWNER_FILE).read_text())
        return Owner(**data)
    except (OSError, ValueError, TypeError):
        return None


class RunLock:
    """The lock on one ``output_dir`` for the job ``token``. :meth:`acquire` either takes it, finds it already
    held by this same job (an ancestor process took it), or raises :class:`LockHeld`."""

    def __init__(self, output_dir: str | Path, token: str):
        self.dir = Path(output_dir)
        self.token = token
        self.held = False
        self._fd: int | None = None
        self._stop = threading.Event()

    def acquire(self) -> bool:
        """True when this process now owns the lock; False when another process of the same job owns it, and
        this one shares it. Either way the OS lock stays held (shared) until :meth:`release` or the process ends:
        the workers of a ``cpt run`` keep ``output_dir`` locked while they live, also when ``cpt run`` is gone."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            return self._acquire(fd)
        except BaseException:
            os.close(fd)
            raise

    def _acquire(self, fd: int) -> bool:
        locked = _try_flock(fd, fcntl.LOCK_EX)
        owner = read_owner(self.dir)
        if not locked:
            # The owner writes its record just after taking the OS lock: give it a moment (nodes of one job
            # start together).
            deadline = time.monotonic() + RECORD_WAIT_S
            while owner is None and time.monotonic() < deadline:
                time.sleep(0.1)
                owner = read_owner(self.dir)
            if owner is not None and owner.token == self.token:
                self._share(fd)
                return False
            if owner is not None and owner.host == socket.gethostname() and not _alive_here(owner):
                # The owner is gone but processes it started still hold the lock: they stop within seconds
                # when their launcher is gone (launch/lifeline.py), so wait for them instead of refusing.
                log.warning("output_dir %s: waiting up to %.0f s for the processes of a run that is gone (%s) to "
                            "end", self.dir, DYING_WAIT_S, owner.describe())  # fmt: skip
                deadline = time.monotonic() + DYING_WAIT_S
                while not locked and time.monotonic() < deadline:
                    time.sleep(0.2)
                    locked = _try_flock(fd, fcntl.LOCK_EX)
            if not locked:
                raise LockHeld(self._refusal(owner))
        here = socket.gethostname()
        if owner is not None and owner.token != self.token:
            alive = _alive_here(owner) if owner.host == here else time.time() - owner.heartbeat < STALE_AFTER_S
            if alive:
                raise LockHeld(self._refusal(owner))
            log.warning("output_dir %s: taking over the lock of a job that is gone (%s)", self.dir, owner.describe())
        now = time.time()
        pid = os.getpid()
        self._owner = Owner(here, pid, self.token, now, now, os.environ.get("SLURM_JOB_ID"), _process_started(pid))
        self._write()
        # Shared from here on, so that this job's other processes can hold it too; a new job asking for it
        # exclusively still waits. The record is written first: a job that slips in while the lock changes
        # finds this live owner and refuses.
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._fd = fd
        self.held = True
        threading.Thread(target=self._beat, daemon=True, name="output-dir-lock-heartbeat").start()
        return True

    def _share(self, fd: int) -> None:
        """Hold the lock shared with the owner of this job (which holds it exclusively only for a moment)."""
        deadline = time.monotonic() + RECORD_WAIT_S
        while not _try_flock(fd, fcntl.LOCK_SH):
            if time.monotonic() > deadline:
                raise LockHeld(self._refusal(read_owner(self.dir)))
            time.sleep(0.05)
        self._fd = fd

    def _refusal(self, owner: Owner | None) -> str:
        who = owner.describe() if owner is not None else "a process that holds its lock file"
        stop = (
            f"scancel {owner.job_id}"
            if owner is not None and owner.job_id
            else f"kill {owner.pid} on {owner.host}"
            if owner is not None
            else "stop it"
        )
        return (
            f"output_dir {self.dir} is in use by another run: {who}. Two runs on one output_dir would overwrite "
            f"each other's checkpoints. Wait for it to end, stop it ({stop}), or choose another output_dir; a lock "
            f"whose owner is gone is taken over by the next run (after {STALE_AFTER_S:.0f} s from another host)."
        )

    def _write(self) -> None:
        atomic_write(self.dir / OWNER_FILE, json.dumps(asdict(self._owner), indent=2) + "\n")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._owner.heartbeat = time.time()
            with contextlib.suppress(OSError):
                self._write()

    def release(self) -> None:
        """Give the lock up (a run that ends; the kernel releases it anyway when the process dies). The owner
        removes its record."""
        self._stop.set()
        if self._fd is None:
            return
        if self.held:
            with contextlib.suppress(OSError):
                (self.dir / OWNER_FILE).unlink()
        os.close(self._fd)
        self._fd = None
        self.held = False


def status(output_dir: str | Path) -> tuple[Owner | None, bool]:
    """The recorded owner of ``output_dir`` and whether the run holding it is alive."""
    out = Path(output_dir)
    owner = read_owner(out)
    busy = False
    if (out / LOCK_FILE).is_file():
        fd = os.open(out / LOCK_FILE, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            busy = True
        finally:
            os.close(fd)
    if busy or owner is None:
        return owner, busy
    if owner.host == socket.gethostname():
        return owner, False  # the OS lock is free: its holder on this host has ended
    return owner, time.time() - owner.heartbeat < STALE_AFTER_S
