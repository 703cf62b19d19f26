"""``cpt``: run, plan, eval, export, status, quickstart.

Bad input to any subcommand (a missing path, a folder of the wrong kind, a recipe that does not validate) ends in
one ``error: ...`` naming the path or key and saying what to pass instead, and exit code 2, before anything runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from .config import DS_CONFIG_DIR, ConfigError, SourceConfig, eval_overlap_warnings, to_yaml
from .engine import PLANS, plan_for
from .launch import default_nproc
from .lengths import train_steps
from .run import load_or_exit, run_recipe

DISTRIBUTION = "cpt-launcher"
USAGE_ERROR = 2


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return USAGE_ERROR


def cmd_run(args: argparse.Namespace) -> int:
    return run_recipe(args.recipe, args.overrides)


def cmd_plan(args: argparse.Namespace) -> int:
    from .preflight import plan_model_config, planned_vocabulary

    recipe = load_or_exit(args.recipe, args.overrides)
    gpus = args.gpus_per_node or default_nproc(recipe.parallel.nproc_per_node)
    world = args.nodes * gpus
    try:
        layout = recipe.batch_layout(world)
    except ConfigError as e:
        return fail(str(e))
    from .metrics import flops_per_token
    from .model import param_counts

    print(to_yaml(recipe), end="")
    for warning in eval_overlap_warnings(recipe):
        print(f"warning: {warning}", file=sys.stderr)
    print("---")
    t = recipe.train
    steps = train_steps(t, layout.tokens_per_step)
    lines = {
        "world": f"{args.nodes} node(s) x {gpus} worker(s) = {world} ranks, engine {recipe.parallel.engine} "
        f"({recipe.parallel.config})",
        "parallelism": f"data-parallel {layout.data_parallel} x sequence {layout.sequence_parallel}",
        "micro batch": _plan_micro_batch(layout, recipe.data.seq_len),
        "gradient accumulation": layout.grad_accum,
        "global batch": f"{layout.global_batch_size} sequences = {layout.tokens_per_step:,} tokens per step",
        "steps": steps,
        "tokens in total": f"{layout.tokens_per_step * steps:,}",
    }
    try:
        cfg, note = plan_model_config(recipe)
        if cfg is not None:
            cfg, grown = planned_vocabulary(recipe, cfg)
            if grown:
                lines["vocabulary"] = grown
            n = param_counts(cfg, recipe.model.trust_remote_code).total
            if note:
                lines["model config"] = note
            lines["model"] = f"{cfg.model_type}, {n / 1e9:.3f}B parameters"
            lines["positions"] = _plan_positions(recipe, cfg)
            lines["training FLOPs"] = f"{flops_per_token(cfg, recipe.data.seq_len, n):.3e} per token"
        else:
            lines["model"] = note
    except (OSError, ValueError) as e:
        lines["model"] = f"config not readable here ({e})"
        cfg = None
    for k, v in lines.items():
        print(f"{k:>22}: {v}")
    if cfg is not None:
        code = _plan_memory(recipe, cfg, world, args.gpu_memory_gib)
        _plan_host(recipe, cfg, world, gpus, args.read_gbps)
        return code
    return 0


def _plan_micro_batch(layout, seq_len: int) -> str:
    """Sequences per micro-batch, and the tokens each GPU holds of them under sequence parallelism."""
    mb, n = layout.micro_batch_size, layout.sequence_parallel
    if n == 1:
        return f"{mb} sequences per rank"
    return f"{mb} sequences per data-parallel rank, each split over {n} GPUs ({mb * seq_len // n:,} tokens per GPU)"


def _plan_positions(recipe, cfg) -> str:
    """The model's positions and RoPE as the run sets them (``model.rope_*``, ``model.max_position_embeddings``),
    with a warning when ``data.seq_len`` exceeds them."""
    from .model import describe_rope, position_limit
    from .preflight import positions_problem

    text = cfg.get_text_config()
    whose = "model.max_position_embeddings" if recipe.model.max_position_embeddings else "its max_position_embeddings"
    if problem := positions_problem(recipe, position_limit(cfg), whose):
        print(f"warning: {problem}", file=sys.stderr)
    return describe_rope(getattr(text, "max_position_embeddings", None), getattr(text, "rope_parameters", None) or {})


def _plan_host(recipe, cfg, world: int, ranks_per_node: int, read_gbps: float) -> None:
    """Host memory per rank and node for loading and for the offloaded training state; the load's disk reads."""
    from .memory import host_estimate
    from .model import param_counts
    from .weights import checkpoint_bytes

    source = recipe.model.name_or_path
    size: float | None = None
    if source:
        size = checkpoint_bytes(Path(source)) if Path(source).is_dir() else None
        if size is None:  # a hub model not downloaded here: its parameters in the config's dtype
            dtype = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "bfloat16")
            size = param_counts(cfg, recipe.model.trust_remote_code).total * (4 if "32" in dtype else 2)
    est = host_estimate(recipe, cfg, world, ranks_per_node, size)
    print("--- host memory per rank (beyond the process itself: 1.6 GiB for a GPU rank measured on an H200)")
    print(est.table(ranks_per_node, read_gbps))


def _plan_memory(recipe, cfg, world: int, gpu_memory_gib: float | None) -> int:
    """The per-GPU memory estimate, a warning when it leaves too little room, and what would fit: the largest
    micro-batch, the longest seq_len and, when the recipe does not fit, the smallest sequence parallelism."""
    from . import memory
    from .memory import GIB, HEADROOM

    if gpu_memory_gib is None:
        import torch

        if torch.cuda.is_available():
            gpu_memory_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    gpu = gpu_memory_gib * GIB if gpu_memory_gib else None
    bf16 = recipe.train.precision != "fp32"
    est = memory.estimate(recipe, cfg, world, bf16=bf16)
    print("--- memory per GPU (peak allocated, bf16)" if bf16 else "--- memory per GPU (peak allocated, fp32)")
    print(est.table(gpu))
    if gpu is None:
        print("(pass --gpu-memory-gib to check the fit; no GPU here)")
        return 0
    best = memory.suggest_micro_batch(recipe, cfg, world, gpu)
    if best is not None:
        print(
            f"{'largest micro batch':>22}: {best[0]} (gradient accumulation {best[1]}) within {HEADROOM:.0%} of the GPU"
        )
    print(f"{'longest seq_len':>22}: {memory.describe_longest_seq_len(recipe, cfg, world, gpu)}")
    size = f"the estimate ({est.total / GIB:.1f} GiB)"
    if est.total > gpu:
        problem = f"{size} exceeds the GPU's {gpu / GIB:.1f} GiB"
    elif est.total > HEADROOM * gpu:
        # The estimate is of what tensors hold; the allocator's fragmentation, NCCL's buffers and the CUDA context
        # need several GiB besides, so a run planned this close to the limit often runs out of memory.
        problem = (
            f"{size} is {est.total / gpu:.0%} of the GPU's {gpu / GIB:.1f} GiB, above {HEADROOM:.0%}: fragmentation "
            "and NCCL's buffers need the rest"
        )
    else:
        return 0
    sp, text = memory.describe_sequence_parallel(recipe, cfg, world, gpu)
    print(f"{'sequence parallel':>22}: {text}")
    micro = recipe.train.micro_batch_size
    lower = f" (to {best[0]})" if best is not None and best[0] < micro else ""
    spread = f", or set parallel.sequence_parallel={sp}" if sp is not None else ""
    square = memory.SQUARE in est.parts
    unmask = ", or model.attn_implementation=flash_attention_2 (no seq_len^2 mask)" if square else ""
    print(
        f"warning: {problem}; lower train.micro_batch_size{lower}, turn on model.activation_checkpointing"
        f"{_offload_hint(recipe)}{spread}{unmask}",
        file=sys.stderr,
    )
    return 0


def _offload_hint(recipe) -> str:
    """The CPU offload the recipe could still turn on: an offload config of its engine from ds_configs/."""
    if plan_for(recipe).offloaded(recipe):
        return ""
    suffix = Path(recipe.parallel.config).suffix
    configs = sorted(p.name for p in DS_CONFIG_DIR.glob(f"*offload*{suffix}"))
    return f", or offload to the CPU (parallel.config={configs[0]})" if configs else ", or offload to the CPU"


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export, export_problem

    checkpoint, out = Path(args.checkpoint), Path(args.out)
    problem = export_problem(checkpoint, out)
    if problem is not None:
        return fail(problem)
    try:
        written = export(checkpoint, out, max_shard_size=args.max_shard_size)
    except OSError as e:
        return fail(f"{out}: cannot write the model ({e})")
    print(f"Hugging Face model written to {written}")
    return 0


def _eval_input_problem(model: Path, data_file: str) -> str | None:
    """Why ``cpt eval`` cannot evaluate ``model`` on ``data_file``, naming the path and what to pass instead."""
    from .data import check_sources

    pass_model = "pass a Hugging Face model directory (a run's final/, or what `cpt export` wrote)"
    if not model.is_dir():
        return f"{model}: {'not a directory' if model.exists() else 'no such directory'}; {pass_model}"
    if (model / "trainer_state.json").is_file():
        return f"{model}: a checkpoint, not a model; export it first (`cpt export {model} OUT`) and evaluate OUT"
    if not (model / "config.json").is_file():
        if (model / "final" / "config.json").is_file():
            return f"{model}: a run's output_dir, not a model; pass its final model {model / 'final'}"
        return f"{model}: no config.json, so not a Hugging Face model; {pass_model}"
    problems = check_sources([SourceConfig(path=data_file)])
    if problems and not any(c in data_file for c in "*?[") and not os.path.exists(data_file):
        return (
            f"{data_file}: no such file or directory; pass a data file (.jsonl, .parquet, .txt), a directory or a glob"
        )
    return problems[0] if problems else None


def cmd_eval(args: argparse.Namespace) -> int:
    problem = _eval_input_problem(Path(args.model_dir), args.data_file)
    if problem is not None:
        return fail(problem)
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


def _status_input_problem(out: Path) -> str | None:
    """Why ``out`` is not a run's output_dir, and what to pass instead."""
    from .launch.lock import LOCK_FILE, OWNER_FILE

    pass_one = "pass a run's output_dir (the output_dir of its recipe)"
    if not out.exists():
        return f"{out}: no such directory; {pass_one}"
    if not out.is_dir():
        return f"{out}: not a directory; {pass_one}"
    if (out / "trainer_state.json").is_file():
        return f"{out}: a checkpoint; pass the run's output_dir {out.parent.parent}"
    marks = (LOCK_FILE, OWNER_FILE, "resolved_recipe.yaml", "metrics.jsonl", "checkpoints")
    if any((out / m).exists() for m in marks):
        return None
    runs = sorted(str(d) for d in out.iterdir() if d.is_dir() and any((d / m).exists() for m in marks))
    instead = f"the runs in it: {', '.join(runs)}" if runs else pass_one
    return (
        f"{out}: not a run's output_dir (no resolved_recipe.yaml, metrics.jsonl, checkpoints/ or run lock); {instead}"
    )


def cmd_status(args: argparse.Namespace) -> int:
    """Who holds ``output_dir``, whether that run is alive, and how far it got."""
    from .callbacks.base import read_metrics
    from .checkpoint import complete_checkpoints
    from .launch.lock import status

    out = Path(args.output_dir)
    problem = _status_input_problem(out)
    if problem is not None:
        return fail(problem)
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

    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        return fail(f"--output-dir {out}: not a directory; pass a directory for the quickstart's files")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return fail(f"--output-dir {out}: cannot create it ({e.strerror}); pass a directory you can write to")
    if not os.access(out, os.W_OK | os.X_OK):
        return fail(f"--output-dir {out}: not writable; pass a directory you can write to")
    return run_quickstart(out, fast=args.fast)


def _positive(kind: type[int] | type[float]):
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _shard_size(text: str) -> str:
    """``--max-shard-size``: a size such as 5GB, 500MB or 2GiB, checked before anything is read."""
    from .export import parse_size

    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``cpt`` parser and each subcommand's own parser, by name."""
    p = argparse.ArgumentParser(prog="cpt", description="Continual pretraining of causal language models")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")
    commands: dict[str, argparse.ArgumentParser] = {}

    def command(name: str, what: str) -> argparse.ArgumentParser:
        commands[name] = sub.add_parser(name, help=what, description=what)
        return commands[name]

    recipe_help = "recipe YAML file (see recipes/)"
    overrides_help = "key=value overrides of the recipe, e.g. train.max_steps=100; before or after the flags"

    r = command("run", "train a recipe (starts the workers unless a launcher already did)")
    r.add_argument("recipe", help=recipe_help)
    r.add_argument("overrides", nargs="*", help=overrides_help)
    r.set_defaults(func=cmd_run)

    pl = command("plan", "print the resolved recipe, world layout, batch math and memory; no training")
    pl.add_argument("recipe", help=recipe_help)
    pl.add_argument("overrides", nargs="*", help=overrides_help)
    pl.add_argument("--nodes", type=_positive(int), default=1, help="machines the run will use (default: 1)")
    pl.add_argument(
        "--gpus-per-node",
        type=_positive(int),
        default=None,
        help="workers (GPUs) per machine (default: parallel.nproc_per_node, else this machine's GPUs, else 1)",
    )
    pl.add_argument(
        "--gpu-memory-gib",
        type=_positive(float),
        default=None,
        help="memory of one GPU in GiB to check the fit against (default: this machine's GPU)",
    )
    pl.add_argument(
        "--read-gbps",
        type=_positive(float),
        default=2.0,
        help="disk read speed per node in GB/s that the load time is estimated with (default 2)",
    )
    pl.set_defaults(func=cmd_plan)

    e = command("eval", "perplexity of a saved model on one data file; prints one JSON line last")
    e.add_argument("model_dir", help="a Hugging Face model directory (a run's final/, or what `cpt export` wrote)")
    e.add_argument("data_file", help="text to evaluate on: a .jsonl, .parquet or .txt file, a directory or a glob")
    e.add_argument("--seq-len", type=_positive(int), default=2048, help="tokens per evaluated block (default: 2048)")
    e.add_argument("--batch-size", type=_positive(int), default=1, help="blocks per forward pass (default: 1)")
    e.add_argument(
        "--nproc", type=_positive(int), default=None, help="worker processes (default: one per GPU, or 1 without GPUs)"
    )
    e.add_argument(
        "--engine",
        choices=list(PLANS),
        default="deepspeed",
        help="engine that holds the model, with its default config (default: deepspeed)",
    )
    e.set_defaults(func=cmd_eval)

    x = command("export", "consolidated Hugging Face model from a checkpoint")
    x.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/NAME/checkpoints/step-2000")
    x.add_argument("out", help="directory to write the model to (safetensors, config, tokenizer)")
    x.add_argument(
        "--max-shard-size",
        type=_shard_size,
        default="5GB",
        help="largest safetensors file, e.g. 5GB, 500MB or 2GiB (default: 5GB); the export holds about one such "
        "file plus one decoder layer in memory",
    )
    x.set_defaults(func=cmd_export)

    st = command("status", "who runs in an output_dir, whether it is alive, last step and checkpoint")
    st.add_argument("output_dir", help="a run's output_dir (the output_dir of its recipe)")
    st.set_defaults(func=cmd_status)

    q = command("quickstart", "the whole workflow on this machine, no GPU or network needed")
    q.add_argument("--output-dir", default="runs/quickstart", help="where its data, models and runs go")
    q.add_argument("--fast", action="store_true", help="a shortened run: a smaller model and a few steps of each stage")
    q.set_defaults(func=cmd_quickstart)
    return p, commands


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with a subcommand's key=value overrides before or after its flags: argparse, given the
    subcommand inside the main parser, would stop taking positionals at the first flag."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, commands = build_parser()
    if argv and argv[0] in commands:
        return commands[argv[0]].parse_intermixed_args(argv[1:])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # what the user typed, for the model card (the workers see only their own command line)
    os.environ.setdefault("CPT_COMMAND", shlex.join(["cpt", *(sys.argv[1:] if argv is None else argv)]))
    args = parse_args(argv)
    return args.func(args)
