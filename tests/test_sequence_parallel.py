"""``parallel.sequence_parallel: N`` end to end: real ``cpt run`` jobs (gloo, fp32) against runs without it.

A group of N ranks shares each sequence, so with the same global batch the losses, the gradient norm (clipping
included) and the eval perplexity must be those of the run without sequence parallelism, up to float rounding:
N=2 on 2 ranks against 1 rank (FSDP2 with causal attention, ZeRO-3 with packed documents masked), N=2 x data-parallel
2 on 4 ranks against data-parallel 2. A sequence-parallel checkpoint resumes without it (one data position per
data-parallel rank). What a recipe cannot do is refused before launch, naming the key and the numbers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cpt, read_metrics, tiny_recipe, worker_env, write_recipe

from launcher.config import ConfigError
from launcher.preflight import load_recipe

STEPS = 5
TRAIN = {"max_steps": STEPS, "micro_batch_size": 2, "global_batch_size": 4, "lr": 1e-3, "warmup_steps": 1,
         "seed": 3, "precision": "fp32", "log_every": 1, "save_every": 3, "save_final": False}  # fmt: skip
ENGINES = {"fsdp": "fsdp.yaml", "deepspeed": "zero3.json"}


def _recipe(assets, out: Path, engine: str, ranks: int, sp: int, **data) -> Path:
    tree = tiny_recipe(assets, out, train=TRAIN, data=data,
                       parallel={"engine": engine, "config": ENGINES[engine], "nproc_per_node": ranks,
                                 "sequence_parallel": sp})  # fmt: skip
    return write_recipe(out.parent / f"{out.name}.yaml", tree)


RUNS = {
    # name: engine, ranks, N, data settings
    "fsdp-1": ("fsdp", 1, 1, {}),
    "fsdp-sp2": ("fsdp", 2, 2, {}),
    "zero3-docs-1": ("deepspeed", 1, 1, {"document_masking": True}),
    "zero3-docs-sp2": ("deepspeed", 2, 2, {"document_masking": True}),
    "fsdp-dp2": ("fsdp", 2, 1, {}),
    "fsdp-dp2-sp2": ("fsdp", 4, 2, {}),
}


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Each run's output directory and its log."""
    root = tmp_path_factory.mktemp("sp")
    outs = {}
    for name, (engine, ranks, sp, data) in RUNS.items():
        out = root / name
        p = cpt("run", str(_recipe(assets, out, engine, ranks, sp, **data)))
        outs[name] = (out, p.stdout + p.stderr)
    return outs


def _steps(out: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(out) if "loss" in m}


def _eval(out: Path) -> dict[str, dict]:
    return next(m["eval"] for m in reversed(read_metrics(out)) if "eval" in m)


@pytest.mark.parametrize(
    "reference, sharded",
    [("fsdp-1", "fsdp-sp2"), ("zero3-docs-1", "zero3-docs-sp2"), ("fsdp-dp2", "fsdp-dp2-sp2")],
)
def test_a_sequence_parallel_run_trains_as_the_run_without_it(runs, reference, sharded):
    want, got = _steps(runs[reference][0]), _steps(runs[sharded][0])
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step]["data/batch_hash"] == want[step]["data/batch_hash"], f"step {step}: other data"
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-5), f"step {step}"
        # the norm before clipping (1.0 clips these steps): an N-fold gradient would show here first
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-5), f"step {step}"
    ev_want, ev_got = _eval(runs[reference][0]), _eval(runs[sharded][0])
    for name in ev_want:
        assert ev_got[name]["tokens"] == ev_want[name]["tokens"]
        assert ev_got[name]["perplexity"] == pytest.approx(ev_want[name]["perplexity"], rel=1e-6)


def test_the_runs_really_split_the_sequences(runs):
    """The 4-rank run says how it split (rank 0 logs at INFO): 2 data-parallel ranks, 2 parts of each sequence."""
    line = "INFO launcher.engine.ulysses: sequence parallel: part 1 of 2 of each sequence (data-parallel rank 0 of 2)"
    assert line in runs["fsdp-dp2-sp2"][1]
    assert "sequence parallel" not in runs["fsdp-dp2"][1]
    card = (runs["fsdp-dp2-sp2"][0] / "README.md").read_text()
    assert (
        "(2 per data-parallel rank x 1 accumulation x 2 data-parallel ranks; each sequence split over 2 of the 4"
        in card
    )


def test_a_sequence_parallel_checkpoint_resumes_without_it(assets, runs, tmp_path):
    """The N=2 run's step-3 checkpoint continued on 1 rank: steps 4-5 are those of the run that was never split."""
    out = tmp_path / "resumed"
    shutil.copytree(runs["fsdp-sp2"][0] / "checkpoints" / "step-3", out / "checkpoints" / "step-3")
    p = cpt("run", str(_recipe(assets, out, "fsdp", 1, 1)))
    assert "resum" in p.stdout + p.stderr
    want, got = _steps(runs["fsdp-1"][0]), _steps(out)
    assert sorted(got) == [4, 5]
    for step in (4, 5):
        assert got[step]["data/batch_hash"] == want[step]["data/batch_hash"]
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-5)


@pytest.mark.parametrize(
    "sections, world, expected",
    [
        ({"parallel": {"sequence_parallel": 4}}, 4, "parallel.sequence_parallel: 4 does not divide the model's "
                                                    "key/value heads (2"),
        ({"parallel": {"sequence_parallel": 3}}, 3, "parallel.sequence_parallel: 3 does not divide the model's "
                                                    "attention heads (4"),
        ({"parallel": {"sequence_parallel": 2}}, 3, "parallel.sequence_parallel: 2 does not divide the world size 3"),
        ({"parallel": {"sequence_parallel": 2}, "data": {"seq_len": 65}}, 2,
         "parallel.sequence_parallel: 2 must divide data.seq_len (65)"),
        ({"parallel": {"sequence_parallel": 2}, "model": {"attn_implementation": "eager"}}, 2,
         "parallel.sequence_parallel: 2 needs model.attn_implementation: sdpa"),
        ({"parallel": {"sequence_parallel": 0}}, 2, "parallel.sequence_parallel: must be >= 1, got 0"),
        ({"parallel": {"sequence_parallel": 2, "deepspeed": {"compile": {"deepcompile": True}}}}, 2,
         "parallel.deepspeed.compile.deepcompile: true with parallel.sequence_parallel: 2"),
        ({"parallel": {"sequence_parallel": 2},
          "data": {"seq_len": 64, "seq_len_stages": [{"seq_len": 31, "until_step": 2}, {"seq_len": 64}]}}, 2,
         "data.seq_len_stages[0].seq_len"),
    ],
)  # fmt: skip
def test_what_sequence_parallelism_cannot_do_is_refused_before_launch(assets, tmp_path, sections, world, expected):
    tree = tiny_recipe(assets, tmp_path / "out")
    for key, value in sections.items():
        for k, v in value.items():
            if isinstance(v, dict) and isinstance(tree[key].get(k), dict):
                tree[key][k] = {**tree[key][k], **v}
            else:
                tree[key][k] = v
    path = write_recipe(tmp_path / "r.yaml", tree)
    with pytest.raises(ConfigError) as e:
        load_recipe(path, world_size=world, check_files=True, ask_hub=False)
    assert any(expected in p for p in e.value.problems), e.value.problems


def test_cpt_run_refuses_before_any_worker_starts(assets, tmp_path):
    tree = tiny_recipe(assets, tmp_path / "out", parallel={"engine": "fsdp", "config": "fsdp.yaml",
                                                           "nproc_per_node": 2, "sequence_parallel": 4})  # fmt: skip
    recipe = write_recipe(tmp_path / "r.yaml", tree)
    p = subprocess.run([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=REPO, env=worker_env(),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2, p.stderr[-2000:]
    assert "parallel.sequence_parallel: 4 does not divide the world size 2" in p.stderr
    assert not (tmp_path / "out").exists()
