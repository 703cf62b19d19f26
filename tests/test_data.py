"""The data pipeline: formats, packing, sharding and coverage, mixtures and stopping rules, exact resume, document
masking, eval splitting."""

from __future__ import annotations

import gzip
import json
import os
import random
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from launcher.config import ConfigError, SourceConfig
from launcher.data import (
    DataError,
    TrainStream,
    assign_parts,
    check_sources,
    document_position_ids,
    eval_blocks,
    open_source,
    pack,
    source_labels,
    tokenize_documents,
)
from launcher.data.packing import Packer
from launcher.data.spec import budgets_of
from launcher.preflight import load_recipe

VOCAB = [f"w{i}" for i in range(400)]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on the words the test corpora are made of: one token per word."""
    t = Tokenizer(models.WordLevel(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.train_from_iterator([" ".join(VOCAB)] * 2, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="<unk>")


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "meta": i}) + "\n" for i, t in enumerate(texts)))
    return path


def make_corpus(root: Path, sizes: list[int], row_group_size: int | None = None) -> list[str]:
    """Files of the given document counts; every document is unique (its file and index words) and they
    differ in length, so a lost, duplicated or split document shows up. With ``row_group_size``, Parquet files
    of row groups that size instead of JSON Lines."""
    root.mkdir(parents=True, exist_ok=True)
    docs = []
    for f, n in enumerate(sizes):
        texts = []
        for d in range(n):
            filler = " ".join(f"w{300 + (f * 31 + d * 7 + j) % 90}" for j in range((f + d) % 5))
            texts.append(f"w{f} w{20 + d} {filler}".strip())
        if row_group_size:
            pq.write_table(pa.table({"text": texts}), root / f"part-{f:02d}.parquet", row_group_size=row_group_size)
        else:
            write_jsonl(root / f"part-{f:02d}.jsonl", texts)
        docs += texts
    return docs


def split_on(tokens: list[int], eos: int) -> list[tuple[int, ...]]:
    docs, cur = [], []
    for t in tokens:
        if t == eos:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    assert not cur, "a pass must end with the EOS of its last document"
    return docs


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["input_ids"].tolist() == y["input_ids"].tolist()
        assert x["labels"].tolist() == y["labels"].tolist()


# ----------------------------------------------------------------------------------------------- pack


def test_pack_exact_blocks():
    docs = [[1, 2, 3], [], [4, 5], [6, 7, 8, 9, 10, 11]]
    # stream: 1 2 3 E 4 5 E 6 7 8 9 10 11 E  (E=0, the empty document adds nothing)
    assert list(pack(docs, 4, keep_partial=True, eos_id=0)) == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10], [11, 0]]
    assert list(pack(docs, 4, keep_partial=False, eos_id=0)) == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10]]
    assert list(pack(docs, 7, keep_partial=False, eos_id=0)) == [[1, 2, 3, 0, 4, 5, 0], [6, 7, 8, 9, 10, 11, 0]]
    assert list(pack(docs, 7, keep_partial=True, eos_id=0)) == [[1, 2, 3, 0, 4, 5, 0], [6, 7, 8, 9, 10, 11, 0]]
    # Without eos_id documents are concatenated as given.
    assert list(pack([[1, 2], [3]], 2, keep_partial=True)) == [[1, 2], [3]]
    assert list(pack([], 3, keep_partial=True, eos_id=0)) == []
    with pytest.raises(ValueError):
        list(pack(docs, 0, keep_partial=True))


@pytest.mark.parametrize("seed", range(5))
def test_pack_is_a_lossless_cut(seed):
    rng = random.Random(seed)
    docs = [[rng.randrange(1, 50) for _ in range(rng.choice([0, 0, 1, 3, 9, 20]))] for _ in range(40)]
    seq_len = rng.randrange(1, 12)
    stream = [t for d in docs if d for t in [*d, 99]]
    kept = list(pack(docs, seq_len, keep_partial=True, eos_id=99))
    assert [t for b in kept for t in b] == stream
    assert all(len(b) == seq_len for b in kept[:-1]) and 0 < len(kept[-1]) <= seq_len
    dropped = list(pack(docs, seq_len, keep_partial=False, eos_id=99))
    assert dropped == [b for b in kept if len(b) == seq_len]
    assert len(dropped) == len(stream) // seq_len


@pytest.mark.parametrize("compact", [3, Packer.COMPACT])
def test_packer_cuts_the_stream_and_rebuilds_from_its_pending_documents(monkeypatch, compact):
    """The packing core training and evaluation share: cuts of any length are the documents with EOS, in order,
    counted per source; a packer rebuilt from ``pending`` (each document's position and how far it was cut, as a
    resume rebuilds it) continues the same stream. A small ``compact`` compacts the token list all the time."""
    monkeypatch.setattr(Packer, "COMPACT", compact)
    rng = random.Random(compact)
    eos = 1
    docs = [(rng.randrange(2), [rng.randrange(2, 50) for _ in range(rng.choice([0, 1, 7, 40]))]) for _ in range(150)]
    flat = [(source, t) for source, doc in docs for t in [*doc, eos]]
    packer = Packer(eos, num_sources=2)
    done, drawn, rebuilt = 0, 0, 0
    while done < len(flat):
        n = rng.randrange(1, 30)
        while packer.size < n and drawn < len(docs):
            source, doc = docs[drawn]
            assert packer.add(doc, source, drawn) == len(doc) + 1
            drawn += 1
        n = min(n, packer.size)
        if packer.pending and done > rebuilt + 200:  # now and then, the rest from a packer rebuilt here
            again = Packer(eos, num_sources=2)
            for g in packer.pending:
                again.add(docs[g.position][1], g.source, g.position, start=g.start)
            assert again.size == packer.size
            rest = flat[done : done + again.size]
            assert again.cut(again.size) == ([t for _, t in rest], [sum(s == k for s, _ in rest) for k in range(2)])
            rebuilt = done
        ids, counts = packer.cut(n)
        expected = flat[done : done + n]
        assert ids == [t for _, t in expected]
        assert counts == [sum(s == k for s, _ in expected) for k in range(2)]
        done += n
    assert rebuilt and not packer.pending and packer.size == 0
    blocks = list(pack([doc for _, doc in docs], 5, keep_partial=True, eos_id=eos))
    assert [t for b in blocks for t in b] == [t for _, doc in docs if doc for t in [*doc, eos]]


def test_tokenize_skips_blank_documents_and_eos_follows_each(tok):
    eos = tok.eos_token_id
    texts = ["w1 w2", "", "   ", "\n\t", "w3", "w4 w5 w6"]
    blocks = list(pack(tokenize_documents(texts, tok), 3, keep_partial=True, eos_id=eos))
    flat = [t for b in blocks for t in b]
    assert flat == ids(tok, "w1 w2") + [eos] + ids(tok, "w3") + [eos] + ids(tok, "w4 w5 w6") + [eos]
    assert flat.count(eos) == 3
    assert [len(b) for b in blocks] == [3, 3, 3]


# --------------------------------------------------------------------------------------------- sources


TEXTS = ["w1 w2 w3", "w4", "w5 w6"]


def _jsonl(p: Path) -> Path:
    return write_jsonl(p / "a.jsonl", TEXTS)


def _json_array(p: Path) -> Path:
    (p / "a.json").write_text(json.dumps([{"text": t, "n": i} for i, t in enumerate(TEXTS)]))
    return p / "a.json"


def _parquet(p: Path) -> Path:
    pq.write_table(pa.table({"id": [1, 2, 3], "text": TEXTS}), p / "a.parquet")
    return p / "a.parquet"


def _txt(p: Path) -> Path:
    (p / "a.txt").write_text("\n".join(TEXTS) + "\n")
    return p / "a.txt"


def _gz(p: Path) -> Path:
    with gzip.open(p / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in TEXTS)
    return p / "a.jsonl.gz"


def _zst(p: Path) -> Path:
    raw = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()
    (p / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    return p / "a.jsonl.zst"


def _glob(p: Path) -> str:
    (p / "d").mkdir()
    write_jsonl(p / "d" / "x1.jsonl", TEXTS[:1])
    write_jsonl(p / "d" / "x2.jsonl", TEXTS[1:])
    (p / "d" / "notes.md").write_text("not data")
    return str(p / "d" / "*.jsonl")


def _directory(p: Path) -> Path:
    (p / "d" / "sub").mkdir(parents=True)
    write_jsonl(p / "d" / "a.jsonl", TEXTS[:2])
    write_jsonl(p / "d" / "sub" / "b.jsonl", TEXTS[2:])
    (p / "d" / "README.md").write_text("not data")
    (p / "d" / "_SUCCESS").write_text("")
    return p / "d"


@pytest.mark.parametrize("make", [_jsonl, _json_array, _parquet, _txt, _gz, _zst, _glob, _directory])
def test_open_source_formats(tmp_path, make):
    ds = open_source(SourceConfig(path=str(make(tmp_path))))
    rows = list(ds)
    assert [r["text"] for r in rows] == TEXTS
    assert all(list(r) == ["text"] for r in rows)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_open_source_custom_text_field(tmp_path, fmt):
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "a.jsonl", TEXTS, field="body")
    else:
        path = tmp_path / "a.parquet"
        pq.write_table(pa.table({"body": TEXTS, "text": ["x", "y", "z"]}), path)
    rows = list(open_source(SourceConfig(path=str(path), text_field="body")))
    assert rows == [{"text": t} for t in TEXTS]


def test_open_source_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        open_source(SourceConfig(path=str(missing)))
    csv = tmp_path / "a.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"a\.csv: unknown extension"):
        open_source(SourceConfig(path=str(csv)))
    with pytest.raises(DataError, match=r"nothing-\*\.jsonl: no file matches"):
        open_source(SourceConfig(path=str(tmp_path / "nothing-*.jsonl")))
    body = write_jsonl(tmp_path / "body.jsonl", TEXTS, field="body")
    with pytest.raises(DataError, match=r"body\.jsonl.*'text'.*body"):
        open_source(SourceConfig(path=str(body)))
    pq.write_table(pa.table({"content": TEXTS}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet.*no column 'text'.*content"):
        open_source(SourceConfig(path=str(tmp_path / "c.parquet")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: the directory holds no data file"):
        open_source(SourceConfig(path=str(tmp_path / "empty")))


def test_local_sources_do_not_touch_the_network(tmp_path, tok, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a local-data test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    for make in (_jsonl, _parquet, _txt, _zst):
        list(open_source(SourceConfig(path=str(make(tmp_path)))))
    eval_blocks(SourceConfig(path=str(tmp_path / "a.jsonl")), tok, seq_len=4, rank=0, world_size=1)
    assert attempts == []


def test_bad_first_line_fails_at_open(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": oops}\n{"text": "w1"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 1: malformed JSON"):
        open_source(SourceConfig(path=str(bad)))


def test_check_sources(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", TEXTS)
    (tmp_path / "a.csv").write_text("x")
    problems = check_sources(
        [
            SourceConfig(path=str(good)),
            SourceConfig(path=str(tmp_path / "missing.jsonl")),
            SourceConfig(path=str(tmp_path / "a.csv")),
            SourceConfig(path=str(tmp_path / "none-*.parquet")),
            SourceConfig(path="some-org/some-dataset"),  # hub id: not contacted
            SourceConfig(path="s3://bucket/data/*.jsonl.zst"),  # URL: not contacted
        ]
    )
    assert len(problems) == 3
    assert "missing.jsonl" in problems[0] and "a.csv" in problems[1] and "none-*.parquet" in problems[2]


# -------------------------------------------------------------------------------------- worker errors


def _stream(paths, tok, **kw):
    args = dict(seq_len=4, micro_batch_size=2, rank=0, world_size=1, seed=0, num_workers=2)
    args.update(kw)
    return TrainStream([SourceConfig(path=str(p)) for p in paths], tok, **args)


def test_bad_json_line_reaches_the_user_with_file_and_line(tmp_path, tok):
    make_corpus(tmp_path / "c", [5, 5, 5])
    bad = tmp_path / "c" / "part-02.jsonl"
    lines = bad.read_text().splitlines()
    lines.insert(3, '{"text": "w1 w2", broken')
    bad.write_text("\n".join(lines) + "\n")
    stream = _stream([tmp_path / "c"], tok)
    with pytest.raises(DataError, match=r"part-02\.jsonl, line 4: malformed JSON") as e:
        for _ in stream:
            pass
    assert "Traceback" not in str(e.value) and str(tmp_path / "c") in str(e.value)
    with pytest.raises(DataError, match=r"part-02\.jsonl, line 4: malformed JSON"):
        eval_blocks(SourceConfig(path=str(tmp_path / "c")), tok, seq_len=4, rank=0, world_size=1)


def test_missing_field_in_a_later_record(tmp_path, tok):
    make_corpus(tmp_path / "c", [5, 5])
    with open(tmp_path / "c" / "part-01.jsonl", "a") as f:
        f.write(json.dumps({"body": "w3"}) + "\n")
    stream = _stream([tmp_path / "c"], tok, num_workers=0)
    with pytest.raises(DataError, match=r"part-01\.jsonl, line 6: no field 'text'"):
        for _ in stream:
            pass


def test_too_small_for_seq_len(tmp_path, tok):
    make_corpus(tmp_path / "c", [2])
    stream = _stream([tmp_path / "c"], tok, seq_len=1000, num_workers=0)
    with pytest.raises(DataError, match=r"too small.*") as e:
        next(iter(stream))
    assert str(tmp_path / "c") in str(e.value)


def test_batches_are_the_packed_stream(tmp_path, tok):
    corpus = make_corpus(tmp_path / "c", [6, 5])
    stream = _stream([tmp_path / "c"], tok, seq_len=5, micro_batch_size=3, num_workers=0)
    tokens = [t for d in corpus for t in [*ids(tok, d), tok.eos_token_id]]
    n = len(tokens) // 15  # complete micro-batches in one pass
    assert n >= 2
    for i, batch in enumerate(_take(stream, n)):
        assert batch["input_ids"].shape == (3, 5) and batch["input_ids"].dtype == torch.long
        assert batch["input_ids"].flatten().tolist() == tokens[15 * i : 15 * (i + 1)]
        assert torch.equal(batch["labels"], batch["input_ids"])


# --------------------------------------------------------------------------------------------- coverage


class RecordingTokenizer:
    """Logs every text it tokenizes to a file per process, to see which rank and worker read what."""

    def __init__(self, inner, log_dir: Path):
        self.inner = inner
        self.log_dir = log_dir
        self.eos_token_id = inner.eos_token_id

    def __call__(self, texts, **kwargs):
        with open(self.log_dir / f"{os.getpid()}.txt", "a") as f:
            f.writelines(t + "\n" for t in texts)
        return self.inner(texts, **kwargs)


@pytest.mark.parametrize(
    ("sizes", "world_size", "num_workers", "shuffle_buffer", "row_group_size"),
    [
        ([7, 9, 11, 13, 15], 2, 2, 0, None),  # 5 files, 4 readers: one whole file each, the fifth shared by all
        ([9, 13, 11, 7], 2, 2, 0, None),  # 4 files: one whole file per reader
        ([31], 2, 2, 0, None),  # 1 file: every fourth document per reader
        ([7, 9, 11, 13, 15], 3, 0, 0, None),  # 3 readers: one whole file each, the last two shared
        ([7, 9, 11, 13, 15, 5, 6], 2, 2, 4, None),  # shuffled file order and windows
        ([23], 2, 2, 0, 4),  # one Parquet file of 6 row groups: split per row group, not per document
    ],
)
def test_one_pass_reads_every_document_exactly_once(
    tmp_path, tok, sizes, world_size, num_workers, shuffle_buffer, row_group_size
):
    corpus = make_corpus(tmp_path / "c", sizes, row_group_size)
    eos = tok.eos_token_id
    slots = max(1, num_workers)
    seen: Counter = Counter()
    tokenized_by_rank = []
    for rank in range(world_size):
        log_dir = tmp_path / f"log-{rank}"
        log_dir.mkdir()
        stream = TrainStream(
            [SourceConfig(path=str(tmp_path / "c"))],
            RecordingTokenizer(tok, log_dir),
            seq_len=1,  # one token per block: a pass loses nothing, so it must reproduce the documents exactly
            micro_batch_size=1,
            rank=rank,
            world_size=world_size,
            seed=0,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
        )
        if row_group_size:
            assert stream._sources[0].num_shards == -(-sum(sizes) // row_group_size)
        per_worker: list[list[int]] = [[] for _ in range(slots)]
        finished = [False] * slots
        for n, batch in enumerate(stream):
            assert batch["input_ids"].shape == (1, 1) and batch["input_ids"].dtype == torch.long
            assert batch["labels"].tolist() == batch["input_ids"].tolist()
            worker = n % slots
            epoch = stream.state_dict()["workers"][worker]["pass"]
            if epoch == 0:
                per_worker[worker].append(int(batch["input_ids"][0, 0]))
            else:
                finished[worker] = True
                if all(finished):
                    break
        for tokens in per_worker:
            seen.update(split_on(tokens, eos))
        logs = [set(p.read_text().splitlines()) for p in log_dir.iterdir()]
        if shuffle_buffer:
            continue  # the logs also hold the start of the next pass, whose shuffled files go to other readers
        if num_workers > 1:
            assert len(logs) == num_workers and not set.intersection(*logs), "workers tokenized the same document"
        tokenized_by_rank.append(set().union(*logs))
    assert seen == Counter(tuple(ids(tok, d)) for d in corpus)
    if shuffle_buffer:
        return
    assert set().union(*tokenized_by_rank) == set(corpus)
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not tokenized_by_rank[a] & tokenized_by_rank[b], "two ranks tokenized the same document"


# ----------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(("num_workers", "shuffle_buffer"), [(0, 0), (0, 16), (2, 16), (2, 0)])
def test_resume_is_exact(tmp_path, tok, num_workers, shuffle_buffer):
    make_corpus(tmp_path / "c", [19, 23, 17])
    kw = dict(
        seq_len=8, micro_batch_size=2, world_size=2, seed=3, num_workers=num_workers, shuffle_buffer=shuffle_buffer
    )
    sources = [SourceConfig(path=str(tmp_path / "c"))]
    k, m = 11, 14  # several passes over each worker's share, and k not a multiple of the worker count
    reference = _take(TrainStream(sources, tok, rank=1, **kw), k + m)
    assert len({tuple(b["input_ids"].flatten().tolist()) for b in reference}) >= 3

    first = TrainStream(sources, tok, rank=1, **kw)
    _same(_take(first, k), reference[:k])
    state = json.loads(json.dumps(first.state_dict()))
    assert state["batches"] == k and max(w["pass"] for w in state["workers"]) >= 1

    resumed = TrainStream(sources, tok, rank=1, **kw)  # load before any iteration
    resumed.load_state_dict(state)
    _same(_take(resumed, m), reference[k:])

    busy = TrainStream(sources, tok, rank=1, **kw)  # load after iterating elsewhere
    _take(busy, 3)
    busy.load_state_dict(state)
    _same(_take(busy, m), reference[k:])
    assert busy.state_dict()["batches"] == k + m

    # Continuing after a fresh iter() picks up where the previous iterator stopped.
    again = TrainStream(sources, tok, rank=1, **kw)
    _same(_take(again, 5) + _take(again, k + m - 5), reference)

    # Rank 0's state loaded on rank 1 (only the count carries over) is still exact for rank 1.
    other = TrainStream(sources, tok, rank=0, **kw)
    _take(other, k)
    from_rank0 = TrainStream(sources, tok, rank=1, **kw)
    from_rank0.load_state_dict(other.state_dict())
    _same(_take(from_rank0, m), reference[k:])


def test_shuffle_changes_order_between_epochs_and_seeds(tmp_path, tok):
    make_corpus(tmp_path / "c", [40])
    sources = [SourceConfig(path=str(tmp_path / "c"))]

    def first_tokens(seed, shuffle_buffer, n=30):
        s = TrainStream(
            sources, tok, seq_len=4, micro_batch_size=1, rank=0, world_size=1, seed=seed, shuffle_buffer=shuffle_buffer
        )
        return [b["input_ids"].flatten().tolist() for b in _take(s, n)]

    plain, shuffled = first_tokens(0, 0), first_tokens(0, 16)
    assert plain != shuffled
    assert shuffled == first_tokens(0, 16)
    assert shuffled != first_tokens(1, 16)


# -------------------------------------------------------------------------------------------------- eval


def test_eval_blocks_are_world_size_invariant(tmp_path, tok):
    corpus = make_corpus(tmp_path / "c", [7, 8, 6])
    src = SourceConfig(path=str(tmp_path / "c"))
    eos = tok.eos_token_id
    stream = [t for d in corpus for t in [*ids(tok, d), eos]]
    seq_len = 5
    assert len(stream) % seq_len, "the corpus must leave a partial block for this test"
    single = eval_blocks(src, tok, seq_len=seq_len, rank=0, world_size=1)
    assert [t for b in single for t in b] == stream
    assert len(single[-1]) == len(stream) % seq_len and all(len(b) == seq_len for b in single[:-1])
    for world_size in (2, 3):
        parts = [eval_blocks(src, tok, seq_len=seq_len, rank=r, world_size=world_size) for r in range(world_size)]
        for r, part in enumerate(parts):
            assert part == single[r::world_size]
        assert sum(len(p) for p in parts) == len(single)
    capped = [eval_blocks(src, tok, seq_len=seq_len, rank=r, world_size=2, max_blocks=3) for r in range(2)]
    assert capped == [single[0:3:2], single[1:3:2]]


def test_eval_empty_set_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "blank.jsonl", ["", "  ", "\n"])
    with pytest.raises(DataError, match="blank.jsonl: no text"):
        eval_blocks(SourceConfig(path=str(path)), tok, seq_len=4, rank=0, world_size=1)


# ------------------------------------------------------------------------------------------------ mixing


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 2)])
def test_mixture_follows_the_weights_in_tokens(tmp_path, tok, world_size, num_workers):
    """Weights are shares of the tokens, also when one source's documents are 6 times longer than the other's:
    drawing documents by weight would give the long ones 93% of the tokens instead of 70%."""
    for name, word, n_words in (("long", "w1", 11), ("short", "w2", 1)):
        for f in range(3):
            write_jsonl(tmp_path / f"{name}-{f}.jsonl", [" ".join([word] * n_words)] * 1000)
    sources = [
        SourceConfig(path=str(tmp_path / "long-*.jsonl"), weight=7, label="long"),
        SourceConfig(path=str(tmp_path / "short-*.jsonl"), weight=3, label="short"),
    ]
    long_id, short_id = ids(tok, "w1")[0], ids(tok, "w2")[0]
    for rank in range(world_size):
        stream = TrainStream(sources, tok, seq_len=16, micro_batch_size=4, rank=rank, world_size=world_size, seed=0,
                             num_workers=num_workers)  # fmt: skip
        owner, counts = None, Counter()
        for n, batch in enumerate(_take_each(stream, 60)):  # before any source runs out
            for t in batch["input_ids"].flatten().tolist():
                owner = {long_id: "long", short_id: "short"}.get(t, owner)  # EOS: the document before it
                counts[owner] += 1
            share = counts["long"] / (counts["long"] + counts["short"])
            # Each reader stays within a document (12 tokens) of its 70%; the rank's batches alternate readers.
            assert abs(share - 0.7) <= 12 * max(1, num_workers) / (64 * (n + 1)) + 1e-9, (n, share)
            metrics = stream.gather_metrics()
            assert metrics["data/mix/long"] == pytest.approx(share)
            assert metrics["data/mix/short"] == pytest.approx(1 - share)


def test_mixture_metrics_report_the_consumed_tokens(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", [" ".join(["w1"] * (1 + i % 7)) for i in range(500)])
    write_jsonl(tmp_path / "b.jsonl", [" ".join(["w2"] * (1 + i % 5)) for i in range(500)])
    sources = [
        SourceConfig(path=str(tmp_path / "a.jsonl"), weight=3),
        SourceConfig(path=str(tmp_path / "b.jsonl"), weight=1, label="replay"),
    ]
    stream = TrainStream(sources, tok, seq_len=8, micro_batch_size=2, rank=0, world_size=1, seed=0, num_workers=2)
    # Before any batch is consumed there is no mixture to report, and the hash is the hash of no tokens: the same
    # for a stream of other sources and settings.
    other = TrainStream(sources[1:], tok, seq_len=4, micro_batch_size=1, rank=0, world_size=1, seed=9)
    nothing = other.gather_metrics()
    assert set(nothing) == {"data/batch_hash"}
    assert stream.gather_metrics() == nothing
    a_id, b_id = ids(tok, "w1")[0], ids(tok, "w2")[0]
    counts: Counter = Counter()
    previous = []
    for batch in _take(stream, 30):
        flat = batch["input_ids"].flatten().tolist()
        # EOS belongs to the document before it; a block may start with the EOS of a document cut by the last one.
        owner = previous[-1] if previous else None
        for t in flat:
            owner = {a_id: "a", b_id: "replay"}.get(t, owner)
            counts[owner] += 1
            previous = [owner]
    m = stream.gather_metrics()
    assert set(m) == {"data/mix/a", "data/mix/replay", "data/batch_hash", "data/epochs/a", "data/epochs/replay"}
    # 480 tokens of sources of about 2,500 and 1,500: neither has been read to its end
    assert m["data/epochs/a"] == m["data/epochs/replay"] == 0
    assert m["data/batch_hash"] != nothing["data/batch_hash"]
    assert m["data/mix/a"] == pytest.approx(counts["a"] / (30 * 16))
    assert m["data/mix/replay"] == pytest.approx(counts["replay"] / (30 * 16))
    assert m["data/mix/a"] + m["data/mix/replay"] == pytest.approx(1.0)
    state = json.loads(json.dumps(stream.state_dict()))
    assert state["source_tokens"] == [counts["a"], counts["replay"]]
    again = TrainStream(sources, tok, seq_len=8, micro_batch_size=2, rank=0, world_size=1, seed=0, num_workers=2)
    again.load_state_dict(state)
    assert again.gather_metrics() == m


def test_batch_hash_follows_the_data(tmp_path, tok):
    make_corpus(tmp_path / "c", [30, 20])
    sources = [SourceConfig(path=str(tmp_path / "c"))]

    def hashes(seed, n=8, **kw):
        s = TrainStream(sources, tok, seq_len=6, micro_batch_size=2, rank=0, world_size=1, seed=seed, **kw)
        out = []
        for _ in _take_each(s, n):
            out.append(s.gather_metrics()["data/batch_hash"])
        return out

    a = hashes(0)
    assert len(set(a)) == len(a) and all(isinstance(h, int) and 0 <= h < 2**48 for h in a)
    assert hashes(0) == a
    assert hashes(0, num_workers=2) != a  # another reader layout is another data order
    assert hashes(0, shuffle_buffer=8) != hashes(1, shuffle_buffer=8)


def _take_each(stream, n):
    it = iter(stream)
    for _ in range(n):
        yield next(it)


# ---------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("num_readers", [1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 8, 13])
def test_assign_parts_partitions_every_shard(num_shards, num_readers):
    docs = {s: 11 + 3 * s for s in range(num_shards)}  # documents per shard
    order = list(range(num_shards))
    random.Random(num_shards * 100 + num_readers).shuffle(order)
    for shuffled in (None, order):
        taken: Counter = Counter()
        shares = []
        for reader in range(num_readers):
            parts = assign_parts(num_shards, num_readers, reader, shuffled)
            assert sum(p.stride > 1 for p in parts) <= 1, "a reader shares at most one shard with others"
            assert len(parts) <= num_shards // num_readers + 1
            mine = [(p.shard, d) for p in parts for d in range(p.offset, docs[p.shard], p.stride)]
            taken.update(mine)
            shares.append(sum(1 / p.stride for p in parts))
        assert taken == Counter((s, d) for s in range(num_shards) for d in range(docs[s]))
        left = num_shards % num_readers  # shards shared by groups of readers
        if left == 0:
            assert max(shares) == min(shares) == num_shards // num_readers
        else:
            assert max(shares) - min(shares) <= 1 / (num_readers // left) + 1e-9


def test_assign_parts_rejects_bad_input():
    with pytest.raises(ValueError):
        assign_parts(3, 2, 2)
    with pytest.raises(ValueError):
        assign_parts(3, 2, 0, order=[0, 0, 1])


def test_a_reader_without_documents_is_an_error(tmp_path, tok):
    write_jsonl(tmp_path / "two.jsonl", ["w1 w2", "w3"])
    stream = _stream([tmp_path / "two.jsonl"], tok, world_size=2, rank=1, num_workers=2)
    with pytest.raises(DataError, match=r"two\.jsonl has no text for this reader.*4 readers"):
        next(iter(stream))


# ---------------------------------------------------------------------------------------------- stopping

A_DOCS = [f"w{i} w{50 + i}" for i in range(12)]  # 12 documents of 3 tokens (EOS included)
B_DOCS = [f"w{100 + j}" + f" w{250 + j}" * (j % 3) for j in range(40)]  # 40 documents of 2 to 4 tokens


def _doc_sequence(tmp_path, tok, n_batches, **kw):
    """The documents a single reader consumes, as (source, index), and the stream."""
    write_jsonl(tmp_path / "a.jsonl", A_DOCS)
    write_jsonl(tmp_path / "b.jsonl", B_DOCS)
    weights = kw.pop("weights", (1, 1))
    budgets = kw.pop("budgets", (None, None))
    sources = [
        SourceConfig(path=str(tmp_path / "a.jsonl"), weight=weights[0], token_budget=budgets[0]),
        SourceConfig(path=str(tmp_path / "b.jsonl"), weight=weights[1], token_budget=budgets[1]),
    ]
    stream = TrainStream(sources, tok, seq_len=8, micro_batch_size=2, rank=0, world_size=1, seed=5, **kw)
    tokens = [t for b in _take(stream, n_batches) for t in b["input_ids"].flatten().tolist()]
    tokens = tokens[: len(tokens) - tokens[::-1].index(tok.eos_token_id)]  # whole documents only
    which = {tuple(ids(tok, d)): ("a", i) for i, d in enumerate(A_DOCS)}
    which.update({tuple(ids(tok, d)): ("b", j) for j, d in enumerate(B_DOCS)})
    return [which[d] for d in split_on(tokens, tok.eos_token_id)], stream


def _runs(indices: list[int]) -> list[list[int]]:
    """Split a source's document indices where they restart (go back)."""
    runs: list[list[int]] = [[]]
    for i in indices:
        if runs[-1] and i <= runs[-1][-1]:
            runs.append([])
        runs[-1].append(i)
    return runs


def test_all_exhausted_repeats_the_smaller_source_and_cuts_none(tmp_path, tok):
    seq, stream = _doc_sequence(tmp_path, tok, 60, stopping="all_exhausted")
    a = [i for s, i in seq if s == "a"]
    b = [j for s, j in seq if s == "b"]
    # Each source is read cycle after cycle, each cycle whole and in order (no shuffle): nothing is cut off.
    for indices, n in ((a, len(A_DOCS)), (b, len(B_DOCS))):
        runs = _runs(indices)
        assert all(r == list(range(n)) for r in runs[:-1]) and runs[-1] == list(range(len(runs[-1])))
    assert len(_runs(a)) >= 3 * len(_runs(b)) - 1  # the small source repeats while the large one is read
    # A pass ends when both sources ran out at least once (the last documents drawn may not be consumed yet).
    passes = stream.state_dict()["workers"][0]["pass"]
    assert len(_runs(b)) - 1 <= passes <= len(_runs(b)) and passes >= 2
    # Mixed by tokens: equal weights give equal token counts, within a document or so per pass.
    lengths = {("a", i): len(ids(tok, d)) + 1 for i, d in enumerate(A_DOCS)}
    lengths.update({("b", j): len(ids(tok, d)) + 1 for j, d in enumerate(B_DOCS)})
    ta = sum(lengths[d] for d in seq if d[0] == "a")
    tb = sum(lengths[d] for d in seq if d[0] == "b")
    assert abs(ta - tb) <= 4 * (passes + 1)


def test_first_exhausted_restarts_every_source_when_one_runs_out(tmp_path, tok):
    seq, stream = _doc_sequence(tmp_path, tok, 60, stopping="first_exhausted")
    passes: list[list[tuple[str, int]]] = [[]]
    last = {"a": -1, "b": -1}
    for s, i in seq:
        if i <= last[s]:  # a source went back: a new pass started (both restart, so both go back)
            passes.append([])
            last = {"a": -1, "b": -1}
        last[s] = i
        passes[-1].append((s, i))
    assert len(passes) >= 3
    for p in passes[:-1]:
        a = [i for s, i in p if s == "a"]
        b = [j for s, j in p if s == "b"]
        assert a == list(range(len(A_DOCS))), "the small source runs out, whole, once per pass"
        assert b == list(range(len(b))) and len(b) < len(B_DOCS), "the large one from its start, never repeated"
    for p in passes[1:]:
        assert [i for s, i in p if s == "b"][:1] == [0], "every pass starts the large source from its beginning"
    assert stream.state_dict()["workers"][0]["pass"] == len(passes) - 1


def test_token_budget_takes_each_budget_per_pass_and_continues(tmp_path, tok):
    budgets = (30, 90)  # per pass: 10 documents of a, about 30 of b
    seq, stream = _doc_sequence(tmp_path, tok, 70, stopping="token_budget", budgets=budgets)
    lengths = {("a", i): len(ids(tok, d)) + 1 for i, d in enumerate(A_DOCS)}
    lengths.update({("b", j): len(ids(tok, d)) + 1 for j, d in enumerate(B_DOCS)})
    # Replay the rule on the consumed sequence: a source at its budget rests until both are; then a new pass.
    counts = {"a": 0, "b": 0}
    n_passes = 0
    for doc in seq:
        s = doc[0]
        assert counts[s] < budgets["ab".index(s)], f"{s} drawn after reaching its budget"
        counts[s] += lengths[doc]
        if counts["a"] >= budgets[0] and counts["b"] >= budgets[1]:
            n_passes += 1
            counts = {"a": 0, "b": 0}
    assert n_passes >= 3
    # Sources continue across passes: each is read cycle after cycle, whole and in order.
    for name, n in (("a", len(A_DOCS)), ("b", len(B_DOCS))):
        runs = _runs([i for s, i in seq if s == name])
        assert all(r == list(range(n)) for r in runs[:-1]) and runs[-1] == list(range(len(runs[-1])))
    m = stream.gather_metrics()
    assert m["data/mix/a"] == pytest.approx(0.25, abs=0.05)


def test_token_budget_split_by_weight(tmp_path, tok):
    seq, _ = _doc_sequence(tmp_path, tok, 50, stopping="token_budget", token_budget=120, weights=(1, 3))
    seq_b, _ = _doc_sequence(tmp_path, tok, 50, stopping="token_budget", budgets=(30, 90))
    assert seq == seq_b


def test_stopping_rules_are_checked_in_the_recipe(tmp_path):
    def problems(data: dict) -> list[str]:
        recipe = tmp_path / "r.yaml"
        train = [{"path": "a.jsonl"}, {"path": "b.jsonl"}]
        recipe.write_text(json.dumps({"model": {"name_or_path": "m"}, "data": {"train": train, **data}}))
        with pytest.raises(ConfigError) as e:
            load_recipe(recipe)
        return e.value.problems

    assert problems({"stopping": "token_budget"}) == [
        "data.stopping: token_budget needs data.token_budget, or token_budget on every source (data.train[0], "
        "data.train[1] has none)"
    ]
    assert problems({"stopping": "first_exhausted", "token_budget": 10}) == [
        "data.token_budget: only used with data.stopping=token_budget (it is 'first_exhausted')"
    ]
    assert problems({"stopping": "sometimes"}) == [
        "data.stopping: 'sometimes' is not one of 'all_exhausted' | 'first_exhausted' | 'token_budget'"
    ]
    assert problems({"stopping": "token_budget", "token_budget": 0}) == ["data.token_budget: must be positive, got 0"]
    train = [{"path": "a.jsonl", "token_budget": 5, "label": "x"}, {"path": "b.jsonl", "label": "x"}]
    assert problems({"train": train, "stopping": "token_budget", "token_budget": 10}) == [
        "data.token_budget: set either data.token_budget (split by weight) or token_budget on every training "
        "source, not both (data.train[0] sets one)",
        "data.train: label 'x' names more than one source; labels must be unique",
    ]
    ok = tmp_path / "ok.yaml"
    train = [{"path": "a.jsonl", "token_budget": 5}, {"path": "b.jsonl", "token_budget": 7}]
    ok.write_text(json.dumps({"model": {"name_or_path": "m"}, "data": {"train": train, "stopping": "token_budget"}}))
    # The stream takes the budgets of a checked recipe as they are, without checking them again.
    data = load_recipe(ok).data
    assert budgets_of(data.train, data.stopping, data.token_budget) == (5, 7)


def test_source_labels():
    labels = source_labels(
        [
            SourceConfig(path="/data/code/train.jsonl.zst"),
            SourceConfig(path="data/web/*.parquet"),
            SourceConfig(path="HuggingFaceFW/fineweb-edu", name="sample-10BT"),
            SourceConfig(path="s3://bucket/books/part-*.jsonl"),
            SourceConfig(path="/other/train.jsonl"),
            SourceConfig(path="/x/y.jsonl", label="replay"),
        ]
    )
    assert labels == ["train-0", "web", "fineweb-edu-sample-10BT", "books", "train-4", "replay"]


# --------------------------------------------------------------------------------------- resume, mixed


def _mixed_corpus(root: Path) -> list[SourceConfig]:
    """Two sources of several files, with blank documents and documents longer than a micro-batch."""
    make_corpus(root / "a", [13, 7, 9])
    (root / "b").mkdir()
    rng = random.Random(0)
    for f in range(2):
        texts = [
            " ".join(f"w{rng.randrange(100, 300)}" for _ in range(rng.choice([0, 1, 5, 40, 90]))) for _ in range(17)
        ]
        write_jsonl(root / "b" / f"long-{f}.jsonl", texts)
    return [SourceConfig(path=str(root / "a"), weight=2), SourceConfig(path=str(root / "b"), weight=1)]


@pytest.mark.parametrize(
    ("stopping", "num_workers", "shuffle_buffer"),
    [("all_exhausted", 2, 4), ("first_exhausted", 2, 0), ("token_budget", 0, 4), ("all_exhausted", 0, 0)],
)
def test_resume_of_a_mixture_is_exact(tmp_path, tok, stopping, num_workers, shuffle_buffer):
    sources = _mixed_corpus(tmp_path)
    kw = dict(seq_len=8, micro_batch_size=3, world_size=2, rank=1, seed=7, num_workers=num_workers,
              shuffle_buffer=shuffle_buffer, stopping=stopping)  # fmt: skip
    if stopping == "token_budget":
        kw["token_budget"] = 400
    n = 90
    ref_stream = TrainStream(sources, tok, **kw)
    reference, metrics = [], []
    for batch in _take_each(ref_stream, n):
        reference.append(batch)
        metrics.append(ref_stream.gather_metrics())
    assert max(w["pass"] for w in ref_stream.state_dict()["workers"]) >= 1  # across pass boundaries
    for k in (5, 17):
        first = TrainStream(sources, tok, **kw)
        _same(_take(first, k), reference[:k])
        state = json.loads(json.dumps(first.state_dict()))
        assert any(w["pending"] for w in state["workers"]), "a document continues across the cut"
        resumed = TrainStream(sources, tok, **kw)
        resumed.load_state_dict(state)
        assert resumed.gather_metrics() == metrics[k - 1]
        rest = []
        for batch in _take_each(resumed, n - k):
            rest.append(batch)
        _same(rest, reference[k:])
        assert resumed.gather_metrics() == metrics[-1]


# ------------------------------------------------------------------------------------- document masking


def test_document_position_ids():
    eos = 0
    block = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 4], [0, 3, 3, 0, 0, 2, 2, 2]])
    assert document_position_ids(block, eos).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 0, 0, 1, 2]]


def test_stream_carries_position_ids_only_with_masking(tmp_path, tok):
    make_corpus(tmp_path / "c", [15, 11])
    plain = _take(_stream([tmp_path / "c"], tok, seq_len=7, micro_batch_size=3), 6)
    masked = _take(_stream([tmp_path / "c"], tok, seq_len=7, micro_batch_size=3, document_masking=True), 6)
    assert all(set(b) == {"input_ids", "labels"} for b in plain)
    _same(plain, masked)
    eos = tok.eos_token_id
    for b in masked:
        assert set(b) == {"input_ids", "labels", "position_ids"}
        for row, pos in zip(b["input_ids"].tolist(), b["position_ids"].tolist()):
            expected, p = [], 0
            for i in range(len(row)):
                p = 0 if i == 0 or row[i - 1] == eos else p + 1
                expected.append(p)
            assert pos == expected


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_document_masking_keeps_attention_inside_each_document(tmp_path, assets, attn):
    """The second document of a packed block gets the logits it gets alone, through the model the engines build
    (launcher.model) and the inputs they pass (model_inputs); without masking it sees the first document."""
    from transformers import AutoTokenizer

    from launcher.config import ModelConfig, Recipe
    from launcher.engine.base import model_inputs
    from launcher.model import build_model, load_config

    tokenizer = AutoTokenizer.from_pretrained(assets["base"])
    first = "def add(a, b):\n    return a + b\n"
    second = "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n"
    n1, n2 = len(ids(tokenizer, first)) + 1, len(ids(tokenizer, second)) + 1
    write_jsonl(tmp_path / "two.jsonl", [first, second])
    recipe = Recipe(model=ModelConfig(name_or_path=str(assets["base"]), attn_implementation=attn))
    model = build_model(recipe, load_config(recipe), torch.float32).eval()

    def block(masking: bool) -> dict[str, torch.Tensor]:
        stream = TrainStream([SourceConfig(path=str(tmp_path / "two.jsonl"))], tokenizer, seq_len=n1 + n2,
                             micro_batch_size=1, rank=0, world_size=1, seed=0, document_masking=masking)  # fmt: skip
        return next(iter(stream))

    masked, plain = block(True), block(False)
    assert torch.equal(masked["input_ids"], plain["input_ids"])
    alone = masked["input_ids"][:, n1:]
    with torch.no_grad():
        reference = model(input_ids=alone).logits
        with_masking = model(**model_inputs(masked, torch.device("cpu"))).logits[:, n1:]
        without = model(**model_inputs(plain, torch.device("cpu"))).logits[:, n1:]
    torch.testing.assert_close(with_masking, reference, rtol=1e-5, atol=1e-5)
    assert (without - reference).abs().max() > 1e-3


def test_workers_tokenize_after_the_parent_used_the_tokenizer_thread_pool(tmp_path, assets):
    """The Rust thread pool of ``tokenizers`` does not survive a fork: once the trainer process has tokenized in
    parallel (evaluation sets are tokenized there), forked DataLoader workers must tokenize serially or hang."""
    script = tmp_path / "fork.py"
    script.write_text(
        f"""
import os, sys
os.environ["TOKENIZERS_PARALLELISM"] = "true"
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from transformers import AutoTokenizer
from launcher.config import SourceConfig
from launcher.data import TrainStream
tok = AutoTokenizer.from_pretrained({str(assets["tokenizer"])!r})
texts = [line for line in open({str(assets["code_train"])!r})][:2000]
assert len(tok(texts)["input_ids"]) == len(texts) > 20  # a large batch: the parallel path of the pool
stream = TrainStream([SourceConfig(path={str(assets["code_train"])!r})], tok, seq_len=64, micro_batch_size=2,
                     rank=0, world_size=1, seed=0, num_workers=2)
it = iter(stream)
print(sum(next(it)["input_ids"].numel() for _ in range(6)))
"""
    )
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == str(6 * 2 * 64)


def test_encode_gives_the_ids_of_the_tokenizer(assets, tok):
    from transformers import AutoTokenizer

    from launcher.data.packing import encode

    bpe = AutoTokenizer.from_pretrained(assets["tokenizer"])
    texts = ["def f(x):\n    return x  # é ü 中文", "  leading spaces", "</s> <s> special tokens in text", "", "\n\n"]
    for t in (bpe, tok):
        assert encode(t, texts) == t(texts, add_special_tokens=False)["input_ids"]
    bpe.backend_tokenizer.enable_truncation(4)  # a backend set up otherwise is called through the tokenizer
    assert encode(bpe, texts) == bpe(texts, add_special_tokens=False)["input_ids"]
    assert max(map(len, encode(bpe, texts))) > 4


def test_resume_on_changed_data_is_an_error(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", [" ".join(f"w{i % 90}" for i in range(j, j + 30)) for j in range(40)])
    stream = _stream([tmp_path / "a.jsonl"], tok, seq_len=8, micro_batch_size=1, num_workers=0)
    _take(stream, 20)
    state = stream.state_dict()
    assert state["workers"][0]["pending"], "the 20th block ends inside a document"
    write_jsonl(tmp_path / "a.jsonl", ["w1 w2"] * 3)
    resumed = _stream([tmp_path / "a.jsonl"], tok, seq_len=8, micro_batch_size=1, num_workers=0)
    resumed.load_state_dict(state)
    with pytest.raises(DataError, match=r"a\.jsonl no longer has the document .* the data changed"):
        next(iter(resumed))


def test_epochs_of_each_source_are_counted(tmp_path, tok):
    """A small source mixed with a large one is read to its end again and again (all_exhausted); data/epochs
    counts its completed passes, which the consumed documents show independently."""
    small = [f"w{10 + i} w3 w3" for i in range(3)]
    write_jsonl(tmp_path / "small.jsonl", small)
    write_jsonl(tmp_path / "big.jsonl", [" ".join(["w2"] * (1 + i % 5)) for i in range(2000)])
    sources = [SourceConfig(path=str(tmp_path / "small.jsonl")), SourceConfig(path=str(tmp_path / "big.jsonl"))]
    stream = TrainStream(sources, tok, seq_len=8, micro_batch_size=2, rank=0, world_size=1, seed=0)
    first = {ids(tok, t)[0] for t in small}
    seen = sum(1 for batch in _take(stream, 40) for t in batch["input_ids"].flatten().tolist() if t in first)
    m = stream.gather_metrics()
    # each pass over the small source is its 3 documents; the pass in progress is not complete yet
    assert seen >= 9
    assert m["data/epochs/small"] in (seen // 3 - 1, seen // 3)
    assert m["data/epochs/big"] == 0
