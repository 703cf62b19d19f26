"""Where am I and who are my peers: torchrun, the deepspeed launcher, Slurm's srun, or nothing at all.

- ``env``: which launcher started this process and what its variables say; a worker's RANK, WORLD_SIZE, ...
  from Slurm's, or a world of one when nothing launched it.
- ``world``: the process group, and the check that every rank agrees on the layout (:class:`DistInfo`,
  :class:`LaunchError`).
- ``spawn``: ``cpt run`` starting the workers itself through torchrun (and srun), relaying preemption signals
  and returning the workers' own exit code.
- ``lifeline``: workers exit when the launch processes above them are gone (torchrun dies with ``cpt run``).
- ``lock``: one live job per ``output_dir``.

Workers import from here; nothing in this package imports the training code above it.
"""

from .env import apply_launcher_env, detect_launcher, free_port, node_address, resolves, use_cpu_accelerator_if_no_gpu
from .lifeline import watch_launcher
from .lock import LockHeld, RunLock, job_token
from .spawn import (
    EXIT_STATUS_ENV,
    NPROC_ENV,
    RDZV_PORT_ENV,
    RDZV_TIMEOUT_ENV,
    SHUTDOWN_TIMEOUT_S,
    SRUN_ENV,
    default_nproc,
    leave_exit_status,
    rendezvous_args,
    spawn_workers,
)
from .world import (
    INIT_TIMEOUT_ENV,
    DistInfo,
    LaunchError,
    check_world,
    describe_world,
    init_distributed,
    teardown,
)

__all__ = [
    "EXIT_STATUS_ENV",
    "INIT_TIMEOUT_ENV",
    "NPROC_ENV",
    "RDZV_PORT_ENV",
    "RDZV_TIMEOUT_ENV",
    "SHUTDOWN_TIMEOUT_S",
    "SRUN_ENV",
    "DistInfo",
    "LaunchError",
    "LockHeld",
    "RunLock",
    "apply_launcher_env",
    "check_world",
    "default_nproc",
    "describe_world",
    "detect_launcher",
    "free_port",
    "init_distributed",
    "job_token",
    "leave_exit_status",
    "node_address",
    "rendezvous_args",
    "resolves",
    "spawn_workers",
    "teardown",
    "use_cpu_accelerator_if_no_gpu",
    "watch_launcher",
]
