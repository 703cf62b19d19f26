"""Per-GPU memory of a recipe before it runs: model states by engine, activations, logits, buffers.

The estimate is of the peak of ``torch.cuda.max_memory_allocated`` (what the metrics log as ``mem_peak_gib``):
at the start of the backward pass, when every saved activation and the loss's logits are alive next to the
model states. Bytes per token of a Llama-style decoder layer (hidden ``h``, key/value width ``kv``, FFN ``f``),
counting what autograd keeps under bf16 with sdpa attention:

* RMSNorm x2: the fp32 upcast input ``4h`` and the normalised bf16 ``2h`` each, plus the bf16 output that the
  next projection keeps (``2h``): ``16h``
* attention: queries ``2h``, keys and values ``4kv`` (rotary embeddings keep nothing per token), the attention
  output ``2h`` and its contiguous copy for the output projection ``2h``: ``6h + 4kv``
* MLP: gate, SiLU(gate), up and their product ``8f``

With activation checkpointing a checkpointed layer keeps only its input (``2h``), and one layer's activations
are rebuilt at a time during backward. Compiled layers keep less (see :func:`layer_activation_bytes`). Model
states follow the engine: FSDP2 keeps fp32 parameter, gradient and Adam shards (``16 N / W`` bytes); ZeRO-3 bf16
and fp32 parameter partitions, fp32 gradient partitions and Adam states (``18 N / W``) and, with the shipped
``stage3_max_live_parameters`` / ``stage3_max_reuse_distance``, keeps gathered bf16 parameters alive between
forward and backward up to ``max_live_parameters``; ZeRO-1/2 keep the whole bf16 model; ZeRO-0 everything. CPU
offload moves the states off the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Recipe
from .engine.loss import chunk_tokens
from .metrics import _shape, layer_param_count, param_count

GIB = float(2**30)
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size, what "auto" fills in
# torch._dynamo.config.recompile_limit: how many variants of one compiled function torch keeps before it runs the
# function uncompiled for every new variant
RECOMPILE_LIMIT = 8


@dataclass
class MemoryEstimate:
    parts: dict[str, float]
    """Bytes per GPU by component."""

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def table(self, gpu_bytes: float | None = None) -> str:
        rows = [f"{k:>22}: {v / GIB:8.2f} GiB" for k, v in self.parts.items()]
        rows.append(f"{'total (estimate)':>22}: {self.total / GIB:8.2f} GiB")
        if gpu_bytes:
            rows.append(f"{'GPU memory':>22}: {gpu_bytes / GIB:8.2f} GiB ({100 * self.total / gpu_bytes:.0f}% used)")
        return "\n".join(rows)


def layer_activation_bytes(config: Any, compiled: bool = False) -> int:
    """Bytes per token that one decoder layer keeps for backward (bf16, no checkpointing). A compiled layer
    keeps each norm's input and output (``8h``), queries, keys and values (``2h + 4kv``), the attention output
    and the output projection's input (``4h``), gate and up (``4f``), and recomputes the fp32 norm
    intermediates and SiLU(gate) * up in backward: 62% of the eager bytes for the 1.1B shape, where 67% was
    measured (2x H200, 2026-11-28, benchmarks/results/2026-11-28-speed-NVIDIA-H200.json)."""
    s = _shape(config)
    h, kv, f = s["hidden"], s["kv_heads"] * s["head_dim"], s["intermediate"]
    if compiled:
        return 16 * h + 4 * kv + 4 * f
    return 16 * h + 6 * h + 4 * kv + 8 * f


def _zero_stage(recipe: Recipe) -> int:
    return int((recipe.parallel.deepspeed.get("zero_optimization") or {}).get("stage", 0))


def compiled_layers(recipe: Recipe, layers: int) -> range:
    """The decoder layers that run compiled. DeepSpeed's ``memory_efficient_linear`` (ZeRO-3) replaces torch's
    linear with an autograd function that reads each weight's ZeRO id, so torch.compile compiles the layer
    function again for each layer and runs the layers after the first ``RECOMPILE_LIMIT`` uncompiled (the
    launcher turns it off unless the DeepSpeed config asks for it)."""
    if not recipe.train.compile:
        return range(0)
    zero = recipe.parallel.deepspeed.get("zero_optimization") or {}
    if recipe.parallel.engine == "deepspeed" and _zero_stage(recipe) == 3 and zero.get("memory_efficient_linear"):
        return range(min(layers, RECOMPILE_LIMIT))
    return range(layers)


def _offloaded(recipe: Recipe) -> bool:
    p = recipe.parallel
    if p.engine == "fsdp":
        return p.fsdp.cpu_offload
    zero = p.deepspeed.get("zero_optimization") or {}
    return (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)


def estimate(
    recipe: Recipe, config: Any, world_size: int, *, micro_batch_size: int | None = None, bf16: bool = True
) -> MemoryEstimate:
    """Peak allocated bytes per GPU for ``recipe`` on ``world_size`` GPUs (bf16 training)."""
    s = _shape(config)
    n = param_count(config)
    w = max(1, world_size)
    h, v, layers = s["hidden"], s["vocab"], s["layers"]
    per_layer_params = layer_param_count(config)
    root_params = n - per_layer_params * layers
    mb = micro_batch_size or recipe.train.micro_batch_size
    tokens = mb * recipe.data.seq_len
    low = 2 if bf16 else 4  # bytes of a compute-precision value
    parts: dict[str, float] = {}
    offload = _offloaded(recipe)

    # model states
    if recipe.parallel.engine == "fsdp":
        f = recipe.parallel.fsdp
        shards = 0.0 if offload else 16 * n / w
        parts["params+grads+adam"] = shards
        held = (1 + f.prefetch_layers) if f.reshard_after_forward else layers
        gathered = low * (root_params + per_layer_params * held)
        reduce = (4 if f.reduce_dtype == "fp32" or not bf16 else 2) * per_layer_params
        parts["gathered params"] = gathered + reduce + (low * per_layer_params * layers if offload else 0)
    else:
        stage = _zero_stage(recipe)
        zero = recipe.parallel.deepspeed.get("zero_optimization") or {}
        master_and_adam = 0.0 if offload else 12 * n / (w if stage >= 1 else 1)
        grads = low * n / (w if stage >= 2 else 1) + (4 * n if stage == 0 and bf16 else 0)
        if stage == 3:
            grads = 4 * n / w  # ZeRO-3 accumulates gradient partitions in fp32
        if stage == 3:
            params = low * n / w
            live = zero.get("stage3_max_live_parameters", 1e9)
            live = float(live) if isinstance(live, (int, float)) else 1e9
            bucket = zero.get("reduce_bucket_size")
            bucket = float(bucket) if isinstance(bucket, (int, float)) else min(REDUCE_BUCKET, n)
            # the gradient bucket stays allocated between steps (+0.92 GiB measured for +496M elements)
            parts["gathered params"] = low * min(n, live + per_layer_params) + low * bucket
        else:
            params = low * n
        parts["params+grads+adam"] = params + grads + master_and_adam

    # activations
    compiled = compiled_layers(recipe, layers)
    per_layer = [layer_activation_bytes(config, compiled=i in compiled) * (low / 2) for i in range(layers)]
    every = recipe.model.checkpoint_every if recipe.model.activation_checkpointing else 0
    checkpointed = set(range(0, layers, every)) if every else set()
    # an uncheckpointed layer keeps its activations, a checkpointed one its input (and, while it is recomputed
    # in backward, one layer's activations)
    kept = sum(b for i, b in enumerate(per_layer) if i not in checkpointed) + len(checkpointed) * low * h
    kept += max(per_layer) if checkpointed else 0
    parts["activations"] = tokens * (kept + 8 * h)  # + the final norm and the head's input

    # logits and loss
    if recipe.train.fused_loss:
        rows = min(tokens, chunk_tokens(v))
        parts["loss"] = rows * v * (4 + 4 + low) + tokens * h * low + 4 * v * h
    else:
        parts["loss"] = tokens * v * (low + 4 + 4)
    return MemoryEstimate(parts)


def suggest_micro_batch(
    recipe: Recipe, config: Any, world_size: int, gpu_bytes: float, headroom: float = 0.9
) -> tuple[int, int] | None:
    """The largest micro-batch whose estimate fits ``headroom`` of the GPU and divides the global batch, with
    the gradient accumulation it implies; None when not even 1 fits."""
    t = recipe.train
    global_batch = t.global_batch_size or t.micro_batch_size * world_size
    per_rank, rest = divmod(global_batch, world_size)
    if rest:
        return None
    best = None
    for mb in range(1, per_rank + 1):
        if (
            per_rank % mb == 0
            and estimate(recipe, config, world_size, micro_batch_size=mb).total <= headroom * gpu_bytes
        ):
            best = (mb, per_rank // mb)
    return best
