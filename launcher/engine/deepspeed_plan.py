"""DeepSpeed ZeRO 0-3: what its JSON config must hold, how ``"auto"`` values are filled from the recipe, the memory
its model states take, and how its checkpoints are read for export (:mod:`launcher.engine.deepspeed_checkpoint`)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import BatchLayout, Recipe
from .deepspeed_checkpoint import weights_only_loading, zero_checkpoint_tensors  # noqa: F401 (the engine loads with it)
from .plan import EnginePlan, recompile_limit

log = logging.getLogger(__name__)

REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default reduce_bucket_size, what ``"auto"`` fills in (never more than a rank's share of the model)."""


def zero_section(recipe: Recipe) -> dict[str, Any]:
    zero = recipe.parallel.deepspeed.get("zero_optimization")
    return zero if isinstance(zero, dict) else {}


def zero_stage(recipe: Recipe) -> int:
    return int(zero_section(recipe).get("stage", 0))


class DeepSpeedPlan(EnginePlan):
    name = "deepspeed"
    default_config = "zero3.json"

    @classmethod
    def loads_shards(cls, recipe: Recipe) -> bool:
        """ZeRO-3 partitions the model as it is built; ZeRO 0-2 keep a whole model on every rank by design."""
        return zero_stage(recipe) == 3

    @classmethod
    def check(cls, recipe: Recipe, world_size: int | None = None) -> list[str]:
        """The DeepSpeed config may leave values ``"auto"``; fixed values must agree with the recipe."""
        problems: list[str] = []
        ds = recipe.parallel.deepspeed
        if not ds:
            return ["parallel.deepspeed: empty; parallel.config must name a DeepSpeed JSON file"]
        zero = ds.get("zero_optimization", {})
        stage = zero.get("stage", 0) if isinstance(zero, dict) else None
        if stage not in (0, 1, 2, 3):
            problems.append(f"parallel.deepspeed.zero_optimization.stage: must be 0, 1, 2 or 3, got {stage!r}")
        if "scheduler" in ds:
            problems.append(
                "parallel.deepspeed.scheduler: the schedule comes from train.schedule/warmup_steps/min_lr_ratio; "
                "remove it from the DeepSpeed config"
            )
        checks: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": recipe.train.micro_batch_size,
            "gradient_clipping": recipe.train.grad_clip,
        }
        for k, want in checks.items():
            got = ds.get(k, "auto")
            if got != "auto" and got != want:
                problems.append(f'parallel.deepspeed.{k}: {got!r} contradicts the recipe\'s value {want!r}; use "auto"')
        for fp in ("fp16", "bf16"):
            sect = ds.get(fp)
            if isinstance(sect, dict) and sect.get("enabled") not in (None, "auto", False):
                want = recipe.train.precision
                if fp == "fp16" or want == "fp32":
                    problems.append(
                        f'parallel.deepspeed.{fp}.enabled: true contradicts train.precision={want!r}; use "auto"'
                    )
        sp = recipe.parallel.sequence_parallel
        if sp > 1 and isinstance(ds.get("compile"), dict) and ds["compile"].get("deepcompile"):
            problems.append(
                f"parallel.deepspeed.compile.deepcompile: true with parallel.sequence_parallel: {sp}: DeepCompile "
                "traces the whole model and its ZeRO gathers, not the sequence-parallel exchanges; turn one off "
                "(train.compile compiles each decoder layer with them)"
            )
        if sp > 1 and ds.get("sequence_parallel_size", sp) != sp:
            problems.append(
                f"parallel.deepspeed.sequence_parallel_size: {ds['sequence_parallel_size']!r} contradicts "
                f"parallel.sequence_parallel: {sp}; leave it out (the recipe sets it)"
            )
        return problems

    @classmethod
    def describe(cls, recipe: Recipe) -> str:
        zero = zero_section(recipe)
        text = f"DeepSpeed ZeRO stage {zero.get('stage', 0)}"
        offload = [
            f"{what} to {sect.get('device')}"
            for what, key in (("optimizer", "offload_optimizer"), ("parameters", "offload_param"))
            if isinstance(sect := zero.get(key), dict) and sect.get("device") not in (None, "none")
        ]
        return text + (", offloading " + " and ".join(offload) if offload else "")

    @classmethod
    def offloaded(cls, recipe: Recipe) -> bool:
        return (zero_section(recipe).get("offload_optimizer") or {}).get("device", "none") not in ("none", None)

    @classmethod
    def compiled_layers(cls, recipe: Recipe, layers: int, limit: int | None = None) -> range:
        """DeepSpeed's ``memory_efficient_linear`` (ZeRO-3) replaces torch's linear with an autograd function that
        reads each weight's ZeRO id, so torch.compile compiles the layer function again for each layer and runs
        the layers after the first ``limit`` uncompiled (:func:`fill_auto` turns it off unless the DeepSpeed
        config asks for it; a run raises the limit above the layer count, runs before that had torch's 8)."""
        if not recipe.train.compile:
            return range(0)
        if zero_stage(recipe) == 3 and zero_section(recipe).get("memory_efficient_linear"):
            return range(min(layers, recompile_limit(layers) if limit is None else limit))
        return range(layers)

    @classmethod
    def host_state_bytes(cls, recipe: Recipe, n_params: int, world: int) -> dict[str, float]:
        """Offloaded optimizer: fp32 master weights, Adam's two moments and the fp32 gradients DeepSpeed's CPU
        Adam reads, each a partition under ZeRO 1-3; offloaded ZeRO-3 parameters: their bf16 partitions."""
        stage, zero = zero_stage(recipe), zero_section(recipe)
        share = world if stage >= 1 else 1
        parts: dict[str, float] = {}
        if cls.offloaded(recipe):
            parts["offloaded master+adam+grads"] = 16 * n_params / share
        if stage == 3 and (zero.get("offload_param") or {}).get("device", "none") not in ("none", None):
            parts["offloaded params"] = 2 * n_params / world
        if stage == 3:
            # At start-up ZeRO-3 moves each rank's whole parameter partition through a host buffer to defragment
            # GPU memory (deepspeed.runtime.zero.utils.defragment): 17.7 GB peak on 1x H200 for the 8B shape,
            # 16 GB of it this copy (benchmarks/results/2026-12-01-load-1gpu-NVIDIA-H200.json).
            low = 4 if recipe.train.precision == "fp32" else 2
            parts["start-up partition copy"] = low * n_params / world
        return parts

    @classmethod
    def model_state_bytes(
        cls, recipe: Recipe, n_params: int, layer_params: int, layers: int, world: int, low: int
    ) -> dict[str, float]:
        """ZeRO-3: bf16 parameter and gradient partitions, fp32 master partitions and Adam states (``16 N / W``)
        and, with the shipped ``stage3_max_live_parameters`` / ``stage3_max_reuse_distance``, gathered bf16
        parameters kept alive between forward and backward up to ``max_live_parameters``, plus the reduce bucket;
        ZeRO-1/2 keep the whole bf16 model; ZeRO-0 everything. Offload moves the optimizer states off the GPU.
        ZeRO-3 is modelled with ``parallel.zero3_layer_gather`` (the default): gathering per submodule measured
        7.7 GiB more on the 1.1B shape (2x H200, benchmarks/results/2026-11-28-speed-zero3-linear-b-*.json)."""
        n, stage, zero = n_params, zero_stage(recipe), zero_section(recipe)
        master_and_adam = 0.0 if cls.offloaded(recipe) else 12 * n / (world if stage >= 1 else 1)
        grads = low * n / (world if stage >= 2 else 1) + (4 * n if stage == 0 and low == 2 else 0)
        parts: dict[str, float] = {}
        if stage == 3:
            # ZeRO-3 keeps its gradient partitions in data_types.grad_accum_dtype, which defaults to the model's
            # dtype (bf16 training: 2 bytes; measured on a real engine, tests/test_memory.py)
            accum = (recipe.parallel.deepspeed.get("data_types") or {}).get("grad_accum_dtype")
            grads = (4 if accum in ("fp32", "float32") else low) * n / world
            params = low * n / world
            live = zero.get("stage3_max_live_parameters", 1e9)
            live = float(live) if isinstance(live, (int, float)) else 1e9
            bucket = zero.get("reduce_bucket_size")
            bucket = float(bucket) if isinstance(bucket, (int, float)) else min(REDUCE_BUCKET, n / world)
            # the gradient bucket stays allocated between steps (+0.92 GiB measured for +496M elements)
            parts["gathered params"] = low * min(n, live + layer_params) + low * bucket
        else:
            params = low * n
        return {"params+grads+adam": params + grads + master_and_adam, **parts}

    @classmethod
    def export_tensors(cls, checkpoint: Path, model_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
        from ..model import weight_units, weights_layout_model

        yield from zero_checkpoint_tensors(checkpoint, weight_units(weights_layout_model(model_config)))


def fill_auto(
    recipe: Recipe, layout: BatchLayout, n_params: int, layer_params: int, hidden: int, dtype: torch.dtype, cuda: bool
) -> dict[str, Any]:
    """The DeepSpeed config with every ``"auto"`` replaced by the value the recipe implies, for a model of
    ``n_params`` parameters (``layer_params`` per decoder layer, hidden size ``hidden``)."""
    ds = copy.deepcopy(recipe.parallel.deepspeed)
    t = recipe.train
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    auto = {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": layout.global_batch_size,
        "gradient_clipping": t.grad_clip,
    }
    for k, v in auto.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    if layout.sequence_parallel > 1:
        # DeepSpeed then checks the batch against world / N data-parallel ranks (the ZeRO-3 build sees no mpu)
        ds["sequence_parallel_size"] = layout.sequence_parallel
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = dtype == torch.bfloat16
    opt = ds.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        # torch's AdamW (fused on GPU) is as fast as DeepSpeed's FusedAdam and needs no JIT build; offloaded
        # optimizer states need DeepSpeedCPUAdam, which DeepSpeed picks when torch_adam is off.
        wanted: dict[str, Any] = {"lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay,
                  "torch_adam": not offload_opt}  # fmt: skip
        for k, v in wanted.items():
            if params.get(k, "auto") == "auto":
                params[k] = v
        if params.get("torch_adam") and cuda:
            params.setdefault("fused", True)
    # Bucket sizes. The Hugging Face integration's hidden^2 (reduce) and 0.9 hidden^2 (prefetch) are less than
    # one decoder layer; DeepSpeed's 5e8 reduce bucket and a prefetch of two layers train the 1.1B shape 13%
    # faster on 2x H200 (55,805 against 49,235 tokens/s/GPU, +0.9 GiB; benchmarks/results/
    # 2026-11-28-speed-zero3-NVIDIA-H200.json).
    sizes = {
        # allocated whole on every rank: no bigger than the rank's share of the model
        "reduce_bucket_size": min(REDUCE_BUCKET, -(-n_params // layout.world_size)),
        "stage3_prefetch_bucket_size": 2 * layer_params,
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for k, v in sizes.items():
        if zero.get(k) == "auto":
            zero[k] = v
    if zero.get("stage") == 3:
        # DeepSpeed's memory_efficient_linear (on by default) swaps torch's linear for an autograd function that
        # reads each weight's ZeRO id: torch.compile then compiles the decoder layer again for every layer (with
        # torch's default recompile limit of 8 it gave up after 8, leaving the rest uncompiled). Off, one compiled
        # variant serves every layer: 1.1B shape on 1x H200, 57,405 -> 71,373 tokens/s/GPU and 72.1 -> 60.3 GiB
        # peak (benchmarks/results/2026-11-28-profile-1gpu-NVIDIA-H200.json, -speed-zero3-linear-). torch's
        # linear keeps the same tensors for backward.
        zero.setdefault("memory_efficient_linear", False)
        if zero["memory_efficient_linear"] and t.compile:
            log.warning(
                "parallel.deepspeed.zero_optimization.memory_efficient_linear=true with train.compile: each decoder "
                "layer compiles its own variant (each layer's weights change the compiled code): a longer compile"
            )
    return ds
