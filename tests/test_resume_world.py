"""Resuming on another world size: a checkpoint written by W ranks continues on W' ranks, under both engines, in
real ``cpt run`` launches.

Every training block is the same document, so the batches do not depend on how the data is divided among the
ranks: with the global batch fixed by the recipe, the loss at each step depends only on the model, optimizer and
schedule a run carries, not on which rank read which document. The losses after a resume are compared with the
run that went on without stopping on the old world size: the two hold the same state at the checkpoint, so any
difference comes from what the resume restored (a fresh Adam state puts the second loss after the resume about
30% higher, the base model's weights the first one about 25%), plus rounding from the other reduction order (none
here on 2 and 4 ranks; on 3 none under DeepSpeed, under 0.6% under FSDP2). A run on the new world size from the
start would differ from the first step on by its own rounding (FSDP2 on 3 ranks: 0.1-0.4% by step 12) and cost
one more launch per case. The learning rate after the resume must be the reference's exactly.

One chain per engine, each run reused by several tests: 2 ranks to step 12 (checkpoints at 4, 8, 12); its
output_dir as it stood after step 4, resumed on 4 ranks; that run's output_dir as it stood after step 8, resumed
on 2 ranks. DeepSpeed also resumes step 4 on 3 ranks.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, cpt, read_metrics, tiny_recipe, worker_env, write_recipe

STEPS, EVERY, AHEAD = 12, 4, 3
"""Every run ends at step STEPS, saving every EVERY steps; the first AHEAD steps after a resume are compared."""
SEQ_LEN = 64
GLOBAL_BATCH = 24  # 2, 3 and 4 ranks of micro-batch 2: gradient accumulation 6, 4 and 3
TOLERANCE = 0.02


@dataclass
class Run:
    out: Path
    recipe: Path
    log: str = ""

    def metrics(self) -> dict[int, dict]:
        return {m["step"]: m for m in read_metrics(self.out) if "loss" in m}


@pytest.fixture(scope="module")
def corpus(assets, tmp_path_factory) -> Path:
    """One document of SEQ_LEN - 1 tokens (SEQ_LEN with its EOS), repeated: every packed block is that document."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    source = json.loads(Path(assets["code_train"]).read_text().splitlines()[0])["text"]
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    ends = (i for i in range(1, len(source)) if not source[i - 1].isspace())
    doc = next(source[:i] for i in ends if count(source[:i]) == SEQ_LEN - 1)
    path = tmp_path_factory.mktemp("corpus") / "one_document.jsonl"
    path.write_text((json.dumps({"text": doc}) + "\n") * 600)  # a run takes 12 x 24 of them: less than one pass
    return path


def _recipe(assets, corpus: Path, root: Path, name: str, engine: str, config: str) -> Run:
    out = root / name
    tree = tiny_recipe(
        assets, out,
        data={"train": [{"path": str(corpus)}], "seq_len": SEQ_LEN, "num_workers": 0},
        train={"max_steps": STEPS, "micro_batch_size": 2, "global_batch_size": GLOBAL_BATCH, "lr": 5e-3,
               "warmup_steps": 2, "save_every": EVERY, "keep_last": 3, "log_every": 1},
        eval={"sets": {}},
        parallel={"engine": engine, "config": config, "nproc_per_node": 2},
    )  # fmt: skip
    return Run(out, write_recipe(root / f"{name}.yaml", tree))


def _stopped_after(run: Run, step: int, assets, corpus: Path, root: Path, name: str, engine: str, config: str) -> Run:
    """A copy of ``run``'s output_dir as it stood after its ``step`` checkpoint: the later checkpoints removed."""
    copy = _recipe(assets, corpus, root, name, engine, config)
    shutil.copytree(run.out, copy.out, ignore=shutil.ignore_patterns(".cpt-*"))
    for path in (copy.out / "checkpoints").iterdir():
        if (m := re.match(r"step-(\d+)", path.name)) and int(m.group(1)) > step:
            shutil.rmtree(path)
    (copy.out / "checkpoints" / "latest").write_text(f"step-{step}\n")
    return copy


def _resume(run: Run, ranks: int, *overrides: str) -> Run:
    p = cpt("run", str(run.recipe), f"parallel.nproc_per_node={ranks}", *overrides)
    run.log = p.stdout + p.stderr
    return run


def _chain(assets, corpus: Path, root: Path, engine: str, config: str) -> dict[str, Run]:
    two = _recipe(assets, corpus, root, "two", engine, config)
    _resume(two, 2)
    four = _resume(_stopped_after(two, EVERY, assets, corpus, root, "four", engine, config), 4)
    back = _stopped_after(four, 2 * EVERY, assets, corpus, root, "back", engine, config)
    # keep_last=1: the save at step 12 prunes every older checkpoint, with what was derived from it
    return {"two": two, "four": four, "back": _resume(back, 2, "train.keep_last=1")}


@pytest.fixture(scope="module")
def deepspeed_runs(assets, corpus, tmp_path_factory) -> dict[str, Run]:
    return _chain(assets, corpus, tmp_path_factory.mktemp("deepspeed"), "deepspeed", "zero3.json")


@pytest.fixture(scope="module")
def fsdp_runs(assets, corpus, tmp_path_factory) -> dict[str, Run]:
    return _chain(assets, corpus, tmp_path_factory.mktemp("fsdp"), "fsdp", "fsdp.yaml")


@pytest.fixture(params=["deepspeed", "fsdp"])
def runs(request) -> dict[str, Run]:
    return request.getfixturevalue(f"{request.param}_runs")


@pytest.fixture(scope="module")
def deepspeed_three(deepspeed_runs, assets, corpus, tmp_path_factory) -> Run:
    """The 4-rank run's output_dir as it stood after step 4 (its universal form of step 4 included), resumed on 3."""
    root = tmp_path_factory.mktemp("deepspeed-three")
    copy = _stopped_after(deepspeed_runs["four"], EVERY, assets, corpus, root, "three", "deepspeed", "zero3.json")
    return _resume(copy, 3)


def assert_continues(resumed: Run, reference: Run, at: int) -> None:
    """Steps 1..STEPS each once; from ``at`` + 1 the learning rate of ``reference`` and, for AHEAD steps, its loss
    within TOLERANCE."""
    got, want = resumed.metrics(), reference.metrics()
    assert [m["step"] for m in read_metrics(resumed.out) if "loss" in m] == list(range(1, STEPS + 1))
    for step in range(at + 1, STEPS + 1):
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-9), f"learning rate at step {step}"
    for step in range(at + 1, at + 1 + AHEAD):
        a, b = got[step]["loss"], want[step]["loss"]
        assert abs(a / b - 1) <= TOLERANCE, f"step {step}: loss {a:.4f} after the resume, {b:.4f} without it"
    # the loss moves by more than the tolerance over these steps: a resume that lost its state would show
    assert want[at]["loss"] / want[at + AHEAD]["loss"] - 1 > 3 * TOLERANCE


def assert_logged(run: Run, old: int, new: int) -> None:
    assert f"world size changed: {old} -> {new} ranks" in run.log, run.log[-4000:]
    assert f"= {GLOBAL_BATCH} sequences before" in run.log and f"= {GLOBAL_BATCH} now" in run.log
    # every old rank's data position reached the stream, which divided it among the new ranks
    assert f"re-divided from {old} old readers ({old} ranks" in run.log


def test_resume_on_more_ranks_continues_the_run(runs):
    """2 -> 4 ranks; compared with the 2-rank run, which holds the same state at step 4."""
    assert_continues(runs["four"], runs["two"], EVERY)
    assert_logged(runs["four"], 2, 4)


def test_resume_on_fewer_ranks_continues_the_run(runs):
    """4 -> 2 ranks; compared with the 4-rank run from step 8 on, which holds the same state at step 8."""
    assert_continues(runs["back"], runs["four"], 2 * EVERY)
    assert_logged(runs["back"], 4, 2)


def test_deepspeed_resume_on_three_ranks(deepspeed_three, deepspeed_runs):
    """2 -> 3 ranks: ZeRO-3's partitions of 3 are uneven (padded) where those of 2 and 4 are not; the universal
    form of step 4 that the 4-rank resume left beside it is reused, not built again."""
    assert_continues(deepspeed_three, deepspeed_runs["two"], EVERY)
    assert_logged(deepspeed_three, 2, 3)
    assert "reusing the universal checkpoint" in deepspeed_three.log
    assert "converting" not in deepspeed_three.log


def _digests(path: Path) -> dict[str, str]:
    files = [f for f in path.rglob("*") if f.is_file()]
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_deepspeed_universal_checkpoint_lives_beside_its_checkpoint(deepspeed_runs):
    """The conversion is written beside the checkpoint, which stays as it was committed, and goes when its
    checkpoint is pruned."""
    from launcher.checkpoint import verify

    two, four, back = deepspeed_runs["two"], deepspeed_runs["four"], deepspeed_runs["back"]
    ckpt = four.out / "checkpoints" / f"step-{EVERY}"
    universal = ckpt.with_name(ckpt.name + ".universal")
    assert "universal checkpoint written" in four.log and "re-partitioning" in four.log
    assert (universal / "zero").is_dir()
    assert json.loads((universal / "source.json").read_text())["checkpoint"] == ckpt.name
    assert _digests(ckpt) == _digests(two.out / "checkpoints" / ckpt.name), "the committed checkpoint changed"
    assert verify(ckpt) is None
    leftovers = [p.name for p in (four.out / "checkpoints").iterdir() if p.name.endswith((".tmp", "latest_universal"))]
    assert not leftovers
    # the 2-rank resume converted step 8, then its save at step 12 (keep_last=1) pruned steps 4 and 8 with theirs
    assert "universal checkpoint written" in back.log
    assert sorted(p.name for p in (back.out / "checkpoints").glob("step-*")) == [f"step-{STEPS}"]


def test_fsdp_reshards_through_distributed_checkpoint(fsdp_runs):
    assert "torch.distributed.checkpoint reshards the parameters and optimizer states of 2 ranks over 4" in (
        fsdp_runs["four"].log
    )


def test_a_checkpoint_of_the_other_engine_is_refused(fsdp_runs):
    """Before any worker starts, naming both engines."""
    two = fsdp_runs["two"]
    cmd = [sys.executable, "-m", "launcher", "run", str(two.recipe), "parallel.engine=deepspeed",
           "parallel.config=zero3.json", f"train.max_steps={STEPS + 1}"]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "written by the fsdp engine and this recipe uses deepspeed" in p.stderr, p.stderr[-3000:]
    assert "parallel.engine=fsdp" in p.stderr
    assert max(two.metrics()) == STEPS, "nothing was trained"


def test_a_rank_without_a_saved_rng_state_gets_a_fixed_one():
    """Ranks the saved run did not have: seeded from (train.seed, step, rank), the same on every resume of that
    checkpoint and different for every rank."""
    import random

    import torch

    from launcher.checkpoint import _seed_new_rank

    def draw(seed: int, step: int, rank: int) -> tuple[float, float]:
        _seed_new_rank(seed, step, rank)
        return torch.rand(()).item(), random.random()

    assert draw(3, 4, 2) == draw(3, 4, 2)
    assert len({draw(3, 4, 2), draw(3, 4, 3), draw(3, 8, 2), draw(4, 4, 2)}) == 4
