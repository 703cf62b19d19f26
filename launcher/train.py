"""The entry point every worker runs, whatever started it.

    python -m launcher.train RECIPE [key=value ...]                      # one process
    torchrun --nproc-per-node 8 -m launcher.train RECIPE [k=v ...]       # one node
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 \\
        -m launcher.train RECIPE [k=v ...]                               # several nodes
    deepspeed --hostfile hosts --module launcher.train RECIPE [k=v ...]
    sbatch --nodes 4 slurm/pretrain.sbatch RECIPE [k=v ...]

Parse, check, join the process group, train, tear down.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from .config import ConfigError, load_recipe
from .launch import (
    EXIT_STATUS_ENV,
    DistInfo,
    LaunchError,
    apply_launcher_env,
    describe_collective_failure,
    init_distributed,
    teardown,
    use_cpu_accelerator_if_no_gpu,
)
from .preemption import PREEMPTED_EXIT_CODE

FAILED_EXIT_CODE = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launcher.train", description="Continual pretraining worker")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # DeepSpeed still calls the collectives torch renamed; one warning per call would bury the training log.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def failure_message(error: BaseException, timeout_minutes: float) -> str | None:
    """What to tell the user, without a traceback, about an error that ended training: bad data (file and line),
    a checkpoint the storage refused (file and OS error), a collective whose peer stopped answering (which
    collective, and the timeout). None for anything else, whose traceback is more use."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .loop import TrainingStopped

    if isinstance(error, (DataError, CheckpointError, TrainingStopped)):
        return str(error)
    return describe_collective_failure(error, timeout_minutes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apply_launcher_env()  # srun sets only its own variables: map them before anything reads RANK or WORLD_SIZE
    setup_logging(int(os.environ.get("RANK", "0")))
    use_cpu_accelerator_if_no_gpu()
    try:
        recipe = load_recipe(
            args.recipe, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")), check_files=True
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        info: DistInfo = init_distributed(recipe.parallel.timeout_minutes)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .loop import Trainer

    # On failure no barrier: the peers may be inside another collective, and waiting for them would turn one
    # rank's error into a hang. Exiting lets the launcher stop the others.
    try:
        trainer = Trainer(recipe, info)
        trainer.fit()
    except Exception as e:
        message = failure_message(e, recipe.parallel.timeout_minutes)
        if message is None:
            raise
        sys.stderr.write(f"error: rank {info.rank}: {message}\n")  # one write: ranks share the terminal
        sys.stderr.flush()
        return FAILED_EXIT_CODE
    if trainer.preempted and info.is_main and os.environ.get(EXIT_STATUS_ENV):
        # Before teardown, so the launcher that reads it never sees the workers gone and the file not yet there.
        Path(os.environ[EXIT_STATUS_ENV]).write_text(str(PREEMPTED_EXIT_CODE))
    teardown()
    return PREEMPTED_EXIT_CODE if trainer.preempted else 0


if __name__ == "__main__":
    sys.exit(main())
