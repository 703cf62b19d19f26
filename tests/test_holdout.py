"""Held-out evaluation: a training source reserves its first documents for evaluation; no rank or DataLoader worker
trains on them, the eval set reads exactly them, resume stays exact, and an eval set that is training data is
warned about."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import read_metrics, run, tiny_recipe, write_recipe
from test_data import split_on
from transformers import AutoTokenizer

from launcher.config import ConfigError, SourceConfig, eval_overlap_warnings
from launcher.data import DataError, TrainStream, eval_blocks, pack
from launcher.preflight import load_recipe

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "rivers", "run", "to", "sea"]


@pytest.fixture(scope="module")
def tok(assets):
    """The byte-level BPE tokenizer of the test corpora."""
    return AutoTokenizer.from_pretrained(assets["tokenizer"])


def numbered(n: int) -> list[str]:
    """``n`` documents, each unique by its number, of different lengths (a blank one among them: it counts as a
    document of the source's order but holds no text)."""
    docs = [
        f"document {i:04d}: " + " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(1 + i % 6)) for i in range(n)
    ]
    docs[7] = "   "
    return docs


def write_corpus(root: Path, docs: list[str], sizes: list[int], row_group_size: int | None = None) -> None:
    """``docs`` in files of ``sizes`` documents, in order (the source's natural order is the files sorted by name)."""
    root.mkdir(parents=True)
    assert sum(sizes) == len(docs)
    start = 0
    for f, n in enumerate(sizes):
        part = docs[start : start + n]
        start += n
        if row_group_size:
            pq.write_table(pa.table({"text": part}), root / f"part-{f:02d}.parquet", row_group_size=row_group_size)
        else:
            (root / f"part-{f:02d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))


def ids(tok, text: str) -> tuple[int, ...]:
    return tuple(tok(text, add_special_tokens=False)["input_ids"])


def first_pass(stream: TrainStream, slots: int) -> list[tuple[int, ...]]:
    """The documents of one rank's first pass, from a stream of one token per batch (nothing is cut off)."""
    per_worker: list[list[int]] = [[] for _ in range(slots)]
    finished = [False] * slots
    for n, batch in enumerate(stream):
        worker = n % slots
        if stream.state_dict()["workers"][worker]["pass"] == 0:
            per_worker[worker].append(int(batch["input_ids"][0, 0]))
        else:
            finished[worker] = True
            if all(finished):
                break
    return [d for tokens in per_worker for d in split_on(tokens, stream.spec.eos_id)]


@pytest.mark.parametrize(
    ("sizes", "holdout", "world_size", "num_workers", "shuffle_buffer", "row_group_size"),
    [
        ([60], 9, 1, 0, 0, None),  # one rank, one file
        ([11, 13, 9, 17, 10], 15, 1, 2, 4, None),  # the holdout spans the first two files; shuffled
        ([11, 13, 9, 17, 10], 15, 2, 2, 0, None),  # two ranks x two workers: the first files shared or whole
        ([11, 13, 9, 17, 10], 15, 2, 1, 5, None),  # two ranks, shuffled file order and windows
        ([31], 20, 2, 2, 0, None),  # one file shared document by document by four readers
        ([45], 12, 2, 2, 0, 4),  # one Parquet file split per row group: the holdout spans three row groups
    ],
)
def test_training_skips_exactly_the_held_out_documents_and_the_eval_set_is_them(
    tmp_path, tok, sizes, holdout, world_size, num_workers, shuffle_buffer, row_group_size
):
    docs = numbered(sum(sizes))
    write_corpus(tmp_path / "c", docs, sizes, row_group_size)
    which = {ids(tok, d): i for i, d in enumerate(docs) if d.strip()}
    assert len(which) == len(docs) - 1, "the test documents must tokenize apart"
    source = SourceConfig(path=str(tmp_path / "c"), holdout_documents=holdout)

    trained: Counter = Counter()
    for rank in range(world_size):
        stream = TrainStream(
            [source], tok, seq_len=1, micro_batch_size=1, rank=rank, world_size=world_size, seed=sum(sizes),
            num_workers=num_workers, shuffle_buffer=shuffle_buffer,
        )  # fmt: skip
        trained.update(which[d] for d in first_pass(stream, max(1, num_workers)))
    held = set(range(holdout)) - {7}
    assert set(trained) == set(which.values()) - held  # every other document is trained on ...
    assert all(n == 1 for n in trained.values())  # ... once per pass
    assert not held & set(trained)

    # The eval set is those documents, in their order, whatever the world size.
    eos = tok.eos_token_id
    expected = [t for i in sorted(held) for t in [*ids(tok, docs[i]), eos]]
    for ranks in (1, 2, 3):
        blocks = [eval_blocks(source, tok, seq_len=16, rank=r, world_size=ranks) for r in range(ranks)]
        ordered = [blocks[i % ranks][i // ranks] for i in range(sum(map(len, blocks)))]
        assert [t for b in ordered for t in b] == expected


@pytest.mark.parametrize(("num_workers", "shuffle_buffer"), [(0, 0), (2, 4)])
def test_resume_with_a_holdout_is_exact(tmp_path, tok, num_workers, shuffle_buffer):
    docs = numbered(97)
    write_corpus(tmp_path / "c", docs, [23, 19, 28, 15, 12])  # the first file wholly held out
    sources = [SourceConfig(path=str(tmp_path / "c"), holdout_documents=30)]
    kw = dict(seq_len=8, micro_batch_size=2, world_size=2, rank=1, seed=3, num_workers=num_workers,
              shuffle_buffer=shuffle_buffer)  # fmt: skip
    k, m = 9, 60  # into the second pass over the rank's share
    reference = [b["input_ids"].tolist() for b in take(TrainStream(sources, tok, **kw), k + m)]
    first = TrainStream(sources, tok, **kw)
    assert [b["input_ids"].tolist() for b in take(first, k)] == reference[:k]
    state = json.loads(json.dumps(first.state_dict()))
    assert max(w["pass"] for w in state["workers"]) == 0 and state["layout"]["sources"][0]["holdout_documents"] == 30
    resumed = TrainStream(sources, tok, **kw)
    resumed.load_state_dict(state)
    rest = [b["input_ids"].tolist() for b in take(resumed, m)]
    assert rest == reference[k:]
    assert max(w["pass"] for w in resumed.state_dict()["workers"]) >= 1  # the held-out documents skipped again


def test_a_changed_holdout_is_a_changed_data_layout(tmp_path, tok, caplog):
    write_corpus(tmp_path / "c", numbered(40), [40])
    kw = dict(seq_len=8, micro_batch_size=2, world_size=1, rank=0, seed=3)
    saved = TrainStream([SourceConfig(path=str(tmp_path / "c"), holdout_documents=10)], tok, **kw)
    take(saved, 3)
    other = TrainStream([SourceConfig(path=str(tmp_path / "c"), holdout_documents=20)], tok, **kw)
    other.load_state_dict(saved.state_dict())
    assert "data layout changed" in caplog.text and "holdout_documents" in caplog.text


def test_a_holdout_of_the_whole_source_is_refused_by_name(tmp_path, tok):
    write_corpus(tmp_path / "c", numbered(12), [5, 7])
    for n in (12, 13):
        with pytest.raises(DataError, match=rf"{tmp_path / 'c'}: holdout_documents={n} holds out every document"):
            TrainStream([SourceConfig(path=str(tmp_path / "c"), holdout_documents=n)], tok, seq_len=4,
                        micro_batch_size=1, rank=0, world_size=1, seed=0)  # fmt: skip
    TrainStream([SourceConfig(path=str(tmp_path / "c"), holdout_documents=11)], tok, seq_len=4, micro_batch_size=1,
                rank=0, world_size=1, seed=0)  # fmt: skip


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- the recipe


def recipe(tmp_path: Path, train: list[dict], sets: dict[str, dict]) -> Path:
    tree = {"model": {"name_or_path": "org/m"}, "data": {"train": train}, "eval": {"sets": sets}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_held_out_source_is_an_eval_set_named_by_its_label(tmp_path):
    r = load_recipe(recipe(tmp_path, [{"path": "org/web", "holdout_documents": 50},
                                      {"path": "org/code", "label": "code", "holdout_documents": 5},
                                      {"path": "org/books"}],
                           {"other": {"path": "org/other"}}))  # fmt: skip
    sources = r.eval_sources()
    assert list(sources) == ["web", "code", "other"]
    assert (sources["web"].path, sources["web"].holdout_documents) == ("org/web", 50)
    assert (sources["code"].path, sources["code"].holdout_documents) == ("org/code", 5)


@pytest.mark.parametrize(
    ("train", "sets", "needle"),
    [
        ([{"path": "org/web", "holdout_documents": -1}], {}, "data.train[0].holdout_documents: must be >= 0, got -1"),
        ([{"path": "org/web"}], {"x": {"path": "org/y", "holdout_documents": 5}},
         "eval.sets.x.holdout_documents: only a training source holds documents out"),
        ([{"path": "org/web", "holdout_documents": 5}], {"web": {"path": "org/y"}},
         "eval.sets.web: this name is taken by the documents data.train[0] holds out"),
    ],
)  # fmt: skip
def test_bad_holdouts_are_named(tmp_path, train, sets, needle):
    with pytest.raises(ConfigError) as e:
        load_recipe(recipe(tmp_path, train, sets))
    assert any(needle in p for p in e.value.problems), e.value.problems


@pytest.mark.parametrize(
    ("train", "evaluated", "overlaps"),
    [
        ({"path": "org/web", "name": "a", "split": "train"}, {"path": "org/web", "name": "a", "split": "train"}, True),
        ({"path": "org/web", "name": "a", "split": "train"}, {"path": "org/web", "name": "a", "split": "test"}, False),
        ({"path": "org/web", "name": "a"}, {"path": "org/web", "name": "b"}, False),
        ({"path": "{d}/train.jsonl"}, {"path": "{d}/train.jsonl"}, True),
        ({"path": "{d}"}, {"path": "{d}/eval.jsonl"}, True),  # the training directory holds the eval file
        ({"path": "{d}/*.jsonl"}, {"path": "{d}/eval.jsonl"}, True),
        ({"path": "{d}/train.jsonl"}, {"path": "{d}/eval.jsonl"}, False),
        ({"path": "s3://b/web/*.jsonl"}, {"path": "s3://b/web/part-0.jsonl"}, True),
        ({"path": "s3://b/web/*.jsonl"}, {"path": "s3://b/other.jsonl"}, False),
    ],
)
def test_an_eval_set_that_is_training_data_is_warned_about(tmp_path, train, evaluated, overlaps):
    d = tmp_path / "data"
    d.mkdir()
    for name in ("train.jsonl", "eval.jsonl"):
        (d / name).write_text('{"text": "x"}\n')
    train = {k: v.format(d=d) for k, v in train.items()}
    evaluated = {k: v.format(d=d) for k, v in evaluated.items()}
    r = load_recipe(recipe(tmp_path, [train], {"ev": evaluated}))
    warnings = eval_overlap_warnings(r)
    assert bool(warnings) == overlaps, warnings
    if overlaps:
        assert warnings[0].startswith("eval.sets.ev reads the training data of data.train[0]")
        assert "set data.train[0].holdout_documents" in warnings[0]


def test_a_held_out_part_is_not_warned_about_and_the_shipped_recipe_holds_one_out(tmp_path):
    held = load_recipe(recipe(tmp_path, [{"path": "org/web", "holdout_documents": 100}], {}))
    assert list(held.eval_sources()) == ["web"] and eval_overlap_warnings(held) == []
    # Evaluating the whole source next to its held-out part still overlaps, and the warning says what exists.
    both = load_recipe(recipe(tmp_path, [{"path": "org/web", "holdout_documents": 100}], {"all": {"path": "org/web"}}))
    assert ["'web'" in w for w in eval_overlap_warnings(both)] == [True]
    from launcher.config import RECIPE_DIR

    shipped = load_recipe(RECIPE_DIR / "llama-1b-zero3.yaml")
    assert eval_overlap_warnings(shipped) == []
    fineweb = shipped.eval_sources()["fineweb"]
    assert (fineweb.path, fineweb.name, fineweb.split) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train")
    assert fineweb.holdout_documents > 0 and shipped.data.train == [fineweb]


# ------------------------------------------------------------------------------------------- a real run


def test_a_run_evaluates_the_held_out_documents_and_warns_once_about_training_data(assets, tmp_path, tok):
    """Two worker processes: the held-out set scores exactly the held-out tokens, the set that is the training
    file is warned about once (rank 0), and the card names the held-out set and the command the user ran."""
    docs = [json.loads(line)["text"] for line in assets["code_train"].read_text().splitlines()][:60]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        assets, out,
        data={"train": [{"path": str(train), "label": "code", "holdout_documents": 6}], "seq_len": 64,
              "num_workers": 0},
        train={"max_steps": 2, "micro_batch_size": 2, "save_every": 0, "export_final": False},
        eval={"sets": {"whole": {"path": str(train)}}, "max_blocks": None},
    ))  # fmt: skip
    # As an outer command (cpt quickstart, a wrapper script) leaves it for the workers.
    p = run([sys.executable, "-m", "launcher", "run", str(path)], CPT_COMMAND="cpt quickstart --fast")
    log = p.stdout + p.stderr
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results) == {"code", "whole"}
    base = AutoTokenizer.from_pretrained(assets["base"])
    stream = [t for d in docs[:6] if d.strip() for t in [*ids(base, d), base.eos_token_id]]
    blocks = list(pack([stream], 64, keep_partial=True))
    assert results["code"]["tokens"] == len(stream) - len(blocks)
    warned = [line for line in log.splitlines() if "eval.sets.whole reads the training data of data.train[0]" in line]
    assert [line for line in warned if "[rank" in line and "[rank0]" not in line] == [], warned
    assert len([line for line in warned if "[rank0]" in line]) == 1, log[-3000:]
    assert "eval.sets.code" not in log
    assert any("eval" in m and "code" in m["eval"] for m in read_metrics(out))
    card = (out / "README.md").read_text()
    assert "first 6 documents held out as eval set code" in card
    assert "## Command\n\n```bash\ncpt quickstart --fast\n```" in card
