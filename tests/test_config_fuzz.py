"""Random recipe trees thrown at the validator: it returns a recipe or a ConfigError, and never crashes."""

from __future__ import annotations

import dataclasses
import typing

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.config import ConfigError, Recipe
from launcher.preflight import load_recipe


def schema_keys(tp=Recipe) -> list[str]:
    keys = []
    for f in dataclasses.fields(tp):
        keys.append(f.name)
        inner = typing.get_type_hints(tp)[f.name]
        if dataclasses.is_dataclass(inner):
            keys += schema_keys(inner)
    return keys


KEYS = st.sampled_from(schema_keys() + ["extends", "path", "weight", "deepspeed", "zero_optimization", "stage"])
WORDS = st.sampled_from(["zero3.json", "fsdp.yaml", "deepspeed", "fsdp", "auto"])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10_000), st.floats(allow_nan=True), st.text(max_size=12), WORDS
)
TREES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=6)),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(KEYS, TREES, max_size=8), overrides=st.lists(st.text(max_size=20), max_size=3))
def test_validator_never_crashes(tmp_path, tree, overrides):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        r = load_recipe(path, overrides, world_size=2)
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)
    else:
        assert isinstance(r, Recipe)
