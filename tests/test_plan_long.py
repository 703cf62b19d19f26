"""`cpt plan` for long sequences and sequence parallelism: what attention keeps beyond the tokens (document masking
under sdpa, eager attention) against what autograd saves and against the masking benchmark on an H200; activations
per GPU under ``parallel.sequence_parallel``; the smallest sequence parallelism and the longest seq_len that fit,
against a search of their own over the planner's estimate; and the plan's lines."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import cpt, tiny_recipe, write_recipe
from transformers import AutoConfig, AutoModelForCausalLM

from launcher.config import PACKAGE_ROOT
from launcher.data.packing import document_position_ids
from launcher.memory import (
    GIB,
    SQUARE,
    attention_terms,
    estimate,
    largest_seq_len,
    smallest_sequence_parallel,
)
from launcher.model import load_config
from launcher.preflight import load_recipe

RECIPE = PACKAGE_ROOT / "recipes" / "llama-1b-scratch.yaml"
LLAMA_1B = PACKAGE_ROOT / "recipes" / "models" / "llama-1b.json"
MASKING_RUN = PACKAGE_ROOT / "benchmarks" / "results" / "2026-11-28-masking-NVIDIA-H200.json"


def recipe(world: int, *overrides: str):
    """The 1.1B shape (32 heads, 4 key/value heads, 22 layers) from a config, with ``overrides``."""
    return load_recipe(RECIPE, list(overrides), world_size=world, check_files=False)


@pytest.fixture(scope="module")
def cfg():
    return AutoConfig.from_pretrained(LLAMA_1B)


def changed(r, *, seq_len: int | None = None, sp: int | None = None):
    """A copy of recipe ``r`` with another seq_len or sequence parallelism, made here without the planner's help."""
    r = copy.deepcopy(r)
    if seq_len is not None:
        r.data.seq_len = seq_len
    if sp is not None:
        r.parallel.sequence_parallel = sp
    return r


# ------------------------------------------------------------------------------- what attention keeps per layer


def saved_by_one_layer(attn: str, masked: bool, tokens: int, batch: int = 2) -> int:
    """Bytes autograd saves for backward in one decoder layer (two layers minus one) of a bf16 forward with 8 query
    heads and 2 key/value heads (query width 512 on hidden 256), given ``position_ids`` that restart after an EOS
    as document masking passes them (``masked``)."""
    base = AutoConfig.from_pretrained(LLAMA_1B).to_dict()
    shape = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2,
             "head_dim": 64, "vocab_size": 512, "use_cache": False}  # fmt: skip

    def saved(layers: int) -> int:
        config = AutoConfig.for_model(**{**base, **shape, "num_hidden_layers": layers})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
        weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in weights:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(3, 512, (batch, tokens))
        ids[:, tokens // 3] = 2  # an EOS: two documents in each block
        inputs = {"input_ids": ids, "position_ids": document_position_ids(ids, 2)} if masked else {"input_ids": ids}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model(**inputs)
        return sum(kept.values())

    return saved(2) - saved(1)


@pytest.mark.parametrize("tokens", [64, 128])
@pytest.mark.parametrize("attn", ["sdpa-masked", "eager"])
def test_attention_terms_are_what_autograd_saves_beyond_the_causal_kernel(tokens, attn):
    """The layer's bytes over those of sdpa's causal kernel: with a document mask, keys and values repeated to every
    query head and the mask made additive in bf16 (T^2 per sequence); eager, the softmax probabilities in fp32 and
    bf16 (heads x T^2 each). Two lengths tell T from T^2."""
    batch = 2
    impl, masked = ("sdpa", True) if attn == "sdpa-masked" else ("eager", False)
    measured = saved_by_one_layer(impl, masked, tokens, batch) - saved_by_one_layer("sdpa", False, tokens, batch)
    small = AutoConfig.for_model(**{**AutoConfig.from_pretrained(LLAMA_1B).to_dict(), "hidden_size": 256,
                                    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64})  # fmt: skip
    r = recipe(1, f"model.attn_implementation={impl}", f"data.document_masking={str(masked).lower()}",
               f"data.seq_len={tokens}")  # fmt: skip
    per_token, per_sequence, _ = attention_terms(r, small, 2)
    # on CPU sdpa's kernel also keeps a log-sum-exp per head and token (fp32) that eager does not: under 1%
    assert batch * tokens * per_token + batch * per_sequence == pytest.approx(measured, rel=0.01)


def test_masking_terms_are_the_h200_masking_benchmark():
    """sdpa with and without document masking, one training step of 22 layers of the 1.1B shape at micro-batch 4
    (benchmarks/document_masking_gpu.py): the estimate's difference against the measured peaks' difference."""
    record = json.loads(MASKING_RUN.read_text())
    assert record["model"]["num_hidden_layers"] == 22 and record["micro_batch"] == 4
    rows = [row for row in record["results"] if row["attn"] == "sdpa"]
    assert {row["seq_len"] for row in rows} == {2048, 8192}
    for row in rows:
        common = (f"data.seq_len={row['seq_len']}", "train.micro_batch_size=4", "train.global_batch_size=4",
                  "train.fused_loss=false")  # fmt: skip
        plain = recipe(1, *common)
        config = load_config(plain)
        masked = estimate(recipe(1, *common, "data.document_masking=true"), config, 1).total
        got = (masked - estimate(plain, config, 1).total) / GIB
        measured = row["masked"]["peak_gib"] - row["plain"]["peak_gib"]
        assert got == pytest.approx(measured, rel=0.05), (row["seq_len"], got, measured)


# ------------------------------------------------------------------------------------ tokens per GPU under N


@pytest.mark.parametrize(
    "setting",
    [(), ("model.activation_checkpointing=true",), ("data.document_masking=true",),
     ("train.compile=true", "data.document_masking=true", "model.activation_checkpointing=true")],
)  # fmt: skip
def test_sequence_parallel_halves_what_each_gpu_keeps_of_the_tokens(cfg, setting):
    """N = 1 -> 2 at a fixed seq_len: each GPU holds half the tokens, so the activations halve; the model states
    (sharded over every rank either way) stay; the fused loss shrinks by half its part that counts tokens; the
    document mask, whole on every rank of a group, stays. (Eager attention cannot be split: refused with N > 1.)"""
    common = ("data.seq_len=65536", "train.micro_batch_size=1", "train.global_batch_size=8", *setting)
    one = estimate(recipe(8, *common), cfg, 8).parts
    two = estimate(recipe(8, *common, "parallel.sequence_parallel=2"), cfg, 8).parts
    four = estimate(recipe(8, *common, "parallel.sequence_parallel=4"), cfg, 8).parts
    assert two["activations"] == pytest.approx(one["activations"] / 2)
    assert four["activations"] == pytest.approx(one["activations"] / 4)
    assert two["params+grads+adam"] == one["params+grads+adam"] == four["params+grads+adam"]
    # the loss: a fixed part (a chunk of logits, the head's fp32 gradient) and a part per token
    assert one["loss"] - two["loss"] == pytest.approx(2 * (two["loss"] - four["loss"])) and four["loss"] < two["loss"]
    if "data.document_masking=true" in setting:
        assert two[SQUARE] == one[SQUARE] > 0
    else:
        assert SQUARE not in one and SQUARE not in two


@pytest.mark.parametrize(
    "setting", [(), ("data.document_masking=true",), ("model.attn_implementation=eager",),
                ("data.document_masking=true", "model.activation_checkpointing=true")]
)  # fmt: skip
def test_same_tokens_in_longer_sequences_differ_only_by_the_seq_len_squared_terms(cfg, setting):
    """One sequence of 65,536 tokens against 32 of 2,048 (N = 1): the same bytes, except what grows with each
    sequence's length squared, 32 times larger for the long sequence (T^2 per sequence: 65536^2 / (32 x 2048^2))."""
    long = estimate(recipe(2, "data.seq_len=65536", "train.micro_batch_size=1", *setting), cfg, 2).parts
    short = estimate(recipe(2, "data.seq_len=2048", "train.micro_batch_size=32", *setting), cfg, 2).parts
    assert {k: v for k, v in long.items() if k != SQUARE} == {k: v for k, v in short.items() if k != SQUARE}
    if setting:
        assert long[SQUARE] == pytest.approx(32 * short[SQUARE])
    else:
        assert SQUARE not in long and SQUARE not in short


def test_fused_loss_keeps_a_bounded_chunk_of_logits_however_long_the_sequence(cfg):
    """What the loss keeps beyond its bytes per token is the same at 64K and 1M tokens per GPU, and less than half
    of one sequence of 64K tokens' fp32 logits."""

    def loss(seq_len: int) -> float:
        return estimate(recipe(1, f"data.seq_len={seq_len}", "train.micro_batch_size=1"), cfg, 1).parts["loss"]

    per_token = (loss(1 << 20) - loss(1 << 19)) / (1 << 19)
    fixed = loss(1 << 16) - per_token * (1 << 16)
    assert fixed == pytest.approx(loss(1 << 20) - per_token * (1 << 20))
    assert 0 < fixed < (1 << 16) * cfg.vocab_size * 4 / 2
    assert per_token < cfg.vocab_size  # no logits per token: a token's fp32 logits alone take 4 bytes per entry


# --------------------------------------------------------------------------------------- what would fit


def fits(r, config, world: int, gpu: float) -> bool:
    return estimate(r, config, world).total <= 0.9 * gpu


@pytest.mark.parametrize(
    ("gpu_gib", "setting"),
    [(141, ()), (80, ()), (40, ()), (20, ()), (141, ("data.document_masking=true",)),
     (80, ("data.document_masking=true", "model.activation_checkpointing=true"))],
)  # fmt: skip
def test_smallest_sequence_parallel_is_the_smallest_size_that_fits(cfg, gpu_gib, setting):
    """Against every N from 1 to the world size, the allowed ones picked here: N divides the world (8), the 32 query
    heads, the 4 key/value heads (so never 8 for this shape) and seq_len."""
    world, gpu = 8, gpu_gib * GIB
    r = recipe(world, "data.seq_len=65536", "train.micro_batch_size=1", "train.global_batch_size=8", *setting)
    allowed = [n for n in range(1, world + 1) if world % n == 0 and 32 % n == 0 and 4 % n == 0 and 65536 % n == 0]
    assert allowed == [1, 2, 4]
    want = next((n for n in allowed if fits(changed(r, sp=n), cfg, world, gpu)), None)
    assert smallest_sequence_parallel(r, cfg, world, gpu) == want


@pytest.mark.parametrize(("gpu_gib", "sp"), [(24, 1), (141, 2), (40, 4)])
@pytest.mark.parametrize("setting", [("data.document_masking=true", "model.activation_checkpointing=true"), ()])
def test_largest_seq_len_is_the_last_that_fits(cfg, gpu_gib, sp, setting):
    """Against a scan of every multiple of 1024 from the first: the last that fits before the first that does not
    (and the eight after that do not either), and the largest power of two x 1024 among those that fit."""
    world, gpu = 8, gpu_gib * GIB
    r = recipe(world, "train.micro_batch_size=1", "train.global_batch_size=8", f"parallel.sequence_parallel={sp}",
               *setting)  # fmt: skip
    k = 1
    while fits(changed(r, seq_len=1024 * k), cfg, world, gpu):
        k += 1
    assert k > 1
    assert not any(fits(changed(r, seq_len=1024 * (k + i)), cfg, world, gpu) for i in range(8))
    exact = 1024 * (k - 1)
    power = max(1024 * 2**i for i in range(20) if 1024 * 2**i <= exact)
    assert largest_seq_len(r, cfg, world, gpu) == (power, exact)


def test_largest_seq_len_steps_by_a_sequence_parallelism_that_does_not_divide_1024():
    """N = 3 (hidden 1536, 24 heads, 3 key/value heads, 6 ranks): every answer a multiple of 3 as well, and no power
    of two is."""
    shape = {"hidden_size": 1536, "num_attention_heads": 24, "num_key_value_heads": 3, "head_dim": 64}
    config = AutoConfig.for_model(**{**AutoConfig.from_pretrained(LLAMA_1B).to_dict(), **shape})
    world, gpu = 6, 60 * GIB
    r = recipe(world, "train.micro_batch_size=1", "train.global_batch_size=2", "parallel.sequence_parallel=3",
               "data.document_masking=true", "model.activation_checkpointing=true", "data.seq_len=3072")  # fmt: skip
    k = 1
    while fits(changed(r, seq_len=3072 * k), config, world, gpu):
        k += 1
    assert k > 2 and not fits(changed(r, seq_len=3072 * k + 1024), config, world, gpu)
    assert largest_seq_len(r, config, world, gpu) == (None, 3072 * (k - 1))


# ------------------------------------------------------------------------------------------------ cpt plan


def plan_lines(stdout: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r"^ *([^:\n]+?): (.*)$", stdout, re.M)}


def test_cpt_plan_shows_the_layout_the_longest_seq_len_and_the_smallest_sequence_parallelism(tmp_path, assets):
    tree = tiny_recipe(assets, tmp_path / "out", data={"seq_len": 65536},
                       train={"micro_batch_size": 1, "global_batch_size": 8},
                       parallel={"engine": "fsdp", "config": "fsdp.yaml"})  # fmt: skip
    tree["model"] = {"from_config": str(LLAMA_1B), "tokenizer": str(assets["base"]), "max_position_embeddings": 1 << 20}
    path = write_recipe(tmp_path / "r.yaml", tree)
    p = cpt("plan", str(path), "parallel.sequence_parallel=2", "--gpus-per-node", "8", "--gpu-memory-gib", "48")
    lines = plan_lines(p.stdout)
    assert lines["parallelism"] == "data-parallel 4 x sequence 2"
    assert lines["micro batch"] == "1 sequences per data-parallel rank, each split over 2 GPUs (32,768 tokens per GPU)"
    r = load_recipe(path, ["parallel.sequence_parallel=2"], world_size=8, check_files=False)
    power, exact = largest_seq_len(r, load_config(r), 8, 48 * GIB)
    assert lines["longest seq_len"].startswith(f"{power:,} as a power of two x 1,024, {exact:,} as a multiple of 1,024")
    assert "(micro batch 1, sequence 2, within 90% of the GPU)" in lines["longest seq_len"]
    assert lines["sequence parallel"].startswith("4 fits: parallel.sequence_parallel=4 (data-parallel 2 x sequence 4")
    assert "warning: the estimate" in p.stderr and "set parallel.sequence_parallel=4" in p.stderr
    assert SQUARE not in lines

    masked = cpt("plan", str(path), "data.document_masking=true", "--gpus-per-node", "8", "--gpu-memory-gib", "141")
    lines = plan_lines(masked.stdout)
    assert lines["parallelism"] == "data-parallel 8 x sequence 1" and lines["micro batch"] == "1 sequences per rank"
    assert float(lines[SQUARE].split()[0]) > 141  # 22 layers of a 65,536^2 bf16 mask
    assert lines["sequence parallel"].startswith("none fits (tried 1, 2, 4:")
    assert "model.attn_implementation=flash_attention_2" in masked.stderr
