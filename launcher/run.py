"""``cpt run``: check the recipe, then start the workers on this machine, or train right here when a launcher
already started this process as one of its workers (``torchrun ... -m launcher run RECIPE``).

It sits above both the worker entry point (:mod:`launcher.train`) and the launch package, which knows nothing of
training; ``cpt`` and the quickstart start runs through :func:`run_recipe`.
"""

from __future__ import annotations

import os
import sys

from . import train
from .config import ConfigError, Recipe
from .launch import LockHeld, RunLock, default_nproc, detect_launcher, job_token, spawn_workers
from .launch.lock import TOKEN_ENV
from .preflight import load_recipe


def load_or_exit(recipe: str, overrides: list[str], **checks) -> Recipe:
    """The checked recipe; on a problem, every problem printed and exit code 2."""
    try:
        return load_recipe(recipe, overrides, **checks)
    except ConfigError as e:
        # A path that is no recipe file is one mistake, not a list of the recipe's problems.
        print(f"error: {e.problems[0] if not os.path.isfile(recipe) else e}", file=sys.stderr)
        raise SystemExit(2) from None


def nproc(recipe: Recipe) -> int:
    return default_nproc(recipe.parallel.nproc_per_node)


def run_recipe(recipe_path: str, overrides: list[str]) -> int:
    """Check everything, then start the workers on this machine (or run here if a launcher already did)."""
    if detect_launcher() is not None:
        train.exit_worker(train.main([recipe_path, *overrides]))
    recipe = load_or_exit(recipe_path, overrides, world_size=nproc, check_files=True)
    # The lock is this job's from here on: the workers (and, under Slurm, every node's cpt run) carry its token.
    os.environ[TOKEN_ENV] = token = job_token()
    lock = RunLock(recipe.output_dir, token)
    try:
        lock.acquire()
    except LockHeld as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return spawn_workers("launcher.train", [recipe_path, *overrides], nproc(recipe), recipe.train.preempt_signals)
    finally:
        lock.release()
