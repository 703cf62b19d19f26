"""`cpt plan`'s per-GPU memory estimate: the model-state bytes by engine, the activation and loss terms, the fit."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cpt, tiny_recipe, write_recipe
from transformers import AutoConfig, AutoModelForCausalLM

from launcher.config import load_recipe
from launcher.memory import GIB, estimate, layer_activation_bytes, suggest_micro_batch
from launcher.metrics import param_count

LLAMA_1B = "recipes/models/llama-1b.json"


def recipe_for(tmp_path, assets, **sections):
    tree = tiny_recipe(assets, tmp_path / "out", **sections)
    return load_recipe(write_recipe(tmp_path / "r.yaml", tree), check_files=False)


def big_config():
    from launcher.config import PACKAGE_ROOT

    return AutoConfig.from_pretrained(PACKAGE_ROOT / LLAMA_1B)


def test_model_states_follow_the_engine(tmp_path, assets):
    cfg = big_config()
    n = param_count(cfg)
    fsdp = recipe_for(tmp_path, assets, parallel={"engine": "fsdp", "config": "fsdp.yaml"})
    zero3 = recipe_for(tmp_path, assets, parallel={"engine": "deepspeed", "config": "zero3.json"})
    zero2 = recipe_for(tmp_path, assets, parallel={"engine": "deepspeed", "config": "zero2.json"})
    offload = recipe_for(tmp_path, assets, parallel={"engine": "fsdp", "config": "fsdp-offload.yaml"})
    for w in (1, 2, 8):
        assert estimate(fsdp, cfg, w).parts["params+grads+adam"] == pytest.approx(16 * n / w)
        assert estimate(zero3, cfg, w).parts["params+grads+adam"] == pytest.approx(18 * n / w)
        # ZeRO-2: the whole bf16 model, sharded gradients, master weights and Adam states
        assert estimate(zero2, cfg, w).parts["params+grads+adam"] == pytest.approx(2 * n + 14 * n / w)
        assert estimate(offload, cfg, w).parts["params+grads+adam"] == 0


def test_param_count_is_the_built_models(assets):
    cfg = AutoConfig.from_pretrained(assets["base"])
    model = AutoModelForCausalLM.from_config(cfg)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())


def test_activations_scale_with_tokens_and_shrink_with_checkpointing_and_compile(tmp_path, assets):
    cfg = big_config()
    plain = recipe_for(tmp_path, assets, data={"seq_len": 2048})
    a1 = estimate(plain, cfg, 2, micro_batch_size=1).parts["activations"]
    a4 = estimate(plain, cfg, 2, micro_batch_size=4).parts["activations"]
    assert a4 == pytest.approx(4 * a1)
    per_layer = layer_activation_bytes(cfg)
    assert a1 == pytest.approx(2048 * (cfg.num_hidden_layers * per_layer + 8 * cfg.hidden_size))
    full = recipe_for(tmp_path, assets, data={"seq_len": 2048}, model={"activation_checkpointing": True})
    half = recipe_for(tmp_path, assets, data={"seq_len": 2048},
                      model={"activation_checkpointing": True, "checkpoint_every": 2})  # fmt: skip
    compiled = recipe_for(tmp_path, assets, data={"seq_len": 2048}, train={"compile": True})
    sizes = [estimate(r, cfg, 2).parts["activations"] for r in (full, half, compiled, plain)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4


def test_fused_loss_never_holds_the_whole_batch_of_logits(tmp_path, assets):
    cfg = big_config()
    fused = recipe_for(tmp_path, assets, data={"seq_len": 2048}, train={"micro_batch_size": 16})
    plain = recipe_for(tmp_path, assets, data={"seq_len": 2048}, train={"micro_batch_size": 16, "fused_loss": False})
    tokens, vocab = 16 * 2048, cfg.vocab_size
    assert estimate(plain, cfg, 2).parts["loss"] == tokens * vocab * 10
    assert estimate(fused, cfg, 2).parts["loss"] < tokens * vocab * 10 / 3


def test_suggested_micro_batch_is_the_largest_that_fits(tmp_path, assets):
    cfg = big_config()
    r = recipe_for(tmp_path, assets, data={"seq_len": 2048}, train={"micro_batch_size": 1, "global_batch_size": 64},
                   parallel={"engine": "fsdp", "config": "fsdp.yaml"})  # fmt: skip
    gpu = 80 * GIB
    mb, accum = suggest_micro_batch(r, cfg, 2, gpu)
    assert mb * accum == 32
    assert estimate(r, cfg, 2, micro_batch_size=mb).total <= 0.9 * gpu
    bigger = [m for m in range(mb + 1, 33) if 32 % m == 0]
    assert all(estimate(r, cfg, 2, micro_batch_size=m).total > 0.9 * gpu for m in bigger)
    assert suggest_micro_batch(r, cfg, 2, 1 * GIB) is None


def test_cpt_plan_prints_the_estimate_and_warns_when_it_will_not_fit(tmp_path, assets):
    from launcher.config import PACKAGE_ROOT

    tree = tiny_recipe(assets, tmp_path / "out", train={"micro_batch_size": 64, "global_batch_size": 128},
                       data={"seq_len": 2048})  # fmt: skip
    tree["model"] = {"from_config": str(PACKAGE_ROOT / LLAMA_1B), "tokenizer": str(assets["base"])}
    recipe = write_recipe(tmp_path / "r.yaml", tree)
    p = cpt("plan", str(recipe), "--gpus-per-node", "2", "--gpu-memory-gib", "80")
    assert p.returncode == 0, p.stderr
    assert "total (estimate)" in p.stdout and "activations" in p.stdout
    assert "warning: the estimate" in p.stderr and "exceeds the GPU's 80.0 GiB" in p.stderr
    assert "largest micro batch" in p.stdout
    small = cpt("plan", str(recipe), "train.micro_batch_size=2", "--gpus-per-node", "2", "--gpu-memory-gib", "80")
    assert small.returncode == 0 and "warning" not in small.stderr, small.stderr


def test_layer_param_count_is_the_built_models(assets):
    from launcher.metrics import layer_param_count
    from launcher.model import decoder_layers

    cfg = AutoConfig.from_pretrained(assets["base"])
    layer = decoder_layers(AutoModelForCausalLM.from_config(cfg))[0]
    assert layer_param_count(cfg) == sum(p.numel() for p in layer.parameters())


def test_deepspeed_linear_leaves_layers_after_the_recompile_limit_uncompiled(tmp_path, assets):
    from launcher.memory import RECOMPILE_LIMIT, compiled_layers

    cfg = big_config()
    layers = cfg.num_hidden_layers
    zero3 = {"engine": "deepspeed", "config": "zero3.json"}
    ds_linear = {**zero3, "deepspeed": {"zero_optimization": {"memory_efficient_linear": True}}}
    fsdp = {"engine": "fsdp", "config": "fsdp.yaml"}
    runs = {
        "fsdp": recipe_for(tmp_path, assets, train={"compile": True}, parallel=fsdp),
        "zero3": recipe_for(tmp_path, assets, train={"compile": True}, parallel=zero3),
        "ds_linear": recipe_for(tmp_path, assets, train={"compile": True}, parallel=ds_linear),
        "eager": recipe_for(tmp_path, assets, parallel=ds_linear),
    }  # fmt: skip
    assert runs["ds_linear"].parallel.deepspeed["zero_optimization"]["stage"] == 3
    counts = {k: len(compiled_layers(r, layers)) for k, r in runs.items()}
    assert counts == {"fsdp": layers, "zero3": layers, "ds_linear": RECOMPILE_LIMIT, "eager": 0}
    act = {k: estimate(r, cfg, 2).parts["activations"] for k, r in runs.items()}
    eager_extra = layer_activation_bytes(cfg) - layer_activation_bytes(cfg, compiled=True)
    tokens = runs["zero3"].train.micro_batch_size * runs["zero3"].data.seq_len
    assert act["ds_linear"] - act["zero3"] == pytest.approx(tokens * (layers - RECOMPILE_LIMIT) * eager_extra)
    assert act["fsdp"] == act["zero3"] < act["ds_linear"] < act["eager"]


# Runs measured before the launcher turned DeepSpeed's memory_efficient_linear off (it was on, DeepSpeed's default)
DEEPSPEED_LINEAR = {
    f"2026-11-28-{name}-NVIDIA-H200"
    for name in ("e2e", "resume-export", "scaling", "speed", "speed-zero3", "speed-zero3-b", "profile-1gpu")
}


def recorded_gpu_runs():
    """Every run of the GPU benchmarks with its recipe overrides and measured peak (benchmarks/results)."""
    import json

    from launcher.config import PACKAGE_ROOT

    out = []
    for path in sorted((PACKAGE_ROOT / "benchmarks" / "results").glob("*-NVIDIA-*.json")):
        for name, run in json.loads(path.read_text()).get("runs", {}).items():
            if run.get("overrides") and run.get("peak_mem_gib"):
                if path.stem in DEEPSPEED_LINEAR and run.get("engine") == "deepspeed":
                    run["overrides"].append("parallel.deepspeed.zero_optimization.memory_efficient_linear=true")
                out.append(pytest.param(run, id=f"{path.stem}:{name}"))
    return out


@pytest.mark.parametrize("run", recorded_gpu_runs())
def test_estimate_is_within_15_percent_of_every_measured_gpu_peak(run):
    """The formula of this checkout against the peaks measured on GPUs: the model directories the benchmark built
    are recipes/models/*.json with the same vocabulary, so the recipe is rebuilt from those."""
    from launcher.config import PACKAGE_ROOT
    from launcher.model import load_config

    models = PACKAGE_ROOT / "recipes" / "models"
    overrides = []
    for o in run["overrides"]:
        key, _, value = o.partition("=")
        if key in ("model.from_config", "model.tokenizer"):
            o = f"{key}={models / (Path(value).name + '.json')}"
        overrides.append(o)
    recipe = load_recipe(PACKAGE_ROOT / "recipes" / "llama-1b-scratch.yaml", overrides, world_size=run["gpus"],
                         check_files=False)  # fmt: skip
    got = estimate(recipe, load_config(recipe), run["gpus"]).total / GIB
    assert got == pytest.approx(run["peak_mem_gib"], rel=0.15), (got, run["peak_mem_gib"])
