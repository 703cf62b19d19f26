"""Weight schedules: a source's weight changes over the optimizer steps. The tokens drawn follow the schedule step
by step, a run killed across the change resumes bit for bit, the log shows the mixture as it changes, and bad
schedules are named before any worker starts."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cpt, kill_whole_job, read_metrics, tiny_recipe, worker_env, write_recipe
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from launcher.config import ConfigError, SourceConfig
from launcher.data import TrainStream
from launcher.preflight import load_recipe

CODE_WORDS = [f"c{i}" for i in range(150)]
PROSE_WORDS = [f"p{i}" for i in range(150)]


def code_share(step: float) -> float:
    """The schedule under test, written out: code 0.8 up to step 20, linear down to 0.2 at step 60, then 0.2; prose
    the complement, so the weights already sum to 1."""
    return 0.8 - 0.6 * min(1.0, max(0.0, (step - 20) / 40))


SCHEDULE = {"code": {20: 0.8, 60: 0.2}, "prose": {20: 0.2, 60: 0.8}}


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """One token per word; the code words and the prose words are different tokens."""
    t = Tokenizer(models.WordLevel(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.train_from_iterator([" ".join(CODE_WORDS + PROSE_WORDS)] * 2,
                          trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="<unk>")


def corpus(path: Path, words: list[str], n: int, seed: int) -> Path:
    """``n`` documents of 2 to 20 words of ``words``, in two files."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 20))) for _ in range(n)]
    for f in range(2):
        (path / f"part-{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[f::2]))
    return path


# ------------------------------------------------------------------------------------ the mixture follows the schedule


def count(batches, tok, n: int, accum: int, slots: int, last: dict[int, str]) -> list[dict[str, int]]:
    """The tokens of each source in the next ``n`` micro-batches of the iterator ``batches``, per optimizer step
    (``accum`` batches each), told apart by their token ids; an EOS belongs to the document it ends, the last one
    of its reader (``last``: the source of each reader's open document; the DataLoader deals the batches out to
    its ``slots`` workers in turn). An EOS that ends a document begun before ``last`` knew it is not counted."""
    code_ids = set(tok.convert_tokens_to_ids(CODE_WORDS))
    prose_ids = set(tok.convert_tokens_to_ids(PROSE_WORDS))
    per_step = [{"code": 0, "prose": 0} for _ in range(n // accum)]
    for i in range(n):
        for t in next(batches)["input_ids"].flatten().tolist():
            if t != tok.eos_token_id:
                assert t in code_ids | prose_ids
                last[i % slots] = "code" if t in code_ids else "prose"
            if i % slots in last:
                per_step[i // accum][last[i % slots]] += 1
    return per_step


def share(per_step: list[dict[str, int]]) -> float:
    return sum(s["code"] for s in per_step) / sum(s["code"] + s["prose"] for s in per_step)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_tokens_drawn_follow_the_schedule_step_by_step(tmp_path, tok, num_workers):
    """80 steps of 3 micro-batches of 4 x 32 tokens, the code weight falling from 0.8 to 0.2 between steps 20 and
    60. The tokens of each source are counted in the batches themselves, per optimizer step (the rank's batch i is
    of step i // 3); over each window of 20 steps the code share is within 2% of the schedule's mean over it."""
    accum, window = 3, 20
    sources = [
        SourceConfig(path=str(corpus(tmp_path / "code", CODE_WORDS, 1500, 1)), weight=SCHEDULE["code"], label="code"),
        SourceConfig(path=str(corpus(tmp_path / "prose", PROSE_WORDS, 1500, 2)), weight=SCHEDULE["prose"],
                     label="prose"),
    ]  # fmt: skip
    stream = TrainStream(sources, tok, seq_len=32, micro_batch_size=4, rank=0, world_size=1, seed=5,
                         num_workers=num_workers, shuffle_buffer=16, grad_accum=accum)  # fmt: skip
    last: dict[int, str] = {}
    with contextlib.closing(iter(stream)) as it:
        for w in range(4):
            drawn = count(it, tok, window * accum, accum, max(1, num_workers), last)
            assert sum(s["code"] + s["prose"] for s in drawn) == window * accum * 4 * 32
            span = range(w * window, (w + 1) * window)
            expected = sum(code_share(s) for s in span) / window
            assert abs(share(drawn) - expected) <= 0.02, (w, share(drawn), expected)
            # The log says the same: the share since the previous call, and the weight at the last batch's step.
            m = stream.gather_metrics()
            assert m["data/mix_recent/code"] == pytest.approx(share(drawn), abs=1e-12)
            assert m["data/mix_recent/code"] + m["data/mix_recent/prose"] == pytest.approx(1)
            assert m["data/weight/code"] == pytest.approx(code_share(span[-1]), abs=1e-12)
            assert m["data/weight/prose"] == pytest.approx(1 - code_share(span[-1]), abs=1e-12)


def test_a_new_world_size_continues_the_schedule_at_the_step_reached(tmp_path, tok):
    """31 steps of 2 micro-batches on 1 rank, then the position re-divided to 2 ranks of 2 DataLoader workers (1
    micro-batch per step each): the next batch of each rank is of step 31 (its logged weight is the schedule's at
    31; 62 micro-batches over 4 new readers is not a whole number each, so counting them would be off), and the
    next 29 steps draw the schedule's mean share, within 2%."""
    sources = [
        SourceConfig(path=str(corpus(tmp_path / "code", CODE_WORDS, 1500, 3)), weight=SCHEDULE["code"], label="code"),
        SourceConfig(path=str(corpus(tmp_path / "prose", PROSE_WORDS, 1500, 4)), weight=SCHEDULE["prose"],
                     label="prose"),
    ]  # fmt: skip
    args = dict(seq_len=32, micro_batch_size=4, seed=5, shuffle_buffer=16)
    old = TrainStream(sources, tok, rank=0, world_size=1, grad_accum=2, **args)
    with contextlib.closing(iter(old)) as it:
        count(it, tok, 62, 2, 1, {})
    saved = [json.loads(json.dumps(old.state_dict()))]
    drawn = []
    for rank in range(2):
        new = TrainStream(sources, tok, rank=rank, world_size=2, num_workers=2, grad_accum=1, **args)
        new.load_state_dict(saved[0], all_ranks=saved)
        with contextlib.closing(iter(new)) as it:
            last: dict[int, str] = {}
            drawn += count(it, tok, 1, 1, 2, last)
            assert new.gather_metrics()["data/weight/code"] == pytest.approx(code_share(31), abs=1e-12)
            drawn += count(it, tok, 28, 1, 2, last)
    assert abs(share(drawn) - sum(code_share(s) for s in range(31, 60)) / 29) <= 0.02


def test_resume_in_the_middle_of_the_change_is_exact(tmp_path, tok):
    """A position saved 91 micro-batches in (step 30 of 3 micro-batches each: mid-change, mid-step, the DataLoader
    workers mid-round) and loaded into a new stream gives the batches the uninterrupted stream gives."""
    sources = [
        SourceConfig(path=str(corpus(tmp_path / "code", CODE_WORDS, 800, 5)), weight=SCHEDULE["code"]),
        SourceConfig(path=str(corpus(tmp_path / "prose", PROSE_WORDS, 800, 6)), weight={0: 0.5}),
    ]
    args = dict(seq_len=32, micro_batch_size=2, rank=0, world_size=1, seed=7, num_workers=2, grad_accum=3)
    straight = TrainStream(sources, tok, **args)
    with contextlib.closing(iter(straight)) as it:
        reference = [next(it)["input_ids"].tolist() for _ in range(150)]
    first = TrainStream(sources, tok, **args)
    with contextlib.closing(iter(first)) as it:
        head = [next(it)["input_ids"].tolist() for _ in range(91)]
    resumed = TrainStream(sources, tok, **args)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    with contextlib.closing(iter(resumed)) as it:
        tail = [next(it)["input_ids"].tolist() for _ in range(59)]
    assert head + tail == reference


# ------------------------------------------------------------------------------- a real run killed across the change


def schedule_recipe(assets, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """2 ranks x 2 DataLoader workers, 2 micro-batches per step; the code weight falls from 0.9 to 0.1 over steps
    4 to 7 (counted from 0: the updates logged as 5 to 8), after the checkpoint of step 4."""
    out = tmp_path / name
    tree = tiny_recipe(
        assets, out,
        data={"train": [{"path": str(assets["code_train"]), "weight": {4: 0.9, 7: 0.1}, "label": "code"},
                        {"path": str(assets["prose_train"]), "weight": {4: 0.1, 7: 0.9}, "label": "prose"}],
              "seq_len": 64, "num_workers": 2, "shuffle_buffer": 8},
        train={"max_steps": 10, "save_every": 4, "keep_last": 3, "global_batch_size": 8, "schedule": "constant",
               "save_final": False, "export_final": False},
        eval={"sets": {}},
        parallel={"engine": "fsdp", "config": "fsdp.yaml", "nproc_per_node": 2},
    )  # fmt: skip
    return write_recipe(tmp_path / f"{name}.yaml", tree), out


def start(recipe: Path) -> subprocess.Popen:
    """``cpt run`` in its own session, so that a test can kill everything under it; its output in RECIPE.log."""
    with recipe.with_suffix(".log").open("w") as log:
        return subprocess.Popen([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=REPO, env=worker_env(),
                                start_new_session=True, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def tail(recipe: Path) -> str:
    return recipe.with_suffix(".log").read_text()[-5000:]


def test_a_run_killed_before_the_change_resumes_bit_exact_across_it(assets, tmp_path):
    """SIGKILL of the whole job after the checkpoint of step 4, before the weights change; the rerun resumes there
    and trains step for step as the run that was never stopped (the two first runs side by side, to save time)."""
    straight_recipe, straight = schedule_recipe(assets, tmp_path, "straight")
    killed_recipe, killed = schedule_recipe(assets, tmp_path, "killed")
    reference, proc = start(straight_recipe), start(killed_recipe)
    try:
        end = time.time() + 240
        while not (killed / "checkpoints" / "step-4").is_dir():
            assert proc.poll() is None, f"run ended before it could be killed:\n{tail(killed_recipe)}"
            assert time.time() < end, "no checkpoint of step 4 in time"
            time.sleep(0.05)
        kill_whole_job(proc)  # mid-run
        assert reference.wait(timeout=240) == 0, tail(straight_recipe)
    finally:
        for p in (proc, reference):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    committed = sorted(int(p.name[5:]) for p in (killed / "checkpoints").glob("step-*") if p.name[5:].isdigit())
    assert committed == [4], "killed after the checkpoint of step 4, before that of step 8"
    assert max(m["step"] for m in read_metrics(killed) if "loss" in m) < 10
    cpt("run", str(killed_recipe))
    a = {m["step"]: m for m in read_metrics(straight) if "loss" in m}
    b = {m["step"]: m for m in read_metrics(killed) if "loss" in m}
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in range(5, 11):
        for key in ("data/batch_hash", "loss", "data/mix/code", "data/mix_recent/code", "data/weight/code"):
            assert b[step][key] == a[step][key], (step, key)
    # The weights logged are the schedule's at the step of the update (logged as step + 1), normalised.
    for logged in range(1, 11):
        code = 0.9 - 0.8 * min(1.0, max(0.0, (logged - 1 - 4) / 3))
        assert a[logged]["data/weight/code"] == pytest.approx(code, abs=1e-12), logged
        assert a[logged]["data/weight/prose"] == pytest.approx(1 - code, abs=1e-12), logged
    assert len({a[s]["data/batch_hash"] for s in a}) == 10


# ------------------------------------------------------------------------------------------------------- bad input


def plan(assets, tmp_path: Path, name: str, data: dict) -> subprocess.CompletedProcess:
    """``cpt plan`` of the tiny recipe with ``data``, its schedules written in the order given."""
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(assets, tmp_path / name, data=data), sort_keys=False))
    return subprocess.run([sys.executable, "-m", "launcher", "plan", str(recipe)], cwd=REPO,
                          env=worker_env(), capture_output=True, text=True, timeout=120)  # fmt: skip


def test_bad_schedules_are_named_and_nothing_starts(assets, tmp_path):
    """Each problem named by its key, all of them at once, exit 2 before anything is written."""
    code, prose = str(assets["code_train"]), str(assets["prose_train"])
    bad = plan(assets, tmp_path, "order", {"train": [{"path": code, "weight": {0: 0.5, 2000: 0.4, 100: 0.1}},
                                                     {"path": prose, "weight": {0: 0.5, 100: -0.2}}]})  # fmt: skip
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "data.train[0].weight: steps must increase: 2000 then 100" in bad.stderr
    assert "data.train[1].weight: the weight at step 100 must be a number >= 0, got -0.2" in bad.stderr
    # Code rests from step 50 on, prose starts at step 50: at step 50 nothing would be drawn.
    bad = plan(assets, tmp_path, "zero", {"train": [{"path": code, "weight": {0: 1, 50: 0}},
                                                    {"path": prose, "weight": {50: 0, 100: 1}}],
                                          "stopping": "token_budget", "token_budget": 100000})  # fmt: skip
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "data.train: the weights of all training sources are 0 at step 50" in bad.stderr
    for i in (0, 1):
        assert f"data.train[{i}].weight: a schedule does not work with data.stopping=token_budget" in bad.stderr
    assert not (tmp_path / "order").exists() and not (tmp_path / "zero").exists()


def test_a_schedule_from_the_command_line(tmp_path):
    """``data.train.N.weight=...`` sets one source's weight; written without the space after a colon, YAML reads
    ``0:0.5`` as one number, and the message says what to write."""
    recipe = tmp_path / "r.yaml"
    train = [{"path": "org/a"}, {"path": "org/b", "weight": 3}]
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": "org/m"}, "data": {"train": train}}))
    r = load_recipe(recipe, ["data.train.1.weight={0: 0.5, 100: 0.1}", "data.train[0].weight={0: 0.5, 100: 0.9}"])
    assert [s.weight for s in r.data.train] == [{0: 0.5, 100: 0.9}, {0: 0.5, 100: 0.1}]
    with pytest.raises(ConfigError) as e:
        load_recipe(recipe, ["data.train.1.weight={0:0.5,100:0.1}", "data.train.2.weight=1"])
    assert e.value.problems == [
        "data.train.2.weight: data.train has 2 item(s), numbered from 0; to add one, set the whole list",
        "data.train[1].weight: 0.5 has no value; write each entry as `key: value`, with a space after the colon",
        "data.train[1].weight: 6000.1 has no value; write each entry as `key: value`, with a space after the colon",
    ]
