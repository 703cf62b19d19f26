"""A real two-node Slurm cluster on this one machine: munged, slurmctld and two slurmd daemons (node1, node2).

Both nodes are this host (NodeAddr=127.0.0.1, one slurmd port each) with one CPU each. Everything lives under
one directory: config, munge key and socket, state, spool and logs. Debian's ``slurm-wlm`` and ``munge`` are
installed with apt-get when ``slurmctld`` is missing (the test skips only where that is impossible: not root,
or no apt-get). ``stop()`` ends the daemons and every job process they started, and leaves nothing running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
SBIN = ["/usr/sbin", "/usr/local/sbin"]


def which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def install_problem() -> str | None:
    """Install Slurm and munge if they are missing. A reason to skip when that cannot be done here, else None.

    Raises RuntimeError when apt-get was possible and failed (that is a failure, not a skip)."""
    if all(which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it (apt-get) needs root"
    if not which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    p = subprocess.run(install, env=env, capture_output=True, text=True)
    if p.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        p = subprocess.run(install, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return None


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """Start with ``start()``, submit with ``run(["sbatch", ...])``, end with ``stop()``."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("node1", "node2"), partition: str = "debug"):
        self.root = root
        self.nodes = nodes
        self.partition = partition
        self.conf = root / "slurm.conf"
        self.daemons: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (sbatch, srun, scontrol, ...) talking to this cluster."""
        path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": path}

    def write_config(self) -> None:
        for d in ("state", "spool", "log", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        r = self.root
        nodes = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs=1 State=UNKNOWN"
            for n, p in zip(self.nodes, node_ports)
        )
        self.conf.write_text(f"""\
ClusterName=cpttest
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
MailProg=/bin/true
{nodes}
PartitionName={self.partition} Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")  # noqa: SIM115 - closed with the process
        self.daemons[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        m = self.root / "munge"
        self._spawn("munged", [which("munged") or "munged", "--foreground", "--force", f"--socket={m}/munge.socket",
                               f"--key-file={key}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                               f"--seed-file={m}/munged.seed"])  # fmt: skip
        self._wait(lambda: (m / "munge.socket").exists(), timeout, "munged did not start")
        self._spawn("slurmctld", [which("slurmctld") or "slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(self._ctld_up, timeout, "slurmctld did not answer")
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", [which("slurmd") or "slurmd", "-D", "-N", n, "-f", str(self.conf)])
        self._wait(self.nodes_idle, timeout, "the nodes did not become idle")

    def _ctld_up(self) -> bool:
        return self.run(["scontrol", "ping"], check=False).returncode == 0

    def node_states(self) -> dict[str, str]:
        p = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
        return dict(line.split() for line in p.stdout.splitlines() if line.strip())

    def nodes_idle(self) -> bool:
        states = self.node_states()
        return all(states.get(n) == "idle" for n in self.nodes)

    def _wait(self, ready, timeout: float, what: str) -> None:
        end = time.time() + timeout
        while time.time() < end:
            for name, d in self.daemons.items():
                if d.poll() is not None:
                    raise RuntimeError(f"{name} exited with {d.returncode}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} within {timeout:.0f} s:\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if f.is_file():
                out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def run(self, cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        p = self.run(["scontrol", "show", "job", "-o", job_id])
        fields = {}
        for item in p.stdout.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields[k] = v
        return fields

    def step_processes(self) -> list[psutil.Process]:
        """slurmstepd processes of this cluster (they hold its slurmd log open) and everything under them."""
        logs = str(self.root / "log") + os.sep
        found: list[psutil.Process] = []
        for p in psutil.process_iter(["name"]):
            try:
                if p.info["name"] == "slurmstepd" and any(f.path.startswith(logs) for f in p.open_files()):
                    found += [*p.children(recursive=True), p]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def stop(self) -> None:
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            self.run(["scancel", "--partition", self.partition], check=False)
        end = time.time() + 20
        while self.step_processes() and time.time() < end:
            time.sleep(0.3)
        for p in self.step_processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        for name in reversed(list(self.daemons)):
            d = self.daemons[name]
            if d.poll() is None:
                d.send_signal(signal.SIGTERM)
                try:
                    d.wait(15)
                except subprocess.TimeoutExpired:
                    d.kill()
                    d.wait(5)
        self.daemons.clear()
