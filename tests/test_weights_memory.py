"""No rank holds the whole model: the peak host memory of every rank loading a 300M-parameter bf16 checkpoint under
FSDP2 and ZeRO-3, on 2 and 4 ranks, measured from outside (VmHWM in /proc/<pid>/status of each worker), against
the same run of a tiny model (the process's own overhead) plus the engine's share of the model."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, tiny_recipe, worker_env, write_recipe

ENGINES = [("deepspeed", "zero3.json"), ("fsdp", "fsdp.yaml")]
MB = 1e6

# Bytes per parameter per rank that each engine keeps on a CPU rank (fp32 training, no step taken), besides the
# checkpoint pages each rank maps while reading its slices (2 bytes per parameter of its share, bf16):
SHARE = {
    # the fp32 parameter shards (the optimizer's states are made at the first step)
    "fsdp": 4,
    # fp32 parameter partitions, the optimizer's fp32 copy of them and Adam's two moments, which DeepSpeed makes
    # when the engine is built
    "deepspeed": 16,
}
MAPPED = 2
SLACK = 250 * MB
"""Allowance for allocator growth and the largest tensor's slice in flight."""


def big_config(assets, root: Path) -> Path:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(assets["config"])
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 1024, 2816, 28
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 16, 4, 64
    cfg.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def checkpoints(assets, tmp_path_factory) -> dict[str, tuple[Path, int]]:
    """A >= 300M-parameter Llama written as sharded bf16 safetensors by this test (not by the launcher), and the
    tiny one in the same format: name -> (directory, parameters)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("memory")
    out = {}
    for name, config in (("big", big_config(assets, root / "big-config")), ("tiny", assets["config"])):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config), dtype=torch.bfloat16)
        path = root / name
        model.save_pretrained(path, max_shard_size="150MB")
        for f in assets["base"].iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                (path / f.name).write_bytes(f.read_bytes())
        out[name] = (path, sum(p.numel() for p in model.parameters()))
        del model
    assert out["big"][1] >= 300e6
    assert len(list(out["big"][0].glob("*.safetensors"))) >= 4
    return out


def peak_per_rank(recipe: Path, nproc: int, timeout: float = 600) -> dict[int, float]:
    """Run the recipe; sample every worker's VmHWM (its peak resident set) until it exits: rank -> bytes. The
    process tree is walked only until all ``nproc`` workers are found (walking it reads every process's stat,
    milliseconds each time, which the ranks being measured would otherwise lose to the sampler 50 times a
    second); from then on only their status files are read, every 20 ms as before."""
    # deepspeed.zero.Init makes each parameter whole on the CPU before partitioning it (on a GPU it does that in GPU
    # memory). glibc serves those short-lived tensors from its heap once freed mmap chunks have raised its mmap
    # threshold, and keeps the freed heap: +0.8 GiB of RSS per rank for this model on 4 ranks that no tensor
    # holds. A fixed threshold gives freed tensors back, so what is measured is what the ranks hold.
    env = worker_env(MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    peaks: dict[int, float] = {}
    ranks: dict[int, int] = {}
    workers: list[psutil.Process] = []
    end = time.time() + timeout
    while proc.poll() is None and time.time() < end:
        if len(ranks) < nproc:
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                break
        else:
            children = workers
        for child in children:
            try:
                if child.pid not in ranks:
                    if "launcher.train" not in " ".join(child.cmdline()):
                        continue
                    ranks[child.pid] = int(child.environ()["RANK"])
                    workers.append(child)
                status = Path(f"/proc/{child.pid}/status").read_text()
            except (psutil.Error, OSError, KeyError, ValueError):
                continue
            # an exited process (a zombie until reaped) has no VmHWM line
            hwm = next((int(x.split()[1]) * 1024 for x in status.splitlines() if x.startswith("VmHWM:")), 0)
            rank = ranks[child.pid]
            peaks[rank] = max(peaks.get(rank, 0), hwm)
        time.sleep(0.02)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output[-6000:]
    return peaks


def recipe_for(assets, tmp_path: Path, name: str, model_dir: Path, engine: str, config: str, nproc: int) -> Path:
    parallel = {"engine": engine, "config": config, "nproc_per_node": nproc}
    tree = tiny_recipe(assets, tmp_path / name, model={"name_or_path": str(model_dir)}, train={"max_steps": 0},
                       eval={"sets": {}}, parallel=parallel)  # fmt: skip
    return write_recipe(tmp_path / f"{name}.yaml", tree)


@pytest.mark.parametrize("engine, config", ENGINES)
def test_no_rank_holds_the_whole_model(assets, tmp_path, checkpoints, engine, config):
    big, n = checkpoints["big"]
    tiny, _ = checkpoints["tiny"]
    base = peak_per_rank(recipe_for(assets, tmp_path, "tiny", tiny, engine, config, 2), 2)
    overhead = max(base.values())
    peaks = {w: peak_per_rank(recipe_for(assets, tmp_path, f"big{w}", big, engine, config, w), w) for w in (2, 4)}
    report = {w: {r: round(v / MB) for r, v in p.items()} for w, p in peaks.items()}
    print(f"{engine}: overhead {overhead / MB:.0f} MB; peaks (MB) by world size and rank {report}")
    for w, p in peaks.items():
        assert sorted(p) == list(range(w))
        share = (SHARE[engine] + MAPPED) * n / w
        for rank, peak in p.items():
            assert peak - overhead <= share + SLACK, (
                f"{w} ranks, rank {rank}: {peak / MB:.0f} MB, more than the tiny run's {overhead / MB:.0f} MB plus "
                f"the engine's share {share / MB:.0f} MB"
            )
        # rank 0 is one rank among equals: no larger than the others by more than the process's own overhead
        others = max(v for r, v in p.items() if r != 0)
        assert p[0] - others <= overhead, (
            f"{w} ranks: rank 0 peaks at {p[0] / MB:.0f} MB, the others at {others / MB:.0f}"
        )
    # twice the ranks, half the share each
    grown = {w: max(p.values()) - overhead for w, p in peaks.items()}
    assert grown[4] < 0.65 * grown[2], (
        f"per-rank growth over the tiny run: {grown[2] / MB:.0f} MB on 2 ranks, {grown[4] / MB:.0f} MB on 4"
    )
