"""The recipe schema: typed dataclasses with a docstring under each field, the one source of truth for recipe keys.

A recipe is YAML whose sections are the fields of :class:`Recipe`; ``launcher.config.load`` turns files and
overrides into one merged tree, ``launcher.config.validate`` turns the tree into these objects and reports every
problem at once, each under its dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from ..files import is_hub_id, strip_data_extension

PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent
DS_CONFIG_DIR = PACKAGE_ROOT / "ds_configs"
RECIPE_DIR = PACKAGE_ROOT / "recipes"
ENGINE_CONFIG_FILES = {".json": ("deepspeed", " DeepSpeed"), ".yaml": ("fsdp", "n FSDP"), ".yml": ("fsdp", "n FSDP")}
"""An engine config file's suffix -> the ``parallel`` section it fills (the engine it is for) and its name."""

PREEMPT_SIGNALS = {"SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGCONT"}


class ConfigError(Exception):
    """Every problem found in a recipe, each naming its dotted key (or file)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid recipe:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class SourceConfig:
    path: str = ""
    """A local file, directory or glob (jsonl, json, parquet, txt; .gz/.zst), a Hugging Face hub dataset
    id, or an fsspec URL (s3://, gs://, https://)."""
    name: str | None = None
    """Dataset configuration name, for hub datasets that have several."""
    split: str = "train"
    """Split to read."""
    text_field: str = "text"
    """Column holding the document text (ignored for .txt files, where each line is a document)."""
    weight: float | dict[int, float] = 1.0
    """Relative share of the training tokens when several training sources are mixed. Each reader takes its next
    document from the source furthest below its share so far, so the proportions in tokens follow the weights
    within about one document, whatever the document lengths (logged as ``data/mix/<label>``).

    A schedule over the optimizer steps instead of a number: ``{step: weight, ...}``, e.g. ``{0: 0.5, 2000: 0.1}``
    on the general data (replay falling from 0.5 to 0.1) and ``{0: 0.5, 2000: 0.9}`` on the domain data. Between two
    given steps the weight is linear; before the first it is the first value, after the last the last. Steps are
    whole numbers >= 0 in increasing order, counted from 0 (step ``s`` is the update logged as step ``s + 1``);
    weights are >= 0 (a source may rest at 0), and at every step some training source's weight is above 0. A number
    next to schedules is a constant weight. At each step the weights are normalised over the sources; each reader
    keeps a target per source that grows, with every document drawn, by the document's tokens times the source's
    normalised weight at the step of the batch being filled, and draws next from the source furthest below its
    target: the tokens drawn over any stretch of steps follow the mean weights over it, within about one document
    per reader. On the command line: ``data.train.0.weight='{0: 0.5, 2000: 0.1}'`` (a space after each colon).
    Under ``data.stopping: token_budget`` (budgets split by weight, fixed for a pass) the weights must be numbers.
    Eval sets ignore the weight.

    With a schedule the log also shows, at each logged step, ``data/weight/<label>``: each source's weight at that
    step, normalised over the sources; and ``data/mix_recent/<label>``: each source's share of the tokens consumed
    since the previous logged step, next to the cumulative ``data/mix/<label>``. Without one, neither is logged."""
    token_budget: int | None = None
    """Tokens this source supplies per pass, over all ranks, under ``data.stopping: token_budget``. Set it on
    every training source, or set ``data.token_budget`` instead to split one total by the weights."""
    label: str | None = None
    """Name of this source in the logged mixture proportions (``data/mix/<label>``) and of the eval set of its
    held-out documents. Defaults to the file, directory or dataset name (see :func:`source_labels`)."""
    holdout_documents: int = 0
    """Documents of this training source reserved for evaluation (0: none): its first N documents in their
    natural order -- local files sorted by path, records in file order; a hub dataset's files in its own order
    -- so the same documents whatever the world size, DataLoader workers, seed or shuffling. Training never
    reads them; they are evaluated as one more eval set, named after the source's ``label``, at the same steps
    and with the same ``eval.max_blocks`` as ``eval.sets``. An eval set naming a training source without this
    measures how well the model fits its own training data, not how it generalises."""


def source_kind(path: str) -> str:
    """``url`` for fsspec URLs, ``hub`` for ``org/name`` ids (:func:`launcher.files.is_hub_id`: a mistyped local
    directory is reported as missing rather than looked up on the hub), ``local`` for everything else. Only hub
    datasets have configurations (``name``) and splits (``split``)."""
    if "://" in path:
        return "url"
    return "hub" if is_hub_id(path) else "local"


def has_glob(path: str) -> bool:
    return any(c in "*?[" for c in path)


def source_labels(sources: list[SourceConfig]) -> list[str]:
    """Names of the sources in the logged metrics (and of their held-out eval sets): ``label``, else the file,
    directory or dataset name (without data extensions or glob patterns); names that would repeat get their
    source index appended."""
    names = []
    for s in sources:
        if s.label:
            names.append(s.label)
            continue
        parts = [p for p in PurePosixPath(s.path.split("://", 1)[-1]).parts if p not in ("/", ".", "..")]
        while len(parts) > 1 and has_glob(parts[-1]):
            parts.pop()
        name = strip_data_extension(parts[-1] if parts else s.path)
        if s.name:
            name = f"{name}-{s.name}"
        names.append(name or str(len(names)))
    return [n if s.label or names.count(n) == 1 else f"{n}-{i}" for i, (s, n) in enumerate(zip(sources, names))]


@dataclass
class ModelConfig:
    name_or_path: str | None = None
    """Base model: a local Hugging Face model directory or a hub id. Leave empty to train from scratch
    from ``from_config``. Used only when output_dir holds no checkpoint to resume from."""
    from_config: str | None = None
    """For training from scratch: a config.json, or a directory holding one (random initialisation)."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; defaults to ``name_or_path`` (or the ``from_config`` directory)."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa, flash_attention_2, eager."""
    attention_backend: Literal["auto", "cudnn", "flash", "efficient"] = "auto"
    """With ``attn_implementation: sdpa`` on a GPU: the kernel torch's scaled_dot_product_attention tries first
    (the others stay as fallbacks for shapes it cannot take). ``auto`` keeps torch's own order (FlashAttention-2
    first); ``cudnn`` is cuDNN's fused attention, faster on Hopper GPUs (H100, H200)."""
    activation_checkpointing: bool = False
    """Recompute decoder layers' activations in the backward pass to save memory."""
    checkpoint_every: int = 1
    """With ``activation_checkpointing``: recompute only every k-th decoder layer (1: every layer; 2: half
    of them ...). Selective checkpointing keeps the rest of the activations, trading memory for speed."""
    trust_remote_code: bool = False
    """Allow model/tokenizer code from the model repository to run. Off unless you need it."""
    init_from: str | None = None
    """Start a new run from the weights of another run: one of its checkpoints (``<output_dir>/checkpoints/step-N``,
    saved on any world size) or a Hugging Face model directory such as its ``final/``, in place of the weights of
    ``name_or_path`` (or the random start of ``from_config``), which still say what the model is: the weights must
    be of that architecture. The schedule starts afresh (step 0; ``train.warmup_steps`` re-warms): the annealing
    branch of a WSD run, or the next stage of a curriculum, in one recipe that extends the first. A checkpoint must
    come from this recipe's ``parallel.engine``; to start from another engine's, export it (``cpt export CKPT DIR``)
    and init from ``DIR``. A checkpoint in this run's own ``output_dir`` still takes precedence: a restarted branch
    resumes itself, and ``init_from`` is then not read."""
    init_optimizer: bool = False
    """With ``init_from`` a checkpoint of the same engine: also take its optimizer state (Adam's moments and step
    count), so the branch continues the update of the run it came from. The learning rate, betas, epsilon and
    weight decay are this recipe's; its parameter groups (``train.weight_decay_exclude``, ``train.trainable``) must
    be those of the run it came from."""
    init_data: bool = False
    """With ``init_from`` a checkpoint: continue its data stream where that run stood, and its random state (its
    sources, seq_len, seed and data layout must be this recipe's; on another world size the position is re-divided
    among the ranks), rather than reading the data from the start. The step count and tokens seen still start at
    0. A branch with ``init_optimizer`` and ``init_data`` trains step for step as the run it came from would have."""
    add_tokens: list[str] = field(default_factory=list)
    """Tokens to add to the tokenizer as whole tokens (each becomes one id). The embedding matrices grow to the new
    vocabulary, padded to a multiple of 64; each new row (input and output embeddings) starts as the mean of the
    rows of the pieces the base tokenizer splits the token into (the mean of all rows for a token it cannot
    split). ``model.tokenizer`` may name a tokenizer that extends the base one instead, or as well."""
    rope_theta: float | None = None
    """The base of the rotary position embedding's frequencies (Llama 3: 500000); null keeps the model's own.
    Written into the model config the run builds, its checkpoints' and ``final/``'s config.json."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling for a longer context, the Hugging Face ``rope_scaling`` dict (transformers 5 keeps it, with
    ``rope_theta``, as the config's ``rope_parameters``); it replaces any scaling the model had, null keeps the
    model's own. ``rope_type`` and its keys: ``llama3`` (``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``), ``yarn`` (``factor``, ``original_max_position_embeddings``; optional
    ``beta_fast``, ``beta_slow``, ``attention_factor``, ``mscale``, ``mscale_all_dim``, ``truncate``), ``linear``
    (``factor``), ``dynamic`` (``factor``; frequencies rescaled on the fly for sequences longer than
    ``max_position_embeddings``, up to ``factor`` times it). ``factor`` > 1. Only for models with one RoPE for
    all layers."""
    max_position_embeddings: int | None = None
    """The positions the model takes, raised with ``rope_scaling`` for a longer ``data.seq_len`` (which may not
    exceed it); null keeps the model's own."""


@dataclass
class SeqLenStage:
    """One stage of ``data.seq_len_stages``."""

    seq_len: int | None = None
    """Tokens per packed training block during this stage: a divisor of ``data.seq_len`` (and a multiple of
    ``parallel.sequence_parallel``)."""
    until_step: int | None = None
    """The last optimizer step of this stage, counted from 1 as the log counts them; the next stage begins with step
    ``until_step + 1``. Required on every stage but the last, which runs to the end of training and has none."""


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    """Training sources, streamed; each rank reads only its own part, and none the documents a source holds out
    for evaluation (``holdout_documents``)."""
    seq_len: int = 2048
    """Tokens per packed block. With ``seq_len_stages``, the longest stage's seq_len, at which
    ``train.micro_batch_size`` and ``train.global_batch_size`` are counted; evaluation always uses it."""
    seq_len_stages: list[SeqLenStage] = field(default_factory=list)
    """Training at growing sequence lengths, as in long-context continued pretraining: e.g. ``[{seq_len: 8192,
    until_step: 1000}, {seq_len: 32768}]`` with ``seq_len: 32768``; empty: every step at ``seq_len``. The tokens per
    optimizer step stay the same: ``train.micro_batch_size`` and ``train.global_batch_size`` are counted at
    ``seq_len``, which must be the longest stage's, and a stage at ``s`` tokens takes ``micro_batch_size x seq_len /
    s`` blocks per micro-batch (so ``s`` divides ``seq_len``) with the same gradient accumulation. A stage runs up to
    and including its ``until_step`` (optimizer steps counted from 1, as logged; the last stage has none); from its
    first step the stream is cut into blocks of its length (the documents and their order do not depend on the
    stages, only where blocks end; ``document_masking`` positions restart at each block). A resume anywhere gives
    the blocks an uninterrupted run would have had. The log says when a stage begins; ``metrics.jsonl`` and W&B show
    ``data/seq_len_stage`` (from 0) and ``data/seq_len`` at each logged step, and MFU counts attention at the stage's
    length. Evaluation keeps using ``seq_len``."""
    num_workers: int = 1
    """DataLoader worker processes per rank for reading, tokenizing and packing (0 = in the trainer)."""
    prefetch_factor: int = 4
    """Batches each DataLoader worker prepares ahead."""
    shuffle_buffer: int = 0
    """Shuffling, in documents (0 = read in order). When set, the order of the files (or Parquet row groups) is
    shuffled anew in every pass over a source, and each file is read in windows of this many documents whose
    order is shuffled. A window is held in memory (untokenized) per source and DataLoader worker; a resume
    re-reads at most one file per source."""
    stopping: Literal["all_exhausted", "first_exhausted", "token_budget"] = "all_exhausted"
    """When a pass over a mixture of sources ends. The stream never ends: after a pass the next one starts, and
    ``train.max_steps`` decides how much is trained. ``all_exhausted``: every source is read to its end at least
    once per pass; a source that runs out before the others starts over (reshuffled), so the proportions follow
    the weights throughout and smaller sources are repeated. ``first_exhausted``: the pass ends when the first
    source runs out and the next pass starts every source from its beginning (reshuffled): nothing repeats
    within a pass, and the rest of the larger sources is not read in it. ``token_budget``: each source supplies
    its token budget per pass (``token_budget`` on each source, or ``data.token_budget`` split by weight); a
    source that runs out starts over, one that reaches its budget rests until the pass ends, and every source
    continues where it stopped in the next pass, so a large source gives new documents in every pass. With one
    source the three agree. Each rank and DataLoader worker applies the rule to its own share of the data."""
    token_budget: int | None = None
    """Under ``stopping: token_budget``: tokens per pass over all sources and ranks, split among the sources by
    their weights. Leave empty when every source sets its own ``token_budget``."""
    document_masking: bool = False
    """Keep attention inside each document of a packed block: the blocks carry ``position_ids`` that restart
    at 0 after every EOS, which transformers turns into per-document attention (varlen kernels under
    flash_attention_2, a block-diagonal causal mask under sdpa and eager) and per-document rotary positions.
    Off: every token attends to all earlier tokens of its block, across document boundaries. The masks built
    for sdpa and eager take memory and time that grow with seq_len squared, where sdpa without masking runs its
    causal kernel; flash_attention_2 is the fast choice. Evaluation scores its blocks without masking."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps to run. 0 evaluates the model and exits."""
    max_tokens: int | None = None
    """Length of the run in training tokens ("10B tokens of domain data"), instead of ``max_steps``: the steps are
    derived from it and the tokens per step (global batch x seq_len), rounding up, and logged."""
    micro_batch_size: int = 1
    """Sequences per GPU (or CPU process) per forward pass."""
    global_batch_size: int | None = None
    """Sequences per optimizer step across all ranks; gradient accumulation is derived from it and the
    world size. Empty: micro_batch_size x world size (no accumulation)."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine and linear schedules)."""
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """Learning rate after warmup: ``cosine`` and ``linear`` decay to ``min_lr_ratio`` over the whole run;
    ``constant`` stays at ``lr``; ``wsd`` (warmup-stable-decay) stays at ``lr`` and decays to ``min_lr_ratio`` over
    the last ``decay_steps`` (or ``decay_fraction``) steps, in the shape ``decay_shape``. A WSD run's stable phase
    can be branched at any checkpoint and annealed (``model.init_from``)."""
    decay_steps: int | None = None
    """``schedule: wsd``: steps of the final decay."""
    decay_fraction: float | None = None
    """``schedule: wsd``: the final decay as a fraction of ``max_steps`` (rounded to whole steps), instead of
    ``decay_steps``."""
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "linear"
    """``schedule: wsd``: shape of the decay from ``lr`` to ``lr x min_lr_ratio``, with p the fraction of the decay
    done: ``linear`` 1 - p, ``cosine`` (1 + cos(pi p)) / 2, ``1-sqrt`` 1 - sqrt(p)."""
    warmup_steps: int = 0
    """Linear warmup from 0 to ``lr`` over this many steps (after ``model.init_from``: re-warms the loaded model)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    weight_decay_exclude: list[str] = field(default_factory=lambda: ["bias", "norm"])
    """Parameters that are not decayed: regular expressions searched in each parameter's name (as the model's
    ``named_parameters`` gives it, e.g. ``model.layers.0.input_layernorm.weight``). The default leaves biases and
    normalisation weights alone, as HF Trainer does; add ``embed`` to spare the embeddings too (as OLMo does);
    ``[]`` decays everything."""
    trainable: Literal["all", "embeddings"] = "all"
    """What is trained: ``all`` the parameters, or only the input and output ``embeddings`` (every other weight
    stays bit for bit as loaded), the usual first stage after a vocabulary extension."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Training precision: bf16 on GPU and fp32 on CPU when ``auto``."""
    seed: int = 42
    """Seed for initialisation, data order and dropout."""
    log_every: int = 1
    """Write train metrics every this many steps."""
    save_every: int = 0
    """Save a checkpoint every this many steps (0: only at the end)."""
    async_save: Literal["auto", True, False] = "auto"
    """Write the ``save_every`` checkpoints in the background (FSDP2 only; true with DeepSpeed is refused): each
    rank copies its shards into a host copy kept for the run (12 bytes per trained parameter over the ranks) that a
    thread writes; only the next optimizer step waits for the copy. ``step-N`` is committed once every rank has
    written; the next save, a preemption and the end wait for it. 3B, 1x H100: 0.72 s lost per save against 45.8 s.
    ``auto``: on for FSDP2 on GPUs without CPU offload. ``checkpoint_stall_s`` (metrics, log): each save's stall."""
    keep_last: int = 2
    """Checkpoints kept in output_dir/checkpoints; older ones are removed after a newer one is saved."""
    nonfinite: Literal["skip", "stop"] = "skip"
    """A step whose loss or gradient is not finite on any rank (the global gradient norm tells every rank the
    same): ``skip`` drops its update (the optimizer state and the learning-rate schedule stay as they were) and
    goes on; ``stop`` ends the run at once with a non-zero exit, keeping the last checkpoint."""
    max_skipped_steps: int = 3
    """With ``nonfinite: skip``: stop when more than this many steps in a row are skipped."""
    save_final: bool = True
    """Save a checkpoint at the end of training (off for throughput runs never resumed)."""
    export_final: bool = True
    """Write a consolidated Hugging Face model to output_dir/final at the end."""
    compile: bool = False
    """Compile each decoder layer's forward with torch.compile (the sharding hooks stay outside), and the fused
    loss's element-wise part. Faster on GPU once warm; the first steps take longer while kernels are generated."""
    compile_tuning: Literal["auto", True, False] = "auto"
    """With ``compile``: tune each generated kernel's block sizes (the first step: +100 s, 3B rowwise on an H200).
    ``auto``: with ``float8: rowwise`` only, as measured (3B: 1.11x bf16 against 1.08x; bf16 gained nothing)."""
    float8: Literal["off", "rowwise", "tensorwise"] = "off"
    """Run the matrix products of the decoder's linear layers in float8 (torchao's float8 training, on GPUs of
    compute capability 8.9 or more: L4, L40S, H100, H200 and later): ``tensorwise`` scales each tensor by one
    number (the faster; under FSDP2 the weights are also gathered in float8), ``rowwise`` each row by its own (more
    accurate for outliers, slower casts). Weights, gradients, optimizer states, checkpoints and the exported model
    stay in the model's dtype; the output projection and the embeddings stay in bf16. Best with ``compile: true``,
    which fuses the casts. Refused on CPU and older GPUs."""
    float8_skip_small: bool = False
    """With ``float8``: layers too small for a gain by torchao's H100 thresholds stay bf16 (3B: k/v); off: 1.085x
    bf16 against 1.080x (3B rowwise, H200) for 7.9 GiB more activations."""
    fused_loss: bool = True
    """Compute the output projection and the cross-entropy together, a chunk of tokens at a time, with the
    gradients worked out in the same pass: neither bf16 nor fp32 logits of the whole micro-batch are ever held
    in memory. Falls back to the model's own logits for models that scale or cap them after the projection."""
    gc_every: int = 50
    """Python's full garbage collection every this many steps, at the same step on every rank, and never on its
    own while training: it walks every object (a compiled 1.1B: 0.83 million, 0.40 s) and one rank's stall holds
    up the others at the next collective; the objects alive after the first step are left out of it (12 ms).
    Logged as ``gc_ms``. 0: Python's own schedule."""
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that make every rank finish its step, save a checkpoint and exit with code 75 (requeue me)."""
    profile_steps: list[int] = field(default_factory=list)
    """``[first, last]``: record a torch.profiler trace of these optimizer steps (counted from 1, inclusive) on
    every rank, into output_dir/profile/ with a summary of the GPU's busy time and top operators. Skip the first
    steps, which include torch.compile. Empty: off."""

    def wsd_decay_steps(self) -> int:
        """Steps of a WSD schedule's final decay: ``decay_steps``, or ``decay_fraction`` of ``max_steps`` (at least
        one)."""
        if self.decay_steps is not None:
            return self.decay_steps
        return max(1, round((self.decay_fraction or 0.0) * self.max_steps))


@dataclass
class EvalConfig:
    sets: dict[str, SourceConfig] = field(default_factory=dict)
    """Named eval sets; each is read fully, split across ranks, and reported as loss and perplexity. Setting a
    name to null removes a set defined by an extended recipe. The documents a training source holds out
    (``data.train[i].holdout_documents``) are one more set, named after the source's label; a set here that names
    a training source reads documents it trains on, and a warning says so."""
    every: int = 0
    """Evaluate every this many steps (0: only at the end)."""
    at_start: bool = False
    """Also evaluate before the first step, to show the base model's perplexity."""
    micro_batch_size: int | None = None
    """Sequences per forward pass in evaluation; defaults to train.micro_batch_size."""
    max_blocks: int | None = None
    """Cap on seq_len blocks read per eval set (empty: the whole set)."""


@dataclass
class FsdpConfig:
    reshard_after_forward: bool = True
    """Free each layer's gathered parameters after its forward (ZeRO-3 like); False keeps them until
    backward (ZeRO-2 like: more memory, less communication)."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer states in CPU memory."""
    replicate_degree: int = 1
    """Hybrid sharding: replicate across this many groups and shard within each (1 = full sharding)."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of gradient reduce-scatter under bf16 training."""
    prefetch_layers: int = 1
    """Decoder layers whose parameters are all-gathered ahead of the one computing, in forward and backward
    (0: FSDP2's own implicit prefetching)."""
    reduce_every_micro_batch: bool = True
    """With gradient accumulation: reduce-scatter the gradients after every micro-batch's backward, so each rank
    keeps only its shard of them between micro-batches (one reduce-scatter per micro-batch, overlapped with the
    backward). False reduces once per optimizer step and keeps unsharded gradients of the whole model on every rank
    until then: less communication, gradient memory of the whole model (``cpt plan`` shows both)."""


@dataclass
class ParallelConfig:
    engine: Literal["deepspeed", "fsdp"] = "deepspeed"
    """Sharding engine."""
    config: str = "zero3.json"
    """Engine config: a file name in ds_configs/ or a path. DeepSpeed JSON or FSDP YAML."""
    nproc_per_node: int | None = None
    """Worker processes ``cpt run`` starts on one machine: one per GPU when empty, else this many
    (CPU processes with gloo when there is no GPU)."""
    sequence_parallel: int = 1
    """Ranks that share each sequence (Ulysses): each holds 1/N of every sequence's tokens and attention exchanges
    heads by all-to-all. The data-parallel size is world / N; ``train.global_batch_size`` still counts sequences."""
    timeout_minutes: float = 30.0
    """Collective-communication timeout; a dead peer ends the job after this long."""
    zero3_layer_gather: bool = True
    """DeepSpeed ZeRO-3: gather each decoder layer's parameters at once, from one hook on the layer (as FSDP2
    does), instead of one hook and one all-gather per submodule (DeepSpeed's default)."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """The DeepSpeed config, loaded from ``config``; ``"auto"`` values are filled from the recipe."""
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    """FSDP2 settings, loaded from ``config`` when engine is fsdp."""


@dataclass
class LoggingConfig:
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    """Weights & Biases: ``auto`` is online when credentials exist, offline (files under output_dir) when
    they do not."""
    project: str = "cpt"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user)."""
    run_name: str | None = None
    """W&B run name; defaults to the output_dir name."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    progress: bool = True
    """Progress bar on rank 0."""
    tensorboard: bool = False
    """Also write TensorBoard event files (rank 0) under output_dir/tensorboard."""


@dataclass
class Recipe:
    output_dir: str = "runs/default"
    """Where every output goes: metrics, eval results, checkpoints, final model."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def eval_sources(self) -> dict[str, SourceConfig]:
        """Every eval set by name: the held-out documents of each training source that has some (named by its
        label; evaluating such a source reads only those, see ``holdout_documents``), then ``eval.sets``."""
        held = {name: s for name, s in zip(source_labels(self.data.train), self.data.train) if s.holdout_documents > 0}
        return {**held, **self.eval.sets}

    def batch_layout(self, world_size: int) -> BatchLayout:
        """Gradient accumulation and global batch for ``world_size`` ranks, ``parallel.sequence_parallel`` of
        which share each sequence (so world / N data-parallel ranks)."""
        sp = self.parallel.sequence_parallel
        if sp < 1 or world_size % sp:
            problem = f"parallel.sequence_parallel: {sp} does not divide the world size {world_size}"
            raise ConfigError([f"{problem} (ranks are grouped {sp} to a sequence)"])
        data_parallel = world_size // sp
        micro = self.train.micro_batch_size
        global_batch = self.train.global_batch_size or micro * data_parallel
        accum, rest = divmod(global_batch, micro * data_parallel)
        if rest or accum == 0:
            ranks = (
                f"data-parallel size ({data_parallel} = world {world_size} / sequence_parallel {sp})"
                if sp > 1
                else f"world size ({world_size})"
            )
            raise ConfigError(
                [
                    f"train.global_batch_size: {global_batch} is not a multiple of train.micro_batch_size "
                    f"({micro}) x {ranks} = {micro * data_parallel}"
                ]
            )
        return BatchLayout(world_size, micro, accum, global_batch, global_batch * self.data.seq_len, sp)


@dataclass(frozen=True)
class BatchLayout:
    world_size: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    tokens_per_step: int
    sequence_parallel: int = 1

    @property
    def data_parallel(self) -> int:
        """Ranks that read different sequences: world / sequence_parallel."""
        return self.world_size // self.sequence_parallel

    def data_rank(self, rank: int) -> int:
        """The data-parallel rank of ``rank`` (a sequence-parallel group: contiguous ranks, the same sequences)."""
        return rank // self.sequence_parallel
