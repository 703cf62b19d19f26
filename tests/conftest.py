"""Shared fixtures: a tiny real tokenizer, a tiny Llama base model and corpora, real multi-process launches, a
function run on several gloo ranks, and the end-of-run list of what did not run."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Corpora (prose and code, train/eval), a 512-token BPE tokenizer, and a saved ~70K-parameter Llama."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.quickstart_assets import build_base_config, build_corpora, build_tokenizer

    root = tmp_path_factory.mktemp("assets")
    corpora = build_corpora(root / "data", max_code_chars=150_000)
    tok = build_tokenizer(root / "tokenizer", [corpora["prose_train"], corpora["code_train"]], vocab_size=512)
    cfg_dir = build_base_config(
        root / "config", tok, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
        max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg_dir))
    base = root / "base"
    model.save_pretrained(base)
    for f in cfg_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (base / f.name).write_bytes(f.read_bytes())
    return {**corpora, "tokenizer": tok, "config": cfg_dir, "base": base, "root": root}


def tiny_recipe(assets: dict[str, Path], out: Path, **sections) -> dict:
    """A recipe tree for the tiny model; ``sections`` are merged one level deep."""
    r = {
        "output_dir": str(out),
        "model": {"name_or_path": str(assets["base"])},
        "data": {"train": [{"path": str(assets["code_train"])}], "seq_len": 64, "num_workers": 0},
        "train": {"max_steps": 4, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "seed": 3},
        "eval": {"sets": {"code": {"path": str(assets["code_eval"])}, "prose": {"path": str(assets["prose_eval"])}},
                 "max_blocks": 12},
        "parallel": {"engine": "deepspeed", "config": "zero3.json", "nproc_per_node": 2},
        "logging": {"wandb": "disabled", "progress": False},
    }  # fmt: skip
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(r.get(k), dict):
            r[k] = {**r[k], **v}
        else:
            r[k] = v
    return r


def write_recipe(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})  # fmt: skip
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float = 420, **env: str) -> subprocess.CompletedProcess:
    """Run a command from the repository root; fail the test with its output if it fails."""
    p = subprocess.run(cmd, cwd=REPO, env=worker_env(**env), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-6000:]}\n--- stderr\n{p.stderr[-8000:]}"
        )
    return p


def cpt(*args: str, timeout: float = 420, **env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "launcher", *args], timeout=timeout, **env)


def kill_whole_job(proc: subprocess.Popen) -> None:
    """SIGKILL a job started with ``start_new_session=True`` all at once: cpt and torchrun (one process group) and
    every worker (torchrun starts each in a session of its own)."""
    import signal

    import psutil

    family = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()


def start_job(recipe: Path, log: Path, **env: str) -> subprocess.Popen:
    """``cpt run`` in its own session (so that everything under it can be found and, on a failure, killed), its
    output in ``log``: a pipe nobody reads while the test waits would fill up and stall the run."""
    with log.open("w") as sink:
        return subprocess.Popen([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=REPO,
                                env=worker_env(**env), start_new_session=True, stdout=sink,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip


def job_output(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    """The job's output once it has ended by itself; past ``timeout`` everything is killed and the test fails."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_whole_job(proc)
        pytest.fail(f"the job did not end within {timeout:.0f} s:\n{log.read_text()[-5000:]}")
    return log.read_text()


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}


# ------------------------------------------------------------------------------ one trained run per engine, shared

TRAINED = {"max_steps": 8, "save_every": 2, "keep_last": 3, "log_every": 1, "gc_every": 3}
"""The train section of the shared runs (``trained_runs``): 8 steps, checkpoints kept at steps 4, 6 and 8, Python's
full garbage collections at steps 3 and 6."""
TRAINED_ENGINES = {"deepspeed": "zero3.json", "fsdp": "fsdp.yaml"}


def trained_tree(assets: dict[str, Path], out: Path, engine: str) -> dict:
    """The recipe of a shared run: the tiny model on 2 ranks, ``TRAINED``, no evaluation."""
    parallel = {"engine": engine, "config": TRAINED_ENGINES[engine], "nproc_per_node": 2}
    return tiny_recipe(assets, out, train=dict(TRAINED), eval={"sets": {}}, parallel=parallel)


class TrainedRuns:
    """engine -> the output_dir of one finished ``cpt run`` of ``trained_tree`` (ZeRO-3 or FSDP2), started on first
    use and then shared by every test that needs a finished run of it (its checkpoints, final/, metrics): one run
    per engine for the whole session instead of one per test. Read only: a test that changes files works on a
    copy (``shutil.copytree``)."""

    def __init__(self, assets: dict[str, Path], root: Path):
        self.assets, self.root, self.outs = assets, root, {}

    def __getitem__(self, engine: str) -> Path:
        if engine not in self.outs:
            out = self.root / engine
            recipe = write_recipe(self.root / f"{engine}.yaml", trained_tree(self.assets, out, engine))
            cpt("run", str(recipe))
            self.outs[engine] = out
        return self.outs[engine]


@pytest.fixture(scope="session")
def trained_runs(assets, tmp_path_factory) -> TrainedRuns:
    return TrainedRuns(assets, tmp_path_factory.mktemp("trained"))


# ----------------------------------------------------------------------------------- a function on several ranks


def _rank_main(rank: int, world_size: int, port: int, func: Callable, args: tuple, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        results.put((rank, True, func(*args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(func: Callable, world_size: int, *args: Any, timeout: float = 120) -> list[Any]:
    """``func(*args)`` in ``world_size`` fresh processes joined in one gloo process group (OLMo-core's
    ``run_distributed_test``); what each rank returned, in rank order. ``func`` must be defined at module level,
    so that the spawned processes can import it; a rank that raises fails the test with its traceback."""
    import multiprocessing

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")  # fork after torch has started threads can deadlock
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, func, args, results))
             for rank in range(world_size)]  # fmt: skip
    for proc in procs:
        proc.start()
    got: dict[int, Any] = {}
    failures = []
    try:
        for _ in procs:
            rank, ok, value = results.get(timeout=timeout)
            if ok:
                got[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    if failures:
        pytest.fail("\n".join(failures))
    return [got[rank] for rank in range(world_size)]


# ------------------------------------------------------------------------------------------- what did not run


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Always, even under ``-q``: the tests that did not run, grouped by the reason they give, so that a green run
    on a laptop never reads as "Slurm and GPUs tested"."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if getattr(r, "longrepr", None)]
    if not skipped:
        return
    reasons: Counter[str] = Counter()
    for report in skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    terminalreporter.write_sep("=", f"NOT RUN: {len(skipped)} test(s) skipped; they are not tested by this run")
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"{count:4d}  {reason}")
