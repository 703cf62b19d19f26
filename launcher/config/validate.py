"""From a merged tree to a :class:`Recipe`: type conversion against the dataclasses and the value checks that
need nothing but the recipe. Every problem names its dotted key; all of them are collected, none raised here.

Checks that need more than the recipe live with what they concern: an engine's config in ``launcher.engine``,
files and the model's own config in ``launcher.preflight``. The longer checks of the ``data`` section (token
budgets, weight schedules, sequence-length stages) are in ``launcher.config.data_checks``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from fnmatch import fnmatch
from typing import Any, Literal, TypeGuard

from .data_checks import check_budgets, check_seq_len_stages, check_weights, schedule_problems
from .schema import (
    PREEMPT_SIGNALS,
    ModelConfig,
    Recipe,
    SourceConfig,
    has_glob,
    source_kind,
    source_labels,
)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is dict:
        return "{" + ": ".join(_type_name(a) for a in typing.get_args(tp)) + "}"
    return getattr(tp, "__name__", str(tp))


def _is_container(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) or typing.get_origin(tp) in (list, dict)


def _has_shape(tp: Any, value: Any) -> bool:
    """Whether ``value`` is the kind of thing ``tp`` is (a mapping, a list, or a single value), to pick among the
    alternatives of a union such as ``float | dict[int, float]``."""
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict:
        return isinstance(value, dict)
    if typing.get_origin(tp) is list:
        return isinstance(value, list)
    return not isinstance(value, (dict, list))


def _elsewhere(name: str) -> list[str]:
    """Dotted keys of the recipe whose last part is ``name``: ``train.seq_len`` is ``data.seq_len``."""
    found = []
    for section in dataclasses.fields(Recipe):
        tp = typing.get_type_hints(Recipe)[section.name]
        if dataclasses.is_dataclass(tp):
            found += [f"{section.name}.{f.name}" for f in dataclasses.fields(tp) if f.name == name]
    return found


def build(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    """Convert ``value`` to ``tp``, appending a problem (and returning a placeholder) where it does not fit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = key or "recipe"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return build(inner[0], value, key, problems)
        # A number or a schedule of numbers, say: the alternative of the value's shape.
        shaped = [a for a in inner if _has_shape(a, value)]
        if shaped:
            return build(shaped[0], value, key, problems)
        problems.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value in args:
            return value
        if value is False and "off" in args:  # YAML reads a bare ``off`` as false
            return "off"
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
                close = _elsewhere(str(k)) or difflib.get_close_matches(str(k), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{key + '.' if key else ''}{k}: unknown key{hint}")
        kwargs = {}
        for n in names:
            if n in value:
                before = len(problems)
                built = build(hints[n], value[n], f"{key + '.' if key else ''}{n}", problems)
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
            item = build(args[0], v, f"{key}[{i}]", problems)
            if len(problems) == before or _is_container(args[0]):
                items.append(item)
        return items
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return {}
        if args[0] is not str:
            return _build_keyed(args, value, key, problems)
        # A null entry removes what an extended recipe defined (e.g. ``eval.sets.fineweb=null``).
        return {str(k): build(args[1], v, f"{key}.{k}", problems) for k, v in value.items() if v is not None}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # ``1e9`` (files and overrides read it as a float alike) is a whole number written the short way.
        if isinstance(value, float) and value.is_integer():
            return int(value)
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


def _build_keyed(args: tuple[Any, Any], value: dict[Any, Any], key: str, problems: list[str]) -> dict[Any, Any]:
    """A mapping whose keys are not names (``{step: weight}``): keys and values converted, order kept."""
    out = {}
    for k, v in value.items():
        if v is None:
            # ``{0:0.5}`` without the space reads as one value, 0:0.5 (a YAML 1.1 base-60 number), with no value.
            problems.append(
                f"{key}: {k!r} has no value; write each entry as `key: value`, with a space after the colon"
            )
            continue
        before = len(problems)
        built_key = build(args[0], k, f"{key} (key {k!r})", problems)
        built = build(args[1], v, f"{key}.{k}", problems)
        if len(problems) == before:
            out[built_key] = built
    return out


def check_values(r: Recipe) -> list[str]:
    """Problems with the values of ``r`` that the recipe alone shows."""
    problems: list[str] = []

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
    if not m.init_from:
        for key, on in (("model.init_optimizer", m.init_optimizer), ("model.init_data", m.init_data)):
            need(not on, f"{key}: takes its state from the checkpoint model.init_from names; set model.init_from")
    if m.from_config and not m.tokenizer and m.from_config.endswith(".json"):
        problems.append("model.tokenizer: required when model.from_config is a config.json file")
    need(m.checkpoint_every > 0, f"model.checkpoint_every: must be positive, got {m.checkpoint_every}")
    need(m.attention_backend == "auto" or m.attn_implementation == "sdpa",
         f"model.attention_backend: {m.attention_backend} picks a kernel of torch's sdpa; model.attn_implementation "
         f"is {m.attn_implementation}")  # fmt: skip
    _check_rope(m, problems)
    _check_sequence_parallel(r, need)
    d = r.data
    need(d.seq_len > 0, f"data.seq_len: must be positive, got {d.seq_len}")
    need(d.num_workers >= 0, f"data.num_workers: must be >= 0, got {d.num_workers}")
    need(d.prefetch_factor > 0, f"data.prefetch_factor: must be positive, got {d.prefetch_factor}")
    need(d.shuffle_buffer >= 0, f"data.shuffle_buffer: must be >= 0, got {d.shuffle_buffer}")
    problems += check_seq_len_stages(r)
    t = r.train
    if t.max_steps > 0:
        need(bool(d.train), "data.train: at least one training source is needed when train.max_steps > 0")
    for i, s in enumerate(d.train):
        _check_source(s, f"data.train[{i}]", problems)
    for name, s in r.eval.sets.items():
        _check_source(s, f"eval.sets.{name}", problems, train=False)
    check_budgets(d, problems)
    check_weights(d, problems)
    labels = [s.label for s in d.train if s.label]
    for label in sorted({x for x in labels if labels.count(x) > 1}):
        problems.append(f"data.train: label {label!r} names more than one source; labels must be unique")
    for i, (label, s) in enumerate(zip(source_labels(d.train), d.train)):
        if s.holdout_documents > 0 and label in r.eval.sets:
            problems.append(
                f"eval.sets.{label}: this name is taken by the documents data.train[{i}] holds out for evaluation "
                f"(their eval set is named after the source's label); rename the eval set or set data.train[{i}].label"
            )
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
    _check_schedule(r, problems)
    for i, pattern in enumerate(t.weight_decay_exclude):
        try:
            re.compile(pattern)
        except re.error as e:
            problems.append(f"train.weight_decay_exclude[{i}]: {pattern!r} is not a regular expression ({e})")
    need(
        len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
        f"train.betas: two numbers within [0, 1), got {t.betas}",
    )
    need(t.eps > 0, f"train.eps: must be positive, got {t.eps}")
    need(t.grad_clip >= 0, f"train.grad_clip: must be >= 0, got {t.grad_clip}")
    need(t.log_every > 0, f"train.log_every: must be positive, got {t.log_every}")
    need(t.save_every >= 0, f"train.save_every: must be >= 0, got {t.save_every}")
    need(
        t.async_save is not True or r.parallel.engine != "deepspeed",
        "train.async_save: background checkpoints are FSDP2-only (parallel.engine: fsdp); DeepSpeed writes its "
        "checkpoints synchronously: set train.async_save: auto (or false)",
    )
    need(
        t.compile_tuning is not True or t.compile,
        "train.compile_tuning: true tunes the kernels torch.compile generates; set train.compile: true",
    )
    need(t.max_skipped_steps > 0, f"train.max_skipped_steps: must be positive, got {t.max_skipped_steps}")
    need(t.gc_every >= 0, f"train.gc_every: steps between garbage collections, 0 or more, got {t.gc_every}")
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
    return problems


ROPE_SCALING: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "llama3": (
        {"factor": "factor", "low_freq_factor": "positive", "high_freq_factor": "positive",
         "original_max_position_embeddings": "positions"},
        {},
    ),
    "yarn": (
        {"factor": "factor", "original_max_position_embeddings": "positions"},
        {"beta_fast": "positive", "beta_slow": "positive", "attention_factor": "positive", "mscale": "positive",
         "mscale_all_dim": "positive", "truncate": "bool"},
    ),
    "linear": ({"factor": "factor"}, {}),
    "dynamic": ({"factor": "factor"}, {}),
}  # fmt: skip
"""``model.rope_scaling``'s ``rope_type`` -> (required keys, optional keys), each key -> the kind of its value."""

_ROPE_VALUES = {
    "factor": ("a number > 1", lambda v: v > 1),
    "positive": ("a number > 0", lambda v: v > 0),
    "positions": ("a whole number > 0", lambda v: isinstance(v, int) and v > 0),
}


def _is_number(v: Any) -> TypeGuard[float]:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v))


def _check_sequence_parallel(r: Recipe, need) -> None:
    """``parallel.sequence_parallel``: what the recipe alone rules out (heads, KV heads and the world size are
    checked where they are known: the model's config before launch, the batch layout for a world size)."""
    n = r.parallel.sequence_parallel
    if n < 1:
        need(False, f"parallel.sequence_parallel: must be >= 1, got {n}")
        return
    if n == 1:
        return
    key = f"parallel.sequence_parallel: {n}"
    need(r.model.attn_implementation == "sdpa",
         f"{key} needs model.attn_implementation: sdpa (each rank attends over the whole sequence with torch's sdpa "
         f"after the exchange); got {r.model.attn_implementation}")  # fmt: skip
    need(r.data.seq_len % n == 0, f"{key} must divide data.seq_len ({r.data.seq_len}): each rank holds seq_len / N "
                                  "tokens of every sequence")  # fmt: skip


def _check_rope(m: ModelConfig, problems: list[str]) -> None:
    """``model.rope_theta``, ``model.max_position_embeddings`` and ``model.rope_scaling``: the scaling's type, its
    required keys, and each value's type and range, every problem naming its key."""
    if m.rope_theta is not None and not (_is_number(m.rope_theta) and m.rope_theta > 0):
        problems.append(f"model.rope_theta: must be a number > 0, got {m.rope_theta}")
    if m.max_position_embeddings is not None and m.max_position_embeddings <= 0:
        problems.append(f"model.max_position_embeddings: must be positive, got {m.max_position_embeddings}")
    scaling = m.rope_scaling
    if scaling is None:
        return
    key = "model.rope_scaling"
    rope_type = scaling.get("rope_type")
    if not isinstance(rope_type, str) or rope_type not in ROPE_SCALING:
        if "rope_type" in scaling:
            got = repr(rope_type)
        else:
            got = "none" + (" (write rope_type: type is its old name)" if "type" in scaling else "")
        problems.append(f"{key}.rope_type: must be one of {', '.join(ROPE_SCALING)}, got {got}")
        return
    required, optional = ROPE_SCALING[rope_type]
    known = {"rope_type", *required, *optional}
    for name in scaling:
        if name in known:
            continue
        if name == "rope_theta":
            hint = " (set model.rope_theta)"
        else:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{key}.{name}: not a key of rope_type {rope_type}{hint}; its keys: {', '.join(sorted(known))}")
    for name in required:
        if name not in scaling:
            problems.append(f"{key}.{name}: required for rope_type {rope_type}")
    for name, kind in {**required, **optional}.items():
        if name not in scaling:
            continue
        v = scaling[name]
        if kind == "bool":
            ok, want = isinstance(v, bool), "true or false"
        else:
            want, fits = _ROPE_VALUES[kind]
            ok = _is_number(v) and fits(v)
        if not ok:
            problems.append(f"{key}.{name}: must be {want}, got {v!r}")
    low, high = scaling.get("low_freq_factor"), scaling.get("high_freq_factor")
    if rope_type == "llama3" and _is_number(low) and _is_number(high) and high <= low:
        problems.append(f"{key}.high_freq_factor: must be > low_freq_factor {low}, got {high}")
    fast, slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)  # transformers' defaults
    if rope_type == "yarn" and _is_number(fast) and _is_number(slow) and fast <= slow:
        problems.append(f"{key}.beta_fast: must be > beta_slow {slow}, got {fast}")
    original = scaling.get("original_max_position_embeddings")
    if m.max_position_embeddings is not None and isinstance(original, int) and m.max_position_embeddings < original:
        problems.append(
            f"model.max_position_embeddings: {m.max_position_embeddings} is below "
            f"{key}.original_max_position_embeddings {original}: scaling lengthens the context"
        )


def _check_schedule(r: Recipe, problems: list[str]) -> None:
    """WSD's decay is set in exactly one way and fits in the run after the warmup; its keys only with WSD."""
    t = r.train
    given = [k for k in ("decay_steps", "decay_fraction") if getattr(t, k) is not None]
    if t.schedule != "wsd":
        for k in given:
            problems.append(f"train.{k}: only used with train.schedule=wsd (it is {t.schedule!r})")
        return
    if len(given) != 1:
        problems.append(
            "train.schedule: wsd needs the length of its final decay: set one of train.decay_steps and "
            f"train.decay_fraction ({'both are' if given else 'neither is'} set)"
        )
        return
    if t.decay_steps is not None and t.decay_steps <= 0:
        problems.append(f"train.decay_steps: must be positive, got {t.decay_steps}")
        return
    if t.decay_fraction is not None and not 0 < t.decay_fraction <= 1:
        problems.append(f"train.decay_fraction: must be within (0, 1], got {t.decay_fraction}")
        return
    # Under train.max_tokens the steps follow from the world size at launch: not checked here.
    if t.max_tokens is None and t.max_steps > 0:
        decay = t.wsd_decay_steps()
        if t.warmup_steps + decay > t.max_steps:
            problems.append(
                f"train.decay_steps: the warmup ({t.warmup_steps} steps) and the decay ({decay} steps) do not fit in "
                f"train.max_steps={t.max_steps}"
            )


def _check_source(s: SourceConfig, key: str, problems: list[str], *, train: bool = True) -> None:
    if not s.path:
        problems.append(f"{key}.path: must not be empty")
    if isinstance(s.weight, dict):
        problems += schedule_problems(s.weight, f"{key}.weight")
    elif not (s.weight > 0 and math.isfinite(s.weight)):
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
    if s.holdout_documents and not train:
        problems.append(
            f"{key}.holdout_documents: only a training source holds documents out (it then evaluates them as its "
            "own eval set); remove it here"
        )
    elif s.holdout_documents < 0:
        problems.append(f"{key}.holdout_documents: must be >= 0, got {s.holdout_documents}")


def eval_overlap_warnings(r: Recipe) -> list[str]:
    """A warning for each set of ``eval.sets`` that reads a training source's documents: its perplexity falls as
    the model memorises what it trains on, which says nothing about unseen text. Held-out documents
    (``holdout_documents``) are not in ``eval.sets`` and never warned about."""
    labels = source_labels(r.data.train)
    warnings = []
    for name, e in r.eval.sets.items():
        for i, t in enumerate(r.data.train):
            if not _same_data(e, t):
                continue
            if t.holdout_documents:
                hint = f"its held-out documents are evaluated already, as eval set {labels[i]!r}"
            else:
                hint = f"set data.train[{i}].holdout_documents to evaluate on documents that training skips"
            warnings.append(
                f"eval.sets.{name} reads the training data of data.train[{i}] ({t.path}): its perplexity shows how "
                f"well the model fits what it trains on, not how it does on unseen text; {hint}"
            )
            break
    return warnings


def _same_data(a: SourceConfig, b: SourceConfig) -> bool:
    """Whether two sources share documents, as far as their paths tell (nothing is read): the same hub dataset,
    configuration and split; the same URL; or local paths of which one is, holds or matches the other."""
    kind = source_kind(a.path)
    if kind != source_kind(b.path):
        return False
    if kind == "hub":
        return (a.path, a.name, a.split) == (b.path, b.name, b.split)
    if kind == "url":
        return a.path == b.path or fnmatch(a.path, b.path) or fnmatch(b.path, a.path)
    x, y = (os.path.abspath(os.path.expanduser(p)) for p in (a.path, b.path))
    return x == y or _inside(x, y) or _inside(y, x)


def _inside(path: str, container: str) -> bool:
    """``path`` is in the directory ``container``, or matches it as a glob pattern."""
    if has_glob(container):
        return fnmatch(path, container)
    return os.path.isdir(container) and path.startswith(container.rstrip(os.sep) + os.sep)
