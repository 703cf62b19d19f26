"""The data pipeline: formats, packing, rank/worker coverage, exact resume, eval splitting, mixing."""

from __future__ import annotations

import gzip
import json
import os
import random
import socket
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from launcher.config import SourceConfig
from launcher.data import DataError, TrainStream, check_sources, eval_blocks, open_source, pack, tokenize_documents

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


def make_corpus(root: Path, sizes: list[int]) -> list[str]:
    """Files of the given document counts; every document is unique (its file and index words) and they
    differ in length, so a lost, duplicated or split document shows up."""
    root.mkdir(parents=True, exist_ok=True)
    docs = []
    for f, n in enumerate(sizes):
        texts = []
        for d in range(n):
            filler = " ".join(f"w{300 + (f * 31 + d * 7 + j) % 90}" for j in range((f + d) % 5))
            texts.append(f"w{f} w{20 + d} {filler}".strip())
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
    ("sizes", "world_size", "num_workers"),
    [
        ([7, 9, 11, 13, 15], 2, 2),  # 5 files, 2 ranks: every other document per rank; files split over workers
        ([9, 13, 11, 7], 2, 2),  # 4 files: 2 whole files per rank, one per worker
        ([31], 2, 2),  # 1 file: fewer files than workers, every other document per worker
        ([7, 9, 11, 13, 15], 3, 0),
    ],
)
def test_one_pass_reads_every_document_exactly_once(tmp_path, tok, sizes, world_size, num_workers):
    corpus = make_corpus(tmp_path / "c", sizes)
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
        )
        per_worker: list[list[int]] = [[] for _ in range(slots)]
        finished = [False] * slots
        for n, batch in enumerate(stream):
            assert batch["input_ids"].shape == (1, 1) and batch["input_ids"].dtype == torch.long
            assert batch["labels"].tolist() == batch["input_ids"].tolist()
            worker = n % slots
            epoch = stream.state_dict()["workers"][worker][0]
            if epoch == 0:
                per_worker[worker].append(int(batch["input_ids"][0, 0]))
            else:
                finished[worker] = True
                if all(finished):
                    break
        for tokens in per_worker:
            seen.update(split_on(tokens, eos))
        logs = [set(p.read_text().splitlines()) for p in log_dir.iterdir()]
        if num_workers > 1:
            assert len(logs) == num_workers and not set.intersection(*logs), "workers tokenized the same document"
        tokenized_by_rank.append(set().union(*logs))
    assert seen == Counter(tuple(ids(tok, d)) for d in corpus)
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
    assert state["batches"] == k and max(epoch for epoch, _ in state["workers"]) >= 1

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


def test_mixture_follows_the_weights(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", ["w1"] * 3000)
    write_jsonl(tmp_path / "b.jsonl", ["w2"] * 3000)
    sources = [
        SourceConfig(path=str(tmp_path / "a.jsonl"), weight=7),
        SourceConfig(path=str(tmp_path / "b.jsonl"), weight=3),
    ]
    stream = TrainStream(sources, tok, seq_len=16, micro_batch_size=4, rank=0, world_size=1, seed=0)
    counts = Counter()
    for batch in _take(stream, 40):  # 40 x 4 x 16 tokens = 1280 documents, all drawn before either source runs out
        counts.update(batch["input_ids"].flatten().tolist())
    a, b = counts[ids(tok, "w1")[0]], counts[ids(tok, "w2")[0]]
    assert a + b == counts[tok.eos_token_id] == 1280
    # Binomial(1280, 0.7): standard deviation 0.013, so 0.05 is a margin of almost 4 sigma.
    assert abs(a / (a + b) - 0.7) < 0.05
