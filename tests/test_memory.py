"""`cpt plan`'s per-GPU memory estimate against references that do not come from it: the bytes of the tensors a real
optimizer step leaves allocated, FSDP2's real shards on two gloo ranks, what autograd really saves for backward,
the parameter counts of built models, and the peaks measured on GPUs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cpt, run_distributed, tiny_recipe, write_recipe
from transformers import AutoConfig, AutoModelForCausalLM

from launcher.config import PACKAGE_ROOT
from launcher.engine import plan_for
from launcher.engine.plan import RECOMPILE_LIMIT
from launcher.memory import GIB, estimate, host_estimate, layer_activation_bytes, suggest_micro_batch
from launcher.model import decoder_layers, param_counts
from launcher.preflight import load_recipe

LLAMA_1B = PACKAGE_ROOT / "recipes" / "models" / "llama-1b.json"


def recipe_for(tmp_path, assets, **sections):
    tree = tiny_recipe(assets, tmp_path / "out", **sections)
    return load_recipe(write_recipe(tmp_path / "r.yaml", tree), check_files=False)


def big_config():
    return AutoConfig.from_pretrained(LLAMA_1B)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------------------ parameter counts


def test_param_counts_are_the_built_models(assets):
    """The tiny model (tied embeddings) built with real weights, and the 1.1B shape (untied) built on the meta
    device: the counts are those of the modules transformers builds."""
    for cfg, device in ((AutoConfig.from_pretrained(assets["base"]), "cpu"), (big_config(), "meta")):
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg)
        counts = param_counts(cfg)
        assert counts.total == sum(p.numel() for p in model.parameters())  # a tied matrix once
        assert counts.layer == sum(p.numel() for p in decoder_layers(model)[0].parameters())
        assert counts.layers == cfg.num_hidden_layers


# ------------------------------------------------------------------------------------------- model states

# What each engine keeps per parameter between steps, by kind, as each documents its mixed precision:
# - FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the sharded parameters stay fp32, their
#   gradients arrive in fp32, and AdamW keeps two fp32 moments on them; parameters are cast to bf16 only while
#   gathered for compute.
# - DeepSpeed with bf16, the ZeRO paper's mixed-precision Adam (Rajbhandari et al., 2020, section 3.1): bf16
#   parameters and gradients for forward and backward, and for the optimizer fp32 master weights and AdamW's two
#   fp32 moments (2 + 2 + 12 bytes per parameter). Stage 0 (DeepSpeed's BF16_Optimizer) also accumulates
#   gradients in fp32.
# Which kinds a stage partitions over the data-parallel ranks is the paper's definition (section 5): stage 1 the
# optimizer states, stage 2 also the gradients, stage 3 also the parameters; FSDP2 shards all three.
ENGINES = {
    "fsdp": ("fsdp", "fsdp.yaml", {"params", "grads", "optimizer"}),
    "zero0": ("deepspeed", "zero0.json", set()),
    "zero1": ("deepspeed", "zero1.json", {"optimizer"}),
    "zero2": ("deepspeed", "zero2.json", {"grads", "optimizer"}),
    "zero3": ("deepspeed", "zero3.json", {"params", "grads", "optimizer"}),
}


def allocated_model_states(config, engine: str) -> dict[str, int]:
    """Bytes by kind (parameters, gradients, optimizer) of the tensors a real AdamW step leaves allocated on one
    rank, laid out as ``engine`` lays out its model states (see above)."""
    torch.manual_seed(0)
    mixed = engine != "fsdp"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if mixed else torch.float32)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    params = list(model.parameters())
    grads = [p.grad for p in params]
    if mixed:
        masters = [p.detach().float().requires_grad_() for p in params]
        for master, p in zip(masters, params):
            master.grad = p.grad.float()
        optimizer = torch.optim.AdamW(masters)
        optimizer.step()
        if engine == "zero0":
            grads += [m.grad for m in masters]  # the fp32 accumulators stay
        for master in masters:
            master.grad = None
        owned = masters
    else:
        optimizer = torch.optim.AdamW(params)
        optimizer.step()
        owned = []
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    assert len(states) == 3 * len(params)  # exp_avg, exp_avg_sq and the step count of every parameter
    return {"params": nbytes(params), "grads": nbytes(grads), "optimizer": nbytes(owned + states)}


@pytest.mark.parametrize(
    "name",
    list(ENGINES),
)
def test_model_states_are_what_a_real_optimizer_step_allocates(tmp_path, assets, name):
    engine, config, partitioned = ENGINES[name]
    cfg = AutoConfig.from_pretrained(assets["base"])
    measured = allocated_model_states(cfg, name)
    recipe = recipe_for(tmp_path, assets, parallel={"engine": engine, "config": config})
    # Stage 0 partitions nothing in this accounting; DeepSpeed's BF16_Optimizer does split its fp32 states, so
    # only one rank is a fair comparison there.
    for w in (1,) if name == "zero0" else (1, 2, 8):
        expected = sum(b / (w if kind in partitioned else 1) for kind, b in measured.items())
        # AdamW's step counts (4 bytes per tensor) are the only bytes the estimate leaves out
        assert estimate(recipe, cfg, w).parts["params+grads+adam"] == pytest.approx(expected, rel=1e-3), (name, w)


def fsdp_shard_bytes(config_dir: str) -> dict[str, int]:
    """On each rank: bytes of its local shards of the parameters, gradients and AdamW states after a real step of
    FSDP2 applied as the launcher applies it (each decoder layer, then the root, bf16 compute, fp32 reduce)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    cfg = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.step()

    def local(ts):
        return [t.to_local() if isinstance(t, DTensor) else t for t in ts]

    params = list(model.parameters())
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return {
        "params": nbytes(local(params)),
        "grads": nbytes(local(p.grad for p in params)),
        "optimizer": nbytes(local(states)),
    }


def test_fsdp_model_states_are_the_shards_of_a_real_two_rank_run(tmp_path, assets):
    cfg = AutoConfig.from_pretrained(assets["base"])
    ranks = run_distributed(fsdp_shard_bytes, 2, str(assets["base"]))
    whole = allocated_model_states(cfg, "fsdp")
    for kind in whole:  # the shards partition the states: nothing is kept twice (bar AdamW's step counts)
        assert sum(r[kind] for r in ranks) == pytest.approx(whole[kind], rel=1e-3), kind
    recipe = recipe_for(tmp_path, assets, parallel={"engine": "fsdp", "config": "fsdp.yaml"})
    per_gpu = max(sum(r.values()) for r in ranks)
    assert estimate(recipe, cfg, 2).parts["params+grads+adam"] == pytest.approx(per_gpu, rel=1e-3)
    # a save in the background copies what a checkpoint holds of each rank: its parameter and Adam shards (the
    # planner plans GPUs, where train.async_save's default, auto, saves FSDP2's checkpoints in the background);
    # a run without save_every, or one that saves synchronously, keeps no copy
    fsdp = {"engine": "fsdp", "config": "fsdp.yaml"}
    background = recipe_for(tmp_path, assets, train={"save_every": 5}, parallel=fsdp)  # async_save: auto
    host = host_estimate(background, cfg, 2, 2, None)
    for train in ({"save_every": 5, "async_save": False}, {"save_every": 0}):
        assert "background save copy" not in host_estimate(recipe_for(tmp_path, assets, train=train, parallel=fsdp),
                                                           cfg, 2, 2, None).held, train  # fmt: skip
    copied = max(r["params"] + r["optimizer"] for r in ranks)
    assert host.held["background save copy"] == pytest.approx(copied, rel=1e-3)


def test_offload_keeps_the_optimizer_states_off_the_gpu(tmp_path, assets):
    """What offload means, stated; that FSDP2's states really live in host memory during training is measured on
    a GPU (tests/test_gpu_fsdp_offload.py)."""
    cfg = big_config()
    states = {
        config: estimate(recipe_for(tmp_path, assets, parallel={"engine": engine, "config": config}), cfg, 2)
        for engine, config in (("fsdp", "fsdp.yaml"), ("fsdp", "fsdp-offload.yaml"),
                               ("deepspeed", "zero3.json"), ("deepspeed", "zero3-offload.json"))
    }  # fmt: skip
    assert states["fsdp-offload.yaml"].parts["params+grads+adam"] == 0
    n = param_counts(cfg).total
    # fp32 master weights and two Adam moments: 12 bytes a parameter, sharded over the 2 ranks, move to the host
    moved = states["zero3.json"].parts["params+grads+adam"] - states["zero3-offload.json"].parts["params+grads+adam"]
    assert moved == pytest.approx(12 * n / 2)


# ------------------------------------------------------------------------------------------------ activations


def saved_for_backward(config, layers: int, tokens: int) -> int:
    """Bytes of the distinct tensors autograd saves for backward in a bf16 forward through the first ``layers``
    decoder layers (sdpa attention), parameters and buffers left out."""
    cfg = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": layers, "vocab_size": 512})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 512, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids)
    return sum(saved.values())


@pytest.mark.parametrize("shape", ["tiny", "llama-1b"])
def test_layer_activations_are_what_autograd_saves(assets, shape):
    """One decoder layer's bytes per token, measured as the difference between two layers and one. The estimate
    is for CUDA's kernels: on CPU the attention output needs no contiguous copy for the output projection (2h
    bytes less) and the flash kernel keeps an fp32 log-sum-exp per head (4 bytes per head more): within 5%."""
    cfg = AutoConfig.from_pretrained(assets["base"]) if shape == "tiny" else big_config()
    tokens = 32
    per_layer = (saved_for_backward(cfg, 2, tokens) - saved_for_backward(cfg, 1, tokens)) / tokens
    assert layer_activation_bytes(cfg) == pytest.approx(per_layer, rel=0.05)


def test_activations_scale_with_tokens_and_shrink_with_checkpointing_and_compile(tmp_path, assets):
    cfg = big_config()
    plain = recipe_for(tmp_path, assets, data={"seq_len": 2048})
    a1 = estimate(plain, cfg, 2, micro_batch_size=1).parts["activations"]
    a4 = estimate(plain, cfg, 2, micro_batch_size=4).parts["activations"]
    assert a4 == pytest.approx(4 * a1)
    full = recipe_for(tmp_path, assets, data={"seq_len": 2048}, model={"activation_checkpointing": True})
    half = recipe_for(tmp_path, assets, data={"seq_len": 2048},
                      model={"activation_checkpointing": True, "checkpoint_every": 2})  # fmt: skip
    compiled = recipe_for(tmp_path, assets, data={"seq_len": 2048}, train={"compile": True})
    sizes = [estimate(r, cfg, 2).parts["activations"] for r in (full, half, compiled, plain)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4


def test_fused_loss_never_holds_the_whole_batch_of_logits(tmp_path, assets):
    """Properties only: no CPU measurement gives the peak of a loss computation (autograd's saved tensors miss
    the transient logits), so the byte counts are checked against the GPU peaks below."""
    cfg = big_config()
    fused = recipe_for(tmp_path, assets, data={"seq_len": 2048}, train={"micro_batch_size": 16})
    plain = recipe_for(tmp_path, assets, data={"seq_len": 2048}, train={"micro_batch_size": 16, "fused_loss": False})
    bf16_logits = 16 * 2048 * cfg.vocab_size * 2
    assert estimate(plain, cfg, 2).parts["loss"] > bf16_logits  # at least the logits themselves
    assert estimate(fused, cfg, 2).parts["loss"] < estimate(plain, cfg, 2).parts["loss"] / 3
    bigger = recipe_for(tmp_path, assets, data={"seq_len": 2048}, train={"micro_batch_size": 64})
    # 48 more sequences add less than their logits would
    extra_logits = 48 * 2048 * cfg.vocab_size * 2
    assert estimate(bigger, cfg, 2).parts["loss"] - estimate(fused, cfg, 2).parts["loss"] < extra_logits / 4


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
    tree = tiny_recipe(assets, tmp_path / "out", train={"micro_batch_size": 64, "global_batch_size": 128},
                       data={"seq_len": 2048})  # fmt: skip
    tree["model"] = {"from_config": str(LLAMA_1B), "tokenizer": str(assets["base"])}
    recipe = write_recipe(tmp_path / "r.yaml", tree)
    p = cpt("plan", str(recipe), "--gpus-per-node", "2", "--gpu-memory-gib", "80")
    assert "total (estimate)" in p.stdout and "activations" in p.stdout
    assert "warning: the estimate" in p.stderr and "exceeds the GPU's 80.0 GiB" in p.stderr
    assert "largest micro batch" in p.stdout
    small = cpt("plan", str(recipe), "train.micro_batch_size=2", "--gpus-per-node", "2", "--gpu-memory-gib", "80")
    assert "warning" not in small.stderr, small.stderr


def test_deepspeed_linear_leaves_layers_after_the_recompile_limit_uncompiled(tmp_path, assets):
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
    # under torch's default limit (runs before the launcher raised it)
    limit = RECOMPILE_LIMIT
    counts = {k: len(plan_for(r).compiled_layers(r, layers, limit)) for k, r in runs.items()}
    assert counts == {"fsdp": layers, "zero3": layers, "ds_linear": RECOMPILE_LIMIT, "eager": 0}
    act = {k: estimate(r, cfg, 2, recompile_limit=limit).parts["activations"] for k, r in runs.items()}
    assert act["fsdp"] == act["zero3"] < act["ds_linear"] < act["eager"]
    # the layers left eager cost what eager layers cost: their share of the all-eager difference
    uncompiled = (layers - RECOMPILE_LIMIT) / layers
    assert act["ds_linear"] - act["zero3"] == pytest.approx(uncompiled * (act["eager"] - act["zero3"]))
    # a run raises the limit above the layer count: every layer compiles, each its own variant
    assert len(plan_for(runs["ds_linear"]).compiled_layers(runs["ds_linear"], layers)) == layers
    assert estimate(runs["ds_linear"], cfg, 2).parts["activations"] == act["zero3"]


# Runs measured before the launcher turned DeepSpeed's memory_efficient_linear off (it was on, DeepSpeed's default)
DEEPSPEED_LINEAR = {
    f"2026-11-28-{name}-NVIDIA-H200"
    for name in ("e2e", "resume-export", "scaling", "speed", "speed-zero3", "speed-zero3-b", "profile-1gpu")
}


# The formula's terms were written and checked against the runs recorded up to this date; the runs after it (float8,
# the 3B shape, gradient accumulation, longer sequences) were measured after the formula was fixed and are held to
# a bound of their own, their errors reported apart (benchmarks/README.md).
FITTED_UNTIL = "2026-12-01"


def recorded_gpu_runs(fitted: bool = True):
    """Every run of the GPU benchmarks with its recipe overrides and measured peak (benchmarks/results), of the
    result files up to :data:`FITTED_UNTIL` (``fitted``) or after it."""
    out = []
    for path in sorted((PACKAGE_ROOT / "benchmarks" / "results").glob("*-NVIDIA-*.json")):
        if (path.name[:10] <= FITTED_UNTIL) != fitted:
            continue
        for name, run in json.loads(path.read_text()).get("runs", {}).items():
            # The estimate models ZeRO-3 with layer gathering (the default); per-submodule gathering measured
            # 7.7 GiB (14%) above it on 2x H200 (2026-11-28-speed-zero3-linear-b) and is not modelled.
            per_module = "parallel.zero3_layer_gather=false" in (run.get("overrides") or [])
            if run.get("overrides") and run.get("peak_mem_gib") and not per_module:
                if path.stem in DEEPSPEED_LINEAR and run.get("engine") == "deepspeed":
                    run["overrides"].append("parallel.deepspeed.zero_optimization.memory_efficient_linear=true")
                    run["recompile_limit_default"] = True  # torch's 8: later layers ran uncompiled
                out.append(pytest.param(run, id=f"{path.stem}:{name}"))
    return out


def estimate_of_recorded_run(run) -> float:
    """The formula of this checkout for a recorded run, in GiB: the model directories the benchmark built are
    recipes/models/*.json with the same vocabulary, so the recipe is rebuilt from those."""
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
    limit = RECOMPILE_LIMIT if run.get("recompile_limit_default") else None
    return estimate(recipe, load_config(recipe), run["gpus"], recompile_limit=limit).total / GIB


@pytest.mark.parametrize("run", recorded_gpu_runs())
def test_estimate_is_within_15_percent_of_every_measured_gpu_peak(run):
    got = estimate_of_recorded_run(run)
    assert got == pytest.approx(run["peak_mem_gib"], rel=0.15), (got, run["peak_mem_gib"])


@pytest.mark.parametrize("run", recorded_gpu_runs(fitted=False))
def test_estimate_of_runs_the_formula_did_not_see_is_within_35_percent_and_never_short_by_more_than_10(run):
    """Runs measured after the formula was fixed: the 3B shape keeps less than the compiled-layer bytes say, and an
    every-layer-checkpointed run peaks before its gradients exist. An estimate above the peak wastes memory; one
    below it runs out of memory, so that side is held tighter."""
    got = estimate_of_recorded_run(run)
    error = got / run["peak_mem_gib"] - 1
    assert -0.10 <= error <= 0.35, (got, run["peak_mem_gib"], error)


def float8_runs_with_their_bf16_run():
    """Each recorded float8 run (name ending -rowwise or -tensorwise) with the bf16 run of the same name, shape and
    batch in the same result file."""
    out = []
    for path in sorted((PACKAGE_ROOT / "benchmarks" / "results").glob("*-NVIDIA-*.json")):
        runs = json.loads(path.read_text()).get("runs", {})
        for name, run in runs.items():
            for suffix in ("-rowwise", "-tensorwise"):
                twin = runs.get(name.removesuffix(suffix)) if name.endswith(suffix) else None
                ours = twin and run.get("overrides") and twin.get("overrides")  # not the plain loop's runs
                if ours and run.get("peak_mem_gib") and twin.get("peak_mem_gib") and run.get("gpus") == 1:
                    out.append(pytest.param(run, twin, id=f"{path.stem}:{name}"))
    return out


@pytest.mark.parametrize("run, bf16_run", float8_runs_with_their_bf16_run())
def test_the_estimate_of_a_float8_run_is_as_close_as_that_of_its_bf16_run(run, bf16_run):
    """float8 keeps about a third fewer activation bytes than bf16 (launcher.memory.FLOAT8_ACTIVATION_SHARE): its
    estimate misses its peak by what the bf16 run's estimate misses that one's by, +-5 points (without the share, the
    float8 runs' estimates were 7-27 points further above their peaks than their bf16 runs'). One GPU each."""
    error = estimate_of_recorded_run(run) / run["peak_mem_gib"] - 1
    bf16_error = estimate_of_recorded_run(bf16_run) / bf16_run["peak_mem_gib"] - 1
    assert abs(error - bf16_error) <= 0.05, (error, bf16_error)
