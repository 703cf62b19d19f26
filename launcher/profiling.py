"""``train.profile_steps``: a torch.profiler trace of a few optimizer steps on every rank.

Writes, under ``output_dir/profile/``, for each rank ``rank<R>.trace.json.gz`` (open it in Perfetto or
chrome://tracing) and ``rank<R>.summary.json``: the wall time of each profiled step, how much of it the GPU was
computing (the union of its compute kernels over the profiled window: the rest is time the GPU waited on the host,
on communication it could not overlap, or on data), and the operators that took the most device (or, on CPU, host)
time. Rank 0 logs the one-line result.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

log = logging.getLogger(__name__)

TOP_OPS = 25
STEP = "step "  # our annotation of each profiled step ("step 6")


KERNEL_KINDS = (  # the first whose words a kernel's name holds (lower case); the rest is "other"
    ("comm", ("nccl",)),
    ("compiled", ("triton",)),  # before the others: a fused kernel is named after the operators it fuses
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "f8f8bf16", "scaled_mm", "sm90_", "sm80_")),
    ("foreach", ("multi_tensor_apply", "foreach")),
)
HOST_CATS = ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver", "python_function")
IDLE_GAPS = 8  # the longest device idle gaps a summary names
GAP_BINS = ((0.05e-3, "under_0.05ms"), (1e-3, "0.05_to_1ms"), (float("inf"), "over_1ms"))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, words in KERNEL_KINDS if any(w in low for w in words)), "other")


def idle_gaps(spans: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    """The parts of [start, end] covered by none of ``spans``."""
    gaps, reach = [], start
    for b, e in sorted(spans):
        if b > reach:
            gaps.append((reach, min(b, end)))
        reach = max(reach, e)
        if reach >= end:
            break
    if reach < end:
        gaps.append((reach, end))
    return [(b, e) for b, e in gaps if e > b]


def busy_fraction(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """The share of [start, end] covered by the union of ``(begin, end)`` intervals (clipped to the window)."""
    if end <= start:
        return 0.0
    return 1 - sum(f - b for b, f in idle_gaps(intervals, start, end)) / (end - start)


def trace_summary(trace: dict[str, Any]) -> dict[str, Any]:
    """Device activity of a Chrome trace written by torch.profiler, over the window spanned by our ``step N``
    annotations: the share of it the GPU spent in compute kernels (communication kernels, NCCL's, counted apart:
    they may overlap compute), the kernel seconds of each kind, and where the GPU computed nothing: the idle time
    by gap length and the longest gaps with the host's work during each (innermost first), which says whether the
    GPU waited for a host synchronisation, for launches, or for data."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps = [e for e in events if str(e.get("name", "")).startswith(STEP) and e.get("cat") == "user_annotation"]
    out: dict[str, Any] = {}
    if not steps:
        return out
    start = min(float(e["ts"]) for e in steps)
    end = max(float(e["ts"]) + float(e["dur"]) for e in steps)
    out["window_s"] = round((end - start) / 1e6, 4)
    spans: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if e.get("cat") == "kernel":
            b, f = max(float(e["ts"]), start), min(float(e["ts"]) + float(e["dur"]), end)
            if f > b:
                spans.setdefault(kernel_kind(str(e.get("name", ""))), []).append((b, f))
    if not spans:
        return out
    compute = [s for kind, kind_spans in spans.items() if kind != "comm" for s in kind_spans]
    comm = spans.get("comm", [])
    out["device_busy_frac"] = round(busy_fraction(compute, start, end), 4)
    out["compute_kernel_s"] = round(sum(f - b for b, f in compute) / 1e6, 4)
    out["comm_kernel_s"] = round(sum(f - b for b, f in comm) / 1e6, 4)
    out["kernel_s_by_kind"] = {k: round(sum(f - b for b, f in v) / 1e6, 4) for k, v in sorted(spans.items())}
    gaps = idle_gaps(compute, start, end)
    by_bin = dict.fromkeys((label for _, label in GAP_BINS), 0.0)
    for b, f in gaps:
        by_bin[next(label for limit, label in GAP_BINS if (f - b) / 1e6 < limit)] += (f - b) / 1e6
    out["idle_s_by_gap"] = {k: round(v, 4) for k, v in by_bin.items()}
    host = [e for e in events if e.get("cat") in HOST_CATS and not str(e.get("name", "")).startswith(STEP)]
    longest = []
    for b, f in sorted(gaps, key=lambda g: g[0] - g[1])[:IDLE_GAPS]:
        # host work that covers at least half the gap, innermost (shortest) first
        during = [e for e in host if min(f, float(e["ts"]) + float(e["dur"])) - max(b, float(e["ts"])) >= (f - b) / 2]
        during.sort(key=lambda e: float(e["dur"]))
        longest.append({"at_s": round((b - start) / 1e6, 4), "idle_ms": round((f - b) / 1e3, 3),
                        "host": [str(e["name"])[:80] for e in during[:4]]})  # fmt: skip
    out["longest_idle"] = longest
    return out


def top_ops(prof: profile, device: bool, n: int = TOP_OPS) -> list[dict[str, Any]]:
    """The operators with the most self time on the device (GPU runs) or the host (CPU runs)."""
    rows = []
    for a in prof.key_averages():
        if a.key.startswith((STEP, "ProfilerStep")):  # step annotations (ours, the schedule's) span everything
            continue
        dev_us = float(getattr(a, "self_device_time_total", 0) or 0)
        rows.append({"name": a.key, "calls": a.count, "self_device_ms": round(dev_us / 1e3, 3),
                     "self_cpu_ms": round(float(a.self_cpu_time_total) / 1e3, 3)})  # fmt: skip
    rows.sort(key=lambda r: r["self_device_ms" if device else "self_cpu_ms"], reverse=True)
    return rows[:n]


class StepProfiler:
    """Profiles optimizer steps ``first..last`` (counted from 1, inclusive) of this process: ``with
    profiler.step(n):`` around each step of the loop. torch.profiler's own schedule decides when it records (the
    step before the window warms it up) and hands the trace over after the last profiled step; each profiled step
    is annotated and ends once the device has finished its work."""

    def __init__(self, steps: list[int], out_dir: Path, rank: int, device: torch.device):
        self.first, self.last = (steps[0], steps[-1]) if steps else (0, -1)
        self.dir = out_dir / "profile"
        self.rank = rank
        self.cuda = device.type == "cuda"
        self.prof: profile | None = None
        self.wall: dict[int, float] = {}
        self.done = not steps

    def _start(self, step: int) -> None:
        """Start the profiler at ``step``, the first step this process runs (a resumed run starts late)."""
        first = max(self.first, step)
        warmup = 1 if first > step else 0
        # warmup=0 only when the window opens at the very first step of the process
        plan = schedule(wait=first - step - warmup, warmup=warmup, active=self.last - first + 1, repeat=1)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = profile(activities=activities, schedule=plan, on_trace_ready=self._write, record_shapes=False)
        self.prof.start()

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        if self.done or step > self.last:
            yield
            return
        if self.prof is None:
            self._start(step)
        assert self.prof is not None
        start = time.perf_counter()
        if self.first <= step:
            with record_function(f"{STEP}{step}"):
                yield
                if self.cuda:
                    torch.cuda.synchronize()
            self.wall[step] = time.perf_counter() - start
        else:
            yield
        self.prof.step()  # after the last profiled step this calls _write
        if step == self.last:
            self.prof.stop()
            self.done = True

    def _write(self, prof: profile) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"rank{self.rank}.trace.json.gz"
        prof.export_chrome_trace(str(path))  # compressed for a .gz name
        with gzip.open(path, "rt") as f:
            trace = json.load(f)
        # a run resumed inside the window profiles only the steps it ran
        summary = {"steps": [min(self.wall), max(self.wall)], "step_wall_s": [round(w, 4) for w in self.wall.values()],
                   **trace_summary(trace), "top_ops": top_ops(prof, self.cuda)}  # fmt: skip
        (self.dir / f"rank{self.rank}.summary.json").write_text(json.dumps(summary, indent=2))
        if self.rank == 0:
            busy = summary.get("device_busy_frac")
            busy_text = f", GPU busy {100 * busy:.1f}% of {summary['window_s']} s" if busy is not None else ""
            log.info("profile of steps %d-%d written to %s%s", *summary["steps"], self.dir, busy_text)
