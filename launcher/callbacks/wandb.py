"""Weights & Biases logging from rank 0: online with credentials, offline files under output_dir without."""

from __future__ import annotations

import netrc
import os
import secrets
import socket
import string
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from launcher.callbacks.base import Callback, RunInfo, logged_number, run_name
from launcher.config import LoggingConfig, Recipe, to_dict
from launcher.files import atomic_write
from launcher.redact import redact_text, scrub

RUN_ID_FILE = "wandb_run_id"
_ENV_MODES = {"online": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def wandb_credentials_available() -> bool:
    """Whether W&B can log in without asking: ``WANDB_API_KEY`` or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or str(Path("~/.netrc").expanduser())
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def wandb_mode(logging: LoggingConfig) -> str:
    """The W&B mode a run will use: ``online``, ``offline`` or ``disabled``.

    ``auto`` follows ``WANDB_MODE`` when it is set, else goes online only when credentials exist, so a
    machine without a login never stops at a prompt. An explicit ``online`` without credentials falls back
    to ``offline`` (sync later with ``wandb sync``) instead of failing a run that may have waited in a queue.
    """
    mode = logging.wandb
    if mode == "auto":
        env = _ENV_MODES.get(os.environ.get("WANDB_MODE", "").strip().lower())
        if env:
            return env
        return "online" if wandb_credentials_available() else "offline"
    if mode == "online" and not wandb_credentials_available():
        print(
            "W&B: logging.wandb=online but no credentials (WANDB_API_KEY or ~/.netrc); logging offline "
            "under output_dir/wandb instead, upload with `wandb sync`",
            file=sys.stderr,
        )
        return "offline"
    return mode


class WandbCallback(Callback):
    """Logs train metrics as ``train/<name>`` and eval results as ``eval/<set>/loss|perplexity|tokens``.

    The run id is kept in ``output_dir/wandb_run_id``: a resumed run continues the same W&B run, a fresh
    start in the same directory begins a new one. The config is the resolved recipe without any value
    whose key looks secret. Console capture, git and code saving are off: the run's own logs already
    hold the console, and a git remote URL can carry a token.
    """

    def __init__(self, recipe: Recipe, mode: str | None = None):
        self.recipe = recipe
        self.mode = mode or wandb_mode(recipe.logging)
        self.run = None

    def on_train_start(self, run: RunInfo) -> None:
        if self.mode == "disabled":
            return
        import wandb

        out = Path(run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        id_file = out / RUN_ID_FILE
        run_id = id_file.read_text().strip() if run.resumed and id_file.is_file() else ""
        if not run_id:
            run_id = _new_run_id()
            atomic_write(id_file, run_id + "\n")
        extra = {
            "world_size": run.world_size,
            "grad_accum": run.grad_accum,
            "global_batch_size": run.global_batch_size,
            "tokens_per_step": run.tokens_per_step,
            "n_params": run.n_params,
            "command": redact_text(run.command),
            "host": socket.gethostname(),
        }
        config = scrub({**to_dict(self.recipe), "run": extra})
        try:
            self.run = self._init(wandb, self.mode, run_id, out, config)
        except Exception as e:
            if self.mode != "online":
                raise
            print(f"W&B: could not start an online run ({e}); logging offline instead", file=sys.stderr)
            self.mode = "offline"
            self.run = self._init(wandb, self.mode, run_id, out, config)

    def _init(self, wandb: Any, mode: str, run_id: str, out: Path, config: dict[str, Any]) -> Any:
        log = self.recipe.logging
        settings = wandb.Settings(
            mode=mode,
            silent=True,
            console="off",
            disable_git=True,
            disable_code=True,
            save_code=False,
            # W&B's run metadata records the process's command line as it is, secrets included; the command is
            # in the config instead (``run.command``), with secret values masked.
            x_disable_meta=True,
        )
        return wandb.init(
            project=log.project,
            entity=log.entity,
            name=run_name(self.recipe),
            tags=list(log.tags) or None,
            id=run_id,
            resume="allow",
            dir=str(out),
            config=config,
            settings=settings,
        )

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.run is None:
            return
        data = {f"train/{k}": logged_number(v) for k, v in metrics.items()}
        self.run.log({k: v for k, v in data.items() if v is not None}, step=int(step))

    def on_eval(self, step: int, results: dict[str, dict[str, float]]) -> None:
        if self.run is None:
            return
        data = {
            f"eval/{name}/{k}": float(v)
            for name, res in results.items()
            for k, v in res.items()
            if k in ("loss", "perplexity", "tokens") and logged_number(v) is not None
        }
        self.run.log(data, step=int(step))

    def on_train_end(self, run: RunInfo, final_dir: Path | None) -> None:
        if self.run is None:
            return
        if final_dir is not None:
            self.run.summary["final_dir"] = str(final_dir)
        self.run.finish()
        self.run = None


def _new_run_id() -> str:
    """Eight lowercase letters and digits, the shape of W&B's own run ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))
