"""``cpt``: run, plan, eval, export, quickstart."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .config import ConfigError, to_yaml
from .engine import PLANS
from .launch import default_nproc
from .run import load_or_exit, run_recipe


def cmd_run(args: argparse.Namespace) -> int:
    return run_recipe(args.recipe, args.overrides)


def cmd_plan(args: argparse.Namespace) -> int:
    recipe = load_or_exit(args.recipe, args.overrides)
    gpus = args.gpus_per_node or default_nproc(recipe.parallel.nproc_per_node)
    world = args.nodes * gpus
    try:
        layout = recipe.batch_layout(world)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .metrics import flops_per_token
    from .model import load_config, param_counts

    print(to_yaml(recipe), end="")
    print("---")
    t = recipe.train
    lines = {
        "world": f"{args.nodes} node(s) x {gpus} worker(s) = {world} ranks, engine {recipe.parallel.engine} "
        f"({recipe.parallel.config})",
        "micro batch": f"{layout.micro_batch_size} sequences per rank",
        "gradient accumulation": layout.grad_accum,
        "global batch": f"{layout.global_batch_size} sequences = {layout.tokens_per_step:,} tokens per step",
        "steps": t.max_steps,
        "tokens in total": f"{layout.tokens_per_step * t.max_steps:,}",
    }
    try:
        cfg = load_config(recipe)
        n = param_counts(cfg, recipe.model.trust_remote_code).total
        lines["model"] = f"{cfg.model_type}, {n / 1e9:.3f}B parameters"
        lines["training FLOPs"] = f"{flops_per_token(cfg, recipe.data.seq_len, n):.3e} per token"
    except (OSError, ValueError) as e:
        lines["model"] = f"config not readable here ({e})"
        cfg = None
    for k, v in lines.items():
        print(f"{k:>22}: {v}")
    if cfg is not None:
        return _plan_memory(recipe, cfg, world, args.gpu_memory_gib)
    return 0


def _plan_memory(recipe, cfg, world: int, gpu_memory_gib: float | None) -> int:
    """The per-GPU memory estimate, a warning when it will not fit, and the micro-batch that would."""
    from .memory import GIB, estimate, suggest_micro_batch

    if gpu_memory_gib is None:
        import torch

        if torch.cuda.is_available():
            gpu_memory_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    gpu = gpu_memory_gib * GIB if gpu_memory_gib else None
    bf16 = recipe.train.precision != "fp32"
    est = estimate(recipe, cfg, world, bf16=bf16)
    print("--- memory per GPU (peak allocated, bf16)" if bf16 else "--- memory per GPU (peak allocated, fp32)")
    print(est.table(gpu))
    if gpu is None:
        print("(pass --gpu-memory-gib to check the fit; no GPU here)")
        return 0
    best = suggest_micro_batch(recipe, cfg, world, gpu)
    if best is not None:
        print(f"{'largest micro batch':>22}: {best[0]} (gradient accumulation {best[1]}) within 90% of the GPU")
    if est.total > gpu:
        need = f"the estimate ({est.total / GIB:.1f} GiB) exceeds the GPU's {gpu / GIB:.1f} GiB"
        print(f"warning: {need}: lower train.micro_batch_size, turn on model.activation_checkpointing, or offload",
              file=sys.stderr)  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import export

    out = export(Path(args.checkpoint), Path(args.out), max_shard_size=args.max_shard_size)
    print(f"Hugging Face model written to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    engine_config = PLANS[args.engine].default_config
    with tempfile.TemporaryDirectory(prefix="cpt-eval-") as tmp:
        recipe = Path(tmp) / "eval.yaml"
        recipe.write_text(
            json.dumps(
                {
                    "output_dir": str(Path(tmp) / "out"),
                    "model": {"name_or_path": str(Path(args.model_dir).resolve())},
                    "data": {"seq_len": args.seq_len, "num_workers": 0},
                    "train": {"max_steps": 0, "micro_batch_size": args.batch_size},
                    "eval": {"sets": {"eval": {"path": str(Path(args.data_file).resolve())}}},
                    "parallel": {"engine": args.engine, "config": engine_config, "nproc_per_node": args.nproc},
                    "logging": {"wandb": "disabled", "progress": False},
                }
            )
        )
        rc = run_recipe(str(recipe), [])
        if rc:
            return rc
        results = json.loads((Path(tmp) / "out" / "eval_results.json").read_text())
    print(json.dumps(results["eval"]))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Who holds ``output_dir``, whether that run is alive, and how far it got."""
    from .callbacks.base import read_metrics
    from .checkpoint import complete_checkpoints
    from .launch.lock import status

    out = Path(args.output_dir)
    if not out.is_dir():
        print(f"error: {out}: no such directory", file=sys.stderr)
        return 2
    owner, alive = status(out)
    if owner is None:
        print(f"{'run':>16}: {'running (owner not recorded)' if alive else 'not running'}")
    else:
        print(f"{'run':>16}: {'running' if alive else 'not running'}: {owner.describe()}")
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    print(f"{'last step':>16}: {steps[-1] if steps else 'none logged'}")
    ckpts = complete_checkpoints(out)
    print(f"{'last checkpoint':>16}: {ckpts[-1] if ckpts else 'none'}")
    print(f"{'final model':>16}: {out / 'final' if (out / 'final' / 'config.json').is_file() else 'not written'}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    return run_quickstart(Path(args.output_dir), fast=args.fast)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpt", description="Continual pretraining of causal language models")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train a recipe (starts the workers unless a launcher already did)")
    r.add_argument("recipe")
    r.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_steps=100")
    r.set_defaults(func=cmd_run)

    pl = sub.add_parser("plan", help="print the resolved recipe, world layout and batch math; no training")
    pl.add_argument("recipe")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--nodes", type=int, default=1)
    pl.add_argument("--gpus-per-node", type=int, default=None)
    pl.add_argument("--gpu-memory-gib", type=float, default=None, help="GPU memory to plan for (default: this GPU's)")
    pl.set_defaults(func=cmd_plan)

    e = sub.add_parser("eval", help="perplexity of a saved model on one data file; prints one JSON line last")
    e.add_argument("model_dir")
    e.add_argument("data_file")
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--nproc", type=int, default=None)
    e.add_argument("--engine", choices=list(PLANS), default="deepspeed")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="consolidated Hugging Face model from a checkpoint")
    x.add_argument("checkpoint")
    x.add_argument("out")
    x.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    x.set_defaults(func=cmd_export)

    st = sub.add_parser("status", help="who runs in an output_dir, whether it is alive, last step and checkpoint")
    st.add_argument("output_dir")
    st.set_defaults(func=cmd_status)

    q = sub.add_parser("quickstart", help="the whole workflow on this machine, no GPU or network needed")
    q.add_argument("--output-dir", default="runs/quickstart")
    q.add_argument("--fast", action="store_true", help="a shortened run (used by the tests)")
    q.set_defaults(func=cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    return args.func(args)
