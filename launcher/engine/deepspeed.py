"""DeepSpeed ZeRO 0-3 (and CPU offload), driven natively through ``deepspeed.initialize``."""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.utils import set_z3_leaf_modules
from torch.optim.lr_scheduler import LambdaLR
from transformers import PretrainedConfig
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

from ..callbacks.base import redact_values
from ..config import BatchLayout, Recipe
from ..launch import DistInfo
from ..memory import RECOMPILE_LIMIT, REDUCE_BUCKET
from ..metrics import layer_param_count, param_count
from ..model import apply_training_options, build_model, decoder_layer_classes
from .base import Batch, Engine, forward_loss, lr_lambda

log = logging.getLogger(__name__)


def fill_auto(
    recipe: Recipe, layout: BatchLayout, config: PretrainedConfig, dtype: torch.dtype, cuda: bool
) -> dict[str, Any]:
    """The DeepSpeed config with every ``"auto"`` replaced by the value the recipe implies."""
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
    hidden = int(config.hidden_size)
    sizes = {
        "reduce_bucket_size": min(REDUCE_BUCKET, param_count(config)),  # allocated whole: no bigger than the model
        "stage3_prefetch_bucket_size": 2 * layer_param_count(config),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for k, v in sizes.items():
        if zero.get(k) == "auto":
            zero[k] = v
    if zero.get("stage") == 3:
        # DeepSpeed's memory_efficient_linear (on by default) swaps torch's linear for an autograd function that
        # reads each weight's ZeRO id: torch.compile then compiles the decoder layer again for every layer and
        # gives up after RECOMPILE_LIMIT (torch._dynamo's recompile_limit), leaving the rest uncompiled. Off,
        # every layer compiles: 1.1B shape on 1x H200, 57,405 -> 71,373 tokens/s/GPU and 72.1 -> 60.3 GiB peak
        # (benchmarks/results/2026-11-28-profile-1gpu-NVIDIA-H200.json, -speed-zero3-linear-). torch's linear
        # keeps the same tensors for backward.
        zero.setdefault("memory_efficient_linear", False)
        if zero["memory_efficient_linear"] and t.compile:
            log.warning(
                "parallel.deepspeed.zero_optimization.memory_efficient_linear=true with train.compile: only the "
                "first %d decoder layers compile (each layer's weights change the compiled code)",
                RECOMPILE_LIMIT,
            )
    return ds


def _plain_arch_list() -> None:
    """DeepSpeed's JIT build of the DeepCompile operators cannot parse architecture suffixes in
    ``TORCH_CUDA_ARCH_LIST`` (``9.0a`` fails with "invalid literal for int()", deepspeed 0.19.8): drop them."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    plain = re.sub(r"(\d+\.\d+)[a-z]+", r"\1", archs)
    if plain != archs:
        log.info("TORCH_CUDA_ARCH_LIST=%r -> %r for DeepSpeed's JIT build", archs, plain)
        os.environ["TORCH_CUDA_ARCH_LIST"] = plain


class DeepSpeedEngine(Engine):
    def __init__(self, recipe: Recipe, info: DistInfo, layout: BatchLayout, config: PretrainedConfig):
        super().__init__(recipe, info, layout, config)
        self.ds_config = fill_auto(recipe, layout, config, self.dtype, info.device.type == "cuda")
        self.stage = self.ds_config["zero_optimization"].get("stage", 0)
        # DeepSpeed's own communication layer wraps the process group that already exists.
        deepspeed.init_distributed(dist_init_required=False)
        # While this object lives, transformers builds and loads the model under deepspeed.zero.Init: with
        # ZeRO-3 each rank only ever materialises its own partition of the weights. It must not outlive the
        # build: any later model construction (the export, on rank 0 alone) would become a collective and hang.
        hf_ds = HfDeepSpeedConfig(self.ds_config) if self.stage == 3 else None
        try:
            model = build_model(recipe, config, self.dtype)
        finally:
            del hf_ds
            unset_hf_deepspeed_config()
        # DeepCompile ("compile": {"deepcompile": true} in the DeepSpeed config) compiles the whole model with
        # ZeRO's gathers scheduled inside the graph; otherwise train.compile compiles each decoder layer.
        deepcompile = bool((self.ds_config.get("compile") or {}).get("deepcompile"))
        if deepcompile and info.device.type != "cuda":
            # DeepCompile's operators are CUDA code: the same recipe runs without it (per-layer compile) on CPU.
            log.info("DeepSpeed compile.deepcompile needs a GPU: off on %s", info.device.type)
            self.ds_config["compile"]["deepcompile"] = deepcompile = False
        self.fused_loss = bool(apply_training_options(model, recipe, compile_layers=not deepcompile)["fused_loss"])
        # DeepCompile schedules ZeRO-3's gathers inside the compiled graph itself; leaf modules are for the hooks.
        if self.stage == 3 and recipe.parallel.zero3_layer_gather and not deepcompile:
            set_z3_leaf_modules(model, list(decoder_layer_classes(model)))
        self.ds, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.ds_config,
            lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda(recipe)),
            dist_init_required=False,
        )
        if deepcompile and recipe.train.compile:
            _plain_arch_list()
            self.ds.compile()

    @property
    def module(self):
        return self.ds

    def train_step(self, micro_batches: list[Batch]) -> tuple[torch.Tensor, float]:
        total = torch.zeros((), device=self.info.device)
        skipped_before = self.ds.skipped_steps
        for mb in micro_batches:
            loss = forward_loss(self.ds, self.ds.module, mb, self.info.device, self.fused_loss)
            self.ds.backward(loss)
            self.ds.step()
            total += loss.detach()
        # DeepSpeed drops the update itself when the global gradient norm is not finite (every ZeRO stage,
        # bf16 and fp32 alike) and leaves the learning-rate schedule where it was.
        self.skipped = self.ds.skipped_steps > skipped_before
        norm = self.ds.get_global_grad_norm()
        if self.skipped:
            norm = float("nan") if norm is None or math.isfinite(norm) else norm
        return total / len(micro_batches), float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def save(self, path: Path) -> None:
        # DeepSpeed stores its whole config in every checkpoint file: keep secrets (a monitor's api_key, say) out.
        config = self.ds.config
        self.ds.config = redact_values(config)
        try:
            self.ds.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)
        finally:
            self.ds.config = config

    def load(self, path: Path) -> None:
        load_path, _ = self.ds.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {path}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.stage == 3:
            sd = self.ds._zero3_consolidated_16bit_state_dict()
            return dict(sd) if sd is not None else {}
        if self.info.rank != 0:
            return {}
        return {k: v.detach().cpu() for k, v in self.ds.module.state_dict().items()}
