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
states are each engine's own answer (``EnginePlan.model_state_bytes`` in :mod:`launcher.engine`), and so is which
layers compile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Recipe
from .engine import plan_for
from .engine.loss import chunk_tokens
from .metrics import model_shape
from .model import param_counts

GIB = float(2**30)
HEADROOM = 0.9
"""The share of a GPU's memory a plan may fill: the estimate counts tensors, and the allocator's fragmentation, NCCL's
buffers and the CUDA context need the rest."""


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
    s = model_shape(config)
    h, kv, f = s["hidden"], s["kv_heads"] * s["head_dim"], s["intermediate"]
    if compiled:
        return 16 * h + 4 * kv + 4 * f
    return 16 * h + 6 * h + 4 * kv + 8 * f


def estimate(
    recipe: Recipe,
    config: Any,
    world_size: int,
    *,
    micro_batch_size: int | None = None,
    bf16: bool = True,
    recompile_limit: int | None = None,
) -> MemoryEstimate:
    """Peak allocated bytes per GPU for ``recipe`` on ``world_size`` GPUs (bf16 training); ``recompile_limit``:
    torch._dynamo's, when not the one a run sets (runs before the launcher raised it had torch's 8)."""
    s = model_shape(config)
    counts = param_counts(config, recipe.model.trust_remote_code)
    w = max(1, world_size)
    h, v, layers = s["hidden"], s["vocab"], s["layers"]
    mb = micro_batch_size or recipe.train.micro_batch_size
    tokens = mb * recipe.data.seq_len
    low = 2 if bf16 else 4  # bytes of a compute-precision value
    plan = plan_for(recipe)
    parts: dict[str, float] = dict(plan.model_state_bytes(recipe, counts.total, counts.layer, layers, w, low))

    # activations
    compiled = plan.compiled_layers(recipe, layers, recompile_limit)
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
    recipe: Recipe, config: Any, world_size: int, gpu_bytes: float, headroom: float = HEADROOM
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


READ_GBPS = 2.0
"""Disk read speed a load time is planned with by default, in GB/s: a parallel filesystem's share per node or a
local NVMe drive read by several ranks at once; ``cpt plan --read-gbps`` sets the machine's own."""


SHARD_FILE = 5e9
"""Bytes of one safetensors shard file as the hub's large models ship them: a rank maps one file at a time."""


@dataclass
class HostEstimate:
    transient: dict[str, float]
    """Host bytes per rank that come and go at start-up (one after the other), by component."""
    held: dict[str, float]
    """Host bytes per rank held while training (offloaded states), by component."""
    read_per_node: float
    """Bytes one node reads from disk to load the model."""
    note: str

    @property
    def peak(self) -> float:
        return max(self.transient.values(), default=0.0) + sum(self.held.values())

    def table(self, ranks_per_node: int, read_gbps: float = READ_GBPS) -> str:
        rows = [f"{k:>22}: {v / GIB:8.2f} GiB (start-up)" for k, v in self.transient.items()]
        rows += [f"{k:>22}: {v / GIB:8.2f} GiB" for k, v in self.held.items()]
        rows.append(f"{'peak per rank':>22}: {self.peak / GIB:8.2f} GiB")
        rows.append(f"{'peak per node':>22}: {self.peak * ranks_per_node / GIB:8.2f} GiB ({ranks_per_node} ranks)")
        seconds = self.read_per_node / (read_gbps * 1e9)
        rows.append(f"{'load reads per node':>22}: {self.read_per_node / 1e9:8.2f} GB, about {seconds:.0f} s at "
                    f"{read_gbps:g} GB/s")  # fmt: skip
        return "\n".join(rows + [f"{'':>22}  {self.note}"])


def host_estimate(
    recipe: Recipe, config: Any, world_size: int, ranks_per_node: int, checkpoint_bytes: float | None
) -> HostEstimate:
    """Host memory per rank while loading and training, and what a node reads to load the model.
    ``checkpoint_bytes``: the size of the pretrained weights (None: a random start, nothing read)."""
    counts = param_counts(config, recipe.model.trust_remote_code)
    plan = plan_for(recipe)
    w = max(1, world_size)
    transient: dict[str, float] = {}
    if checkpoint_bytes is None:
        read, note = 0.0, "a random start: each rank initialises its own share, nothing is read"
    elif plan.loads_shards(recipe):
        # Each rank reads the slices it owns from one memory-mapped file at a time.
        transient["loading (mapped file)"] = min(checkpoint_bytes / w, SHARD_FILE)
        read = checkpoint_bytes * min(ranks_per_node, w) / w
        note = "every rank reads only its share of the checkpoint"
    else:
        transient["loading (whole model)"] = checkpoint_bytes
        read = checkpoint_bytes
        note = "ZeRO 0-2 keep a whole model on every rank by design: each rank loads all of it"
    held = plan.host_state_bytes(recipe, counts.total, w)
    for key in [k for k in held if k.startswith("start-up")]:
        transient[key] = held.pop(key)
    return HostEstimate(transient, held, read, note)
