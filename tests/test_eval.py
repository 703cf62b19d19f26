"""Distributed perplexity equals a single-process reference computed independently, for uneven shards too, and
when some ranks have no eval data at all."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cpt

SEQ = 64


def reference(model_dir, data_file, seq_len: int) -> dict:
    """Plain transformers, one process: the packing contract written out by hand, then summed token NLL."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stream: list[int] = []
    for line in data_file.read_text().splitlines():
        text = json.loads(line)["text"]
        if text.strip():
            stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            ids = torch.tensor([b])
            logits = model(ids).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(b) - 1
    return {"loss": nll / count, "perplexity": math.exp(nll / count), "tokens": count, "blocks": len(blocks),
            "last": len(blocks[-1])}  # fmt: skip


@pytest.fixture(scope="module")
def uneven_file(assets, tmp_path_factory):
    """An eval file of 7 full blocks and a partial one: 8 blocks, so 3 ranks hold 3, 3 and 2 (and 2 ranks 4 and 4
    with the short block on one of them)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["base"])
    docs, n = [], 0
    for line in assets["prose_train"].read_text().splitlines():
        text = json.loads(line)["text"][:300]
        k = len(tok(text, add_special_tokens=False)["input_ids"]) + 1
        if n + k > 7 * SEQ + SEQ // 2:
            continue
        docs.append(text)
        n += k
        if n > 7 * SEQ + 2:
            break
    assert n > 7 * SEQ, "eval corpus too small for this test"
    path = tmp_path_factory.mktemp("eval") / "uneven.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.mark.parametrize("engine, nproc", [("deepspeed", 2), ("fsdp", 3)])
def test_distributed_perplexity_equals_single_process_reference(assets, uneven_file, engine, nproc):
    check_against_reference(assets, uneven_file, engine, nproc, blocks=8)


def check_against_reference(assets, data, engine: str, nproc: int, blocks: int) -> None:
    """``cpt eval`` on ``nproc`` ranks against the single-process reference on ``data`` (``blocks`` blocks, the
    last one partial)."""
    ref = reference(assets["base"], data, SEQ)
    assert ref["blocks"] == blocks and 1 < ref["last"] < SEQ
    assert_matches(ref, cpt_eval(assets, data, engine, nproc))


def cpt_eval(assets, data, engine: str, nproc: int) -> dict:
    p = cpt("eval", str(assets["base"]), str(data), "--seq-len", str(SEQ), "--nproc", str(nproc),
            "--engine", engine, "--batch-size", "2", timeout=300)  # fmt: skip
    return json.loads(p.stdout.strip().splitlines()[-1])


def assert_matches(ref: dict, got: dict) -> None:
    assert got["tokens"] == ref["tokens"]
    # Same blocks and weights; batched vs one-at-a-time matrix products differ in the last float32 bits.
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)


@pytest.fixture(scope="module")
def one_block_file(assets, tmp_path_factory):
    """One short document: a single block, so every rank but rank 0 has nothing to evaluate."""
    text = json.loads(assets["prose_eval"].read_text().splitlines()[0])["text"][:120]
    path = tmp_path_factory.mktemp("eval") / "one-block.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    return path


@pytest.mark.parametrize("engine, nproc", [("deepspeed", 2), ("fsdp", 3)])
def test_ranks_without_eval_data_neither_hang_nor_change_the_perplexity(assets, one_block_file, engine, nproc):
    check_against_reference(assets, one_block_file, engine, nproc, blocks=1)
