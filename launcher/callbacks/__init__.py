"""Outputs that hang off the training loop: metrics files, W&B, TensorBoard, the loss plot, the model card, progress.

The loop calls a :class:`CallbackList` and knows none of them by name; rank 0 builds the list with
:func:`default_callbacks`.
"""

from __future__ import annotations

from launcher.callbacks.base import Callback, CallbackList, RunInfo
from launcher.callbacks.jsonl import MetricsJsonl
from launcher.callbacks.model_card import ModelCard
from launcher.callbacks.plot import LossPlot, plot_metrics
from launcher.callbacks.progress import ProgressBar
from launcher.callbacks.tensorboard import TensorBoard
from launcher.callbacks.wandb import WandbCallback, wandb_mode
from launcher.config import Recipe

__all__ = [
    "Callback",
    "CallbackList",
    "LossPlot",
    "MetricsJsonl",
    "ModelCard",
    "ProgressBar",
    "RunInfo",
    "TensorBoard",
    "WandbCallback",
    "default_callbacks",
    "plot_metrics",
]


def default_callbacks(recipe: Recipe) -> list[Callback]:
    """What rank 0 runs: metrics.jsonl first (the others read it at the end), then W&B unless disabled,
    TensorBoard if ``logging.tensorboard``, the progress display if ``logging.progress``, the loss plot and the
    model card."""
    callbacks: list[Callback] = [MetricsJsonl()]
    mode = wandb_mode(recipe.logging)
    if mode != "disabled":
        callbacks.append(WandbCallback(recipe, mode=mode))
    if recipe.logging.tensorboard:
        callbacks.append(TensorBoard())
    if recipe.logging.progress:
        callbacks.append(ProgressBar())
    callbacks += [LossPlot(), ModelCard()]
    return callbacks
