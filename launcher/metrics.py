"""Throughput, model FLOPs utilisation (MFU) and memory: the numbers that say whether a run uses its hardware.

MFU follows the PaLM / Chinchilla accounting: a trained token costs ``6 * N_nonembedding`` FLOPs for the
matmuls of forward plus backward, plus ``12 * L * H * Q * T`` for the attention scores and values. The
input embedding is a lookup, not a matmul, so it is left out; the output projection (lm_head) is real
compute and stays in, whether or not its weight is tied to the embedding.
"""

from __future__ import annotations

import os
import re
from collections import deque
from typing import Any

import torch

PEAK_TFLOPS_ENV = "CPT_PEAK_TFLOPS"

# bf16 dense tensor-core peak, in FLOP/s, by a pattern of the name torch reports.
_PEAK_BF16: list[tuple[str, float]] = [
    (r"H100|H200|GH200", 989e12),
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"\bA10G?\b", 125e12),
]


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _text_config(config: Any) -> Any:
    """The language-model part of a config (multimodal configs nest it)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def model_shape(config: Any) -> dict[str, Any]:
    c = _text_config(config)
    hidden = int(_get(c, "hidden_size"))
    heads = int(_get(c, "num_attention_heads"))
    kv_heads = _get(c, "num_key_value_heads") or heads
    head_dim = _get(c, "head_dim") or hidden // heads
    return {
        "vocab": int(_get(c, "vocab_size")),
        "hidden": hidden,
        "layers": int(_get(c, "num_hidden_layers")),
        "heads": heads,
        "kv_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "intermediate": int(_get(c, "intermediate_size")),
        "tied": bool(_get(c, "tie_word_embeddings", False)),
    }


def flops_per_token(model_config: Any, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token (forward + backward): ``6 * (N - N_embedding) + 12 * L * H * Q * T``.

    ``N`` is ``n_params``, the model's parameter count (:func:`launcher.model.param_counts`). ``N_embedding`` is
    the input embedding only. With tied embeddings the shared matrix is counted once in
    ``N`` but used twice, so its lm_head matmul is added back: a tied model does the same compute per token
    as its untied twin.
    """
    s = model_shape(model_config)
    n = int(n_params)
    embedding = s["vocab"] * s["hidden"]
    dense = n - embedding + (embedding if s["tied"] else 0)
    attention = 12 * s["layers"] * s["heads"] * s["head_dim"] * int(seq_len)
    return float(6 * dense + attention)


def peak_flops(device: torch.device | str) -> float | None:
    """bf16 dense peak FLOP/s of ``device``, or None when unknown (CPU, unlisted GPUs).

    The environment variable ``CPT_PEAK_TFLOPS`` (in TFLOP/s) overrides the table for any device, for GPUs
    it does not list or variants with a lower peak (H100 PCIe: 756, H100 NVL: 835).
    """
    override = os.environ.get(PEAK_TFLOPS_ENV, "").strip()
    if override:
        try:
            value = float(override)
        except ValueError:
            raise ValueError(f"{PEAK_TFLOPS_ENV}={override!r}: expected a number of TFLOP/s") from None
        return value * 1e12 if value > 0 else None
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, peak in _PEAK_BF16:
        if re.search(pattern, name):
            return peak
    return None


def mfu(tokens_per_s_per_device: float, flops_per_tok: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction (0.4 = 40%), or None when the peak is unknown."""
    if not peak or peak <= 0:
        return None
    return tokens_per_s_per_device * flops_per_tok / peak


def memory_stats(device: torch.device | str) -> dict[str, float]:
    """Peak allocated and reserved GPU memory (GiB) since start and what is allocated now (between steps: the
    model states), or the process RSS on CPU."""
    device = torch.device(device)
    gib = float(2**30)
    if device.type == "cuda" and torch.cuda.is_available():
        return {
            "mem_peak_gib": torch.cuda.max_memory_allocated(device) / gib,
            "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / gib,
            "mem_allocated_gib": torch.cuda.memory_allocated(device) / gib,
        }
    try:
        import psutil

        rss = float(psutil.Process().memory_info().rss)
    except ImportError:
        import resource
        import sys

        # ru_maxrss is the peak RSS: kilobytes on Linux, bytes on macOS.
        rss = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        rss *= 1 if sys.platform == "darwin" else 1024
    return {"mem_rss_gib": rss / gib}


class Throughput:
    """Tokens per second of this rank over the last ``window`` steps.

    A rolling window smooths the step-to-step jitter of data loading and logging while still showing a
    slowdown within a few steps; the caller measures each step's wall-clock time.
    """

    def __init__(self, window: int = 10):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._steps: deque[tuple[float, int]] = deque(maxlen=window)

    def update(self, step_time_s: float, tokens: int) -> None:
        self._steps.append((float(step_time_s), int(tokens)))

    def tokens_per_s(self) -> float:
        """Tokens per second on this rank; 0.0 before the first step."""
        seconds = sum(t for t, _ in self._steps)
        return sum(n for _, n in self._steps) / seconds if seconds > 0 else 0.0

    def step_time(self) -> float:
        """Mean seconds per step over the window; 0.0 before the first step."""
        return sum(t for t, _ in self._steps) / len(self._steps) if self._steps else 0.0

    def reset(self) -> None:
        """Forget the window, e.g. after an evaluation pause that is not training time."""
        self._steps.clear()


def host_memory_gib() -> tuple[float, float]:
    """(resident, peak resident) host memory of this process in GiB: what the kernel counts for it, mapped file
    pages included."""
    import resource
    import sys

    import psutil

    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)
    return psutil.Process().memory_info().rss / 2**30, peak / 2**30
