"""FLOPs, MFU, peak and throughput: the numbers a user compares against published runs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from launcher.metrics import Throughput, flops_per_token, memory_stats, mfu, peak_flops
from launcher.model import param_counts

TINYLLAMA = dict(
    hidden_size=2048,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=5632,
    vocab_size=32000,
)


def tiny(model_type: str = "llama", **kw) -> AutoConfig:
    shape = dict(
        vocab_size=101,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
    )
    return AutoConfig.for_model(model_type, **{**shape, **kw})


def test_1b_anchor_params_and_mfu():
    cfg = LlamaConfig(**TINYLLAMA, tie_word_embeddings=False)
    n = param_counts(cfg).total
    assert abs(n - 1.10e9) / 1.10e9 < 0.01  # TinyLlama-1.1B's published size
    f = flops_per_token(cfg, 2048, n)
    assert f == 6 * (n - 32000 * 2048) + 12 * 22 * 32 * 64 * 2048
    assert mfu(13_980, f, 989e12) == pytest.approx(0.103, abs=0.001)


def test_tied_and_untied_differ_by_the_lm_head():
    untied = LlamaConfig(**TINYLLAMA, tie_word_embeddings=False)
    tied = LlamaConfig(**TINYLLAMA, tie_word_embeddings=True)
    n_untied, n_tied = param_counts(untied).total, param_counts(tied).total
    assert n_untied - n_tied == 32000 * 2048
    # The lm_head matmul runs either way, so the compute per token is the same.
    assert flops_per_token(tied, 2048, n_tied) == flops_per_token(untied, 2048, n_untied)


def test_every_parameter_costs_six_flops_per_token():
    cfg = LlamaConfig(**TINYLLAMA)
    n = param_counts(cfg).total
    assert flops_per_token(cfg, 2048, n + 1000) - flops_per_token(cfg, 2048, n) == 6000


@pytest.mark.parametrize(
    "model_type,kw",
    [
        ("llama", {"tie_word_embeddings": False}),
        ("llama", {"tie_word_embeddings": True}),
        ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 12}),
        ("mistral", {}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("qwen3", {"head_dim": 12}),
    ],
)
def test_counts_equal_the_built_models(model_type, kw):
    cfg = tiny(model_type, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    counts = param_counts(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.layer == sum(p.numel() for p in model.model.layers[0].parameters())
    assert counts.layers == len(model.model.layers)


def test_peak_flops(monkeypatch):
    monkeypatch.delenv("CPT_PEAK_TFLOPS", raising=False)
    assert peak_flops(torch.device("cpu")) is None
    assert mfu(1000.0, 1e9, None) is None
    monkeypatch.setenv("CPT_PEAK_TFLOPS", "123.5")
    assert peak_flops(torch.device("cpu")) == pytest.approx(123.5e12)
    monkeypatch.setenv("CPT_PEAK_TFLOPS", "fast")
    with pytest.raises(ValueError, match="CPT_PEAK_TFLOPS"):
        peak_flops("cpu")


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 NVL", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10G", 125e12),
        ("Tesla V100-SXM2-32GB", None),
    ],
)
def test_peak_flops_by_gpu_name(monkeypatch, name, peak):
    monkeypatch.delenv("CPT_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == peak


def test_memory_stats_on_cpu():
    stats = memory_stats(torch.device("cpu"))
    assert set(stats) == {"mem_rss_gib"}
    assert 0 < stats["mem_rss_gib"] < 1024


def test_throughput_is_a_rolling_window():
    tp = Throughput(window=2)
    assert tp.tokens_per_s() == 0.0
    tp.update(1.0, 100)
    assert tp.tokens_per_s() == 100.0
    tp.update(3.0, 300)
    tp.update(1.0, 1000)  # the first step leaves the window
    assert tp.tokens_per_s() == pytest.approx(1300 / 4)
    assert tp.step_time() == pytest.approx(2.0)


def test_profile_busy_share_is_the_union_of_compute_kernels_in_the_step_window():
    from launcher.profiling import busy_fraction, trace_summary

    # overlapping kernels count once; parts outside the window are clipped
    assert busy_fraction([(0, 4), (2, 6), (8, 12)], 1, 11) == pytest.approx((5 + 3) / 10)
    assert busy_fraction([], 0, 1) == 0.0

    def ev(name, cat, ts, dur):
        return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur}

    trace = {"traceEvents": [
        ev("step 6", "user_annotation", 1000, 400), ev("step 7", "user_annotation", 1500, 500),
        ev("ampere_gemm", "kernel", 900, 300),  # starts before the window: 200 us inside
        ev("triton_red_fused__scaled_mm_amax_1", "kernel", 1000, 100),  # compiled, whatever it fuses
        ev("flash_fwd", "kernel", 1300, 200), ev("flash_bwd", "kernel", 1400, 100),  # overlap: 1300-1500
        ev("ncclDevKernel_ReduceScatter", "kernel", 1600, 300),  # communication: not compute
        ev("aten::mm", "cpu_op", 1000, 999), ev("cudaStreamSynchronize", "cuda_runtime", 1510, 480),
        ev("aten::add_", "cpu_op", 1990, 5),  # covers too little of the gap to be named
    ]}  # fmt: skip
    s = trace_summary(trace)
    assert s["window_s"] == pytest.approx(1000e-6)
    assert s["device_busy_frac"] == pytest.approx((200 + 200) / 1000)
    assert s["compute_kernel_s"] == pytest.approx(600e-6)
    assert s["comm_kernel_s"] == pytest.approx(300e-6)
    kinds = {"attention": 300e-6, "comm": 300e-6, "compiled": 100e-6, "matmul": 200e-6}
    assert s["kernel_s_by_kind"] == pytest.approx(kinds)
    # the GPU computed nothing in 1200-1300 and 1500-2000 (the NCCL kernel is not compute)
    assert s["idle_s_by_gap"] == pytest.approx({"under_0.05ms": 0, "0.05_to_1ms": 600e-6, "over_1ms": 0})
    assert s["longest_idle"] == [
        {"at_s": pytest.approx(500e-6), "idle_ms": pytest.approx(0.5), "host": ["cudaStreamSynchronize", "aten::mm"]},
        {"at_s": pytest.approx(200e-6), "idle_ms": pytest.approx(0.1), "host": ["aten::mm"]},
    ]
    assert trace_summary({"traceEvents": [ev("aten::mm", "cpu_op", 0, 5)]}) == {}


@pytest.mark.parametrize("start, profiled", [(1, [2, 3]), (3, [3])])
def test_profiler_records_exactly_the_asked_steps_also_after_a_resume(tmp_path, start, profiled):
    """Steps 2-3 of a run that starts at step 1, and of one resumed at step 3 (only the steps it runs): the trace
    holds our annotation of those steps and no other, and matrix products done in them."""
    import gzip

    from launcher.profiling import StepProfiler

    profiler = StepProfiler([2, 3], tmp_path, 0, torch.device("cpu"))
    x = torch.randn(64, 64)
    for step in range(start, 6):
        with profiler.step(step):
            for _ in range(5):
                x = (x @ x).tanh()
    summary = json.loads((tmp_path / "profile" / "rank0.summary.json").read_text())
    assert summary["steps"] == [profiled[0], profiled[-1]] and len(summary["step_wall_s"]) == len(profiled)
    with gzip.open(tmp_path / "profile" / "rank0.trace.json.gz", "rt") as f:
        events = json.load(f)["traceEvents"]
    annotated = sorted({e["name"] for e in events if str(e.get("name", "")).startswith("step ")})
    assert annotated == [f"step {s}" for s in profiled]
    assert any(e.get("name") == "aten::mm" for e in events)
    assert all(not op["name"].startswith(("step ", "ProfilerStep")) for op in summary["top_ops"])
