"""A data position carried over to another world size or number of DataLoader workers: the old readers' leftovers
are divided among the new readers, so that across the change no document is read twice or skipped, and a document
cut by the end of a batch continues at the token where it was cut."""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from launcher.config import SourceConfig
from launcher.data import TrainStream
from launcher.data.mixture import valid_reader_state
from launcher.data.reshard import fresh_state

SEQ_LEN, MICRO_BATCH = 4, 2
DOC_TOKENS = SEQ_LEN * MICRO_BATCH - 1  # with its EOS, a document fills exactly one micro-batch


# --------------------------------------------------------------------------------------------------- corpora


@pytest.fixture(scope="module")
def bpe(assets):
    return AutoTokenizer.from_pretrained(assets["tokenizer"])


@pytest.fixture(scope="module")
def words(bpe) -> list[str]:
    """Words that the BPE tokenizer makes one token each (with the space before them)."""
    found = sorted(
        w[1:]
        for w in bpe.get_vocab()
        if w.startswith("Ġ") and w[1:].isalpha() and len(bpe(" " + w[1:], add_special_tokens=False)["input_ids"]) == 1
    )
    assert len(found) >= 17
    return found


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def batch_corpus(root: Path, words: list[str], sizes: list[int], tag: int, bpe, parquet_row_group: int = 0):
    """Files of ``sizes`` documents, each unique and exactly one micro-batch long with its EOS; a document's
    token ids -> its number. With ``parquet_row_group``: one Parquet file of row groups that size instead."""
    digits = words[1:17]
    texts = []
    for n in range(sum(sizes)):
        ids = [words[0]] * (DOC_TOKENS - 3)
        texts.append(" " + " ".join([digits[tag], digits[n // 16], digits[n % 16], *ids]))
    ids = [tuple(x) for x in bpe(texts, add_special_tokens=False)["input_ids"]]
    assert {len(x) for x in ids} == {DOC_TOKENS} and len(set(ids)) == len(ids)
    if parquet_row_group:
        root.mkdir(parents=True)
        pq.write_table(pa.table({"text": texts}), root / "all.parquet", row_group_size=parquet_row_group)
    else:
        start = 0
        for f, size in enumerate(sizes):
            write_jsonl(root / f"part-{f:02d}.jsonl", texts[start : start + size])
            start += size
    return {x: n for n, x in enumerate(ids)}


# ----------------------------------------------------------------------------------------------- consuming


def streams(sources, tok, world_size: int, num_workers: int = 0, **kw) -> list[TrainStream]:
    args = dict(seq_len=SEQ_LEN, micro_batch_size=MICRO_BATCH, seed=11)
    args.update(kw)
    return [
        TrainStream(sources, tok, rank=r, world_size=world_size, num_workers=num_workers, **args)
        for r in range(world_size)
    ]


def consume(stream: TrainStream, n: int | None = None, until=None, limit: int = 400):
    """(token ids, state of the reader that gave it right after) of each batch: ``n`` of them, or until
    ``until(latest state of each reader)`` holds."""
    slots = max(1, stream.num_workers)
    out = []
    latest: dict[int, dict] = {}
    with contextlib.closing(iter(stream)) as it:
        for batch in it:
            state = stream.state_dict()
            worker = (state["batches"] - 1) % slots
            latest[worker] = state["workers"][worker]
            out.append((tuple(batch["input_ids"].flatten().tolist()), latest[worker]))
            if len(out) == n or (until is not None and len(latest) == slots and until(list(latest.values()))):
                return out
            assert len(out) < limit, "the readers never got through the leftovers"
    raise AssertionError("the stream ended")


def last_cycles(ranks: list[dict]) -> list[int]:
    """Per source, the latest pass over it that any reader of the saved ranks had begun."""
    states = [w for r in ranks for w in r["workers"] if w is not None]
    return [max(w["sources"][s][0] for w in states) for s in range(len(states[0]["sources"]))]


def past(cycles: list[int]):
    return lambda states: all(w["sources"][s][0] > c for w in states for s, c in enumerate(cycles))


def resume(old: list[TrainStream], new: list[TrainStream]) -> list[dict]:
    saved = [json.loads(json.dumps(s.state_dict())) for s in old]
    for rank, stream in enumerate(new):
        stream.load_state_dict(saved[min(rank, len(saved) - 1)], all_ranks=saved)
    return saved


def tally(counts: list[Counter], which: list[dict], batches, cycles: list[int] | None = None) -> None:
    """Count each batch's document into its source's counter; with ``cycles``, only a document of a pass up to
    the source's cycle in it (the reader's state after the batch tells which pass it came from)."""
    for ids, state in batches:
        source = next(s for s, docs in enumerate(which) if ids[:-1] in docs)
        if cycles is None or state["sources"][source][0] <= cycles[source]:
            counts[source][which[source][ids[:-1]]] += 1


def assert_each_read(counts: list[Counter], which: list[dict], cycles: list[int]) -> None:
    for source, (count, docs) in enumerate(zip(counts, which)):
        expected = Counter({n: cycles[source] + 1 for n in docs.values()})
        assert count == expected, (
            f"source {source}: read twice {sorted(n for n in count if count[n] > expected[n])}, "
            f"missed {sorted(n for n in expected if count[n] < expected[n])}"
        )


# ------------------------------------------------------------------------------------- whole documents


@pytest.mark.parametrize(
    ("sizes", "old_world", "new_world", "shuffle_buffer", "stopping"),
    [
        ([5, 4, 6, 5, 3, 4, 5, 6, 4, 5, 3, 4], 2, 4, 0, "all_exhausted"),  # 12 files: whole files per reader
        ([5, 4, 6, 5, 3, 4, 5, 6, 4, 5, 3, 4], 4, 2, 4, "first_exhausted"),
        ([5, 4, 6, 5, 3, 4, 5, 6, 4, 5, 3, 4], 2, 3, 3, "all_exhausted"),
        ([9, 14, 11], 2, 4, 0, "all_exhausted"),  # fewer files than readers: files shared document by document
        ([9, 14, 11], 3, 2, 4, "all_exhausted"),
    ],
)
def test_every_document_is_read_once_across_a_change_of_world_size(
    tmp_path, bpe, words, sizes, old_world, new_world, shuffle_buffer, stopping, caplog
):
    which = [batch_corpus(tmp_path / "c", words, sizes, 0, bpe)]
    sources = [SourceConfig(path=str(tmp_path / "c"))]
    kw = dict(shuffle_buffer=shuffle_buffer, stopping=stopping)
    counts = [Counter()]
    old = streams(sources, bpe, old_world, **kw)
    for r, stream in enumerate(old):
        tally(counts, which, consume(stream, 3 + 2 * r))  # readers at different places
    new = streams(sources, bpe, new_world, **kw)
    with caplog.at_level(logging.INFO, logger="launcher.data.stream"):
        saved = resume(old, new)
    assert f"re-divided from {old_world} old readers ({old_world} ranks x 1 workers) to {new_world}" in caplog.text
    cycles = last_cycles(saved)
    assert cycles == [0]
    for stream in new:
        batches = consume(stream, until=past(cycles))
        tally(counts, which, batches, cycles)
        assert batches[-1][1]["pass"] >= 1 and "explicit" not in batches[-1][1]  # pass 0 is over
    assert_each_read(counts, which, cycles)


def test_workers_change_twice_and_the_position_survives_each_change(tmp_path, bpe, words):
    """2 ranks x 0 workers -> 1 rank x 2 workers (stopped while still reading leftovers) -> 3 ranks x 0 workers:
    the second change divides again what the first one dealt out."""
    which = [batch_corpus(tmp_path / "c", words, [6, 5, 7, 4, 6], 0, bpe)]
    sources = [SourceConfig(path=str(tmp_path / "c"))]
    counts = [Counter()]
    first = streams(sources, bpe, 2, shuffle_buffer=4)
    for r, stream in enumerate(first):
        tally(counts, which, consume(stream, 4 + r))
    second = streams(sources, bpe, 1, num_workers=2, shuffle_buffer=4)
    resume(first, second)
    tally(counts, which, consume(second[0], 6))
    state = second[0].state_dict()
    assert all("explicit" in w for w in state["workers"]), "stopped while both workers still read leftovers"
    third = streams(sources, bpe, 3, shuffle_buffer=4)
    saved = resume(second, third)
    cycles = last_cycles(saved)
    for stream in third:
        tally(counts, which, consume(stream, until=past(cycles)), cycles)
    assert_each_read(counts, which, cycles)


def test_a_worker_that_gave_no_batch_yet_leaves_its_whole_share(tmp_path, bpe, words):
    which = [batch_corpus(tmp_path / "c", words, [6, 5, 7], 0, bpe)]
    sources = [SourceConfig(path=str(tmp_path / "c"))]
    counts = [Counter()]
    old = streams(sources, bpe, 1, num_workers=2)
    tally(counts, which, consume(old[0], 1))
    assert old[0].state_dict()["workers"][1] is None
    new = streams(sources, bpe, 2)
    saved = resume(old, new)
    cycles = last_cycles(saved)
    for stream in new:
        tally(counts, which, consume(stream, until=past(cycles)), cycles)
    assert_each_read(counts, which, cycles)


@pytest.mark.parametrize(("stopping", "token_budget"), [("all_exhausted", None), ("token_budget", 300)])
def test_a_mixture_keeps_each_source_exact(tmp_path, bpe, words, stopping, token_budget):
    """A small source read many times over and a large one: the old readers are in different passes over the
    small one, and every pass up to the latest is completed exactly once."""
    which = [
        batch_corpus(tmp_path / "a", words, [3, 2], 1, bpe),
        batch_corpus(tmp_path / "b", words, [5, 4, 6, 5, 3, 4, 5, 6], 2, bpe),
    ]
    sources = [SourceConfig(path=str(tmp_path / "a"), weight=2), SourceConfig(path=str(tmp_path / "b"), weight=1)]
    kw = dict(shuffle_buffer=2, stopping=stopping, token_budget=token_budget)
    counts = [Counter(), Counter()]
    old = streams(sources, bpe, 2, **kw)
    for r, stream in enumerate(old):
        tally(counts, which, consume(stream, 9 + 4 * r))
    new = streams(sources, bpe, 3, **kw)
    saved = resume(old, new)
    # The consumed mixture is carried over whole, into rank 0: summed over the ranks, the totals stay right.
    assert new[0].state_dict()["source_tokens"] == [sum(s["source_tokens"][i] for s in saved) for i in (0, 1)]
    assert all(s.state_dict()["source_tokens"] == [0, 0] for s in new[1:])
    assert len({s.state_dict()["hash"] for s in new} - {s["hash"] for s in saved} - {"00" * 8}) == 1
    cycles = last_cycles(saved)
    states = [w for s in saved for w in s["workers"]]
    assert cycles[0] >= 2 and len({w["sources"][0][0] for w in states}) > 1, "old readers in different passes"
    for stream in new:
        tally(counts, which, consume(stream, until=past(cycles)), cycles)
    assert_each_read(counts, which, cycles)


@pytest.mark.parametrize(("old_world", "new_world"), [(1, 2), (2, 1)])
def test_a_source_divided_per_row_group_on_one_side_only(tmp_path, bpe, words, old_world, new_world):
    """One Parquet file is one shard for one reader and is split per row group for two: the leftovers name the
    shards of the old division. A position saved while they are read resumes exactly on the new layout."""
    which = [batch_corpus(tmp_path / "c", words, [24], 0, bpe, parquet_row_group=6)]
    sources = [SourceConfig(path=str(tmp_path / "c"))]
    counts = [Counter()]
    old = streams(sources, bpe, old_world)
    assert [s._sources[0].num_shards for s in old] == [1 if old_world == 1 else 4] * old_world
    for r, stream in enumerate(old):
        tally(counts, which, consume(stream, 5 + r))
    new = streams(sources, bpe, new_world)
    saved = resume(old, new)
    cycles = last_cycles(saved)
    for stream in new:
        tally(counts, which, consume(stream, 2), cycles)
    again = streams(sources, bpe, new_world)  # the re-divided position, saved and resumed on its own layout
    states = [json.loads(json.dumps(other.state_dict())) for other in new]
    assert any("explicit" in w for state in states for w in state["workers"]), "still reading leftovers"
    for stream, other, state in zip(again, new, states):
        stream.load_state_dict(state)
        reference = consume(other, 8)
        assert consume(stream, 8) == reference
        tally(counts, which, reference, cycles)
        tally(counts, which, consume(stream, until=past(cycles)), cycles)
    assert_each_read(counts, which, cycles)


def test_a_new_reader_dealt_nothing_goes_on_with_the_next_pass(tmp_path, unique_tok):
    """One file, read by one reader: its leftovers are one span, so one of two new readers gets none. That reader
    ends its pass at once, though it drew fewer tokens in it than one micro-batch, and reads its share of the
    next pass."""
    write_jsonl(tmp_path / "c" / "a.jsonl", [" ".join(f"d{d}t{i}" for i in range(DOC_TOKENS)) for d in range(20)])
    sources = [SourceConfig(path=str(tmp_path / "c"))]
    old = streams(sources, unique_tok, 1)
    consume(old[0], 1)
    new = streams(sources, unique_tok, 2)
    resume(old, new)
    (_, busy), (_, idle) = consume(new[0], 1)[0], consume(new[1], 1)[0]
    assert busy["pass"] == 0 and busy["explicit"]["0"]["parts"] and busy["sources"][0][0] == 0
    assert idle["pass"] == 1 and "explicit" not in idle and idle["sources"][0][0] == 1


# --------------------------------------------------------------------------------------------- to the token


@pytest.fixture(scope="module")
def unique_tok() -> PreTrainedTokenizerFast:
    """One token per word, and the words of the corpus below are all different: every token id names one
    (document, token index)."""
    vocab = {"<unk>": 0, "<eos>": 1}
    vocab.update({f"d{d}t{i}": 2 + d * 40 + i for d in range(60) for i in range(40)})
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="<unk>")


def cut_inside(stream: TrainStream, n: int) -> list[int]:
    """The token ids of ``n`` or more batches, stopping inside a document; every reader still in pass 0."""
    batches = consume(stream, n)
    while not batches[-1][1]["pending"]:
        batches += consume(stream, 1)
    assert all(w["sources"][0][0] == 0 for _, w in batches), "compared while every reader is in pass 0"
    return [t for ids, _ in batches for t in ids]


@pytest.mark.parametrize(("worlds", "shuffle_buffer"), [((2, 3, 2), 0), ((3, 2, 1), 4)])
def test_a_cut_document_continues_at_its_token(tmp_path, unique_tok, worlds, shuffle_buffer):
    """Long documents, cut by the ends of batches, through two changes of the world size: the second divides
    again what the first dealt out, cut documents included."""
    lengths = [3 + (d * 7) % 31 for d in range(60)]  # up to 33 tokens: documents span several 8-token batches
    for f in range(4):
        write_jsonl(
            tmp_path / "c" / f"part-{f}.jsonl",
            [" ".join(f"d{d}t{i}" for i in range(lengths[d])) for d in range(f * 15, f * 15 + 15)],
        )
    sources = [SourceConfig(path=str(tmp_path / "c"))]
    kw = dict(seq_len=8, micro_batch_size=1, shuffle_buffer=shuffle_buffer)
    eos = unique_tok.eos_token_id
    hops: list[list[list[int]]] = []  # per world size, the token ids each rank consumed
    previous: list[TrainStream] = []
    for world in worlds:
        current = streams(sources, unique_tok, world, **kw)
        if previous:
            resume(previous, current)
        hops.append([cut_inside(stream, 5 + 2 * r) for r, stream in enumerate(current)])
        previous = current

    def where(t: int) -> tuple[int, int]:
        return divmod(t - 2, 40)

    seen = Counter(where(t) for hop in hops for stream in hop for t in stream if t != eos)
    assert max(seen.values()) == 1, f"tokens read twice: {[k for k, n in seen.items() if n > 1]}"
    docs = {d for d, _ in seen}
    for d in docs:
        got = sorted(i for doc, i in seen if doc == d)
        assert got == list(range(len(got))), f"document {d}: tokens {got} are not its first ones"
    # Only the documents still being read at the end of the last streams may be incomplete ...
    unfinished = {d for d in docs if sum(doc == d for doc, _ in seen) < lengths[d]}
    last = {where(stream[-1])[0] for stream in hops[-1]}
    assert unfinished <= last, f"documents cut and never continued: {sorted(unfinished - last)}"
    # Every complete document was followed by its EOS, but those cut just before it at the very end.
    complete = len(docs) - len(unfinished)
    waiting = sum(where(stream[-1])[1] + 1 == lengths[where(stream[-1])[0]] for stream in hops[-1])
    assert sum(t == eos for hop in hops for stream in hop for t in stream) == complete - waiting
    # ... and each document cut at a change went on after it (a new reader dealt two cut documents may not get
    # to the second before the next change, which carries it over again; a document cut just before its EOS
    # goes on with that alone).
    for h, hop in enumerate(hops[:-1]):
        for stream in hop:
            d, i = where(stream[-1])
            later = [t for after in hops[h + 1 :] for s in after for t in s if t != eos]
            assert i + 1 == lengths[d] or any(where(t)[0] == d for t in later), f"document {d} was not continued"


# ----------------------------------------------------------------------------------------- what stays as was


@pytest.mark.parametrize("change", [{"seed": 12}, {"seq_len": 8}, None])
def test_other_changes_still_skip_with_a_warning(tmp_path, unique_tok, change, caplog):
    write_jsonl(tmp_path / "c" / "a.jsonl", [" ".join(f"d{d}t{i}" for i in range(9)) for d in range(40)])
    sources = [SourceConfig(path=str(tmp_path / "c"))]
    old = streams(sources, unique_tok, 2)
    for stream in old:
        consume(stream, 3)
    saved = [json.loads(json.dumps(s.state_dict())) for s in old]
    resumed = streams(sources, unique_tok, 3, **(change or {}))[1]
    with caplog.at_level(logging.INFO, logger="launcher.data.stream"):
        # without a change but the world size, an incomplete set of the old ranks cannot be divided exactly
        resumed.load_state_dict(saved[1], all_ranks=saved if change else saved[:1])
    assert "data layout changed" in caplog.text and "re-divided" not in caplog.text
    state = resumed.state_dict()
    assert state["workers"] is None and state["batches"] == 3  # skips the consumed batches
    next(iter(resumed))


def test_a_saved_state_of_the_previous_version_resumes_exactly(tmp_path, unique_tok):
    write_jsonl(tmp_path / "c" / "a.jsonl", [" ".join(f"d{d}t{i}" for i in range(d % 13 + 1)) for d in range(40)])
    sources = [SourceConfig(path=str(tmp_path / "c"))]
    stream = streams(sources, unique_tok, 2, shuffle_buffer=4)[1]
    consume(stream, 5)
    state = json.loads(json.dumps(stream.state_dict()))
    assert state["version"] == 3 and "explicit" not in state["workers"][0]
    state["version"] = 2
    reference = consume(stream, 7)
    resumed = streams(sources, unique_tok, 2, shuffle_buffer=4)[1]
    resumed.load_state_dict(state)
    assert consume(resumed, 7) == reference
    # and with every rank's states given, the layout unchanged: this rank's own
    other = streams(sources, unique_tok, 2, shuffle_buffer=4)[0]
    consume(other, 5)
    again = streams(sources, unique_tok, 2, shuffle_buffer=4)[1]
    again.load_state_dict(other.state_dict(), all_ranks=[other.state_dict(), state])
    assert consume(again, 7) == reference


def test_reader_states_with_lists_of_spans_are_checked():
    good = fresh_state(2) | {"explicit": {"1": {"cycle": 0, "parts": [[0, 3, 2, 1, 0, 5, 6], [0, 3, 1, 2, 1, 0, -1]]}}}
    assert valid_reader_state(good, 2) and valid_reader_state(fresh_state(2), 2)
    spans = good["explicit"]["1"]["parts"]
    bad_spans = [
        [0, 3, 2, 1, 0, 5],  # six fields
        [0, 3, 3, 1, 0, 0, -1],  # shard past the shards
        [0, 3, 2, 0, 0, 0, -1],  # stride 0
        [0, 3, 2, 2, 2, 0, -1],  # offset past the stride
        [0, 3, 2, 1, 0, 5, 4],  # ends before it starts
        [0, 3, 2, 1, 0, -1, -1],  # starts before the part
        [0, 3, 2, 1, True, 0, -1],  # not a number
    ]
    for bad in bad_spans:
        assert not valid_reader_state(good | {"explicit": {"1": {"cycle": 0, "parts": [*spans, bad]}}}, 2), bad
    for explicit in (
        [],  # not a mapping
        {"2": {"cycle": 0, "parts": []}},  # no such source
        {"x": {"cycle": 0, "parts": []}},
        {"1": {"cycle": 1, "parts": []}},  # a list is kept only for the cycle its source is in
        {"1": {"cycle": 0, "parts": None}},
        {"1": []},
    ):
        assert not valid_reader_state(good | {"explicit": explicit}, 2), explicit
    assert not valid_reader_state(good | {"pending": [[0, 0, 0, 0]]}, 2)
    assert not valid_reader_state(good | {"sources": [[0, 0, 0, 0, 0], [0, 0, -1, 0, 0]]}, 2)
