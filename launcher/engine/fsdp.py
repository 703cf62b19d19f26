"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with torch.distributed.checkpoint for sharded saves."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed.checkpoint as dcp
from accelerate import init_empty_weights
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, HuggingFaceStorageReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM, PretrainedConfig

from ..compat import dcp_writer_naming_os_errors, step_unless_nonfinite
from ..config import BatchLayout, Recipe
from ..files import torch_save
from ..launch import DistInfo
from ..model import decoder_layers, init_checkpoint, meta_model, weights_source
from ..weights import LazyWeights, WeightsError, check_weights, init_tensors, local_model_dir
from .background_save import BackgroundSaves, background_saves, hidden_os_error
from .base import WRITTEN, Batch, Engine, SaveHandle, apply_trainable, forward_loss, lr_lambda, optimizer_groups
from .float8 import plain_tensor, precompute_scales
from .options import apply_training_options
from .ulysses import join

if TYPE_CHECKING:
    from ..vocab import VocabExtension

log = logging.getLogger(__name__)


class FsdpEngine(Engine):
    def __init__(
        self, recipe: Recipe, info: DistInfo, layout: BatchLayout, config: PretrainedConfig,
        vocab: VocabExtension | None = None,
    ):  # fmt: skip
        super().__init__(recipe, info, layout, config)
        f = recipe.parallel.fsdp
        dev = info.device.type
        if f.replicate_degree > 1:
            mesh = init_device_mesh(
                dev, (f.replicate_degree, info.world_size // f.replicate_degree), mesh_dim_names=("replicate", "shard")
            )
        else:
            mesh = init_device_mesh(dev, (info.world_size,), mesh_dim_names=("shard",))
        mp = None
        if self.dtype == torch.bfloat16:
            reduce = torch.float32 if f.reduce_dtype == "fp32" else torch.bfloat16
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
        kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": f.reshard_after_forward}
        if mp is not None:
            kwargs["mp_policy"] = mp
        # Without a GPU everything already lives in CPU memory, so the same recipe runs there unchanged.
        offload = f.cpu_offload and dev == "cuda"
        if f.cpu_offload and not offload:
            log.info("parallel.fsdp.cpu_offload has no effect without a GPU")
        if offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()

        # Every rank builds the model on the meta device, shards it, and fills only its own shards: from the
        # checkpoint's safetensors (each rank reads its slices), or from the per-module initialisation. No rank
        # ever holds the whole model.
        start = time.perf_counter()
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch.float32, attn_implementation=recipe.model.attn_implementation,
                trust_remote_code=recipe.model.trust_remote_code,
            )  # fmt: skip
        # tensorwise float8 under FSDP2 with more than one shard: the weights are gathered already cast (half of
        # bf16's bytes), every weight's scale computed in one all-reduce after the optimizer step (torchao's FSDP2
        # float8 path). With one shard nothing is gathered, so only the extra casts and scale pass would remain:
        # 3B shape on 1x H200, our tensorwise run with it made 0.90x the tokens/s of a plain loop without it
        # (benchmarks/results/2026-12-02-float8-3b-NVIDIA-H200.json); the two were not measured apart.
        shards = info.world_size // f.replicate_degree
        self.float8_all_gather = recipe.train.float8 == "tensorwise" and shards > 1
        # the N ranks of a group share each sequence; parameters stay sharded over every rank
        self.sp = join(model, recipe.parallel.sequence_parallel)
        options = apply_training_options(model, recipe, fsdp_float8_all_gather=self.float8_all_gather)
        self.fused_loss = bool(options["fused_loss"])
        apply_trainable(model, recipe)
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        # Each decoder layer is its own FSDP unit, so one layer's all-gather overlaps the previous one's compute;
        # the root unit holds embeddings, final norm and lm_head (tied weights stay one parameter there).
        layers = decoder_layers(model)
        for layer in layers:
            fully_shard(cast(nn.Module, layer), **kwargs)
        fully_shard(model, **kwargs)
        # Issue the next layers' all-gathers before the current layer computes, in both directions.
        k = f.prefetch_layers
        for i, layer in enumerate(layers if k else []):
            layer.set_modules_to_forward_prefetch(layers[i + 1 : i + 1 + k])
            layer.set_modules_to_backward_prefetch(layers[max(0, i - k) : i][::-1])
        model.to_empty(device="cpu" if offload else info.device)
        with torch.no_grad():
            for name, value in buffers.items():
                model.get_buffer(name).copy_(value)
        if config.tie_word_embeddings:
            model.tie_weights()
        log.info("model built on the meta device and sharded over %d ranks in %.1f s", info.world_size,
                 time.perf_counter() - start)  # fmt: skip
        start = time.perf_counter()
        source = weights_source(recipe)
        if source:
            log.info("FSDP2: every rank reads its shards of %s", source)
            base = vocab.base_config if vocab is not None else config
            read = _load_shards(model, local_model_dir(source), meta_model(recipe, base), vocab)
            log.info("weights loaded in %.1f s (%.2f GB read by this rank)", time.perf_counter() - start, read / 1e9)
        elif (branch := init_checkpoint(recipe)) is not None:
            # model.init_from a checkpoint: its weights are loaded into the shards once the optimizer exists
            log.info("FSDP2: the weights come from %s (model.init_from), loaded once the optimizer is set up", branch)
        else:
            log.info("FSDP2: every rank initialises its shards (seed %d)", recipe.train.seed)
            _init_shards(model, meta_model(recipe, config), recipe.train.seed, info.device)
            log.info("model initialised in %.1f s", time.perf_counter() - start)
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        t = recipe.train
        self.optimizer = torch.optim.AdamW(
            optimizer_groups(model, recipe), lr=t.lr, betas=(t.betas[0], t.betas[1]), eps=t.eps,
            fused=True if dev == "cuda" and not offload else None,
        )  # fmt: skip
        self.scheduler = LambdaLR(self.optimizer, lr_lambda(recipe))
        self._keep_settings(self.optimizer)
        if background_saves(recipe, dev):
            self._background = BackgroundSaves(self.optimizer, info.device, self._state)

    @property
    def module(self):
        return self.model

    def train_step(self, micro_batches: list[Batch]) -> tuple[torch.Tensor, float]:
        total = torch.zeros((), device=self.info.device)
        n = len(micro_batches)
        every = self.recipe.parallel.fsdp.reduce_every_micro_batch
        scale = self.loss_weight / n
        for i, mb in enumerate(micro_batches):
            # Each micro-batch's gradients reduce-scattered as its backward runs (each rank keeps its shard only),
            # or once per step, the unsharded gradients of the whole model kept until the last micro-batch.
            self.model.set_requires_gradient_sync(every or i == n - 1)
            loss = forward_loss(self.model, self.model, mb, self.info.device, self.fused_loss, self.sp)
            (loss * scale).backward()
            total += loss.detach()
        clip = self.recipe.train.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        # The norm is reduced over every rank, so all of them agree on skipping a non-finite step. A fused optimizer
        # (on GPUs) drops the update itself when the norm is not finite, and the host reads the norm only once the
        # update is queued: the GPU does not idle while the host waits for the backward pass and then launches it.
        fused = bool(self.optimizer.defaults.get("fused"))
        if fused:
            step_unless_nonfinite(self.optimizer, norm)
        value = float(norm.item())
        self.skipped = not math.isfinite(value)
        if not self.skipped:
            if not fused:
                self.optimizer.step()
            self.scheduler.step()
            if self.float8_all_gather:
                precompute_scales(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        return self.group_loss(total) / n, value

    def lr(self) -> float:
        # what the next step uses: the schedule sets it, a loaded optimizer state must not have replaced it
        return float(self.optimizer.param_groups[0]["lr"])

    _background: BackgroundSaves | None = None
    """The process group, host copy and optimizer hooks of ``train.async_save``."""

    def _state(self) -> dict[str, Any]:
        """What a checkpoint holds of the engine: this rank's shards of the parameters and the optimizer states."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, path: Path, *, background: bool = False) -> SaveHandle:
        state = self._state()
        writer = dcp_writer_naming_os_errors(str(path))
        handle = WRITTEN
        if background:
            # set up with the engine wherever background_saves() says the run saves in the background
            assert self._background is not None, "a background save of an engine set up for synchronous saves"
            handle = self._background.start(state, writer)
        else:
            try:
                dcp.save(state, storage_writer=writer)
            except (Exception, CheckpointException) as e:  # (not an Exception)
                # A write the storage refused inside torch.save comes out as "unexpected pos": name the OS error.
                failure = hidden_os_error(e, writer)
                if failure is None:
                    raise
                raise failure from e
        if self.info.rank == 0:
            torch_save(self.scheduler.state_dict(), path / "scheduler.pt")
        return handle

    def load(self, path: Path, *, optimizer: bool = True, scheduler: bool = True) -> None:
        """The model (with ``optimizer`` also the optimizer, with ``scheduler`` the schedule) from ``path``, saved on
        any world size: torch.distributed.checkpoint gives each rank's shards of the parameters and of the optimizer
        states (Adam's moments and step) the slices of the saved shards that overlap them. Without ``optimizer``
        only the model's entries of the checkpoint are read, and the optimizer stays new."""
        saved = {m.group(1) for f in path.glob("__*.distcp") if (m := re.match(r"__(\d+)_", f.name))}
        if len(saved) != self.info.world_size:
            what = "parameters and optimizer states" if optimizer else "parameters"
            log.info("FSDP2: torch.distributed.checkpoint reshards the %s of %d ranks over %d", what, len(saved),
                     self.info.world_size)  # fmt: skip
        if optimizer:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
            set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
            self._restore_settings(self.optimizer, schedule=not scheduler)
        else:
            model_sd = get_model_state_dict(self.model)
            dcp.load({"model": model_sd}, checkpoint_id=str(path))
            set_model_state_dict(self.model, model_sd)
        if scheduler:
            self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))

    def export_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        # The sharded state dict (names as the model's own state dict has them, nothing gathered yet); each DTensor
        # is then all-gathered on its own, so every rank holds one whole tensor at most beyond its shards.
        for key, value in get_model_state_dict(self.model).items():
            if not isinstance(value, torch.Tensor):
                continue
            value = plain_tensor(value)
            if isinstance(value, DTensor):
                mesh_device = value.device_mesh.device_type
                if value.device.type != mesh_device:
                    value = cast(DTensor, value.to(mesh_device))  # offloaded shards gather on the GPU
                value = plain_tensor(value.full_tensor())
            if self.info.rank == 0:
                yield key, value.detach().to("cpu")
            del value


def _load_shards(model: nn.Module, model_dir: Path, meta: nn.Module, vocab: VocabExtension | None = None) -> int:
    """Fill the sharded ``model`` from the Hugging Face safetensors in ``model_dir`` through
    torch.distributed.checkpoint's reader: every rank reads only the slices of its own shards, converted to the
    parameters' dtype slice by slice. Returns the bytes this rank's shards hold in the checkpoint.

    ``meta`` is the model the checkpoint holds; with a grown vocabulary (``vocab``) the embedding matrices are
    larger than the checkpoint's, and each rank computes its own rows of them (:class:`launcher.vocab.GrownMatrix`:
    base rows read from the file, new rows from the rows of their pieces)."""
    headers = check_weights(model_dir, meta)
    state = {k: v for k, v in get_model_state_dict(model).items() if k in headers}
    grown: dict[str, torch.Tensor] = {}
    if vocab is not None:
        from ..vocab import embedding_keys

        grown = {k: state.pop(k) for k in embedding_keys(model) if k in state}
    dcp.load(
        state,
        storage_reader=HuggingFaceStorageReader(str(model_dir)),
        planner=DefaultLoadPlanner(allow_partial_load=True),
    )
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))
    read = 0
    for key, value in state.items():
        local = value.to_local() if isinstance(value, DTensor) else value
        if isinstance(local, torch.Tensor):
            read += local.numel() * headers[key].element_size
    if grown:
        assert vocab is not None
        params = dict(model.named_parameters())
        with LazyWeights(headers) as weights, torch.no_grad():
            for key in grown:
                p = params[key]
                local = p.to_local() if isinstance(p, DTensor) else p
                start = _first_row(p)
                matrix = vocab.matrix(lambda a, b, key=key: weights.read_rows(key, a, b))
                local.copy_(matrix.rows(start, start + local.shape[0]))
                base_rows = max(0, min(start + local.shape[0], vocab.base_rows) - start)
                read += base_rows * math.prod(local.shape[1:]) * headers[key].element_size
    return read


def _first_row(p: torch.Tensor) -> int:
    """The first row of the whole parameter that this rank's shard of ``p`` holds. FSDP2 shards along the first
    dimension, in the chunks ``torch.chunk`` cuts (the last ones shorter or empty), over each mesh dimension that
    shards (a replicating one, HSDP's, leaves the rows whole)."""
    if not isinstance(p, DTensor):
        return 0
    start, size = 0, p.shape[0]
    for dim, placement in enumerate(p.placements):
        if not isinstance(placement, Shard):
            continue
        if placement.dim != 0:
            raise WeightsError(f"cannot fill a shard split along dimension {placement.dim}: FSDP2 splits rows")
        chunk = -(-size // p.device_mesh.size(dim))
        index = p.device_mesh.get_local_rank(dim)
        start += index * chunk
        size = max(0, min(chunk, size - index * chunk))
    if size != p.to_local().shape[0]:
        raise WeightsError(f"a shard of {size} rows was expected here, FSDP2 holds {p.to_local().shape[0]}")
    return start


def _init_shards(model: nn.Module, meta: nn.Module, seed: int, device: torch.device) -> None:
    """Each rank fills its own shards of every parameter from :func:`launcher.weights.init_tensors` (the full
    value of one module at a time, the same on every rank and world size)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, full in init_tensors(meta, seed, device, wanted=set(params)):
            p = params.pop(name)
            if isinstance(p, DTensor):
                mine = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p.to_local().copy_(mine)
            else:
                p.copy_(full)
    if params:
        raise WeightsError(f"no initial value for {', '.join(sorted(params)[:5])}")
