"""GPU speed: our recipes on both engines against HF Trainer + DeepSpeed and a plain FSDP2 loop, in one call on one
machine.

    python benchmarks/speed_gpu.py --assets bench_assets --out /tmp/speed [--steps 12] [--runs fsdp baseline ...]

The model is the 1.1B Llama shape of ``recipes/llama-1b-scratch.yaml`` (hidden 2048, 22 layers, 32 heads,
4 KV heads, FFN 5632) with the vocabulary of a 32K BPE tokenizer, trained on real text (Python's standard
library source, streamed, tokenized and packed by the data pipeline with 2 DataLoader workers per rank), seq 2048,
bf16. ``--assets`` is a directory made by ``benchmarks/e2e_gpu.py``'s builders (``data/code_train.jsonl`` and
``llama-1b/`` with config and tokenizer); it is built when missing, with the larger shapes of recipes/models/
(``llama3-8b/``, ``llama-3.2-3b/``) given the same tokenizer.

Every run is an ordinary ``cpt run`` of the recipe with command-line overrides; tokens/s per GPU is taken over the
steps after ``--warmup`` (the first steps include torch.compile's kernel generation), from the per-step
``step_time`` in metrics.jsonl; MFU uses the same function as the training logs. For each run the per-GPU memory
estimate of ``cpt plan`` is recorded next to the measured peak. Writes
``benchmarks/results/<date>-speed-<card>.json`` (and a copy under $OUT) and prints a Markdown table.

The baselines run in the same call: ``baseline*`` through ``hf_trainer_baseline.py`` (HF Trainer + DeepSpeed, ZeRO-3
or ZeRO-2 with Liger kernels), ``plain-*`` through ``plain_fsdp_gpu.py`` (FSDP2 with per-layer compile, random
tokens). Each run that trains in float8 (``train.float8``, torchao) gets ``x_bf16``, its tokens/s over the bf16 run
of the same model and engine, and each of ours ``x_plain``, its tokens/s over the plain loop at the same shape, batch,
GPU count and float8 setting.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RECIPE = REPO / "recipes" / "llama-1b-scratch.yaml"
FAST = ["train.compile=true", "train.fused_loss=true"]
ZERO = "parallel.deepspeed.zero_optimization."
# DeepSpeed's own default reduce bucket and a prefetch bucket of about two 1.1B decoder layers (44M parameters
# each), against the Hugging Face "auto" sizes (hidden^2 and 0.9 hidden^2: less than one layer)
BUCKETS = [f"{ZERO}reduce_bucket_size=500000000", f"{ZERO}stage3_prefetch_bucket_size=100000000"]
DEEPCOMPILE = ["parallel.deepspeed.compile.deepcompile=true"]
# the Llama-3 8B shape at its native sequence length, every 4th layer checkpointed, no offload, no accumulation
LLAMA3_8B = ["data.seq_len=8192", "model.activation_checkpointing=true", "model.checkpoint_every=4"]
ACCUM4 = ["train.global_batch_size=16"]  # with 2 GPUs and micro-batch 2: 4 micro-batches per step
# the Llama-3.2 3B shape at seq 4096: micro-batch 2 fits one H200 without checkpointing
LLAMA3_3B = ["data.seq_len=4096"]
ROWWISE, TENSORWISE = ["train.float8=rowwise"], ["train.float8=tensorwise"]
SKIP_SMALL = ["train.float8_skip_small=true"]


# long sequences: positions raised (the benchmark measures speed and memory, not what the model learns), every layer
# checkpointed; MFU counts attention's 12 x layers x heads x head_dim x seq_len FLOPs per token (full, not causal)
def long_seq(seq_len: int, sp: int = 1, checkpointing: bool = True) -> list[str]:
    ckpt = str(checkpointing).lower()
    return [f"data.seq_len={seq_len}", f"model.max_position_embeddings={max(seq_len, 8192)}",
            f"model.activation_checkpointing={ckpt}", f"parallel.sequence_parallel={sp}"]  # fmt: skip


SAVE_ONCE = ["train.save_every=6", "train.keep_last=1"]
SAVE_TWICE = ["train.max_steps=250", "train.save_every=120", "train.keep_last=1"]  # wins over --steps
# one save at step 30 of 40: the host copy of background saves is made in a thread after the first step (3B: 38.5 GB
# to page-lock), so a save this late finds it ready, as every save of a run that saves every few hundred steps does
SAVE_LATE = ["train.max_steps=40", "train.save_every=30", "train.keep_last=1"]  # wins over --steps
# a run that saves: the synchronous write of a 3B checkpoint took 94 s on the H200 machine's disk (2026-12-02), and a
# background one is waited for at the end of the run
SHAPE_3B_SAVE = {"model": "llama3-3b", "slow": 4.0, "scales": True}
FLOAT8_SUFFIXES = ("-rowwise", "-tensorwise")  # a float8 run is named after its bf16 run plus one of these


class Run(NamedTuple):
    config: str  # engine config in ds_configs/ ("" for the baselines)
    gpus: int  # GPUs in all
    micro_batch: int  # the global batch is micro-batch x GPUs (no accumulation), BASELINE_GLOBAL_BATCH for "hf"
    extra: list[str]  # recipe overrides; for the baselines, arguments of their script
    model: str = "llama-1b"  # key of ensure_assets
    nodes: int = 1  # simulated nodes on the one host (torchrun --nnodes, c10d rendezvous)
    slow: float = 1.0  # times --timeout this run may take (the 8B model takes minutes to build and compile)
    kind: str = "ours"  # "ours" (cpt run), "plain" (plain_fsdp_gpu.py), "hf" (hf_trainer_baseline.py)
    scales: bool = False  # --gpus sets its GPU count (the name states none)


# 3B runs: one GPU unless --gpus says otherwise; building and compiling 28 layers takes longer than the 1.1B's 22
SHAPE_3B = {"model": "llama3-3b", "slow": 2.0, "scales": True}


RUNS: dict[str, Run] = {
    "fsdp": Run("fsdp.yaml", 2, 16, FAST),
    "baseline": Run("", 2, 4, [], kind="hf"),
    "zero3": Run("zero3.json", 2, 16, FAST),
    "fsdp-1gpu": Run("fsdp.yaml", 1, 16, FAST),
    "fsdp-eager": Run("fsdp.yaml", 2, 16, ["train.compile=false"]),
    "zero3-per-module": Run("zero3.json", 2, 16, [*FAST, "parallel.zero3_layer_gather=false"]),
    "zero3-buckets": Run("zero3.json", 2, 16, [*FAST, *BUCKETS]),
    "zero3-deepcompile": Run("zero3.json", 2, 16, [*FAST, *BUCKETS, *DEEPCOMPILE], slow=2.2),  # + its CUDA build
    "zero3-1gpu": Run("zero3.json", 1, 16, FAST),
    "zero3-1gpu-no-overlap": Run("zero3.json", 1, 16, [*FAST, f"{ZERO}overlap_comm=false"]),
    "zero3-1gpu-eager": Run("zero3.json", 1, 16, ["train.compile=false"]),
    "fsdp-1gpu-eager": Run("fsdp.yaml", 1, 16, ["train.compile=false"]),
    # one option at a time against "fsdp"
    "fsdp-plain-loss": Run("fsdp.yaml", 2, 16, ["train.compile=true", "train.fused_loss=false"]),
    "fsdp-prefetch-0": Run("fsdp.yaml", 2, 16, [*FAST, "parallel.fsdp.prefetch_layers=0"]),
    "fsdp-prefetch-2": Run("fsdp.yaml", 2, 16, [*FAST, "parallel.fsdp.prefetch_layers=2"]),
    "fsdp-ckpt-every-2": Run(
        "fsdp.yaml", 2, 16, [*FAST, "model.activation_checkpointing=true", "model.checkpoint_every=2"]
    ),
    "fsdp-reduce-bf16": Run("fsdp.yaml", 2, 16, [*FAST, "parallel.fsdp.reduce_dtype=bf16"]),
    "fsdp-4gpu": Run("fsdp.yaml", 4, 16, FAST),
    "zero3-4gpu": Run("zero3.json", 4, 16, FAST),
    "fsdp-8gpu": Run("fsdp.yaml", 8, 16, FAST),
    "zero3-8gpu": Run("zero3.json", 8, 16, FAST),
    "fsdp-2nodes": Run("fsdp.yaml", 4, 16, FAST, nodes=2),
    "fsdp-2nodes-1gpu": Run("fsdp.yaml", 2, 16, FAST, nodes=2),
    "llama3-8b-fsdp": Run("fsdp.yaml", 2, 2, [*FAST, *LLAMA3_8B], model="llama3-8b", slow=3),
    "llama3-8b-zero3": Run("zero3.json", 2, 2, [*FAST, *LLAMA3_8B], model="llama3-8b", slow=3),
    # recipes/llama3-8b-fsdp.yaml's micro-batch, length and checkpointing with gradient accumulation (global batch 16
    # on 2 GPUs: 4 micro-batches; the recipe's 128 would take 32 per step): each micro-batch's gradients
    # reduce-scattered as its backward runs (the default) against the whole model's unsharded fp32 gradients kept
    # until the last micro-batch, which `cpt plan` puts at 147.8 GiB per GPU on 2 GPUs (117.9 for the default)
    "llama3-8b-fsdp-accum4": Run("fsdp.yaml", 2, 2, [*FAST, *LLAMA3_8B, *ACCUM4], model="llama3-8b", slow=4),
    "llama3-8b-fsdp-accum4-reduce-once": Run(
        "fsdp.yaml",
        2,
        2,
        [*FAST, *LLAMA3_8B, *ACCUM4, "parallel.fsdp.reduce_every_micro_batch=false"],
        model="llama3-8b",
        slow=4,
    ),  # fmt: skip
    # float8 (torchao) against the bf16 run of the same name without the suffix
    "fsdp-1gpu-rowwise": Run("fsdp.yaml", 1, 16, [*FAST, *ROWWISE]),
    "fsdp-1gpu-rowwise-skip-small": Run("fsdp.yaml", 1, 16, [*FAST, *ROWWISE, *SKIP_SMALL]),
    "fsdp-1gpu-tensorwise": Run("fsdp.yaml", 1, 16, [*FAST, *TENSORWISE]),
    "zero3-1gpu-tensorwise": Run("zero3.json", 1, 16, [*FAST, *TENSORWISE]),
    "llama3-3b-fsdp": Run("fsdp.yaml", 1, 2, [*FAST, *LLAMA3_3B], **SHAPE_3B),
    "llama3-3b-fsdp-rowwise": Run("fsdp.yaml", 1, 2, [*FAST, *LLAMA3_3B, *ROWWISE], **SHAPE_3B),
    "llama3-3b-fsdp-tensorwise": Run("fsdp.yaml", 1, 2, [*FAST, *LLAMA3_3B, *TENSORWISE], **SHAPE_3B),
    # what is left on one GPU: cuDNN's attention kernel first, a larger micro-batch
    "fsdp-1gpu-cudnn": Run("fsdp.yaml", 1, 16, [*FAST, "model.attention_backend=cudnn"]),
    "fsdp-1gpu-mb24": Run("fsdp.yaml", 1, 24, FAST),
    "fsdp-1gpu-cudnn-mb24": Run("fsdp.yaml", 1, 24, [*FAST, "model.attention_backend=cudnn"]),
    "llama3-3b-fsdp-mb4": Run("fsdp.yaml", 1, 4, [*FAST, *LLAMA3_3B], **SHAPE_3B),
    "llama3-3b-fsdp-mb4-tensorwise": Run("fsdp.yaml", 1, 4, [*FAST, *LLAMA3_3B, *TENSORWISE], **SHAPE_3B),
    "llama3-3b-fsdp-mb4-rowwise": Run("fsdp.yaml", 1, 4, [*FAST, *LLAMA3_3B, *ROWWISE], **SHAPE_3B),
    # micro-batch 8 (32K tokens per step, no checkpointing: about 90 GiB): the linear layers' share of the step grows
    "llama3-3b-fsdp-mb8": Run("fsdp.yaml", 1, 8, [*FAST, *LLAMA3_3B], **SHAPE_3B),
    "llama3-3b-fsdp-mb8-tensorwise": Run("fsdp.yaml", 1, 8, [*FAST, *LLAMA3_3B, *TENSORWISE], **SHAPE_3B),
    "llama3-3b-fsdp-mb8-rowwise": Run("fsdp.yaml", 1, 8, [*FAST, *LLAMA3_3B, *ROWWISE], **SHAPE_3B),
    "llama3-3b-fsdp-mb8-rowwise-skip-small": Run(
        "fsdp.yaml", 1, 8, [*FAST, *LLAMA3_3B, *ROWWISE, *SKIP_SMALL], **SHAPE_3B
    ),
    "llama3-3b-fsdp-mb8-tensorwise-skip-small": Run(
        "fsdp.yaml", 1, 8, [*FAST, *LLAMA3_3B, *TENSORWISE, *SKIP_SMALL], **SHAPE_3B
    ),
    # one checkpoint at step 6 (of 10 or more), synchronous against in the background: the training stall of a save
    # (checkpoint_stall_s). One: a 3B checkpoint is 38.5 GB, two do not fit a 64 GB disk with the one being written.
    "llama3-3b-fsdp-mb4-save-sync": Run(
        "fsdp.yaml", 1, 4, [*FAST, *LLAMA3_3B, *SAVE_ONCE, "train.async_save=false"], **SHAPE_3B_SAVE
    ),
    "llama3-3b-fsdp-mb4-save-async": Run(
        "fsdp.yaml", 1, 4, [*FAST, *LLAMA3_3B, *SAVE_ONCE, "train.async_save=true"], **SHAPE_3B_SAVE
    ),
    "llama3-3b-fsdp-mb4-save-sync-late": Run(
        "fsdp.yaml", 1, 4, [*FAST, *LLAMA3_3B, *SAVE_LATE, "train.async_save=false"], **SHAPE_3B_SAVE
    ),
    "llama3-3b-fsdp-mb4-save-async-late": Run(
        "fsdp.yaml", 1, 4, [*FAST, *LLAMA3_3B, *SAVE_LATE, "train.async_save=true"], **SHAPE_3B_SAVE
    ),
    # Two background saves 120 steps apart (a 1.1B checkpoint is 17.6 GB: two fit the disk, two 3B ones do not): the
    # second reuses the first's host copy. The steps fixed here win over --steps.
    "fsdp-1gpu-save-async-twice": Run("fsdp.yaml", 1, 16, [*FAST, *SAVE_TWICE, "train.async_save=true"], slow=4.0),
    # the plain FSDP2 loop with per-layer compile (plain_fsdp_gpu.py), at the shapes of our runs above
    # long context (issue: 1.1B at 16K/32K/64K on one GPU; the 8B shape at 32K/64K with sequence parallelism)
    "fsdp-1gpu-16k": Run("fsdp.yaml", 1, 2, [*FAST, *long_seq(16384)]),
    "fsdp-1gpu-32k": Run("fsdp.yaml", 1, 1, [*FAST, *long_seq(32768)]),
    "fsdp-1gpu-64k": Run("fsdp.yaml", 1, 1, [*FAST, *long_seq(65536)], slow=1.5),
    "fsdp-1gpu-16k-nockpt": Run("fsdp.yaml", 1, 2, [*FAST, *long_seq(16384, checkpointing=False)]),
    "fsdp-1gpu-64k-nockpt": Run("fsdp.yaml", 1, 1, [*FAST, *long_seq(65536, checkpointing=False)], slow=1.5),
    "llama3-8b-fsdp-32k-sp2": Run("fsdp.yaml", 2, 1, [*FAST, *long_seq(32768, 2)], model="llama3-8b", slow=3),
    "llama3-8b-fsdp-64k-sp2": Run("fsdp.yaml", 2, 1, [*FAST, *long_seq(65536, 2)], model="llama3-8b", slow=3),
    "llama3-8b-zero3-32k-sp2": Run("zero3.json", 2, 1, [*FAST, *long_seq(32768, 2)], model="llama3-8b", slow=3),
    "llama3-8b-zero3-64k-sp2": Run("zero3.json", 2, 1, [*FAST, *long_seq(65536, 2)], model="llama3-8b", slow=3),
    "llama3-8b-fsdp-64k-sp4": Run("fsdp.yaml", 4, 1, [*FAST, *long_seq(65536, 4)], model="llama3-8b", slow=3),
    "llama3-8b-zero3-64k-sp4": Run("zero3.json", 4, 1, [*FAST, *long_seq(65536, 4)], model="llama3-8b", slow=3),
    "plain-fsdp-1gpu": Run("", 1, 16, ["--seq-len", "2048"], kind="plain"),
    "plain-llama3-3b": Run("", 1, 2, ["--seq-len", "4096"], kind="plain", **SHAPE_3B),
    "plain-llama3-3b-rowwise": Run("", 1, 2, ["--seq-len", "4096", "--float8", "rowwise"], kind="plain", **SHAPE_3B),
    "plain-llama3-3b-tensorwise": Run(
        "", 1, 2, ["--seq-len", "4096", "--float8", "tensorwise"], kind="plain", **SHAPE_3B
    ),
    # HF Trainer: on one GPU, and with ZeRO-2 and Liger kernels (liger-kernel installed)
    "baseline-1gpu": Run("", 1, 4, [], kind="hf"),
    "baseline-liger": Run("", 2, 8, ["--zero", "2", "--liger"], kind="hf"),
    "baseline-liger-1gpu": Run("", 1, 8, ["--zero", "2", "--liger"], kind="hf"),
}
BASELINE_GLOBAL_BATCH = 32
# tried when the run above fails (recorded under "<name>-fallback", with the failure kept)
FALLBACK = {"zero3": ["train.compile=false"], "fsdp": ["train.compile=false"]}


def ensure_assets(root: Path) -> dict[str, Path]:
    model, data = root / "llama-1b", root / "data" / "code_train.jsonl"
    if not (model / "config.json").is_file() or not data.is_file():
        from benchmarks.e2e_gpu import model_dir  # noqa: PLC0415
        from launcher.quickstart_assets import build_corpora, build_tokenizer  # noqa: PLC0415

        c = build_corpora(root / "data", max_code_chars=12_000_000)
        tok = build_tokenizer(root / "tokenizer", [c["prose_train"], c["code_train"]], vocab_size=32000)
        model_dir(root, tok)
    assets = {"llama-1b": model, "data": data}
    # recipes/models/<stem>.json (vocabulary 128256) with the same tokenizer: its ids are a subset. Each directory
    # is named after its config file: tests/test_memory.py rebuilds the recorded runs' recipes from that file.
    for key, stem in (("llama3-8b", "llama3-8b"), ("llama3-3b", "llama-3.2-3b")):
        big = assets[key] = root / stem
        if not (big / "config.json").is_file():
            big.mkdir(parents=True, exist_ok=True)
            cfg = json.loads((REPO / "recipes" / "models" / f"{stem}.json").read_text())
            small = json.loads((model / "config.json").read_text())
            cfg.update({k: small[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in small})
            (big / "config.json").write_text(json.dumps(cfg, indent=2))
            for f in model.glob("tokenizer*"):
                shutil.copy(f, big / f.name)
    return assets


def run_process(cmd: list[str], env: dict[str, str], timeout: float, log: Path) -> tuple[int, float]:
    start = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -9
    return rc, time.time() - start


def launch_nodes(run: Run, overrides: list[str], env: dict[str, str], timeout: float, log: Path) -> tuple[int, float]:
    """``run.nodes`` torchrun agents on this host, each with its own GPUs, joined by a c10d rendezvous: the path a
    multi-node job takes (node ranks, a rendezvous store, NCCL between agents), on one machine."""
    per_node = run.gpus // run.nodes
    port = 29400 + os.getpid() % 1000
    start = time.time()
    procs = []
    for node in range(run.nodes):
        gpus = ",".join(str(node * per_node + i) for i in range(per_node))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={run.nodes}",
               f"--nproc-per-node={per_node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "--rdzv-id=speed", f"--rdzv-conf=is_host={int(node == 0)}", "-m", "launcher.train", str(RECIPE),
               *overrides]  # fmt: skip
        f = log.with_suffix(f".node{node}.log").open("w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env={**env, "CUDA_VISIBLE_DEVICES": gpus}, stdout=f,
                                      stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    rcs = []
    for proc in procs:
        try:
            rcs.append(proc.wait(timeout=max(1.0, timeout - (time.time() - start))))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rcs.append(-9)
    log.write_text("".join(log.with_suffix(f".node{n}.log").read_text() for n in range(run.nodes)))
    return next((rc for rc in rcs if rc), 0), time.time() - start


def engine_of(run: Run) -> str:
    return "fsdp" if run.config.endswith(".yaml") else "deepspeed"


def run_overrides(run: Run, assets: dict[str, Path], run_dir: Path, steps: int) -> list[str]:
    """The command-line overrides of ``RECIPE`` for one run (tests rebuild the recorded runs' recipes from them)."""
    model = assets[run.model]
    return [
        f"output_dir={run_dir}", f"model.from_config={model}", f"model.tokenizer={model}",
        f"data.train=[{{path: {assets['data']}}}]", "data.num_workers=2", "eval.sets={fineweb: null}",
        f"train.max_steps={steps}", f"train.micro_batch_size={run.micro_batch}",
        f"train.global_batch_size={run.micro_batch * run.gpus // sequence_parallel_of(run.extra)}",
        "train.log_every=1", "train.save_every=0",
        "train.save_final=false", "train.export_final=false", "logging.wandb=disabled", "logging.progress=false",
        f"parallel.engine={engine_of(run)}", f"parallel.config={run.config}", *run.extra,
    ]  # fmt: skip


def ours(
    name: str,
    assets: dict[str, Path],
    out: Path,
    steps: int,
    timeout: float,
    env: dict[str, str],
    profile: list[int] | None = None,
    settings: list[str] | None = None,
) -> dict:
    from launcher.memory import GIB, estimate
    from launcher.metrics import flops_per_token, mfu
    from launcher.model import load_config, param_counts
    from launcher.preflight import load_recipe

    run = RUNS[name]
    gpus, mb, timeout = run.gpus, run.micro_batch, timeout * run.slow
    engine = engine_of(run)
    run_dir = out / name
    overrides = run_overrides(run, assets, run_dir, steps) + list(settings or [])
    if profile:
        overrides.append(f"train.profile_steps=[{profile[0]},{profile[1]}]")
    if run.nodes > 1:
        # the checkpoint at the end is written by the ranks of every node (exercised, not timed)
        overrides.append("train.save_final=true")
        rc, wall = launch_nodes(run, overrides, env, timeout, out / f"{name}.log")
        command = (f"torchrun --nnodes {run.nodes} --nproc-per-node {gpus // run.nodes} --rdzv-backend c10d "
                   f"-m launcher.train")  # fmt: skip
    else:
        overrides.append(f"parallel.nproc_per_node={gpus}")
        cmd = [sys.executable, "-m", "launcher", "run", str(RECIPE), *overrides]
        run_env = {**env, "CUDA_VISIBLE_DEVICES": visible(gpus)}
        rc, wall = run_process(cmd, run_env, timeout, out / f"{name}.log")
        command = "cpt run"
    # a 3B checkpoint is 38.5 GB: the next run's save would not fit the machine's disk beside it
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    recipe = load_recipe(RECIPE, overrides, world_size=gpus, check_files=False)
    cfg = load_config(recipe)
    record: dict = {"engine": engine, "config": run.config, "model": run.model, "seq_len": recipe.data.seq_len,
                    "gpus": gpus, "nodes": run.nodes, "micro_batch": mb, "global_batch": mb * gpus, "rc": rc,
                    "wall_s": round(wall, 1), "command": " ".join([command, str(RECIPE.relative_to(REPO)),
                    *overrides]).replace(str(out), "$OUT"), "overrides": [o.replace(str(out), "$OUT")
                    for o in overrides]}  # fmt: skip
    record["float8"] = float8_of(run.extra)
    sp = record["sequence_parallel"] = sequence_parallel_of(run.extra)
    accum = recipe.batch_layout(gpus).grad_accum  # a run's own train.global_batch_size may accumulate
    record["global_batch"] = mb * gpus * accum // sp
    if accum > 1:
        record["grad_accum"] = accum
    est = estimate(recipe, cfg, gpus)
    record["memory_estimate_gib"] = round(est.total / GIB, 2)
    record["memory_estimate_parts_gib"] = {k: round(v / GIB, 2) for k, v in est.parts.items()}
    metrics = run_dir / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    train = [x for x in lines if "loss" in x]
    warm = max(1, min(4, len(train) - 2))
    # profiled steps carry the profiler's overhead: timed apart, in the profile summary
    steady = [x for x in train[warm:] if not profile or not profile[0] <= x["step"] <= profile[1]]
    if not steady:
        return record
    step_time = sum(x["step_time"] for x in steady) / len(steady)
    # a GPU holds 1/N of each of its micro-batches' sequences
    per_gpu = mb * accum * recipe.data.seq_len / sp / step_time
    peak = 989e12
    record.update(
        steps_measured=len(steady), step_time_s=round(step_time, 4), tokens_per_s_per_gpu=round(per_gpu),
        mfu=round(mfu(per_gpu, flops_per_token(cfg, recipe.data.seq_len, param_counts(cfg).total), peak) or 0, 4),
        data_wait_frac=round(sum(x["data_wait"] for x in steady) / sum(x["step_time"] for x in steady), 4),
        peak_mem_gib=round(max(x.get("mem_peak_gib", 0) for x in train), 2),
        # allocated between steps: the model states (parameters, gradients, optimizer) and their buffers
        between_steps_gib=round(steady[-1].get("mem_allocated_gib", 0), 2),
        losses=[round(x["loss"], 4) for x in train],
    )  # fmt: skip
    stalls = {x["step"]: x["checkpoint_stall_s"] for x in lines if "checkpoint_stall_s" in x}
    if stalls:
        # the seconds each save held training up, as the run logs them with the step after its commit
        record["checkpoint_stall_s"] = stalls
    every = save_every(overrides)
    if every:
        # every step's time (a save in the background also slows the steps that run while it writes) and, measured
        # from outside, what each save cost training even when the run ends before its write does
        record.update(step_times=[round(x["step_time"], 4) for x in train], save_gap_s=save_gaps(train, every))
    summary = run_dir / "profile" / "rank0.summary.json"
    if summary.is_file():
        prof = json.loads(summary.read_text())
        record["profile"] = prof  # the summary whole: its top operators name what the kernel kinds sum
    if record["peak_mem_gib"]:
        record["estimate_error"] = round(record["memory_estimate_gib"] / record["peak_mem_gib"] - 1, 3)
    return record


def override_of(overrides: list[str], key: str, default: str) -> str:
    """The value ``key`` takes in ``overrides`` (the last one wins, as in the recipe loader), else ``default``."""
    return next((o.partition("=")[2] for o in reversed(overrides) if o.startswith(f"{key}=")), default)


def save_every(overrides: list[str]) -> int:
    """``train.save_every`` of a run (0: no checkpoints before the end)."""
    return int(override_of(overrides, "train.save_every", "0"))


def save_gaps(train: list[dict], every: int) -> dict[int, float]:
    """For each step N that saved (a multiple of ``every`` with a step after it): the wall time between the metrics
    lines of steps N and N+1 (their ``time``) over the median step's ``step_time``. That is the time training lost to
    the save: its start (and, synchronous, the whole write) between the two steps, and, in the background, the next
    step waiting for the copy of the state and running beside the write."""
    by_step = {x["step"]: x for x in train}
    typical = statistics.median(x["step_time"] for x in train[1:] or train)
    gaps = {}
    for step, line in by_step.items():
        after = by_step.get(step + 1)
        if step % every == 0 and after is not None:
            gaps[step] = round(after["time"] - line["time"] - typical, 3)
    return gaps


def sequence_parallel_of(overrides: list[str]) -> int:
    """``parallel.sequence_parallel`` of a run: GPUs that share each sequence (the global batch counts sequences)."""
    return int(override_of(overrides, "parallel.sequence_parallel", "1"))


def float8_of(overrides: list[str]) -> str:
    return override_of(overrides, "train.float8", "off")


def visible(gpus: int) -> str:
    return ",".join(str(i) for i in range(gpus))


def baseline(name: str, assets: dict[str, Path], out: Path, steps: int, timeout: float, env: dict[str, str]) -> dict:
    """An HF Trainer + DeepSpeed run (``hf_trainer_baseline.py``) at the global batch of our 2-GPU runs."""
    run = RUNS[name]
    result = out / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={run.gpus}",
           str(REPO / "benchmarks" / "hf_trainer_baseline.py"), "--model", str(assets[run.model]), "--data",
           str(assets["data"]), "--micro-batch", str(run.micro_batch), "--global-batch", str(BASELINE_GLOBAL_BATCH),
           "--steps", str(steps), "--out", str(result), *run.extra]  # fmt: skip
    rc, wall = run_process(cmd, {**env, "CUDA_VISIBLE_DEVICES": visible(run.gpus)}, timeout, out / f"{name}.log")
    record = json.loads(result.read_text()) if result.is_file() else {"gpus": run.gpus}
    record.update(
        model=run.model, seq_len=2048, float8="off", rc=rc, wall_s=round(wall, 1),
        command=" ".join(cmd).replace(str(out), "$OUT").replace(str(REPO) + "/", ""),
    )  # fmt: skip
    return record


def plain(name: str, assets: dict[str, Path], out: Path, steps: int, timeout: float, env: dict[str, str]) -> dict:
    """The plain FSDP2 loop (``plain_fsdp_gpu.py``) on random tokens, timed after the same warm-up as our runs."""
    run = RUNS[name]
    result = out / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={run.gpus}",
           str(REPO / "benchmarks" / "plain_fsdp_gpu.py"), "--config", str(assets[run.model]),
           "--micro-batch", str(run.micro_batch), "--steps", str(steps), "--warmup", str(max(1, min(4, steps - 2))),
           "--out", str(result), *run.extra]  # fmt: skip
    env = {**env, "CUDA_VISIBLE_DEVICES": visible(run.gpus)}
    rc, wall = run_process(cmd, env, timeout * run.slow, out / f"{name}.log")
    record = json.loads(result.read_text()) if result.is_file() else {"gpus": run.gpus}
    record.update(
        model=run.model, rc=rc, wall_s=round(wall, 1),
        command=" ".join(cmd).replace(str(out), "$OUT").replace(str(REPO) + "/", ""),
    )  # fmt: skip
    record.pop("config", None)  # the model directory, in the command
    return record


def ratios(runs: dict[str, dict]) -> None:
    """x_baseline: tokens/s over the HF Trainer baseline (1.1B shape); x_bf16: a float8 run's over its bf16 run
    (the name without the float8 suffix); x_plain: one of ours over the plain loop at the same model, sequence,
    micro-batch, GPU count and float8 setting. Only runs of this call are compared."""
    tps = {name: r["tokens_per_s_per_gpu"] for name, r in runs.items() if r.get("tokens_per_s_per_gpu")}
    base_name = next((n for n in ("baseline", "baseline-1gpu") if n in tps), None)
    same = ("model", "seq_len", "micro_batch", "gpus", "float8")
    plains = [n for n in tps if runs[n].get("engine") == "plain-fsdp2"]
    for name in tps:
        r = runs[name]
        if base_name and name != base_name and r.get("model") == "llama-1b":
            r["x_baseline"] = round(tps[name] / tps[base_name], 2)
        bf16 = next((name.removesuffix(s) for s in FLOAT8_SUFFIXES if name.endswith(s)), None)
        if bf16 in tps and all(r.get(k) == runs[bf16].get(k) for k in ("model", "gpus", "micro_batch")):
            r["x_bf16"] = round(tps[name] / tps[bf16], 3)
        match = [p for p in plains if all(r.get(k) == runs[p].get(k) for k in same)]
        if r.get("engine") in ("fsdp", "deepspeed") and match:
            r["x_plain"] = round(tps[name] / tps[match[0]], 3)


def weak_scaling(runs: dict[str, dict]) -> dict[str, float]:
    """tokens/s/GPU at each size over the same engine's 1-GPU run ("fsdp" is the 2-GPU FSDP2 run, "fsdp-4gpu"
    the 4-GPU one, "fsdp-2nodes" 2 simulated nodes), the same micro-batch and model everywhere."""
    out = {}
    for engine in ("fsdp", "zero3"):
        one = runs.get(f"{engine}-1gpu", {}).get("tokens_per_s_per_gpu")
        for name, r in runs.items():
            tps = r.get("tokens_per_s_per_gpu")
            same = r.get("model") == "llama-1b" and r.get("micro_batch") == RUNS[f"{engine}-1gpu"].micro_batch
            if one and tps and same and (name == engine or name.startswith(f"{engine}-")) and r.get("gpus", 1) > 1:
                extra = RUNS[name].extra if name in RUNS else []
                if extra == RUNS[f"{engine}-1gpu"].extra:
                    out[f"{name} ({r['gpus']} GPUs)"] = round(tps / one, 3)
    return out


def table(runs: dict[str, dict]) -> str:
    head = ("| run | GPUs | micro/global batch | tokens/s/GPU | MFU | x baseline | x bf16 | x plain | peak GiB | "
            "estimate GiB | data wait |")  # fmt: skip
    rows = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        tps = r.get("tokens_per_s_per_gpu")
        if not tps:
            rows.append(f"| {name} | {r.get('gpus')} | | failed (rc {r.get('rc')}) | | | | | | | |")
            continue
        x = {k: f"{r[k]:.2f}" if k in r else "" for k in ("x_baseline", "x_bf16", "x_plain")}
        est = r.get("memory_estimate_gib", "")
        wait = f"{100 * r['data_wait_frac']:.2f}%" if "data_wait_frac" in r else ""
        mfu = f"{100 * (r.get('mfu') or 0):.1f}%"
        rows.append(f"| {name} | {r['gpus']} | {r['micro_batch']}/{r['global_batch']} | {tps:,.0f} | {mfu} | "
                    f"{x['x_baseline']} | {x['x_bf16']} | {x['x_plain']} | {r.get('peak_mem_gib')} | {est} | "
                    f"{wait} |")  # fmt: skip
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--assets", default="bench_assets")
    p.add_argument("--out", default="runs/speed")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--runs", nargs="+", default=["fsdp", "baseline", "zero3", "fsdp-1gpu"], choices=list(RUNS))
    p.add_argument("--timeout", type=float, default=150, help="seconds per run")
    p.add_argument("--deadline", type=float, default=0, help="skip runs that would start after this many seconds")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--name", default="speed", help="results file: <date>-<name>-<card>.json")
    p.add_argument(
        "--profile",
        nargs=2,
        type=int,
        metavar=("FIRST", "LAST"),
        help="profile these steps of every run (train.profile_steps; they are left out of the timing)",
    )
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides added to each of our runs (after the run's own): an A/B of one setting, one call each",
    )
    p.add_argument(
        "--gpus", type=int, help="GPU count of the runs whose name states none (llama3-3b-*, plain-llama3-3b*)"
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        help="micro-batch of our runs and the plain loop's (the HF Trainer baselines keep theirs: global batch 32)",
    )
    args = p.parse_args()
    from benchmarks.e2e_gpu import git_revision  # noqa: PLC0415

    for name, run in RUNS.items():
        if args.gpus and run.scales:
            RUNS[name] = run = run._replace(gpus=args.gpus)
        if args.micro_batch and run.kind != "hf":
            RUNS[name] = run._replace(micro_batch=args.micro_batch)

    t0 = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    assets = ensure_assets(Path(args.assets).resolve())
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    record: dict = {
        "date": datetime.date.today().isoformat(), "card": card, "gpus_on_host": torch.cuda.device_count(),
        "model": "llama 1.1B shape (recipes/models/llama-1b.json, 32K BPE vocabulary) unless a run names "
                 "llama3-8b (recipes/models/llama3-8b.json) or llama3-3b (recipes/models/llama-3.2-3b.json)",
        "seq_len": "2048 unless a run records its own",
        "precision": "bf16", "peak_tflops": 989,
        "git_revision": git_revision(),
        "command": " ".join(["python", "benchmarks/speed_gpu.py", *sys.argv[1:]]),
        # compiler settings from the environment change what a run measures: recorded with it
        "environment": {k: v for k, v in os.environ.items() if k.startswith(("TORCHINDUCTOR_", "TORCH_COMPILE"))},
        "runs": {},
    }  # fmt: skip
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TOKENIZERS_PARALLELISM": "false"}
    name_card = card.replace(" ", "-").replace("/", "-")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{record['date']}-{args.name}-{name_card}.json"
    for name in args.runs:
        if args.deadline and time.time() - t0 > args.deadline:
            record["runs"][name] = {"skipped": "deadline"}
            continue
        print(f"--- {name} ({time.time() - t0:.0f} s)", flush=True)
        kind = RUNS[name].kind
        if kind == "hf":
            r = baseline(name, assets, out, args.steps, args.timeout, env)
        elif kind == "plain":
            r = plain(name, assets, out, args.steps, args.timeout, env)
        else:
            r = ours(name, assets, out, args.steps, args.timeout, env, args.profile, args.set)
        record["runs"][name] = r
        print(json.dumps({k: v for k, v in r.items() if k not in ("losses", "command")}), flush=True)
        if r.get("rc") != 0:
            print((out / f"{name}.log").read_text()[-3000:], flush=True)
            if name in FALLBACK and not (args.deadline and time.time() - t0 > args.deadline):
                RUNS[f"{name}-fallback"] = RUNS[name]._replace(extra=[*RUNS[name].extra, *FALLBACK[name]])
                r = ours(f"{name}-fallback", assets, out, args.steps, args.timeout, env, args.profile, args.set)
                record["runs"][f"{name}-fallback"] = r
                print(json.dumps({k: v for k, v in r.items() if k not in ("losses", "command")}), flush=True)
        ratios(record["runs"])
        record["weak_scaling"] = weak_scaling(record["runs"])
        text = json.dumps(record, indent=2)
        path.write_text(text)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], path.name).write_text(text)
    print(table(record["runs"]))
    print(f"wrote {path} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
