"""README.md model card: what was trained on what, how it scored before and after, how to load it."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from launcher.callbacks.base import Callback, RunInfo, finite, read_metrics, run_name
from launcher.callbacks.jsonl import METRICS_FILE
from launcher.config import Recipe, SourceConfig, source_kind, source_labels
from launcher.engine import plan_for
from launcher.files import atomic_write, is_hub_id
from launcher.redact import redact_text

CARD_FILE = "README.md"
COMMAND_ENV = "CPT_COMMAND"
"""The command line the user ran (``cpt run ...``, ``cpt quickstart``), set by the outermost ``cpt`` process and
inherited by the workers it starts: a worker's own command line is only ``python -m launcher.train ...``."""
SCRIPT_SUFFIXES = (".sbatch", ".slurm", ".sh")
"""A Slurm job name with one of these is the batch script's name (Slurm's default job name)."""


def launch_command(environ: Mapping[str, str], worker_args: Sequence[str]) -> str:
    """What started this run, for the model card: ``CPT_COMMAND`` when a ``cpt`` command started the workers;
    under ``sbatch``, the sbatch command as far as the job's environment tells it (the script, the node count and
    the arguments every worker got); else the worker's own command line."""
    args = _without_local_rank(worker_args)
    job = environ.get("SLURM_JOB_ID")
    submit_dir = environ.get("SLURM_SUBMIT_DIR")
    submitted = f"# Slurm job {job}" + (f", submitted from {submit_dir}" if submit_dir else "")
    command = environ.get(COMMAND_ENV)
    if command:
        return f"{submitted}\n{command}" if job else command
    worker = shlex.join(["python", "-m", "launcher.train", *args])
    if not job:
        return worker
    name = environ.get("SLURM_JOB_NAME", "")
    if not name.endswith(SCRIPT_SUFFIXES):
        # Started by srun or under a job name of its own: the batch command cannot be told.
        return f"{submitted} ({name or 'unnamed'}); every worker ran:\n{worker}"
    nodes = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES")
    return f"{submitted}\n" + shlex.join(
        ["sbatch", *(["--nodes", nodes] if nodes else []), _script_path(name, submit_dir), *args]
    )


def _without_local_rank(args: Sequence[str]) -> list[str]:
    """The arguments a launcher passed on, without the ``--local_rank`` the deepspeed launcher adds."""
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        elif not re.match(r"--local[_-]rank=", a):
            out.append(a)
    return out


def _script_path(name: str, submit_dir: str | None) -> str:
    """The batch script as the user named it from where they submitted it: Slurm keeps only its file name, so
    look for it there and in ``slurm/``, where this project's scripts live."""
    for candidate in (name, os.path.join("slurm", name)):
        if submit_dir and os.path.isfile(os.path.join(submit_dir, candidate)):
            return candidate
    return name


class ModelCard(Callback):
    """Writes ``output_dir/README.md`` at the end of training, and a copy into the exported model.

    The numbers come from metrics.jsonl when it exists, so a run resumed several times still reports its
    first evaluation (the base model) next to its last, which is what shows adaptation and forgetting.
    """

    def __init__(self) -> None:
        self._records: list[dict[str, Any]] = []

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._records.append({"step": int(step), **metrics})

    def on_eval(self, step: int, results: dict[str, dict[str, float]]) -> None:
        self._records.append({"step": int(step), "eval": results})

    def on_train_end(self, run: RunInfo, final_dir: Path | None) -> None:
        out = Path(run.output_dir)
        metrics_file = out / METRICS_FILE
        records = read_metrics(metrics_file) if metrics_file.exists() else self._records
        text = render_model_card(run, records, final_dir)
        atomic_write(out / CARD_FILE, text)
        if final_dir is not None and Path(final_dir).is_dir():
            atomic_write(Path(final_dir) / CARD_FILE, text)


def render_model_card(run: RunInfo, records: list[dict[str, Any]], final_dir: Path | None) -> str:
    """The model card as markdown with YAML front matter."""
    r = run.recipe
    name = run_name(r)
    train = [rec for rec in records if "eval" not in rec]
    last_step = max((rec["step"] for rec in train), default=run.start_step)
    tokens_seen = next((rec["tokens_seen"] for rec in reversed(train) if rec.get("tokens_seen") is not None), None)
    if tokens_seen is None:
        tokens_seen = last_step * run.tokens_per_step

    lines = ["---", _front_matter(r).rstrip(), "---", "", f"# {name}", ""]
    base = r.model.name_or_path
    if base:
        shown = f"[{base}](https://huggingface.co/{base})" if is_hub_id(base) else f"`{redact_text(base)}`"
        lines.append(f"Continual pretraining of {shown} with a causal language-modelling objective.")
    else:
        lines.append(f"Trained from scratch (random initialisation from `{redact_text(r.model.from_config or '')}`).")
    lines += ["", "## Training", "", "| | |", "|---|---|"]
    for key, value in _training_rows(run, last_step, int(tokens_seen)):
        lines.append(f"| {key} | {value} |")

    lines += ["", "## Evaluation", ""]
    lines += _eval_table(records, from_base=bool(base)) or ["No evaluation was run."]

    trained = last_step > 0
    load = final_dir if final_dir is not None else (out_final(run) if trained else base or out_final(run))
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{load}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{load}")',
        "```",
    ]
    if not trained:
        lines += ["", "This run only evaluated the model; no training step was taken."]
    elif final_dir is None:
        ckpt = Path(run.output_dir) / "checkpoints" / f"step-{last_step}"
        lines += ["", f"This run wrote no Hugging Face export; make one with `cpt export {ckpt} {load}`."]
    if run.command:
        lines += ["", "## Command", "", "```bash", redact_text(run.command), "```"]
    return "\n".join(lines) + "\n"


def out_final(run: RunInfo) -> Path:
    """Where the exported model goes by default."""
    return Path(run.output_dir) / "final"


def _front_matter(r: Recipe) -> str:
    meta: dict[str, Any] = {"library_name": "transformers"}
    if is_hub_id(r.model.name_or_path):
        meta["base_model"] = r.model.name_or_path
    meta["tags"] = ["continual-pretraining"]
    datasets = sorted({s.path for s in [*r.data.train, *r.eval.sets.values()] if is_hub_id(s.path)})
    if datasets:
        meta["datasets"] = datasets
    meta["pipeline_tag"] = "text-generation"
    return yaml.safe_dump(meta, sort_keys=False)


def _weight(weight: float | dict[int, float], sources: list[SourceConfig]) -> str:
    """A source's weight with its share of the mixture, or its schedule over the steps."""
    if isinstance(weight, dict):
        return "weight " + ", ".join(f"{w:g} at step {step:,}" for step, w in weight.items()) + " (linear between)"
    numbers = [s.weight for s in sources if not isinstance(s.weight, dict)]
    if len(numbers) < len(sources):  # next to a schedule, a share of the mixture changes over the steps
        return f"weight {weight:g}"
    return f"weight {weight:g} ({100 * weight / (sum(numbers) or 1.0):.0f}%)"


def _training_rows(run: RunInfo, last_step: int, tokens_seen: int) -> list[tuple[str, str]]:
    r = run.recipe
    t = r.train
    sources = "<br>".join(
        f"{_source(s)}, {_weight(s.weight, r.data.train)}"
        + (f", first {s.holdout_documents:,} documents held out as eval set {label}" if s.holdout_documents else "")
        for label, s in zip(source_labels(r.data.train), r.data.train)
    )
    rows = [
        ("Base model", f"`{redact_text(r.model.name_or_path)}`" if r.model.name_or_path else "none (from scratch)"),
        *([("Initialised from", _init_from(r))] if r.model.init_from else []),
        ("Parameters", f"{run.n_params:,}"),
        ("Training data", sources or "none"),
        ("Steps", f"{last_step:,}" + (f" (resumed from step {run.start_step:,})" if run.resumed else "")),
        ("Tokens seen", f"{tokens_seen:,}"),
        ("Sequence length", f"{r.data.seq_len:,}"),
        *([("Positions (RoPE)", rope)] if (rope := _rope(r)) else []),
        (
            "Global batch",
            f"{run.global_batch_size:,} sequences = {run.tokens_per_step:,} tokens " + _batch_terms(r, run),
        ),
        (
            "Optimizer",
            f"AdamW, lr {t.lr:g}, {t.schedule} schedule, warmup {t.warmup_steps} steps, min lr ratio "
            f"{t.min_lr_ratio:g}, weight decay {t.weight_decay:g}, grad clip {t.grad_clip:g}",
        ),
        ("Engine", _engine(r)),
        ("Precision", _precision(r)),
    ]
    return rows


def _rope(r: Recipe) -> str:
    """What the run set of the model's positions (``model.max_position_embeddings``, ``rope_theta``,
    ``rope_scaling``); empty when it kept the model's own."""
    from launcher.model import describe_rope

    m = r.model
    params = {"rope_theta": m.rope_theta, **(m.rope_scaling or {})}
    return describe_rope(m.max_position_embeddings, params)


def _init_from(r: Recipe) -> str:
    """Where the starting weights came from (``model.init_from``) and what else was taken from there."""
    m = r.model
    taken = ["weights", *(["optimizer state"] if m.init_optimizer else []), *(["data position"] if m.init_data else [])]
    return f"`{redact_text(m.init_from or '')}`: {', '.join(taken)}"


def _source(s: SourceConfig) -> str:
    """A source as the card names it: configuration and split only for hub datasets, which have them."""
    if source_kind(s.path) != "hub":
        return f"`{redact_text(s.path)}`"
    return f"`{redact_text(s.path)}`" + (f" ({s.name})" if s.name else "") + f" split {s.split}"


def _engine(r: Recipe) -> str:
    return f"{plan_for(r).describe(r)} (`{Path(r.parallel.config).name}`)"


def _precision(r: Recipe) -> str:
    if r.train.precision != "auto":
        return r.train.precision
    import torch

    return f"{'bf16' if torch.cuda.is_available() else 'fp32'} (auto)"


def _eval_table(records: list[dict[str, Any]], from_base: bool) -> list[str]:
    """One row per eval set; first and last evaluation side by side when they differ."""
    first: dict[str, tuple[int, dict[str, Any]]] = {}
    last: dict[str, tuple[int, dict[str, Any]]] = {}
    for rec in sorted((r for r in records if isinstance(r.get("eval"), dict)), key=lambda r: r["step"]):
        for name, res in rec["eval"].items():
            if isinstance(res, dict):
                first.setdefault(name, (rec["step"], res))
                last[name] = (rec["step"], res)
    if not last:
        return []
    compare = any(first[n][0] != last[n][0] for n in last)
    if not compare:
        step = max(s for s, _ in last.values())
        out = [f"At step {step:,}:", "", "| Eval set | Loss | Perplexity | Tokens |", "|---|---:|---:|---:|"]
        for name in sorted(last):
            res = last[name][1]
            out.append(f"| {name} | {_loss(res)} | {_ppl(res)} | {_tokens(res)} |")
        return out
    s0 = min(s for s, _ in first.values())
    s1 = max(s for s, _ in last.values())
    first_label = "base" if s0 == 0 and from_base else f"step {s0:,}"
    out = [
        f"Loss and perplexity before ({first_label}) and after (step {s1:,}) training. A drop on the target "
        "domain is adaptation; a rise on general text is forgetting.",
        "",
        f"| Eval set | Loss ({first_label}) | Perplexity ({first_label}) | Loss (step {s1:,}) "
        f"| Perplexity (step {s1:,}) | Perplexity change | Tokens |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in sorted(last):
        a, b = first[name][1], last[name][1]
        out.append(f"| {name} | {_loss(a)} | {_ppl(a)} | {_loss(b)} | {_ppl(b)} | {_change(a, b)} | {_tokens(b)} |")
    return out


def _loss(res: dict[str, Any]) -> str:
    v = finite(res.get("loss"))
    return f"{v:.4f}" if v is not None else "n/a"


def _ppl(res: dict[str, Any]) -> str:
    v = finite(res.get("perplexity"))
    return f"{v:.2f}" if v is not None else "n/a"


def _tokens(res: dict[str, Any]) -> str:
    v = finite(res.get("tokens"))
    return f"{int(v):,}" if v is not None else "n/a"


def _change(a: dict[str, Any], b: dict[str, Any]) -> str:
    pa, pb = finite(a.get("perplexity")), finite(b.get("perplexity"))
    if pa is None or pb is None or pa == 0:
        return "n/a"
    return f"{100 * (pb - pa) / pa:+.1f}%"


def _batch_terms(r, run) -> str:
    """How the global batch is made: per process (per data-parallel rank with sequence parallelism), accumulation,
    processes."""
    t, n = r.train, r.parallel.sequence_parallel
    if n <= 1:
        return f"({t.micro_batch_size} per process x {run.grad_accum} accumulation x {run.world_size} processes)"
    return (
        f"({t.micro_batch_size} per data-parallel rank x {run.grad_accum} accumulation x {run.world_size // n} "
        f"data-parallel ranks; each sequence split over {n} of the {run.world_size} processes)"
    )
