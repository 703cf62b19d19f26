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
    # the speed options: the plain loss over full logits, selective checkpointing with deeper prefetching, the
    # gradients reduced once per step instead of after each micro-batch (and a profile of steps 2-3),
    # compiled decoder layers, ZeRO-3 gathering per submodule (DeepSpeed's default) instead of per layer
    "fsdp-options": (
        "fsdp",
        "fsdp.yaml",
        {
            "model": {"activation_checkpointing": True, "checkpoint_every": 2},
            "train": {"fused_loss": False, "profile_steps": [2, 3]},
            "parallel": {"fsdp": {"prefetch_layers": 2, "reduce_every_micro_batch": False}},
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


# ------------------------------------------------------------------- an independent reference for the update


def reference_run(out, steps: int, decay_norms: bool) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """The update a run in ``out`` should have made, computed in one process by plain PyTorch: the Hugging Face
    model loaded from the base, ``torch.optim.AdamW``, the recipe's schedule written out here (linear warmup, then
    cosine to ``min_lr_ratio``), the global gradient norm clipped, each optimizer step over the whole global batch
    (the same blocks the ranks read, from the launcher's data stream: the one part shared). Normalisation weights are
    found by their module type (RMSNorm/LayerNorm), not by the launcher's name patterns. Returns the loss of each
    step before its update and the final weights."""
    from transformers import AutoModelForCausalLM

    from launcher.data import TrainStream
    from launcher.model import load_tokenizer
    from launcher.preflight import load_recipe

    r = load_recipe(out / "resolved_recipe.yaml")
    t = r.train
    world = r.parallel.nproc_per_node
    accum = t.global_batch_size // (t.micro_batch_size * world)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(r.model.name_or_path, dtype=torch.float32)
    model.train()
    norms = {id(p) for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)}
    params = list(model.parameters())
    spared = [p for p in params if id(p) in norms and not decay_norms]
    decayed = [p for p in params if id(p) not in {id(q) for q in spared}]
    groups = [{"params": decayed, "weight_decay": t.weight_decay}, {"params": spared, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    warm, floor = t.warmup_steps, t.min_lr_ratio

    def lr_at(step: int) -> float:  # 0-based step
        if step < warm:
            return t.lr * (step + 1) / (warm + 1)
        return t.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warm) / (t.max_steps - warm))))

    tok = load_tokenizer(r)
    streams = [
        iter(TrainStream.from_config(r.data, tok, micro_batch_size=t.micro_batch_size, rank=rank, world_size=world,
                                     seed=t.seed))
        for rank in range(world)
    ]  # fmt: skip
    losses, lrs = [], []
    for step in range(steps):
        blocks = torch.cat([next(s)["input_ids"] for s in streams for _ in range(accum)])
        logits = model(input_ids=blocks).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten())
        losses.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        lrs.append(lr_at(step))
        for g in opt.param_groups:
            g["lr"] = lrs[-1]
        opt.step()
        opt.zero_grad()
    return losses, lrs, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_matches_reference(out, decay_norms: bool) -> None:
    from transformers import AutoModelForCausalLM

    losses = train_losses(out)
    lrs = {m["step"]: m["lr"] for m in read_metrics(out) if "lr" in m}
    ref_losses, ref_lrs, ref_weights = reference_run(out, len(losses), decay_norms)
    for step, (ref, ref_lr) in enumerate(zip(ref_losses, ref_lrs), start=1):
        assert losses[step] == pytest.approx(ref, abs=1e-5), (out.name, step, losses[step], ref)
        assert lrs[step] == pytest.approx(ref_lr, rel=1e-9), (out.name, step, lrs[step], ref_lr)
    final = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).state_dict()
    assert final.keys() == ref_weights.keys()
    for key, ref in ref_weights.items():
        torch.testing.assert_close(final[key], ref, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{out.name} {k}: {m}")


@pytest.mark.parametrize("name", ["zero0", "zero2", "zero3", "zero3-offload", "fsdp", "hsdp", "fsdp-compile"])
def test_engines_match_a_plain_pytorch_reference_with_accumulation(parity_runs, name):
    """Accumulation 2 on 2 ranks, the default weight decay (norm weights spared): losses and final weights within
    1e-5 of plain PyTorch doing the same update in one process."""
    assert_matches_reference(parity_runs[name], decay_norms=False)


@pytest.mark.parametrize("engine,config", [("deepspeed", "zero3.json"), ("fsdp", "fsdp.yaml")])
def test_engines_match_a_plain_pytorch_reference_without_accumulation_decaying_everything(
    assets, tmp_path, engine, config
):
    """Accumulation 1 on 2 ranks, ``weight_decay_exclude: []`` (every weight decayed)."""
    out = tmp_path / engine
    train = {"max_steps": 5, "global_batch_size": 4, "weight_decay_exclude": []}
    tree = tiny_recipe(assets, out, train=train, eval={"sets": {}},
                       parallel={"engine": engine, "config": config, "nproc_per_node": 2})  # fmt: skip
    cpt("run", str(write_recipe(tmp_path / "r.yaml", tree)))
    assert_matches_reference(out, decay_norms=True)


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
