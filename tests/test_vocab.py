"""Vocabulary extension: ``model.add_tokens`` and a ``model.tokenizer`` that extends the base one grow the embeddings
(padded to a multiple of 64); each new row starts as the mean of the base rows of the token's pieces, under ZeRO-3,
FSDP2 and ZeRO-2, tied and untied; the run trains, checkpoints and exports the new tokenizer and vocabulary; with
``train.trainable: embeddings`` nothing else moves; a tokenizer that does not extend the base one is refused before
any worker starts.

The starting rows are checked on the engines themselves, built on two gloo ranks exactly as a run builds them and
gathered through ``export_tensors`` before any step; the runs check the rest end to end."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, cpt, read_metrics, run_distributed, tiny_recipe, worker_env, write_recipe
from conftest import run as run_command
from safetensors import safe_open

ADD = ["return self", "🙂", "    ", "return self"]
"""Two new tokens; one that the base tokenizer already has as one token ("    "), one listed twice."""
NEW = ["return self", "🙂"]
EXTENSION = ["import numpy", "<|tool|>"]
"""What the extending tokenizer adds to the base one: a normal token and a special one."""
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def tensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return out


def copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dst / f.name)


@pytest.fixture(scope="module")
def untied(assets, tmp_path_factory) -> Path:
    """The tiny base model with an output projection of its own (the conftest model ties it to the embeddings)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(assets["base"])
    assert cfg.tie_word_embeddings, "the conftest model is the tied one"
    cfg.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(cfg)
    state = tensors_of(assets["base"])
    generator = torch.Generator().manual_seed(1)
    state[HEAD] = torch.randn(state[EMBED].shape, generator=generator) * 0.05
    model.load_state_dict(state)
    out = tmp_path_factory.mktemp("untied") / "model"
    model.save_pretrained(out)
    copy_tokenizer(assets["base"], out)
    assert HEAD in tensors_of(out)
    return out


@pytest.fixture(scope="module")
def extending_tokenizer(assets, tmp_path_factory) -> Path:
    """The base tokenizer with two tokens appended: every base token keeps its id."""
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["base"])
    tok.add_tokens([AddedToken(EXTENSION[0], normalized=False)])
    tok.add_special_tokens({"additional_special_tokens": [EXTENSION[1]]})
    out = tmp_path_factory.mktemp("extending")
    tok.save_pretrained(out)
    return out


def mean_of_pieces(base: torch.Tensor, base_tok, text: str) -> torch.Tensor:
    pieces = base_tok.encode(text, add_special_tokens=False)
    assert len(pieces) > 1, f"{text!r} must be split by the base tokenizer"
    return base[pieces].float().mean(0)


def starting_rows(base: torch.Tensor, base_tok, tok, texts: list[str], rows: int) -> torch.Tensor:
    """What ``base`` grown to ``rows`` rows starts as: the base rows as they were, each new token's row (one per
    text, each a single token of ``tok``) the mean of its pieces' base rows, every padding row the mean of all."""
    n = base.shape[0]
    assert rows % 64 == 0 and len(tok) <= rows < len(tok) + 64, (rows, len(tok))
    assert len(tok) == n + len(texts)
    grown = base.float().mean(0).repeat(rows, 1)
    grown[:n] = base.float()
    for text in texts:
        (new_id,) = tok.encode(text, add_special_tokens=False)
        assert new_id >= n
        grown[new_id] = mean_of_pieces(base, base_tok, text)
    return grown


def assert_grown(got: torch.Tensor, base: torch.Tensor, base_tok, tok, texts: list[str], name: str) -> None:
    n = base.shape[0]
    assert torch.equal(got[:n], base.float()), f"{name}: the base rows changed"
    torch.testing.assert_close(got, starting_rows(base, base_tok, tok, texts, got.shape[0]), msg=name)


# --------------------------------------------------------------- the starting rows, under each engine, no step taken

ENGINES = {"zero3": ("deepspeed", "zero3.json"), "fsdp": ("fsdp", "fsdp.yaml"), "zero2": ("deepspeed", "zero2.json")}


def built_rows(recipes: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """On each rank: every recipe's engine built as the run builds it (tokenizer and config extended, engine from
    the grown config), then its embedding matrices gathered (rank 0 gets them)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.distributed as dist

    from launcher.engine import build_engine
    from launcher.launch import DistInfo
    from launcher.model import load_config, load_tokenizer
    from launcher.preflight import load_recipe
    from launcher.vocab import extend_vocabulary

    rank, world = dist.get_rank(), dist.get_world_size()
    # what torchrun tells each worker, which DeepSpeed reads
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    info = DistInfo(rank, world, rank, world, torch.device("cpu"), "torchrun")
    out = {}
    for name, path in recipes.items():
        recipe = load_recipe(path, world_size=world, check_files=True, ask_hub=False)
        plan = extend_vocabulary(recipe, load_tokenizer(recipe), load_config(recipe))
        engine = build_engine(recipe, info, recipe.batch_layout(world), plan.config, plan.extension)
        # numpy arrays travel back by value (a tensor would be shared memory of a process that is gone)
        out[name] = {k: v.numpy().copy() for k, v in engine.export_tensors() if k in (EMBED, HEAD)}
        del engine
    return out


def test_new_rows_start_as_the_mean_of_their_pieces_under_each_engine(
    assets, untied, extending_tokenizer, tmp_path
):  # fmt: skip
    from transformers import AutoTokenizer

    recipes = {}
    for engine, (kind, config) in ENGINES.items():
        for tie, base in (("tied", assets["base"]), ("untied", untied)):
            model = {"name_or_path": str(base), "tokenizer": str(extending_tokenizer), "add_tokens": ADD}
            tree = tiny_recipe(assets, tmp_path / f"{engine}-{tie}", model=model,
                               parallel={"engine": kind, "config": config, "nproc_per_node": 2})  # fmt: skip
            recipes[f"{engine}-{tie}"] = str(write_recipe(tmp_path / f"{engine}-{tie}.yaml", tree))
    got = run_distributed(built_rows, 2, recipes, timeout=300)[0]

    base_tok = AutoTokenizer.from_pretrained(assets["base"])
    tok = AutoTokenizer.from_pretrained(extending_tokenizer)
    tok.add_tokens(NEW)
    for name, arrays in got.items():
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
        source = tensors_of(assets["base"] if name.endswith("-tied") else untied)
        if name.endswith("-tied"):
            assert set(tensors) <= {EMBED, HEAD}
            if HEAD in tensors:  # a tied model's output projection is its embedding matrix
                assert torch.equal(tensors[HEAD], tensors[EMBED]), name
        else:
            assert not torch.equal(source[EMBED], source[HEAD]), "the untied model must have two matrices"
            assert_grown(tensors[HEAD], source[HEAD], base_tok, tok, EXTENSION + NEW, f"{name} {HEAD}")
        assert_grown(tensors[EMBED], source[EMBED], base_tok, tok, EXTENSION + NEW, f"{name} {EMBED}")


# ------------------------------------------------------------------------------------------- runs, end to end


RUN_TOKENS = {"zero3": NEW, "fsdp": EXTENSION + NEW[1:]}
"""The new tokens of each run, in id order."""


@pytest.fixture(scope="module")
def embeddings_runs(assets, untied, extending_tokenizer, tmp_path_factory) -> dict[str, tuple[Path, Path, str]]:
    """Two runs that train only the embeddings after growing them: ZeRO-3 on the tied model with
    ``model.add_tokens``; FSDP2 on the untied one with the extending tokenizer and one more token."""
    root = tmp_path_factory.mktemp("vocab-runs")
    runs = {}
    for name, base, model, parallel in (
        ("zero3", assets["base"], {"add_tokens": ADD}, {"engine": "deepspeed", "config": "zero3.json"}),
        ("fsdp", untied, {"tokenizer": str(extending_tokenizer), "add_tokens": [NEW[1]]},
         {"engine": "fsdp", "config": "fsdp.yaml"}),
    ):  # fmt: skip
        out = root / name
        tree = tiny_recipe(
            assets, out, model={"name_or_path": str(base), **model},
            train={"max_steps": 2, "lr": 1e-2, "warmup_steps": 0, "trainable": "embeddings"},
            eval={"sets": {}}, parallel={**parallel, "nproc_per_node": 2},
        )  # fmt: skip
        runs[name] = (out, base, cpt("run", str(write_recipe(root / f"{name}.yaml", tree))).stderr)
    return runs


@pytest.mark.parametrize("name, texts", RUN_TOKENS.items())
def test_the_run_exports_the_new_tokenizer_and_vocabulary(embeddings_runs, name, texts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, base, log = embeddings_runs[name]
    final = out / "final"
    tok = AutoTokenizer.from_pretrained(final)
    base_tok = AutoTokenizer.from_pretrained(base)
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] >= len(base_tok), (text, ids)
        assert ids[0] in tok.encode(f"x = {text} + y", add_special_tokens=False)
    # the checkpoint carries the same tokenizer and vocabulary as the export
    (checkpoint,) = (out / "checkpoints").glob("step-*")
    config = json.loads((final / "config.json").read_text())
    assert json.loads((checkpoint / "hf" / "config.json").read_text())["vocab_size"] == config["vocab_size"]
    assert len(AutoTokenizer.from_pretrained(checkpoint / "hf")) == len(tok)
    assert config["vocab_size"] % 64 == 0 and len(tok) <= config["vocab_size"] < len(tok) + 64
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert losses and all(math.isfinite(x) for x in losses)

    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.get_input_embeddings().weight.shape[0] == config["vocab_size"]
    prompt = tok(f"def f(self): {texts[-1]}", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4
    if name == "zero3":
        assert "'    ' is already one token of the vocabulary; skipped" in log
        assert "model.add_tokens[3]: 'return self' is listed twice" in log


@pytest.mark.parametrize("name, texts", RUN_TOKENS.items())
def test_training_only_the_embeddings_leaves_every_other_weight_as_it_was(embeddings_runs, name, texts):
    from transformers import AutoTokenizer

    out, base, _ = embeddings_runs[name]
    before, after = tensors_of(base), tensors_of(out / "final")
    assert set(after) == set(before)
    for key, value in before.items():
        if key not in (EMBED, HEAD):
            assert torch.equal(after[key], value), key
    tok, base_tok = AutoTokenizer.from_pretrained(out / "final"), AutoTokenizer.from_pretrained(base)
    for key in {EMBED, HEAD} & set(before):
        start = starting_rows(before[key], base_tok, tok, texts, after[key].shape[0])
        n = before[key].shape[0]
        assert not torch.allclose(after[key][:n], start[:n]), f"{key}: the base rows did not train"
        assert not torch.allclose(after[key][n:], start[n:]), f"{key}: the new rows did not train"


def test_a_second_stage_from_the_first_stages_final_trains_everything_at_the_grown_size(
    assets, embeddings_runs, tmp_path
):
    """Language adaptation's stage 2: the same recipe keys (``add_tokens``), ``model.init_from`` the first stage's
    ``final/``, every weight trained: the vocabulary is not grown twice, the rows start where stage 1 left them."""
    from transformers import AutoTokenizer

    first, base, _ = embeddings_runs["zero3"]
    out = tmp_path / "stage2"
    tree = tiny_recipe(
        assets, out, model={"name_or_path": str(base), "add_tokens": ADD, "init_from": str(first / "final")},
        train={"max_steps": 2, "lr": 1e-5, "warmup_steps": 0}, eval={"sets": {}},
        parallel={"engine": "fsdp", "config": "fsdp.yaml", "nproc_per_node": 1},
    )  # fmt: skip
    # one rank: the worker entry point by itself (a world of one, as test_branch.py runs it), without the cpt and
    # torchrun processes a launch would put around it
    run_command([sys.executable, "-m", "launcher.train", str(write_recipe(tmp_path / "r.yaml", tree))])
    stage1, stage2, start = tensors_of(first / "final"), tensors_of(out / "final"), tensors_of(base)
    assert stage2[EMBED].shape == stage1[EMBED].shape
    assert len(AutoTokenizer.from_pretrained(out / "final")) == len(AutoTokenizer.from_pretrained(first / "final"))
    # two steps at lr 1e-5 move a weight by about 2e-5; stage 1 (lr 1e-2) moved the rows much further
    torch.testing.assert_close(stage2[EMBED], stage1[EMBED], rtol=0, atol=1e-4)
    n = start[EMBED].shape[0]
    assert not torch.allclose(stage1[EMBED][:n], start[EMBED], atol=1e-3)
    moved = [k for k in start if k != EMBED and not torch.equal(stage2[k], start[k])]
    assert moved, "stage 2 trains every weight, not only the embeddings"


def test_the_plan_counts_the_grown_vocabulary(assets, tmp_path):
    from launcher.model import load_config
    from launcher.preflight import load_recipe, planned_vocabulary

    tree = tiny_recipe(assets, tmp_path / "out", model={"add_tokens": ADD})
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tree))
    config = load_config(recipe)
    grown, line = planned_vocabulary(recipe, config)
    assert (config.vocab_size, grown.vocab_size) == (512, 576)  # 512 + 2 new tokens, padded to a multiple of 64
    assert "from 512 to 576 rows" in line
    same, none = planned_vocabulary(load_recipe(write_recipe(tmp_path / "p.yaml", tiny_recipe(assets, tmp_path))),
                                    config)  # fmt: skip
    assert same is config and none is None


# ---------------------------------------------------------------------------------------- a random start, refusals


def test_a_random_start_with_added_tokens_pads_the_config(assets, tmp_path):
    from launcher.model import load_config, load_tokenizer
    from launcher.preflight import load_recipe
    from launcher.vocab import extend_vocabulary

    model = {"name_or_path": None, "from_config": str(assets["config"]), "tokenizer": str(assets["base"]),
             "add_tokens": NEW}  # fmt: skip
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(assets, tmp_path / "out", model=model)))
    tok, config = load_tokenizer(recipe), load_config(recipe)
    before = config.vocab_size
    plan = extend_vocabulary(recipe, tok, config)
    assert len(tok) == before + len(NEW)
    assert [len(tok.encode(t, add_special_tokens=False)) for t in NEW] == [1, 1]
    assert plan.config.vocab_size == 576  # 514 tokens, padded to the next multiple of 64
    assert plan.extension is None  # no base weights: every row is initialised as usual


def test_a_tokenizer_that_does_not_extend_the_base_is_refused_before_any_worker_starts(assets, tmp_path):
    from transformers import AutoTokenizer

    bad = tmp_path / "swapped"
    bad.mkdir()
    copy_tokenizer(assets["base"], bad)
    tree = json.loads((bad / "tokenizer.json").read_text())
    vocab = tree["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    vocab[by_id[300]], vocab[by_id[301]] = 301, 300
    (bad / "tokenizer.json").write_text(json.dumps(tree))
    assert AutoTokenizer.from_pretrained(bad).convert_ids_to_tokens(300) == by_id[301]

    out = tmp_path / "out"
    model = {"name_or_path": str(assets["base"]), "tokenizer": str(bad), "add_tokens": ["ok token", ""]}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(assets, out, model=model))
    p = subprocess.run([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=REPO, env=worker_env(),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 2, p.stderr[-3000:]
    assert "model.tokenizer:" in p.stderr and repr(by_id[300]) in p.stderr, p.stderr[-3000:]
    assert "model.add_tokens[1]: empty" in p.stderr
    assert "Traceback" not in p.stderr and "rank0" not in p.stderr, "refused by the workers, not before them"
    assert not out.exists()
