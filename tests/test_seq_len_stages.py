"""Sequence-length stages (``data.seq_len_stages``): each stage trains on blocks of its own length with the tokens
per step unchanged, the switch happens at the step the recipe names, a resume anywhere is bit-exact, and bad stages
are named before anything starts."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cpt, read_metrics, tiny_recipe, worker_env, write_recipe
from test_callbacks import wandb_logs, wandb_run

from launcher.config import RECIPE_DIR, ConfigError, DataConfig, SourceConfig
from launcher.config.schema import SeqLenStage
from launcher.data import TrainStream, pack, reblock, stage_at, stages_of, tokenize_documents
from launcher.preflight import load_recipe

STAGES = [{"seq_len": 32, "until_step": 3}, {"seq_len": 64}]
"""The stages of the runs below: blocks of 32 tokens for steps 1-3, of 64 (``data.seq_len``) from step 4 on."""

# ------------------------------------------------------------------------------------------- the recipe check


def problems(*overrides: str) -> str:
    """The problems of the shipped 1.1B recipe (seq_len 2048, micro-batch 8) with ``overrides``."""
    with pytest.raises(ConfigError) as e:
        load_recipe(RECIPE_DIR / "llama-1b-zero3.yaml", list(overrides))
    return "\n".join(e.value.problems)


def stages(text: str) -> str:
    return f"data.seq_len_stages={text}"


def test_good_stages_load_and_set_the_micro_batch_of_each_stage():
    three = stages("[{seq_len: 512, until_step: 10}, {seq_len: 1024, until_step: 30}, {seq_len: 2048}]")
    r = load_recipe(RECIPE_DIR / "llama-1b-zero3.yaml", [three])
    got = [(s.index, s.seq_len, s.micro_batch_size, s.first_step, s.last_step) for s in stages_of(r.data, 8)]
    assert got == [(0, 512, 32, 1, 10), (1, 1024, 16, 11, 30), (2, 2048, 8, 31, None)]
    assert [stage_at(stages_of(r.data, 8), step).index for step in (1, 10, 11, 30, 31, 10**6)] == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ([stages("[{seq_len: 1024, until_step: 10}, {seq_len: 1024}]")],
         r"data.seq_len: 2048 is not the longest seq_len of data.seq_len_stages \(1024\)"),
        ([stages("[{seq_len: 1024, until_step: 10}, {seq_len: 4096}]")],
         r"data.seq_len_stages\[1\].seq_len: 4096 is longer than data.seq_len 2048"),
        ([stages("[{seq_len: 1000, until_step: 10}, {seq_len: 2048}]")],
         r"data.seq_len_stages\[0\].seq_len: 1000 does not divide data.seq_len 2048"),
        ([stages("[{seq_len: 0, until_step: 10}, {seq_len: 2048}]")],
         r"data.seq_len_stages\[0\].seq_len: must be positive, got 0"),
        ([stages("[{seq_len: -512, until_step: 10}, {seq_len: 2048}]")],
         r"data.seq_len_stages\[0\].seq_len: must be positive, got -512"),
        ([stages("[{until_step: 10}, {seq_len: 2048}]")], r"data.seq_len_stages\[0\].seq_len: required"),
        ([stages("[{seq_len: 512, until_step: 10}, {seq_len: 1024, until_step: 10}, {seq_len: 2048}]")],
         r"data.seq_len_stages\[1\].until_step: must be greater than data.seq_len_stages\[0\].until_step 10 .*got 10"),
        ([stages("[{seq_len: 512, until_step: 10}, {seq_len: 1024, until_step: 4}, {seq_len: 2048}]")],
         r"data.seq_len_stages\[1\].until_step: must be greater than .*until_step 10 .*got 4"),
        ([stages("[{seq_len: 512, until_step: 0}, {seq_len: 2048}]")],
         r"data.seq_len_stages\[0\].until_step: must be >= 1 .*got 0"),
        ([stages("[{seq_len: 512}, {seq_len: 2048}]")], r"data.seq_len_stages\[0\].until_step: required"),
        ([stages("[{seq_len: 512, until_step: 10}, {seq_len: 2048, until_step: 20}]")],
         r"data.seq_len_stages\[1\].until_step: the last stage runs to the end of training: remove its until_step"),
        ([stages("[{seq_len: 512, until_step: 10}, {seq_len: 2048, untill_step: 5}]")],
         r"data.seq_len_stages\[1\].untill_step: unknown key \(did you mean 'until_step'\?\)"),
        ([stages("[{seq_len: 512, until_step: 10}, {seq_len: 2048}]"), "parallel.sequence_parallel=3"],
         r"data.seq_len_stages\[0\].seq_len: 512 is not a multiple of parallel.sequence_parallel 3"),
    ],
)  # fmt: skip
def test_bad_stages_are_named_with_their_numbers(overrides, needle):
    found = problems(*overrides)
    assert re.search(needle, found), found


def test_sequence_parallel_that_divides_every_stage_is_accepted():
    two = stages("[{seq_len: 512, until_step: 10}, {seq_len: 2048}]")
    r = load_recipe(RECIPE_DIR / "llama-1b-zero3.yaml", [two, "parallel.sequence_parallel=4"])
    assert [s.seq_len for s in r.data.seq_len_stages] == [512, 2048]


def test_cpt_run_refuses_bad_stages_before_starting_anything(assets, tmp_path):
    out = tmp_path / "run"
    bad = [{"seq_len": 48, "until_step": 2}, {"seq_len": 64}]
    tree = tiny_recipe(assets, out, data={"train": [{"path": str(assets["code_train"])}], "seq_len_stages": bad})
    recipe = write_recipe(tmp_path / "bad.yaml", tree)
    p = subprocess.run([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=REPO, env=worker_env(),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2, p.stdout + p.stderr
    assert "data.seq_len_stages[0].seq_len: 48 does not divide data.seq_len 64" in p.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------- blocks of a stage's length


@pytest.mark.parametrize("masking", [False, True])
def test_a_stage_cuts_the_stream_into_blocks_of_its_length(assets, masking):
    """The micro-batches of a stream at seq_len 64 (2 blocks each), cut for a stage of 32, are the blocks that
    packing the same documents at 32 gives, 4 per micro-batch, in order; with document masking the positions restart
    at each 32-token block and after every EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["base"])
    texts = [json.loads(line)["text"] for line in assets["code_train"].read_text().splitlines()[:40]]
    expected = list(pack(tokenize_documents(texts, tok), 32, keep_partial=False, eos_id=tok.eos_token_id))
    data = DataConfig(train=[SourceConfig(path=str(assets["code_train"]))], seq_len=64, num_workers=0,
                      document_masking=masking, seq_len_stages=[SeqLenStage(32, 1), SeqLenStage(64)])  # fmt: skip
    short, full = stages_of(data, 2)
    stream = TrainStream.from_config(data, tok, micro_batch_size=2, rank=0, world_size=1, seed=1)
    with contextlib.closing(iter(stream)) as it:
        batches = [next(it) for _ in range(5)]
    eos = tok.eos_token_id
    for i, batch in enumerate(batches):
        cut = reblock(batch, short, eos)
        assert cut["input_ids"].shape == (4, 32)
        assert cut["input_ids"].tolist() == expected[4 * i : 4 * i + 4], i
        assert cut["labels"].tolist() == expected[4 * i : 4 * i + 4], i
        assert reblock(batch, full, eos)["input_ids"].shape == (2, 64)
        if masking:
            for row, positions in zip(cut["input_ids"].tolist(), cut["position_ids"].tolist()):
                want, p = [], 0
                for t in row:
                    want.append(p)
                    p = 0 if t == eos else p + 1
                assert positions == want
        else:
            assert "position_ids" not in cut


# ---------------------------------------------------------------------------------------------- real training runs

ENGINES = {"fsdp": "fsdp.yaml", "deepspeed": "zero3.json"}


def stage_recipe(
    assets, root, name: str, engine: str, *, seq_len: int = 64, micro: int = 2, staged: bool = True, **train
) -> tuple:
    """2 ranks x 2 DataLoader workers, 2 micro-batches of ``micro`` x ``seq_len`` per rank and step (8 x 64 = 512
    tokens per step), constant learning rate without warmup, a checkpoint after every step; with ``staged``,
    ``STAGES``."""
    out = root / name
    data = {
        "train": [{"path": str(assets["code_train"])}, {"path": str(assets["prose_train"])}],
        "seq_len": seq_len,
        "num_workers": 2,
        "shuffle_buffer": 8,
    }
    if staged:
        data["seq_len_stages"] = STAGES
    tree = tiny_recipe(
        assets, out, data=data,
        train={"max_steps": 6, "micro_batch_size": micro, "global_batch_size": 4 * micro, "lr": 1e-3,
               "warmup_steps": 0, "schedule": "constant", "seed": 3, "save_every": 1, "keep_last": 6,
               "export_final": False, **train},
        eval={"sets": {}},
        parallel={"engine": engine, "config": ENGINES[engine], "nproc_per_node": 2},
    )  # fmt: skip
    return write_recipe(root / f"{name}.yaml", tree), out


def steps_of(out) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(out) if "loss" in m}


def died_after(out: Path, step: int, copy: Path) -> None:
    """``copy``: the output directory of ``out``'s run as it would be had the run died right after its checkpoint of
    ``step`` was committed (the later checkpoints removed; the metrics of later steps the resume drops itself)."""
    shutil.copytree(out, copy)
    for path in (copy / "checkpoints").glob("step-*"):
        if int(path.name[5:]) > step:
            shutil.rmtree(path)


@pytest.fixture(scope="module")
def fsdp_runs(assets, tmp_path_factory):
    """FSDP2: the staged run straight to step 6 (``straight``), with its log; the same recipe without stages at
    seq_len 32 (micro-batch 4) for 3 steps (``short``); a run without stages at seq_len 64 that continues the
    staged run's step-3 checkpoint with its optimizer state and data position (``long``: its steps 1-3 are the
    staged run's 4-6); and the staged run dead after its checkpoint of step 2, resumed to step 6 (``resumed``)."""
    root = tmp_path_factory.mktemp("stages-fsdp")
    straight, out = stage_recipe(assets, root, "straight", "fsdp")
    outs = {"straight": out, "log": cpt("run", str(straight), "logging.wandb=offline").stderr}
    short, outs["short"] = stage_recipe(assets, root, "short", "fsdp", seq_len=32, micro=4, staged=False, max_steps=3)
    cpt("run", str(short))
    long, outs["long"] = stage_recipe(assets, root, "long", "fsdp", staged=False, max_steps=3)
    cpt(
        "run",
        str(long),
        f"model.init_from={out / 'checkpoints' / 'step-3'}",
        "model.init_optimizer=true",
        "model.init_data=true",
    )
    resumed, outs["resumed"] = stage_recipe(assets, root, "resumed", "fsdp")
    died_after(out, 2, outs["resumed"])
    outs["resumed_log"] = cpt("run", str(resumed)).stderr
    return outs


def test_each_stage_trains_on_blocks_of_its_length_with_the_same_tokens_per_step(fsdp_runs):
    """Steps 1-3 of the staged run are, to the bit, those of a run at seq_len 32 with twice the micro-batch (the same
    tokens, in 32-token blocks); steps 4-6 are those of a run at seq_len 64 continuing its step-3 checkpoint. The
    running hash of every token consumed agrees with both, so every step consumed the same 512 tokens; the log shows
    each step's stage."""
    staged, short, long = (steps_of(fsdp_runs[k]) for k in ("straight", "short", "long"))
    assert sorted(staged) == list(range(1, 7))
    assert [staged[s]["data/seq_len_stage"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    assert [staged[s]["data/seq_len"] for s in range(1, 7)] == [32, 32, 32, 64, 64, 64]
    assert [staged[s]["tokens_seen"] for s in range(1, 7)] == [512 * s for s in range(1, 7)]
    for step in (1, 2, 3):
        assert staged[step]["data/batch_hash"] == short[step]["data/batch_hash"], step
        assert staged[step]["loss"] == short[step]["loss"], step
    for step in (4, 5, 6):
        assert staged[step]["data/batch_hash"] == long[step - 3]["data/batch_hash"], step
        assert staged[step]["loss"] == long[step - 3]["loss"], step
    assert len({staged[s]["loss"] for s in staged}) == 6
    log = fsdp_runs["log"]
    assert "step 1: sequence-length stage 0 of 2 begins (through step 3): seq_len 32, 4 blocks per micro-batch" in log
    assert "step 4: sequence-length stage 1 of 2 begins (to the end): seq_len 64, 2 blocks per micro-batch" in log
    [wandb_log] = wandb_logs(fsdp_runs["straight"])
    _, history = wandb_run(wandb_log)
    assert [history[s]["train/data/seq_len_stage"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    assert [history[s]["train/data/seq_len"] for s in range(1, 7)] == [32, 32, 32, 64, 64, 64]


def test_fsdp_resume_inside_the_first_stage_is_bit_exact_across_the_boundary(fsdp_runs):
    """Dead after step 2 (inside stage 0) and resumed: steps 3 (stage 0) and 4-6 (stage 1) are the uninterrupted
    run's, to the bit."""
    straight, resumed = steps_of(fsdp_runs["straight"]), steps_of(fsdp_runs["resumed"])
    assert sorted(resumed) == list(range(1, 7))
    for step in range(3, 7):
        for key in ("loss", "data/batch_hash", "data/seq_len_stage", "data/seq_len", "grad_norm"):
            assert resumed[step][key] == straight[step][key], (step, key)
    log = fsdp_runs["resumed_log"]
    assert f"resumed from {fsdp_runs['resumed'] / 'checkpoints' / 'step-2'} at step 2" in log
    assert "step 3: sequence-length stage 0 of 2 continues" in log
    assert "step 4: sequence-length stage 1 of 2 begins" in log


def test_deepspeed_resume_at_the_boundary_is_bit_exact(assets, tmp_path):
    """DeepSpeed ZeRO-3: dead after step 3, the last of stage 0, and resumed: steps 4-6 (stage 1, from its first
    step) are the uninterrupted run's, to the bit."""
    straight, out = stage_recipe(assets, tmp_path, "straight", "deepspeed")
    cpt("run", str(straight))
    resumed, copy = stage_recipe(assets, tmp_path, "resumed", "deepspeed")
    died_after(out, 3, copy)
    log = cpt("run", str(resumed)).stderr
    assert f"resumed from {copy / 'checkpoints' / 'step-3'} at step 3" in log
    assert "step 4: sequence-length stage 1 of 2 begins" in log
    a, b = steps_of(out), steps_of(copy)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[s]["data/seq_len"] for s in range(1, 7)] == [32, 32, 32, 64, 64, 64]
    for step in range(4, 7):
        for key in ("loss", "data/batch_hash", "data/seq_len_stage", "data/seq_len", "grad_norm"):
            assert b[step][key] == a[step][key], (step, key)
