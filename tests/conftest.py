"""Shared fixtures: a tiny real tokenizer, a tiny Llama base model and corpora, and real multi-process launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}
