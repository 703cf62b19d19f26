"""loss.png: train loss and every eval set's loss against the step, drawn from metrics.jsonl."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from launcher.callbacks.base import Callback, RunInfo, finite, read_metrics, run_name
from launcher.callbacks.jsonl import METRICS_FILE
from launcher.files import publish

PLOT_FILE = "loss.png"


def plot_metrics(metrics_jsonl: Path, out_png: Path, title: str | None = None) -> Path | None:
    """Draw ``out_png`` from a metrics.jsonl; returns its path, or None when the file has no losses.

    Usable on its own, e.g. on a run that is still going or one copied off a cluster. Uses matplotlib's
    Agg canvas directly, so it neither needs a display nor changes the caller's pyplot backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(Path(metrics_jsonl))
    train = [(r["step"], finite(r.get("loss"))) for r in records if "loss" in r]
    train = [(s, v) for s, v in train if v is not None]
    evals: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for name, res in (r.get("eval") or {}).items():
            loss = finite(res.get("loss")) if isinstance(res, dict) else None
            if loss is not None:
                evals.setdefault(str(name), []).append((r["step"], loss))
    if not train and not evals:
        return None

    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        steps, losses = zip(*train)
        smooth = len(losses) >= 50
        ax.plot(steps, losses, color="tab:blue", lw=1, alpha=0.35 if smooth else 1.0, label="train")
        if smooth:
            ax.plot(
                steps,
                _moving_average(losses, max(5, len(losses) // 50)),
                color="tab:blue",
                lw=1.8,
                label="train (moving average)",
            )
    for i, (name, points) in enumerate(sorted(evals.items())):
        steps, losses = zip(*sorted(points))
        ax.plot(steps, losses, marker="o", ms=5, lw=1.2, ls="--", color=f"C{(i + 1) % 10}", label=f"eval: {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_png.parent, prefix=f".{out_png.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        publish(tmp, out_png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_png


def _moving_average(values: tuple[float, ...], window: int) -> list[float]:
    """Trailing mean: train loss is noisy step to step, the trend is what the eye wants."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


class LossPlot(Callback):
    """Writes ``output_dir/loss.png`` at the end of training (the whole run, resumed parts included)."""

    def on_train_end(self, run: RunInfo, final_dir: Path | None) -> None:
        out = Path(run.output_dir)
        plot_metrics(out / METRICS_FILE, out / PLOT_FILE, title=run_name(run.recipe))
