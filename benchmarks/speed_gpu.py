"""GPU speed: our recipes on both engines against HF Trainer + DeepSpeed ZeRO-3, in one call on one machine.

    python benchmarks/speed_gpu.py --assets bench_assets --out /tmp/speed [--steps 12] [--runs fsdp baseline ...]

The model is the 1.1B Llama shape of ``recipes/llama-1b-scratch.yaml`` (hidden 2048, 22 layers, 32 heads,
4 KV heads, FFN 5632) with the vocabulary of a 32K BPE tokenizer, trained on real text (Python's standard
library source, streamed, tokenized and packed by the data pipeline with 2 DataLoader workers per rank), seq 2048,
bf16. ``--assets`` is a directory made by ``benchmarks/e2e_gpu.py``'s builders (``data/code_train.jsonl`` and
``llama-1b/`` with config and tokenizer); it is built when missing.

Every run is an ordinary ``cpt run`` of the recipe with command-line overrides; tokens/s per GPU is taken over the
steps after ``--warmup`` (the first steps include torch.compile's kernel generation), from the per-step
``step_time`` in metrics.jsonl; MFU uses the same function as the training logs. For each run the per-GPU memory
estimate of ``cpt plan`` is recorded next to the measured peak. Writes
``benchmarks/results/<date>-speed-<card>.json`` (and a copy under $OUT) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
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


class Run(NamedTuple):
    config: str  # engine config in ds_configs/ ("" for the HF Trainer baseline)
    gpus: int  # GPUs in all
    micro_batch: int  # the global batch is micro-batch x GPUs (no accumulation)
    extra: list[str]  # recipe overrides
    model: str = "llama-1b"  # directory under --assets
    nodes: int = 1  # simulated nodes on the one host (torchrun --nnodes, c10d rendezvous)
    slow: float = 1.0  # times --timeout this run may take (the 8B model takes minutes to build and compile)


RUNS: dict[str, Run] = {
    "fsdp": Run("fsdp.yaml", 2, 16, FAST),
    "baseline": Run("", 2, 4, []),
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
    big = root / "llama3-8b"
    if not (big / "config.json").is_file():
        # recipes/models/llama3-8b.json (vocabulary 128256) with the same tokenizer: its ids are a subset
        big.mkdir(parents=True, exist_ok=True)
        cfg = json.loads((REPO / "recipes" / "models" / "llama3-8b.json").read_text())
        small = json.loads((model / "config.json").read_text())
        cfg.update({k: small[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in small})
        (big / "config.json").write_text(json.dumps(cfg, indent=2))
        for f in model.glob("tokenizer*"):
            shutil.copy(f, big / f.name)
    return {"llama-1b": model, "llama3-8b": big, "data": data}


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
        f"train.global_batch_size={run.micro_batch * run.gpus}", "train.log_every=1", "train.save_every=0",
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
) -> dict:
    from launcher.memory import GIB, estimate
    from launcher.metrics import flops_per_token, mfu
    from launcher.model import load_config, param_counts
    from launcher.preflight import load_recipe

    run = RUNS[name]
    gpus, mb, timeout = run.gpus, run.micro_batch, timeout * run.slow
    engine = engine_of(run)
    run_dir = out / name
    overrides = run_overrides(run, assets, run_dir, steps)
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
        run_env = {**env, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}
        rc, wall = run_process(cmd, run_env, timeout, out / f"{name}.log")
        command = "cpt run"
    recipe = load_recipe(RECIPE, overrides, world_size=gpus, check_files=False)
    cfg = load_config(recipe)
    record: dict = {"engine": engine, "config": run.config, "model": run.model, "seq_len": recipe.data.seq_len,
                    "gpus": gpus, "nodes": run.nodes, "micro_batch": mb, "global_batch": mb * gpus, "rc": rc,
                    "wall_s": round(wall, 1), "command": " ".join([command, str(RECIPE.relative_to(REPO)),
                    *overrides]).replace(str(out), "$OUT"), "overrides": [o.replace(str(out), "$OUT")
                    for o in overrides]}  # fmt: skip
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
    per_gpu = mb * recipe.data.seq_len / step_time
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
    summary = run_dir / "profile" / "rank0.summary.json"
    if summary.is_file():
        prof = json.loads(summary.read_text())
        record["profile"] = {**prof, "top_ops": prof.get("top_ops", [])[:12]}
    if record["peak_mem_gib"]:
        record["estimate_error"] = round(record["memory_estimate_gib"] / record["peak_mem_gib"] - 1, 3)
    return record


def baseline(assets: dict[str, Path], out: Path, steps: int, timeout: float, env: dict[str, str]) -> dict:
    gpus, mb = RUNS["baseline"].gpus, RUNS["baseline"].micro_batch
    result = out / "baseline.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           str(REPO / "benchmarks" / "hf_trainer_baseline.py"), "--model", str(assets["llama-1b"]), "--data",
           str(assets["data"]), "--micro-batch", str(mb), "--global-batch", str(BASELINE_GLOBAL_BATCH),
           "--steps", str(steps), "--out", str(result)]  # fmt: skip
    rc, wall = run_process(cmd, env, timeout, out / "baseline.log")
    record = json.loads(result.read_text()) if result.is_file() else {}
    record.update(
        rc=rc, wall_s=round(wall, 1), command=" ".join(cmd).replace(str(out), "$OUT").replace(str(REPO) + "/", "")
    )
    return record


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
    head = "| run | GPUs | micro/global batch | tokens/s/GPU | MFU | x baseline | peak GiB | estimate GiB | data wait |"
    rows = [head, "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        tps = r.get("tokens_per_s_per_gpu")
        if not tps:
            rows.append(f"| {name} | {r.get('gpus')} | | failed (rc {r.get('rc')}) | | | | | |")
            continue
        ratio = f"{r['x_baseline']:.2f}" if "x_baseline" in r else ""
        est = r.get("memory_estimate_gib", "")
        wait = f"{100 * r['data_wait_frac']:.2f}%" if "data_wait_frac" in r else ""
        mfu = f"{100 * (r.get('mfu') or 0):.1f}%"
        rows.append(f"| {name} | {r['gpus']} | {r['micro_batch']}/{r['global_batch']} | {tps:,.0f} | {mfu} | "
                    f"{ratio} | {r.get('peak_mem_gib')} | {est} | {wait} |")  # fmt: skip
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
    args = p.parse_args()
    from benchmarks.e2e_gpu import git_revision  # noqa: PLC0415

    t0 = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    assets = ensure_assets(Path(args.assets).resolve())
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    record: dict = {
        "date": datetime.date.today().isoformat(), "card": card, "gpus_on_host": torch.cuda.device_count(),
        "model": "llama 1.1B shape (recipes/models/llama-1b.json, 32K BPE vocabulary) unless a run names "
                 "llama3-8b (recipes/models/llama3-8b.json)", "seq_len": 2048,
        "precision": "bf16", "peak_tflops": 989,
        "git_revision": git_revision(),
        "command": " ".join(["python", "benchmarks/speed_gpu.py", *sys.argv[1:]]), "runs": {},
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
        if name == "baseline":
            r = baseline(assets, out, args.steps, args.timeout, env)
        else:
            r = ours(name, assets, out, args.steps, args.timeout, env, args.profile)
        record["runs"][name] = r
        print(json.dumps({k: v for k, v in r.items() if k not in ("losses", "command")}), flush=True)
        if r.get("rc") != 0:
            print((out / f"{name}.log").read_text()[-3000:], flush=True)
            if name in FALLBACK and not (args.deadline and time.time() - t0 > args.deadline):
                RUNS[f"{name}-fallback"] = RUNS[name]._replace(extra=[*RUNS[name].extra, *FALLBACK[name]])
                r = ours(f"{name}-fallback", assets, out, args.steps, args.timeout, env, args.profile)
                record["runs"][f"{name}-fallback"] = r
                print(json.dumps({k: v for k, v in r.items() if k not in ("losses", "command")}), flush=True)
        base = record["runs"].get("baseline", {}).get("tokens_per_s_per_gpu")
        for run in record["runs"].values():
            # the baseline trains the 1.1B shape: no ratio for the 8B runs
            same_model = run.get("model") == "llama-1b"
            if base and same_model and run.get("tokens_per_s_per_gpu") and run is not record["runs"]["baseline"]:
                run["x_baseline"] = round(run["tokens_per_s_per_gpu"] / base, 2)
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
