"""DeepSpeed ZeRO 0-3 (and CPU offload), driven natively through ``deepspeed.initialize``."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import deepspeed
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.utils import set_z3_leaf_modules
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.initialization import no_init_weights
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

from ..config import BatchLayout, Recipe
from ..files import torch_save
from ..launch import DistInfo
from ..metrics import host_memory_gib
from ..model import build_model, decoder_layer_classes, init_checkpoint, meta_model, param_counts, weights_source
from ..redact import redact_values
from ..weights import LazyWeights, WeightsError, check_weights, init_tensors, local_model_dir
from .base import WRITTEN, Batch, Engine, SaveHandle, apply_trainable, forward_loss, lr_lambda, optimizer_groups
from .deepspeed_plan import fill_auto, weights_only_loading
from .deepspeed_universal import ensure_universal, saved_world_size, universal_loading
from .options import apply_training_options
from .ulysses import join

if TYPE_CHECKING:
    from ..vocab import VocabExtension

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


class _LogLines(io.TextIOBase):
    """A text stream whose lines become INFO records of this module's log."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                log.info("%s", line.strip())
        return len(text)


def _plain_arch_list() -> None:
    """DeepSpeed's JIT build of the DeepCompile operators cannot parse architecture suffixes in
    ``TORCH_CUDA_ARCH_LIST`` (``9.0a`` fails with "invalid literal for int()", deepspeed 0.19.8): drop them."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    plain = re.sub(r"(\d+\.\d+)[a-z]+", r"\1", archs)
    if plain != archs:
        log.info("TORCH_CUDA_ARCH_LIST=%r -> %r for DeepSpeed's JIT build", archs, plain)
        os.environ["TORCH_CUDA_ARCH_LIST"] = plain


class DeepSpeedEngine(Engine):
    def __init__(
        self, recipe: Recipe, info: DistInfo, layout: BatchLayout, config: PretrainedConfig,
        vocab: VocabExtension | None = None,
    ):  # fmt: skip
        super().__init__(recipe, info, layout, config)
        counts = param_counts(config, recipe.model.trust_remote_code)
        self.ds_config = fill_auto(
            recipe, layout, counts.total, counts.layer, int(config.hidden_size), self.dtype, info.device.type == "cuda"
        )
        self.stage = self.ds_config["zero_optimization"].get("stage", 0)
        # DeepSpeed's own communication layer wraps the process group that already exists.
        log.info("DeepSpeed joins the process group (on CPU it first builds or loads its shared-memory op)")
        start = time.perf_counter()
        # On CPU DeepSpeed prints "DeepSpeed shm_comm_op built successfully" as it joins: into the log, stamped.
        with contextlib.redirect_stdout(_LogLines()):
            deepspeed.init_distributed(dist_init_required=False)
        log.info("DeepSpeed communication ready in %.1f s", time.perf_counter() - start)
        # While this object lives, transformers builds and loads the model under deepspeed.zero.Init: with
        # ZeRO-3 each rank only ever materialises its own partition of the weights. It must not outlive the
        # build: any later model construction (the export, on rank 0 alone) would become a collective and hang.
        hf_ds = HfDeepSpeedConfig(self.ds_config) if self.stage == 3 else None
        source = weights_source(recipe)
        branch = init_checkpoint(recipe)
        what = "every rank reads its partition of" if self.stage == 3 else "loading the weights of"
        doing = (
            f"{what} {source}"
            if source
            else f"the weights come from {branch} (model.init_from), loaded once the engine is set up"
            if branch is not None
            else "initialising the model"
        )
        log.info("ZeRO stage %d: %s", self.stage, doing)
        start = time.perf_counter()
        try:
            model = _build(recipe, config, self.dtype, self.stage, vocab)
        finally:
            del hf_ds
            unset_hf_deepspeed_config()
        log.info("model built in %.1f s", time.perf_counter() - start)
        if self.stage == 3 or not source:
            start = time.perf_counter()
            if source:
                base = vocab.base_config if vocab is not None else config
                read = _load_partitions(model, local_model_dir(source), meta_model(recipe, base), vocab)
                took = time.perf_counter() - start
                log.info("weights loaded in %.1f s (%.2f GB read by this rank); host memory %.2f GiB (peak %.2f "
                         "GiB)", took, read / 1e9, *host_memory_gib())  # fmt: skip
            elif branch is None:
                _init_partitions(model, meta_model(recipe, config), recipe.train.seed, info.device)
                log.info("model initialised in %.1f s (seed %d)", time.perf_counter() - start, recipe.train.seed)
        # DeepCompile ("compile": {"deepcompile": true} in the DeepSpeed config) compiles the whole model with
        # ZeRO's gathers scheduled inside the graph; otherwise train.compile compiles each decoder layer.
        deepcompile = bool((self.ds_config.get("compile") or {}).get("deepcompile"))
        if deepcompile and info.device.type != "cuda":
            # DeepCompile's operators are CUDA code: the same recipe runs without it (per-layer compile) on CPU.
            log.info("DeepSpeed compile.deepcompile needs a GPU: off on %s", info.device.type)
            self.ds_config["compile"]["deepcompile"] = deepcompile = False
        self.sp = join(model, recipe.parallel.sequence_parallel)
        self.fused_loss = bool(apply_training_options(model, recipe, compile_layers=not deepcompile)["fused_loss"])
        apply_trainable(model, recipe)
        # DeepCompile schedules ZeRO-3's gathers inside the compiled graph itself; leaf modules are for the hooks.
        if self.stage == 3 and recipe.parallel.zero3_layer_gather and not deepcompile:
            set_z3_leaf_modules(model, list(decoder_layer_classes(model)))
        log.info("setting up DeepSpeed: optimizer, ZeRO partitions and the ops it builds on first use")
        start = time.perf_counter()
        self.ds, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=optimizer_groups(model, recipe),
            config=self.ds_config,
            lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda(recipe)),
            dist_init_required=False,
        )
        log.info("DeepSpeed engine initialised in %.1f s; host memory %.2f GiB (peak %.2f GiB)",
                 time.perf_counter() - start, *host_memory_gib())  # fmt: skip
        if deepcompile and recipe.train.compile:
            _plain_arch_list()
            start = time.perf_counter()
            self.ds.compile()
            log.info("DeepCompile set up in %.1f s; the first steps compile the graph", time.perf_counter() - start)
        self.ds.checkpoint_engine = _CheckpointFiles()
        self._keep_settings(self.ds.optimizer)

    @property
    def module(self):
        return self.ds

    def train_step(self, micro_batches: list[Batch]) -> tuple[torch.Tensor, float]:
        total = torch.zeros((), device=self.info.device)
        skipped_before = self.ds.skipped_steps
        for mb in micro_batches:
            loss = forward_loss(self.ds, self.ds.module, mb, self.info.device, self.fused_loss, self.sp)
            self.ds.backward(loss * self.loss_weight)
            self.ds.step()
            total += loss.detach()
        # DeepSpeed drops the update itself when the global gradient norm is not finite (every ZeRO stage,
        # bf16 and fp32 alike) and leaves the learning-rate schedule where it was.
        self.skipped = self.ds.skipped_steps > skipped_before
        norm = self.ds.get_global_grad_norm()
        if self.skipped:
            norm = float("nan") if norm is None or math.isfinite(norm) else norm
        return self.group_loss(total) / len(micro_batches), float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def n_params(self) -> int:
        # ZeRO-3 leaves each rank a partition; ds_numel is the whole parameter's size.
        return sum(getattr(p, "ds_numel", None) or p.numel() for p in self.ds.module.parameters())

    def save(self, path: Path, *, background: bool = False) -> SaveHandle:
        if background:
            raise ValueError("train.async_save: DeepSpeed writes its checkpoints synchronously (FSDP2 only)")
        # DeepSpeed stores its whole config in every checkpoint file: keep secrets (a monitor's api_key, say) out.
        config = self.ds.config
        self.ds.config = redact_values(config)
        try:
            self.ds.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)
        finally:
            self.ds.config = config
        return WRITTEN

    def load(self, path: Path, *, optimizer: bool = True, scheduler: bool = True) -> None:
        """The model (with ``optimizer`` also the optimizer, with ``scheduler`` the schedule) from ``path``. A ZeRO
        checkpoint written by another number of ranks is loaded through its universal form
        (:mod:`launcher.engine.deepspeed_universal`): DeepSpeed re-partitions the fp32 weights and Adam states for
        this world size. ZeRO keeps the fp32 weights beside the Adam states in its optimizer files, so both are
        read; without ``optimizer`` the Adam states are then dropped and the optimizer starts anew."""
        if not optimizer and self.ds.zero_nvme_offload_optimizer():
            raise ValueError(
                "model.init_optimizer: false cannot leave out the optimizer state when DeepSpeed offloads it to NVMe "
                "(offload_optimizer.device: nvme); set model.init_optimizer: true, or offload to cpu"
            )
        saved = saved_world_size(path)
        if saved in (None, self.info.world_size):
            load_path, _ = self.ds.load_checkpoint(
                str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=scheduler
            )
        else:
            source = ensure_universal(path, self.info.rank, self.recipe.parallel.timeout_minutes)
            log.info("ZeRO stage %d: re-partitioning the fp32 weights and Adam states of %d ranks over %d from %s",
                     self.stage, saved, self.info.world_size, source)  # fmt: skip
            start = time.perf_counter()
            with universal_loading(self.ds):
                load_path, _ = self.ds.load_checkpoint(
                    str(source.parent), tag=source.name, load_optimizer_states=True, load_lr_scheduler_states=scheduler
                )
            log.info("universal checkpoint loaded in %.1f s", time.perf_counter() - start)
            _own_step_counters(self.ds.optimizer)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {path}")
        self._restore_settings(self.ds.optimizer, schedule=not scheduler)
        if not optimizer:
            self.ds.optimizer.state.clear()  # Adam creates its moments and step anew at the first step
        if not scheduler:
            # a new run: DeepSpeed's own step counters (logging, skipped steps) start again with the schedule
            self.ds.global_steps = self.ds.global_samples = self.ds.skipped_steps = 0

    def export_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        model = self.ds.module
        if self.stage != 3:
            # ZeRO 0-2: every rank holds the whole module; rank 0 copies one tensor at a time to the CPU.
            if self.info.rank == 0:
                for key, value in model.state_dict().items():
                    yield key, value.detach().to("cpu")
            return
        # ZeRO-3: gather one decoder layer (or one other module's own parameters) at a time, so no rank ever
        # holds more than one layer beyond its partition; rank 0 keeps a CPU copy of it until it is yielded.
        keys = set(model.state_dict())
        layer_classes = decoder_layer_classes(model)
        inside_layer: set[str] = set()
        for name, module in model.named_modules():
            if any(name.startswith(p + ".") for p in inside_layer):
                continue
            whole = isinstance(module, layer_classes)
            if whole:
                inside_layer.add(name)
            params = dict(module.named_parameters(recurse=whole))
            prefix = f"{name}." if name else ""
            unit: list[tuple[str, torch.Tensor]] = []
            if params:
                with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
                    if self.info.rank == 0:
                        unit += [(prefix + k, p.detach().to("cpu", copy=True)) for k, p in params.items()
                                 if prefix + k in keys]  # fmt: skip
            if self.info.rank == 0:
                unit += [(prefix + k, b.detach().to("cpu", copy=True)) for k, b in module.named_buffers(recurse=whole)
                         if prefix + k in keys]  # fmt: skip
            yield from unit
            del unit


def _own_step_counters(optimizer: Any) -> None:
    """DeepSpeed's universal ZeRO-3 load gives the Adam state of every parameter group one and the same ``step``
    tensor (deepspeed 0.19.8), which AdamW then advances once for each group at every step, so that the bias
    correction runs ahead: each group gets its own."""
    seen: set[int] = set()
    for state in optimizer.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(step))


def _build(
    recipe: Recipe, config: PretrainedConfig, dtype: torch.dtype, stage: int, vocab: VocabExtension | None = None
) -> nn.Module:
    """The model, under ZeRO-3 partitioned as it is built (``deepspeed.zero.Init`` through the Hugging Face
    config that is live) and without weights: :func:`_load_partitions` or :func:`_init_partitions` fill them.
    ZeRO 0-2 keep a whole model on every rank by design: pretrained weights come through transformers (the base
    model, whose embeddings then grow to a ``vocab`` extension); a random one is built without initialisation and
    filled by :func:`_init_partitions`, as under ZeRO-3 and FSDP2."""
    m = recipe.model
    if stage != 3 and weights_source(recipe):
        if vocab is None:
            return build_model(recipe, config, dtype)
        from ..vocab import grow_embeddings

        model = build_model(recipe, vocab.base_config, dtype)
        grow_embeddings(model, vocab)
        return model
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code
        )
    # Skipping the initialisation also skips the tying that follows it (transformers 5.24): a tied model would
    # train its output projection as a separate matrix that the export then drops.
    if config.tie_word_embeddings:
        model.tie_weights()
    model.config.use_cache = False
    return model


def _partition(p: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's storage of parameter ``p``, first element it holds of the flattened parameter, how many).
    Under ZeRO-3 a parameter's flattened elements are split into equal runs, one per rank of its group, the last
    padded; otherwise the rank holds all of it."""
    zero: Any = p  # a ZeRO-3 parameter carries its partition and group as attributes
    part = getattr(zero, "ds_tensor", None)
    if part is None:
        return p.data.view(-1), 0, p.numel()
    size = part.ds_numel
    start = size * torch.distributed.get_rank(group=zero.ds_process_group)
    return part.data.view(-1), start, max(0, min(size, int(zero.ds_numel) - start))


def _load_partitions(model: nn.Module, model_dir: Path, meta: nn.Module, vocab: VocabExtension | None = None) -> int:
    """Each rank copies its partition of every parameter straight from the checkpoint's safetensors (the rows that
    cover it), converted to the model's dtype; no collective, no whole tensor. One file is open (memory-mapped) at
    a time, so the pages read stay within one shard file. Returns the bytes read.

    ``meta`` is the model the checkpoint holds; with a grown vocabulary (``vocab``) the partitions of the embedding
    matrices come from :class:`launcher.vocab.GrownMatrix` (base rows from the file, new rows from their pieces')."""
    headers = check_weights(model_dir, meta)
    grown: set[str] = set()
    if vocab is not None:
        from ..vocab import embedding_keys

        grown = set(embedding_keys(model))
    by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    for name, param in model.named_parameters():
        by_file.setdefault(headers[name].file, []).append((name, param))
    read = 0
    with torch.no_grad():
        for file in sorted(by_file):
            with LazyWeights(headers) as weights:
                for name, tensor in by_file[file]:
                    mine, start, n = _partition(tensor)
                    if n and name in grown:
                        assert vocab is not None
                        matrix = vocab.matrix(lambda a, b, name=name: weights.read_rows(name, a, b))
                        values = matrix.flat(start, start + n)
                        mine[:n].copy_(values)
                        base = vocab.base_rows * math.prod(headers[name].shape[1:])
                        read += max(0, min(start + n, base) - start) * headers[name].element_size
                    elif n:
                        values = weights.read_flat(name, start, start + n)
                        mine[:n].copy_(values)
                        read += values.numel() * values.element_size()
    return read


def _init_partitions(model: nn.Module, meta: nn.Module, seed: int, device: torch.device) -> None:
    """Each rank copies its partition of each parameter's initial value (:func:`launcher.weights.init_tensors`,
    one module at a time, the same on every rank, world size and engine)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, full in init_tensors(meta, seed, device, wanted=set(params)):
            mine, start, n = _partition(params.pop(name))
            mine[:n].copy_(full.reshape(-1)[start : start + n])
    if params:
        raise WeightsError(f"no initial value for {', '.join(sorted(params)[:5])}")
