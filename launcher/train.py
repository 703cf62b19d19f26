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
import atexit
import contextlib
import logging
import os
import sys
import warnings
from typing import NoReturn

from . import launch
from .config import ConfigError, Recipe
from .diagnostics import failure_message
from .preemption import PREEMPTED_EXIT_CODE, SIGNALLED
from .preflight import load_recipe

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
    # The libraries' tqdm bars (loading and writing weights, downloads, dataset preparation) end up glued together
    # in a log file, one per rank; the run logs its own stages with timings. Rank 0 keeps them in a terminal.
    if rank != 0 or not sys.stderr.isatty():
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()  # huggingface_hub's downloads too
        datasets.disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    launcher = launch.apply_launcher_env()  # srun sets only its own variables: map them before anything reads RANK
    rank = int(os.environ["RANK"])
    setup_logging(rank)
    launch.use_cpu_accelerator_if_no_gpu()
    if launcher is not None:
        launch.watch_launcher(rank, launcher, saving=SIGNALLED.is_set)
    lock = None
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # Rank 0 asks the hub for the job: when it refuses, the launcher stops the other ranks.
        recipe = load_recipe(args.recipe, args.overrides, world_size=world, check_files=True, ask_hub=rank == 0)
        if rank == 0:
            lock = launch.RunLock(recipe.output_dir, launch.job_token())
            lock.acquire()
        info = launch.init_distributed(recipe.parallel.timeout_minutes)
    except (ConfigError, launch.LaunchError, launch.LockHeld) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _train(recipe, info)
    finally:
        if lock is not None:
            lock.release()


def _train(recipe: Recipe, info: launch.DistInfo) -> int:
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
    if trainer.preempted and info.is_main:
        launch.leave_exit_status(PREEMPTED_EXIT_CODE)
    launch.teardown()
    return PREEMPTED_EXIT_CODE if trainer.preempted else 0


def exit_worker(code: int) -> NoReturn:
    """End a worker whose run has returned: the Python exit hooks first (W&B, TensorBoard, the DataLoader workers),
    every log and stream flushed, then out without the interpreter's teardown. In that teardown, native threads of
    the communication libraries (gloo, DeepSpeed's shared-memory op) can still be joinable when their C++ objects
    are destroyed, and one that is aborts the process ("terminate called without an active exception", SIGABRT)
    after the run has finished and saved everything: a finished run reported as failed. Seen in 1 of about 60
    ZeRO-3 runs on 2 loaded CPU cores (the process group was already destroyed)."""
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_worker(main())
