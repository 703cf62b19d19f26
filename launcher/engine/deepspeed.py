"""DeepSpeed ZeRO 0-3 (and CPU offload), driven natively through ``deepspeed.initialize``."""

from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path

import deepspeed
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.utils import set_z3_leaf_modules
from torch.optim.lr_scheduler import LambdaLR
from transformers import PretrainedConfig
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

from ..config import BatchLayout, Recipe
from ..files import torch_save
from ..launch import DistInfo
from ..model import build_model, decoder_layer_classes, param_counts
from ..redact import redact_values
from .base import Batch, Engine, forward_loss, lr_lambda
from .deepspeed_plan import fill_auto, weights_only_loading
from .options import apply_training_options

log = logging.getLogger(__name__)


class _CheckpointFiles(TorchCheckpointEngine):
    """DeepSpeed's file writer and reader, through our own: a failed write is an OSError naming the file (torch's
    writer, given a path, says only "file write failed"), and reads are ``weights_only`` with DeepSpeed's own value
    types allowed, so a tampered checkpoint cannot run code."""

    def save(self, state_dict, path: str) -> None:
        torch_save(state_dict, path)

    def load(self, path: str, map_location=None):
        with weights_only_loading():
            return torch.load(path, map_location=map_location, weights_only=True)


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
        counts = param_counts(config, recipe.model.trust_remote_code)
        self.ds_config = fill_auto(
            recipe, layout, counts.total, counts.layer, int(config.hidden_size), self.dtype, info.device.type == "cuda"
        )
        self.stage = self.ds_config["zero_optimization"].get("stage", 0)
        # DeepSpeed's own communication layer wraps the process group that already exists.
        log.info("DeepSpeed joins the process group (on CPU it first builds or loads its shared-memory op)")
        start = time.perf_counter()
        deepspeed.init_distributed(dist_init_required=False)
        log.info("DeepSpeed communication ready in %.1f s", time.perf_counter() - start)
        # While this object lives, transformers builds and loads the model under deepspeed.zero.Init: with
        # ZeRO-3 each rank only ever materialises its own partition of the weights. It must not outlive the
        # build: any later model construction (the export, on rank 0 alone) would become a collective and hang.
        hf_ds = HfDeepSpeedConfig(self.ds_config) if self.stage == 3 else None
        source = recipe.model.name_or_path
        log.info(
            "ZeRO stage %d: %s", self.stage, f"loading the weights of {source}" if source else "initialising the model"
        )
        start = time.perf_counter()
        try:
            model = build_model(recipe, config, self.dtype)
        finally:
            del hf_ds
            unset_hf_deepspeed_config()
        log.info("model built in %.1f s", time.perf_counter() - start)
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
        log.info("setting up DeepSpeed: optimizer, ZeRO partitions and the ops it builds on first use")
        start = time.perf_counter()
        self.ds, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.ds_config,
            lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda(recipe)),
            dist_init_required=False,
        )
        log.info("DeepSpeed engine initialised in %.1f s", time.perf_counter() - start)
        if deepcompile and recipe.train.compile:
            _plain_arch_list()
            start = time.perf_counter()
            self.ds.compile()
            log.info("DeepCompile set up in %.1f s; the first steps compile the graph", time.perf_counter() - start)
        self.ds.checkpoint_engine = _CheckpointFiles()

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

    def n_params(self) -> int:
        # ZeRO-3 leaves each rank a partition; ds_numel is the whole parameter's size.
        return sum(getattr(p, "ds_numel", None) or p.numel() for p in self.ds.module.parameters())

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
        model = self.ds.module
        if self.stage != 3:
            return {k: v.detach().cpu() for k, v in model.state_dict().items()} if self.info.rank == 0 else {}
        # ZeRO-3: gather one decoder layer (or one other module's own parameters) at a time, so no rank ever
        # holds more than one layer beyond its partition; rank 0 keeps a CPU copy of each.
        keys = set(model.state_dict())
        out: dict[str, torch.Tensor] = {}
        layer_classes = decoder_layer_classes(model)
        inside_layer: set[str] = set()
        for name, module in model.named_modules():
            if any(name.startswith(p + ".") for p in inside_layer):
                continue
            whole = isinstance(module, layer_classes)
            if whole:
                inside_layer.add(name)
            params = dict(module.named_parameters(recurse=whole))
            if not params:
                continue
            prefix = f"{name}." if name else ""
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
                if self.info.rank == 0:
                    for key, p in params.items():
                        if prefix + key in keys:
                            out[prefix + key] = p.detach().to("cpu", copy=True)
            if self.info.rank == 0:
                for key, b in module.named_buffers(recurse=whole):
                    if prefix + key in keys:
                        out[prefix + key] = b.detach().to("cpu", copy=True)
        return out
