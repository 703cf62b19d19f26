"""Real multi-process training on CPU (gloo): engine parity, resume, outputs, export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cpt, read_metrics, tiny_recipe, train_losses, write_recipe

# FSDP2's CPU offload is not here: without a GPU it is a no-op (the launcher logs so) and would train plain FSDP2;
# tests/test_gpu_fsdp_offload.py runs this recipe with it on GPUs. DeepSpeed's offload does run on CPU: ZeRO-3
# offload steps with DeepSpeedCPUAdam on its offloaded fp32 partitions (see the test after the parity one).
ENGINES = {
    "zero0": ("deepspeed", "zero0.json", {}),
    "zero1": ("deepspeed", "zero1.json", {}),
    "zero2": ("deepspeed", "zero2.json", {}),
    "zero3-offload": ("deepspeed", "zero3-offload.json", {}),
    "zero3": ("deepspeed", "zero3.json", {}),
    "fsdp": ("fsdp", "fsdp.yaml", {}),
    "hsdp": ("fsdp", "fsdp-hybrid.yaml", {}),
    "fsdp-ckpt": ("fsdp", "fsdp.yaml", {"model": {"activation_checkpointing": True}}),
    # the speed options: the plain loss over full logits, selective checkpointing with deeper prefetching (and a
    # profile of steps 2-3),
    # compiled decoder layers, ZeRO-3 gathering per submodule (DeepSpeed's default) instead of per layer
    "fsdp-options": (
        "fsdp",
        "fsdp.yaml",
        {
            "model": {"activation_checkpointing": True, "checkpoint_every": 2},
            "train": {"fused_loss": False, "profile_steps": [2, 3]},
            "parallel": {"fsdp": {"prefetch_layers": 2}},
        },
    ),
    "fsdp-compile": ("fsdp", "fsdp.yaml", {"train": {"compile": True}}),
    "zero3-per-module": ("deepspeed", "zero3.json", {"parallel": {"zero3_layer_gather": False}}),
}


def deep_update(tree: dict, values: dict) -> None:
    for k, v in values.items():
        if isinstance(v, dict):
            deep_update(tree.setdefault(k, {}), v)
        else:
            tree[k] = v


@pytest.fixture(scope="module")
def parity_runs(assets, tmp_path_factory):
    """The same tiny recipe under every engine config but FSDP2 offload (ZeRO-0..3, ZeRO-3 offload, FSDP2
    full/hybrid) and the speed options: 2 ranks x micro-batches of 2 x accumulation 2. ZeRO-3 offload trains with
    DeepSpeedCPUAdam, built on first use."""
    root = tmp_path_factory.mktemp("parity")
    outs = {}
    for name, (engine, config, options) in ENGINES.items():
        out = root / name
        tree = tiny_recipe(assets, out, train={"max_steps": 5, "global_batch_size": 8, "save_every": 2},
                           parallel={"engine": engine, "config": config, "nproc_per_node": 2})  # fmt: skip
        for section, values in options.items():
            deep_update(tree.setdefault(section, {}), values)
        cpt("run", str(write_recipe(root / f"{name}.yaml", tree)))
        outs[name] = out
    return outs


def test_engines_give_the_same_loss_curve(parity_runs):
    # fp32 on CPU, identical weights, data and optimizer (torch AdamW): only the order of floating-point
    # reductions differs (bucketed all-reduce vs reduce-scatter), which moves losses by ~1e-7 per step.
    curves = {name: train_losses(out) for name, out in parity_runs.items()}
    ref = curves["zero3"]
    assert sorted(ref) == [1, 2, 3, 4, 5]
    assert ref[5] < ref[1], "loss did not decrease"
    for name, curve in curves.items():
        assert curve.keys() == ref.keys()
        for step in ref:
            assert curve[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (name, step, curve[step], ref[step])
    evals = {name: json.loads((out / "eval_results.json").read_text()) for name, out in parity_runs.items()}
    for name, res in evals.items():
        for s in ("code", "prose"):
            assert res[s]["tokens"] == evals["zero3"][s]["tokens"] > 0
            assert res[s]["perplexity"] == pytest.approx(evals["zero3"][s]["perplexity"], rel=1e-5), name


def optimizer_param_groups(checkpoint) -> list[dict]:
    """The param groups of the optimizer DeepSpeed wrapped, from rank 0's optimizer file of a checkpoint this
    module's runs wrote (not an untrusted file: unpickled whole)."""
    saved = torch.load(checkpoint / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    return saved["optimizer_state_dict"]["optimizer_state_dict"]["param_groups"]


def test_zero3_offload_steps_with_deepspeed_cpu_adam(parity_runs):
    """On CPU, ZeRO-3 offload is not the plain ZeRO-3 under another name: its optimizer is DeepSpeed's CPU Adam
    (its groups carry bias_correction and none of torch's foreach/fused switches), the plain run's torch's AdamW."""
    offload = optimizer_param_groups(parity_runs["zero3-offload"] / "checkpoints" / "step-5")
    plain = optimizer_param_groups(parity_runs["zero3"] / "checkpoints" / "step-5")
    assert all("bias_correction" in g and "foreach" not in g and "fused" not in g for g in offload), offload
    assert all("foreach" in g and "fused" in g for g in plain), plain


def test_every_output_is_written(parity_runs):
    out = parity_runs["zero3"]
    for f in ("resolved_recipe.yaml", "metrics.jsonl", "eval_results.json", "loss.png", "README.md"):
        assert (out / f).is_file(), f
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == sorted(set(steps))
    m = [m for m in read_metrics(out) if "loss" in m][-1]
    for key in ("lr", "grad_norm", "tokens_per_s", "tokens_seen", "step_time", "data_wait"):
        assert math.isfinite(m[key]), key
    assert m["tokens_seen"] == 5 * 8 * 64
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-4", "step-5"]  # keep_last 2 pruned step-2
    card = (out / "README.md").read_text()
    assert "perplexity" in card.lower()


def test_profile_steps_write_a_trace_and_a_summary_on_every_rank(parity_runs):
    import gzip

    prof = parity_runs["fsdp-options"] / "profile"
    for rank in (0, 1):
        summary = json.loads((prof / f"rank{rank}.summary.json").read_text())
        assert summary["steps"] == [2, 3]
        assert len(summary["step_wall_s"]) == 2 and all(w > 0 for w in summary["step_wall_s"])
        assert summary["window_s"] >= 0.9 * sum(summary["step_wall_s"]) > 0
        names = [op["name"] for op in summary["top_ops"]]
        assert any(n.startswith("aten::") for n in names) and not any(n.startswith("step ") for n in names), names
        with gzip.open(prof / f"rank{rank}.trace.json.gz", "rt") as f:
            trace = json.load(f)
        steps = {e["name"] for e in trace["traceEvents"] if str(e.get("name", "")).startswith("step ")}
        assert steps == {"step 2", "step 3"}
    assert not any((p / "profile").exists() for name, p in parity_runs.items() if name != "fsdp-options")


@pytest.mark.parametrize("name", ["zero0", "zero2", "zero3", "fsdp"])
def test_final_model_loads_and_matches_export_of_the_checkpoint(parity_runs, tmp_path, name):
    from transformers import AutoModelForCausalLM

    out = parity_runs[name]
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    cpt("export", str(out / "checkpoints" / "step-5"), str(tmp_path / "exported"), "--max-shard-size", "100KB")
    assert len(list((tmp_path / "exported").glob("model-*.safetensors"))) > 1, "not sharded by size"
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    ids = torch.randint(0, final.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = final(ids).logits, exported(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert final.get_input_embeddings().weight.data_ptr() == final.get_output_embeddings().weight.data_ptr()


def test_training_moved_the_weights_away_from_the_base(assets, parity_runs):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(assets["base"]).state_dict()
    final = AutoModelForCausalLM.from_pretrained(parity_runs["zero3"] / "final").state_dict()
    assert base.keys() == final.keys()
    changed = [k for k in base if not torch.equal(base[k], final[k])]
    assert len(changed) == len(base), set(base) - set(changed)


def test_resume_continues_the_uninterrupted_run(assets, tmp_path):
    """3 steps, stop, rerun to 6: steps 4-6 equal an uninterrupted 6-step run (optimizer, data position and RNG
    all restored). The schedule is constant here because a cosine schedule depends on max_steps itself."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out in (straight, resumed):
        write_recipe(out.with_suffix(".yaml"), tiny_recipe(
            assets, out, train={"max_steps": 6, "schedule": "constant"}, eval={"sets": {}},
            parallel={"engine": "fsdp", "config": "fsdp.yaml", "nproc_per_node": 2}))  # fmt: skip
    cpt("run", str(straight.with_suffix(".yaml")))
    cpt("run", str(resumed.with_suffix(".yaml")), "train.max_steps=3")
    cpt("run", str(resumed.with_suffix(".yaml")))
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-6), (step, a, b)
