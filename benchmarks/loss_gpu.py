"""The fused output projection + loss on one GPU: a chunk's element-wise part eager against compiled, and the plain
path (the whole micro-batch's logits, then cross-entropy) as the baseline, in one call.

    python benchmarks/loss_gpu.py [--results benchmarks/results] [--name loss]

Shapes: the 1.1B Llama shape's micro-batch (16 x 2048 tokens, hidden 2048, vocabulary 32000) and the Llama-3.2 3B
shape's (8 x 4096, hidden 3072, vocabulary 128256), bf16. Each form runs forward and backward (gradients with
respect to the hidden states and the projection weight) ``--repeat`` times after ``--warmup``; the time is the
median of CUDA-event timings, the memory the peak above what the inputs hold. Writes
``<results>/<date>-<name>-<card>.json`` (and a copy under $OUT when set) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.engine.base import causal_lm_loss  # noqa: E402
from launcher.engine.loss import compiled_terms, eager_terms, linear_cross_entropy  # noqa: E402

SHAPES = {"llama-1b": (16, 2048, 2048, 32000), "llama-3.2-3b": (8, 4096, 3072, 128256)}


def plain(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return causal_lm_loss(hidden @ weight.t(), labels)


def timed(fn, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, warmup: int, repeat: int) -> dict:
    def once() -> float:
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, labels)
        loss.backward()
        return float(loss)

    for _ in range(warmup):
        value = once()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        value = once()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {
        "ms": round(statistics.median(times), 2),
        "ms_all": [round(t, 2) for t in times],
        "peak_above_inputs_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2),
        "loss": round(value, 5),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--name", default="loss")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    forms = {
        "plain": plain,
        "fused-eager": lambda h, w, y: linear_cross_entropy(h, w, y, terms=eager_terms),
        "fused-compiled": lambda h, w, y: linear_cross_entropy(h, w, y, terms=compiled_terms()),
    }
    rows: dict[str, dict] = {}
    for shape, (batch, seq, dim, vocab) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        hidden = torch.randn(batch, seq, dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        weight = (0.02 * torch.randn(vocab, dim, device="cuda", generator=g)).to(torch.bfloat16).requires_grad_()
        labels = torch.randint(0, vocab, (batch, seq), device="cuda", generator=g)
        for form, fn in forms.items():
            try:
                rows[f"{shape}/{form}"] = timed(fn, hidden, weight, labels, args.warmup, args.repeat)
            except torch.OutOfMemoryError as e:
                rows[f"{shape}/{form}"] = {"error": str(e).splitlines()[0]}
            torch.cuda.empty_cache()
        eager = rows[f"{shape}/fused-eager"].get("ms")
        for form in forms:
            row = rows[f"{shape}/{form}"]
            if eager and "ms" in row:
                row["x_fused_eager"] = round(eager / row["ms"], 3)
        del hidden, weight, labels
    card = torch.cuda.get_device_name()
    out = {
        "date": datetime.date.today().isoformat(),
        "card": card,
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
        "shapes": {
            k: dict(zip(("micro_batch", "seq_len", "hidden", "vocab"), v, strict=True)) for k, v in SHAPES.items()
        },
        "runs": rows,
    }
    name = f"{out['date']}-{args.name}-{card.replace(' ', '-')}.json"
    for folder in [args.results, os.environ.get("OUT")]:
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / name).write_text(json.dumps(out, indent=1) + "\n")
    print("| shape / form | ms (fwd+bwd) | x fused-eager | peak GiB above inputs | loss |\n|---|---|---|---|---|")
    for key, row in rows.items():
        print(f"| {key} | {row.get('ms', row.get('error'))} | {row.get('x_fused_eager', '')} | "
              f"{row.get('peak_above_inputs_gib', '')} | {row.get('loss', '')} |")  # fmt: skip


if __name__ == "__main__":
    main()
