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

Tokens are counted per GPU: ``micro_batch_size x seq_len / N`` under ``parallel.sequence_parallel: N``, where each
rank holds 1/N of every sequence through the decoder and, inside attention, the whole sequence for 1/N of the
heads (the same number of elements). sdpa's causal kernels and flash_attention_2 keep nothing that grows faster
than the tokens; what does is in :func:`attention_terms`: the ``seq_len x seq_len`` mask of document masking under
sdpa and the attention scores of eager attention, which every rank of a sequence-parallel group holds at full
length. The fused loss works through the tokens in chunks of a fixed size, so its logits stay bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from .config import ConfigError, Recipe
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


FLOAT8_ACTIVATION_SHARE = 2 / 3
"""What a compiled decoder layer in float8 training keeps for backward, as a share of its bf16 bytes: torch.compile
saves float8 copies of the linear layers' inputs. Measured on one H200 (2026-12-02, benchmarks/results/2026-12-02-
*-NVIDIA-H200.json), rowwise and tensorwise alike, as the peak's drop from the bf16 run of the same shape and batch
over :func:`layer_activation_bytes`: 3B shape 33% at 8K, 16K and 32K tokens per step, 1.1B shape 34.5% at 8K."""


def float8_share(recipe: Recipe, compiled: bool) -> float:
    """The share of a layer's bf16 activation bytes it keeps under ``train.float8`` (1 without float8 or compile)."""
    return FLOAT8_ACTIVATION_SHARE if compiled and recipe.train.float8 != "off" else 1.0


def attention_terms(recipe: Recipe, config: Any, low: int) -> tuple[float, float, float]:
    """What attention keeps for backward beyond :func:`layer_activation_bytes`, for the recipe's kernel: bytes of one
    layer per token on this GPU, bytes of one layer per sequence, and bytes per sequence of the whole model's mask,
    which checkpointed layers keep for their recomputation (``low``: bytes of a compute-precision value).

    * sdpa with ``data.document_masking``: transformers builds a block-diagonal ``[B, 1, T, T]`` bool mask, and
      with a mask it repeats the keys and values to every query head (``repeat_kv``: ``2 low (q - kv)`` more per
      token, for query width ``q``) and torch's sdpa turns the mask into an additive one of the query's dtype in
      every layer, which its efficient kernel keeps for backward (``low T^2`` per sequence and layer). On 1x H200
      (22 layers of the 1.1B shape, micro-batch 4) these give +1.89 GiB at seq 2048 and +15.81 GiB at 8192 over
      the causal kernel, where +1.89 and +15.82 were measured (benchmarks/results/2026-11-28-masking-NVIDIA-H200.json).
    * eager: repeated keys and values as above, and per sequence and layer the softmax's fp32 probabilities and
      their copy in the compute dtype, ``heads / N x T^2`` each.
    * sdpa without a mask, flash_attention_2 (varlen with document masking): nothing; memory linear in T.

    Under sequence parallelism (sdpa only) the mask is the whole sequence's on every rank of its group (the heads are
    split, the mask is shared by all heads)."""
    s = model_shape(config)
    t = recipe.data.seq_len
    q, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    repeated = 2 * low * (q - kv)
    impl = recipe.model.attn_implementation
    if impl == "eager":
        probs = 4 + (low if low < 4 else 0)  # the fp32 softmax, and its cast (none in fp32 training)
        return repeated, s["heads"] * t * t * probs, low * t * t  # (eager cannot run sequence-parallel)
    if impl == "sdpa" and recipe.data.document_masking:
        return repeated, low * t * t, t * t
    return 0.0, 0.0, 0.0


SQUARE = "attention (seq_len^2)"
"""The estimate's part that grows with the square of ``data.seq_len`` (see :func:`attention_terms`)."""


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
    # each of the N ranks that share a sequence holds 1/N of its tokens; model states are sharded over every rank
    tokens = mb * recipe.data.seq_len / max(1, recipe.parallel.sequence_parallel)
    low = 2 if bf16 else 4  # bytes of a compute-precision value
    plan = plan_for(recipe)
    parts: dict[str, float] = dict(plan.model_state_bytes(recipe, counts.total, counts.layer, layers, w, low))

    # activations
    compiled = plan.compiled_layers(recipe, layers, recompile_limit)
    per_token, per_sequence, whole_mask = attention_terms(recipe, config, low)
    kept_share = [(low / 2) * float8_share(recipe, i in compiled) for i in range(layers)]
    per_layer = [
        tokens * (layer_activation_bytes(config, compiled=i in compiled) * kept_share[i] + per_token)
        for i in range(layers)
    ]
    every = recipe.model.checkpoint_every if recipe.model.activation_checkpointing else 0
    checkpointed = set(range(0, layers, every)) if every else set()
    # an uncheckpointed layer keeps its activations, a checkpointed one its input (and, while it is recomputed
    # in backward, one layer's activations)
    kept = sum(b for i, b in enumerate(per_layer) if i not in checkpointed) + len(checkpointed) * low * h * tokens
    kept += max(per_layer) if checkpointed else 0
    parts["activations"] = kept + tokens * 8 * h  # + the final norm and the head's input
    # the same for what grows with seq_len squared: every layer's share is the same size
    holding = layers - len(checkpointed) + (1 if checkpointed else 0)
    square = mb * (per_sequence * holding + (whole_mask if checkpointed else 0))
    if square:
        parts[SQUARE] = square

    # logits and loss
    if recipe.train.fused_loss:
        rows = min(tokens, chunk_tokens(v))
        parts["loss"] = rows * v * (4 + 4 + low) + tokens * h * low + 4 * v * h
    else:
        parts["loss"] = tokens * v * (low + 4 + 4)
    return MemoryEstimate(parts)


def _data_parallel(recipe: Recipe, world_size: int) -> int:
    return max(1, world_size // max(1, recipe.parallel.sequence_parallel))


def _fits(recipe: Recipe, config: Any, world_size: int, budget: float, micro_batch_size: int | None = None) -> bool:
    """Whether the estimate, in the recipe's precision, is within ``budget`` bytes."""
    bf16 = recipe.train.precision != "fp32"
    return estimate(recipe, config, world_size, micro_batch_size=micro_batch_size, bf16=bf16).total <= budget


def suggest_micro_batch(
    recipe: Recipe, config: Any, world_size: int, gpu_bytes: float, headroom: float = HEADROOM
) -> tuple[int, int] | None:
    """The largest micro-batch whose estimate fits ``headroom`` of the GPU and divides the global batch, with
    the gradient accumulation it implies; None when not even 1 fits."""
    t = recipe.train
    ranks = _data_parallel(recipe, world_size)
    global_batch = t.global_batch_size or t.micro_batch_size * ranks
    per_rank, rest = divmod(global_batch, ranks)
    if rest:
        return None
    best = None
    for mb in range(1, per_rank + 1):
        if per_rank % mb == 0 and _fits(recipe, config, world_size, headroom * gpu_bytes, micro_batch_size=mb):
            best = (mb, per_rank // mb)
    return best


def with_layout(recipe: Recipe, *, seq_len: int | None = None, sequence_parallel: int | None = None) -> Recipe:
    """``recipe`` with another ``data.seq_len`` or ``parallel.sequence_parallel`` (the rest shared, not copied)."""
    data = replace(recipe.data, seq_len=seq_len) if seq_len is not None else recipe.data
    sp = sequence_parallel
    return replace(
        recipe, data=data, parallel=recipe.parallel if sp is None else replace(recipe.parallel, sequence_parallel=sp)
    )


def sequence_parallel_choices(recipe: Recipe, config: Any, world_size: int) -> list[int]:
    """The sequence-parallel sizes a run of ``recipe`` can take, smallest first: divisors of the world size that
    divide the attention heads, the key/value heads and ``data.seq_len`` (each rank of a group takes 1/N of the
    heads inside attention and 1/N of the tokens outside it) and leave a batch layout that divides."""
    s = model_shape(config)
    out = []
    for n in range(1, world_size + 1 if recipe.model.attn_implementation == "sdpa" else 2):  # splits sdpa only
        if world_size % n or s["heads"] % n or s["kv_heads"] % n or recipe.data.seq_len % n:
            continue
        try:
            with_layout(recipe, sequence_parallel=n).batch_layout(world_size)
        except ConfigError:
            continue
        out.append(n)
    return out


def smallest_sequence_parallel(
    recipe: Recipe, config: Any, world_size: int, gpu_bytes: float, headroom: float = HEADROOM
) -> int | None:
    """The smallest ``parallel.sequence_parallel`` whose estimate fits ``headroom`` of the GPU, the rest of the
    recipe as it is; None when none of :func:`sequence_parallel_choices` does."""
    for n in sequence_parallel_choices(recipe, config, world_size):
        if _fits(with_layout(recipe, sequence_parallel=n), config, world_size, headroom * gpu_bytes):
            return n
    return None


SEQ_STEP = 1024
"""``data.seq_len`` is searched in multiples of this (and of the sequence-parallel size)."""
SEQ_CEILING = 1 << 24
"""The longest ``data.seq_len`` searched: 16M tokens."""


def largest_seq_len(
    recipe: Recipe, config: Any, world_size: int, gpu_bytes: float, headroom: float = HEADROOM
) -> tuple[int | None, int | None]:
    """The longest ``data.seq_len`` whose estimate fits ``headroom`` of the GPU with the recipe's micro-batch and
    sequence parallelism: the largest power of two times 1024, and the largest multiple of 1024 (and of N), each
    None when not even the smallest fits. The estimate grows with seq_len, so a bisection finds the bound."""
    n = max(1, recipe.parallel.sequence_parallel)
    step = SEQ_STEP * n // math.gcd(SEQ_STEP, n)

    def fits(seq_len: int) -> bool:
        return _fits(with_layout(recipe, seq_len=seq_len), config, world_size, headroom * gpu_bytes)

    lo, hi = 0, 1  # in steps: lo fits (or is 0), hi does not
    while hi * step <= SEQ_CEILING and fits(hi * step):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    exact = lo * step
    power = SEQ_STEP << max(0, (exact // SEQ_STEP).bit_length() - 1)  # the largest 1024 x 2^k up to exact
    while power >= SEQ_STEP and (power > exact or power % n):
        power //= 2
    return (power if power >= SEQ_STEP else None), (exact or None)


def describe_longest_seq_len(recipe: Recipe, config: Any, world_size: int, gpu_bytes: float) -> str:
    """:func:`largest_seq_len` in words, with the model's positions when they end before it (``cpt plan``)."""
    from .model import position_limit

    power, exact = largest_seq_len(recipe, config, world_size, gpu_bytes)
    n = recipe.parallel.sequence_parallel
    setting = f"micro batch {recipe.train.micro_batch_size}, sequence {n}, within {HEADROOM:.0%} of the GPU"
    if exact is None:
        return f"not even {SEQ_STEP:,} fits ({setting})"
    step = f"{SEQ_STEP:,}" + (f" and of {n}" if SEQ_STEP % n else "")
    text = f"{exact:,} as a multiple of {step}"
    if power is not None:
        text = f"{power:,} as a power of two x {SEQ_STEP:,}, {text}"
    text += f" ({setting})"
    limit = position_limit(config)
    if isinstance(limit, int) and limit < exact:
        text += (
            f"; beyond the model's {limit:,} positions: raise model.max_position_embeddings (and model.rope_scaling)"
        )
    return text


def describe_sequence_parallel(
    recipe: Recipe, config: Any, world_size: int, gpu_bytes: float
) -> tuple[int | None, str]:
    """:func:`smallest_sequence_parallel` and the words ``cpt plan`` says it in."""
    n = smallest_sequence_parallel(recipe, config, world_size, gpu_bytes)
    if n is None:
        sizes = ", ".join(map(str, sequence_parallel_choices(recipe, config, world_size)))
        return None, f"none fits (tried {sizes}: the sizes that divide the world, the heads and seq_len)"
    bf16 = recipe.train.precision != "fp32"
    fit = estimate(with_layout(recipe, sequence_parallel=n), config, world_size, bf16=bf16).total
    return n, (
        f"{n} fits: parallel.sequence_parallel={n} (data-parallel {world_size // n} x sequence {n}, "
        f"{fit / GIB:.1f} GiB)"
    )


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
