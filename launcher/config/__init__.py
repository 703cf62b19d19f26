"""The recipe: its schema (``schema``), how files and overrides merge into one tree (``load``), and how the tree
becomes a typed :class:`Recipe` with every problem named (``validate``). The ground floor: it imports nothing else
of the launcher but ``redact`` and ``files``. The whole pre-flight check of a run, which also asks the engine and
the files, is :func:`launcher.preflight.load_recipe`."""

from .data_checks import weight_at
from .load import read_tree, resolve_engine_config_path, to_dict, to_yaml
from .schema import (
    DS_CONFIG_DIR,
    PACKAGE_ROOT,
    PREEMPT_SIGNALS,
    RECIPE_DIR,
    BatchLayout,
    ConfigError,
    DataConfig,
    EvalConfig,
    FsdpConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    Recipe,
    SourceConfig,
    TrainConfig,
    has_glob,
    source_kind,
    source_labels,
)
from .validate import build, check_values, eval_overlap_warnings

__all__ = [
    "DS_CONFIG_DIR",
    "PACKAGE_ROOT",
    "PREEMPT_SIGNALS",
    "RECIPE_DIR",
    "BatchLayout",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FsdpConfig",
    "LoggingConfig",
    "ModelConfig",
    "ParallelConfig",
    "Recipe",
    "SourceConfig",
    "TrainConfig",
    "build",
    "check_values",
    "eval_overlap_warnings",
    "has_glob",
    "read_tree",
    "resolve_engine_config_path",
    "source_kind",
    "source_labels",
    "to_dict",
    "to_yaml",
    "weight_at",
]
