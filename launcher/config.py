"""The recipe schema and how a recipe becomes one validated object.

Merge order, later wins:

    schema defaults <- recipe (and the recipes it ``extends``) <- engine config (``parallel.config``)
    <- ``a.b=v`` overrides from the command line

OmegaConf does the merging of YAML and dotlist overrides. Validation is our own walk over the merged tree
against the dataclasses below, so that every problem is reported at once, each with its dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DS_CONFIG_DIR = PACKAGE_ROOT / "ds_configs"
RECIPE_DIR = PACKAGE_ROOT / "recipes"


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
    weight: float = 1.0
    """Relative share of the training tokens when several training sources are mixed. Each reader takes its next
    document from the source furthest below its share so far, so the proportions in tokens follow the weights
    within about one document, whatever the document lengths (logged as ``data/mix/<label>``)."""
    token_budget: int | None = None
    """Tokens this source supplies per pass, over all ranks, under ``data.stopping: token_budget``. Set it on
    every training source, or set ``data.token_budget`` instead to split one total by the weights."""
    label: str | None = None
    """Name of this source in the logged mixture proportions (``data/mix/<label>``). Defaults to the file,
    directory or dataset name."""


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
    activation_checkpointing: bool = False
    """Recompute decoder layers' activations in the backward pass to save memory."""
    checkpoint_every: int = 1
    """With ``activation_checkpointing``: recompute only every k-th decoder layer (1: every layer; 2: half
    of them ...). Selective checkpointing keeps the rest of the activations, trading memory for speed."""
    trust_remote_code: bool = False
    """Allow model/tokenizer code from the model repository to run. Off unless you need it."""


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    """Training sources, streamed; each rank reads only its own part."""
    seq_len: int = 2048
    """Tokens per packed block."""
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
    micro_batch_size: int = 1
    """Sequences per GPU (or CPU process) per forward pass."""
    global_batch_size: int | None = None
    """Sequences per optimizer step across all ranks; gradient accumulation is derived from it and the
    world size. Empty: micro_batch_size x world size (no accumulation)."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine and linear schedules)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup from 0 to ``lr`` over this many steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
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
    keep_last: int = 2
    """Checkpoints kept in output_dir/checkpoints; older ones are removed after a newer one is saved."""
    nonfinite: Literal["skip", "stop"] = "skip"
    """A step whose loss or gradient is not finite on any rank (the global gradient norm tells every rank the
    same): ``skip`` drops its update (the optimizer state and the learning-rate schedule stay as they were) and
    goes on; ``stop`` ends the run at once with a non-zero exit, keeping the last checkpoint."""
    max_skipped_steps: int = 3
    """With ``nonfinite: skip``: stop when more than this many steps in a row are skipped."""
    save_final: bool = True
    """Save a checkpoint at the end of training (turn off for throughput runs that will never be resumed)."""
    export_final: bool = True
    """Write a consolidated Hugging Face model to output_dir/final at the end."""
    compile: bool = False
    """Compile each decoder layer's forward with torch.compile (the sharding hooks stay outside). Faster on GPU
    once warm; the first steps take longer while kernels are generated."""
    fused_loss: bool = True
    """Compute the output projection and the cross-entropy together, a chunk of tokens at a time, with the
    gradients worked out in the same pass: neither bf16 nor fp32 logits of the whole micro-batch are ever held
    in memory. Falls back to the model's own logits for models that scale or cap them after the projection."""
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that make every rank finish its step, save a checkpoint and exit with code 75 (requeue me)."""
    profile_steps: list[int] = field(default_factory=list)
    """``[first, last]``: record a torch.profiler trace of these optimizer steps (counted from 1, inclusive) on
    every rank, into output_dir/profile/ with a summary of the GPU's busy time and top operators. Skip the first
    steps, which include torch.compile. Empty: off."""


@dataclass
class EvalConfig:
    sets: dict[str, SourceConfig] = field(default_factory=dict)
    """Named eval sets; each is read fully, split across ranks, and reported as loss and perplexity. Setting a
    name to null removes a set defined by an extended recipe."""
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


@dataclass
class ParallelConfig:
    engine: Literal["deepspeed", "fsdp"] = "deepspeed"
    """Sharding engine."""
    config: str = "zero3.json"
    """Engine config: a file name in ds_configs/ or a path. DeepSpeed JSON or FSDP YAML."""
    nproc_per_node: int | None = None
    """Worker processes ``cpt run`` starts on one machine: one per GPU when empty, else this many
    (CPU processes with gloo when there is no GPU)."""
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

    def batch_layout(self, world_size: int) -> BatchLayout:
        """Gradient accumulation and global batch for ``world_size`` data-parallel ranks."""
        micro = self.train.micro_batch_size
        global_batch = self.train.global_batch_size or micro * world_size
        accum, rest = divmod(global_batch, micro * world_size)
        if rest or accum == 0:
            raise ConfigError(
                [
                    f"train.global_batch_size: {global_batch} is not a multiple of train.micro_batch_size "
                    f"({micro}) x world size ({world_size}) = {micro * world_size}"
                ]
            )
        return BatchLayout(world_size, micro, accum, global_batch, global_batch * self.data.seq_len)


@dataclass(frozen=True)
class BatchLayout:
    world_size: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    tokens_per_step: int


# ---------------------------------------------------------------------------------------------- loading


def _read_yaml(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        problems.append(f"{path}: cannot read ({e.strerror})")
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.append(f"{path}:{where} malformed YAML: {getattr(e, 'problem', e)}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
        return {}
    return data


def _load_recipe_tree(path: Path, problems: list[str], seen: tuple[Path, ...] = ()) -> DictConfig:
    """A recipe file with its ``extends`` chain resolved (paths relative to the extending file)."""
    path = path.resolve()
    if path in seen:
        problems.append(f"{path}: extends itself through {' -> '.join(map(str, seen))}")
        return OmegaConf.create({})
    data = _read_yaml(path, problems)
    parent = data.pop("extends", None)
    tree = _create(data, problems, str(path))
    if parent is None:
        return tree
    if not isinstance(parent, str):
        problems.append(f"{path}: extends: must be a file path, got {parent!r}")
        return tree
    parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
    if not parent_path.is_file():
        problems.append(f"{path}: extends: no such recipe {parent_path}")
        return tree
    return _merge([_load_recipe_tree(parent_path, problems, (*seen, path)), tree], problems, f"{path}: extends")


def _create(data: Any, problems: list[str], where: str) -> DictConfig:
    try:
        tree = OmegaConf.create(data)
    except Exception as e:  # OmegaConf refuses some keys and values with several error types
        problems.append(f"{where}: {e}")
        return OmegaConf.create({})
    if not isinstance(tree, DictConfig):
        problems.append(f"{where}: expected a mapping of sections")
        return OmegaConf.create({})
    return tree


def _merge(trees: list[DictConfig], problems: list[str], where: str) -> DictConfig:
    """Later trees win. A value whose shape cannot be merged (a list over a mapping, say) is a problem named
    here, not a crash."""
    try:
        merged = OmegaConf.merge(*trees)
    except Exception as e:
        problems.append(f"{where}: cannot merge: {e}".replace("\n", " "))
        return trees[0]
    assert isinstance(merged, DictConfig)
    return merged


def resolve_engine_config_path(name: str) -> Path:
    """``parallel.config`` as a path: as given if it exists, else a file in ds_configs/."""
    p = Path(name).expanduser()
    if p.is_file() or p.is_absolute():
        return p
    return DS_CONFIG_DIR / name


def _load_engine_config(tree: DictConfig, problems: list[str]) -> DictConfig:
    """The engine config file named by ``parallel.config``, as a recipe fragment to merge."""
    raw = OmegaConf.to_container(tree, resolve=False)
    parallel = raw.get("parallel") if isinstance(raw, dict) else None
    parallel = parallel if isinstance(parallel, dict) else {}
    name = parallel.get("config", ParallelConfig.config)
    engine = parallel.get("engine", ParallelConfig.engine)
    if not isinstance(name, str) or not name:
        return OmegaConf.create({})
    path = resolve_engine_config_path(name)
    if not path.is_file():
        problems.append(f"parallel.config: no such engine config {path}")
        return OmegaConf.create({})
    if path.suffix == ".json":
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            problems.append(f"{path}: line {e.lineno}, column {e.colno}: malformed JSON: {e.msg}")
            return OmegaConf.create({})
        if engine != "deepspeed":
            problems.append(f"parallel.config: {path.name} is a DeepSpeed config but parallel.engine is {engine!r}")
        return _create({"parallel": {"deepspeed": ds}}, problems, str(path))
    data = _read_yaml(path, problems)
    if engine != "fsdp" and data:
        problems.append(f"parallel.config: {path.name} is an FSDP config but parallel.engine is {engine!r}")
    return _create({"parallel": {"fsdp": data}}, problems, str(path))


def parse_overrides(overrides: list[str], problems: list[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o:
            problems.append(f"override {o!r}: expected key=value")
    try:
        return OmegaConf.from_dotlist([o for o in overrides if "=" in o])
    except Exception as e:  # OmegaConf raises several grammar errors
        problems.append(f"overrides: {e}")
        return OmegaConf.create({})


def load_recipe(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    world_size: int | Callable[[Recipe], int] | None = None,
    check_files: bool = False,
) -> Recipe:
    """Merge, validate and build the recipe. Raises ConfigError naming every problem at once.

    With ``world_size`` (a number, or a function of the recipe) the batch math is checked for that many ranks;
    with ``check_files`` the local model and data paths must exist. Both run before any process group exists."""
    problems: list[str] = []
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such recipe file"])
    tree = _load_recipe_tree(path, problems)
    cli = parse_overrides(list(overrides), problems)
    # The engine config is named by the recipe or an override, and merges between the two.
    engine_cfg = _load_engine_config(_merge([tree, cli], [], "overrides"), problems)
    merged = _merge([tree, engine_cfg, cli], problems, "overrides")
    raw = OmegaConf.to_container(merged, resolve=False)
    assert isinstance(raw, dict)
    _check_no_interpolation(raw, "", problems)
    recipe = _build(Recipe, raw, "", problems)
    _check_values(recipe, problems)
    if world_size is not None and recipe.train.micro_batch_size > 0:
        n = world_size(recipe) if callable(world_size) else world_size
        try:
            recipe.batch_layout(n)
        except ConfigError as e:
            problems += e.problems
    if check_files:
        from .data import check_sources

        problems += check_paths(recipe)
        problems += check_sources(recipe.data.train + list(recipe.eval.sets.values()))
    if problems:
        raise ConfigError(problems)
    return recipe


def _check_no_interpolation(node: Any, key: str, problems: list[str]) -> None:
    """Recipes are data: ``${...}`` interpolations and resolvers are not evaluated."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_no_interpolation(v, f"{key}.{k}" if key else str(k), problems)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_no_interpolation(v, f"{key}[{i}]", problems)
    elif isinstance(node, str) and "${" in node and key.split(".")[0] != "parallel":
        problems.append(f"{key}: interpolation {node!r} is not supported in recipes; write the value")


# ------------------------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _is_container(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) or typing.get_origin(tp) in (list, dict)


def _build(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    """Convert ``value`` to ``tp``, appending a problem (and returning a placeholder) where it does not fit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = key or "recipe"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _build(inner[0], value, key, problems)
    if origin is Literal:
        if value in args:
            return value
        problems.append(f"{where}: {value!r} is not one of {_type_name(tp)}")
        return args[0]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return tp()
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        for k in value:
            if k not in names:
                close = difflib.get_close_matches(str(k), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{key + '.' if key else ''}{k}: unknown key{hint}")
        kwargs = {}
        for n in names:
            if n in value:
                before = len(problems)
                built = _build(hints[n], value[n], f"{key + '.' if key else ''}{n}", problems)
                # A scalar that does not fit keeps its default, so the value checks can still run on the rest.
                if len(problems) == before or _is_container(hints[n]):
                    kwargs[n] = built
        return tp(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return []
        items = []
        for i, v in enumerate(value):
            before = len(problems)
            item = _build(args[0], v, f"{key}[{i}]", problems)
            if len(problems) == before or _is_container(args[0]):
                items.append(item)
        return items
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return {}
        # A null entry removes what an extended recipe defined (e.g. ``eval.sets.fineweb=null``).
        return {str(k): _build(args[1], v, f"{key}.{k}", problems) for k, v in value.items() if v is not None}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    problems.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return None


def _check_values(r: Recipe, problems: list[str]) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    need(bool(r.output_dir), "output_dir: must not be empty")
    m = r.model
    need(
        bool(m.name_or_path) != bool(m.from_config),
        "model: set exactly one of model.name_or_path (continue from weights) and model.from_config "
        "(train from scratch)",
    )
    if m.from_config and not m.tokenizer and m.from_config.endswith(".json"):
        problems.append("model.tokenizer: required when model.from_config is a config.json file")
    need(m.checkpoint_every > 0, f"model.checkpoint_every: must be positive, got {m.checkpoint_every}")
    d = r.data
    need(d.seq_len > 0, f"data.seq_len: must be positive, got {d.seq_len}")
    need(d.num_workers >= 0, f"data.num_workers: must be >= 0, got {d.num_workers}")
    need(d.prefetch_factor > 0, f"data.prefetch_factor: must be positive, got {d.prefetch_factor}")
    need(d.shuffle_buffer >= 0, f"data.shuffle_buffer: must be >= 0, got {d.shuffle_buffer}")
    t = r.train
    if t.max_steps > 0:
        need(bool(d.train), "data.train: at least one training source is needed when train.max_steps > 0")
    for i, s in enumerate(d.train):
        _check_source(s, f"data.train[{i}]", problems)
    for name, s in r.eval.sets.items():
        _check_source(s, f"eval.sets.{name}", problems, train=False)
    _check_budgets(d, problems)
    labels = [s.label for s in d.train if s.label]
    for label in sorted({x for x in labels if labels.count(x) > 1}):
        problems.append(f"data.train: label {label!r} names more than one source; labels must be unique")
    need(t.max_steps >= 0, f"train.max_steps: must be >= 0, got {t.max_steps}")
    need(t.micro_batch_size > 0, f"train.micro_batch_size: must be positive, got {t.micro_batch_size}")
    if t.global_batch_size is not None:
        need(t.global_batch_size > 0, f"train.global_batch_size: must be positive, got {t.global_batch_size}")
        need(
            t.micro_batch_size <= 0 or t.global_batch_size % t.micro_batch_size == 0,
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of train.micro_batch_size "
            f"{t.micro_batch_size}",
        )
    need(t.lr > 0 and math.isfinite(t.lr), f"train.lr: must be a positive number, got {t.lr}")
    need(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio: must be within [0, 1], got {t.min_lr_ratio}")
    need(t.warmup_steps >= 0, f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    need(t.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    need(
        len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
        f"train.betas: two numbers within [0, 1), got {t.betas}",
    )
    need(t.eps > 0, f"train.eps: must be positive, got {t.eps}")
    need(t.grad_clip >= 0, f"train.grad_clip: must be >= 0, got {t.grad_clip}")
    need(t.log_every > 0, f"train.log_every: must be positive, got {t.log_every}")
    need(t.save_every >= 0, f"train.save_every: must be >= 0, got {t.save_every}")
    need(t.max_skipped_steps > 0, f"train.max_skipped_steps: must be positive, got {t.max_skipped_steps}")
    need(t.keep_last > 0, f"train.keep_last: must be positive, got {t.keep_last}")
    if t.profile_steps:
        ps = t.profile_steps
        need(
            len(ps) == 2 and 1 <= ps[0] <= ps[1],
            f"train.profile_steps: [first, last] with 1 <= first <= last, got {ps}",
        )
        need(
            len(ps) != 2 or t.max_steps == 0 or ps[1] <= t.max_steps,
            f"train.profile_steps: step {ps[-1]} is after train.max_steps={t.max_steps}",
        )
    for i, name in enumerate(t.preempt_signals):
        need(name in PREEMPT_SIGNALS, f"train.preempt_signals[{i}]: {name!r} is not one of {sorted(PREEMPT_SIGNALS)}")
    e = r.eval
    need(e.every >= 0, f"eval.every: must be >= 0, got {e.every}")
    if e.micro_batch_size is not None:
        need(e.micro_batch_size > 0, f"eval.micro_batch_size: must be positive, got {e.micro_batch_size}")
    if e.max_blocks is not None:
        need(e.max_blocks > 0, f"eval.max_blocks: must be positive, got {e.max_blocks}")
    p = r.parallel
    if p.nproc_per_node is not None:
        need(p.nproc_per_node > 0, f"parallel.nproc_per_node: must be positive, got {p.nproc_per_node}")
    need(p.timeout_minutes > 0, f"parallel.timeout_minutes: must be positive, got {p.timeout_minutes}")
    need(
        p.fsdp.replicate_degree > 0, f"parallel.fsdp.replicate_degree: must be positive, got {p.fsdp.replicate_degree}"
    )
    need(p.fsdp.prefetch_layers >= 0, f"parallel.fsdp.prefetch_layers: must be >= 0, got {p.fsdp.prefetch_layers}")
    if p.engine == "deepspeed":
        _check_deepspeed(r, problems)


def check_paths(r: Recipe) -> list[str]:
    """Local files the recipe names that do not exist (hub ids are not contacted)."""
    problems = []
    m = r.model
    for key, value in (("model.name_or_path", m.name_or_path), ("model.from_config", m.from_config),
                       ("model.tokenizer", m.tokenizer)):  # fmt: skip
        if value and _looks_local(value) and not Path(value).exists():
            problems.append(f"{key}: no such file or directory {value}")
    source = m.name_or_path or m.from_config
    if not problems and source and _looks_local(source):
        problems += _check_model_config(r, Path(source))
    return problems


def _check_model_config(r: Recipe, source: Path) -> list[str]:
    """What the model's own config rules out: blocks longer than its positions, a missing config.json."""
    path = source if source.is_file() else source / "config.json"
    key = "model.name_or_path" if r.model.name_or_path else "model.from_config"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [f"{key}: cannot read the model config {path} ({e})"]
    cfg = cfg.get("text_config", cfg)
    limit = cfg.get("max_position_embeddings")
    if isinstance(limit, int) and r.data.seq_len > limit:
        return [f"data.seq_len: {r.data.seq_len} is longer than the model's max_position_embeddings {limit} ({path})"]
    return []


def _looks_local(name: str) -> bool:
    """Hub ids look like ``org/name``; anything else (absolute, ./, ~, several slashes) is a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or Path(name).exists()


def _check_source(s: SourceConfig, key: str, problems: list[str], *, train: bool = True) -> None:
    if not s.path:
        problems.append(f"{key}.path: must not be empty")
    if not (s.weight > 0 and math.isfinite(s.weight)):
        problems.append(f"{key}.weight: must be a positive number, got {s.weight}")
    if not s.text_field:
        problems.append(f"{key}.text_field: must not be empty")
    if s.token_budget is not None:
        if not train:
            problems.append(f"{key}.token_budget: only training sources have a token budget; remove it")
        elif s.token_budget <= 0:
            problems.append(f"{key}.token_budget: must be positive, got {s.token_budget}")
    if s.label is not None and not s.label.strip():
        problems.append(f"{key}.label: must not be empty")


def _check_budgets(d: DataConfig, problems: list[str]) -> None:
    """Token budgets are set in exactly one way, and only under ``stopping: token_budget``."""
    own = [i for i, s in enumerate(d.train) if s.token_budget is not None]
    if d.token_budget is not None and d.token_budget <= 0:
        problems.append(f"data.token_budget: must be positive, got {d.token_budget}")
    if d.stopping != "token_budget":
        if d.token_budget is not None:
            problems.append(f"data.token_budget: only used with data.stopping=token_budget (it is {d.stopping!r})")
        for i in own:
            problems.append(
                f"data.train[{i}].token_budget: only used with data.stopping=token_budget (it is {d.stopping!r})"
            )
        return
    if d.token_budget is not None and own:
        problems.append(
            "data.token_budget: set either data.token_budget (split by weight) or token_budget on every "
            f"training source, not both (data.train[{own[0]}] sets one)"
        )
    elif d.token_budget is None and d.train and len(own) < len(d.train):
        missing = ", ".join(f"data.train[{i}]" for i in range(len(d.train)) if i not in own)
        problems.append(
            f"data.stopping: token_budget needs data.token_budget, or token_budget on every source ({missing} has none)"
        )


def _check_deepspeed(r: Recipe, problems: list[str]) -> None:
    """The DeepSpeed config may leave values ``"auto"``; fixed values must agree with the recipe."""
    ds = r.parallel.deepspeed
    if not ds:
        problems.append("parallel.deepspeed: empty; parallel.config must name a DeepSpeed JSON file")
        return
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        problems.append(f"parallel.deepspeed.zero_optimization.stage: must be 0, 1, 2 or 3, got {stage!r}")
    for key in ("scheduler",):
        if key in ds:
            problems.append(
                f"parallel.deepspeed.{key}: the schedule comes from train.schedule/warmup_steps/min_lr_ratio; "
                "remove it from the DeepSpeed config"
            )
    checks: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": r.train.micro_batch_size,
        "gradient_clipping": r.train.grad_clip,
    }
    for k, want in checks.items():
        got = ds.get(k, "auto")
        if got != "auto" and got != want:
            problems.append(f'parallel.deepspeed.{k}: {got!r} contradicts the recipe\'s value {want!r}; use "auto"')
    for fp in ("fp16", "bf16"):
        sect = ds.get(fp)
        if isinstance(sect, dict) and sect.get("enabled") not in (None, "auto", False):
            want = r.train.precision
            if fp == "fp16" or want == "fp32":
                problems.append(
                    f'parallel.deepspeed.{fp}.enabled: true contradicts train.precision={want!r}; use "auto"'
                )


# --------------------------------------------------------------------------------------------- output


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, as saved in output_dir/resolved_recipe.yaml and printed by ``cpt plan``.
    Values under secret-looking keys (``api_key``, ``token``, ``password``, ...) are written as ``***``."""
    from .callbacks.base import redact_values

    return OmegaConf.to_yaml(OmegaConf.create(redact_values(to_dict(recipe))))


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)
