import ast
import json
import math
import re
from pathlib import Path

import pytest

from launcher import quickstart_assets as qa

ENGLISH_WORDS = re.compile(r"\b(the|of|is|and|to|a|in|that|are|for|be|if)\b", re.IGNORECASE)


def _english_ratio(text: str) -> float:
    """Share of words that are very common English function words."""
    return len(ENGLISH_WORDS.findall(text)) / max(len(re.findall(r"[A-Za-z]+", text)), 1)


def _texts(path: Path) -> list[str]:
    return list(qa.read_jsonl_texts(path))


def _build_all(root: Path) -> dict[str, Path]:
    corpora = qa.build_corpora(root / "data")
    tok_dir = qa.build_tokenizer(root / "tokenizer", [corpora["prose_train"], corpora["code_train"]])
    base_dir = qa.build_base_config(root / "base", tok_dir)
    return {**corpora, "tokenizer": tok_dir, "base": base_dir}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return _build_all(tmp_path_factory.mktemp("quickstart_a"))


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["tokenizer"])


def test_corpora_are_non_empty_with_usable_eval_sets(assets):
    for domain in ("prose", "code"):
        train, held_out = _texts(assets[f"{domain}_train"]), _texts(assets[f"{domain}_eval"])
        assert len(train) >= 200, domain
        assert all(doc.strip() for doc in train + held_out), domain
        assert sum(map(len, held_out)) >= 15_000, domain
        assert abs(len(held_out) / (len(train) + len(held_out)) - 1 / qa.EVAL_EVERY[domain]) <= 0.02, domain


def test_every_line_is_a_text_record(assets):
    for split in qa.SPLITS:
        for line in assets[split].read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            assert list(record) == ["text"] and isinstance(record["text"], str)


def test_no_document_is_both_trained_on_and_evaluated(assets):
    for domain in ("prose", "code"):
        train, held_out = set(_texts(assets[f"{domain}_train"])), set(_texts(assets[f"{domain}_eval"]))
        assert not train & held_out, domain
    assert not set(_texts(assets["prose_train"])) & set(_texts(assets["code_train"]))


def _parses(text: str) -> bool:
    try:
        ast.parse(text)
    except SyntaxError:
        return False
    return True


def test_code_documents_are_python(assets):
    docs = _texts(assets["code_train"]) + _texts(assets["code_eval"])
    statement = re.compile(r"^\s*(def|class|import|from)\s|^\s*[\w.]+\s*=", re.MULTILINE)
    assert sum(bool(statement.search(doc)) for doc in docs) / len(docs) >= 0.95
    assert sum(map(_parses, docs)) / len(docs) >= 0.5
    assert sum(map(len, docs)) <= 2_000_000
    assert max(map(len, docs)) <= qa.CODE_DOC_CHARS


def test_code_chunks_reassemble_into_the_source_file():
    big = max(qa.stdlib_source_files()[:200], key=lambda p: p.stat().st_size)
    text = big.read_text(encoding="utf-8")
    chunks = qa._pack(qa._code_blocks(text, qa.CODE_DOC_CHARS), qa.CODE_DOC_CHARS)
    assert len(chunks) > 1
    assert "".join(chunks) == text
    assert all(len(chunk) <= qa.CODE_DOC_CHARS for chunk in chunks)


def test_stdlib_selection_skips_tests_and_tooling():
    root = Path(qa.sysconfig.get_paths()["stdlib"])
    rels = [p.relative_to(root).as_posix() for p in qa.stdlib_source_files()]
    assert rels == sorted(rels)
    assert "os.py" in rels
    banned = {"test", "tests", "idlelib", "lib2to3", "site-packages", "pydoc_data"}
    assert not [rel for rel in rels if banned & set(rel.split("/")[:-1])]


def test_prose_documents_are_english_not_code(assets):
    docs = _texts(assets["prose_train"]) + _texts(assets["prose_eval"])
    assert not any(_parses(doc) for doc in docs)
    ratios = [_english_ratio(doc) for doc in docs]
    assert sum(ratio >= 0.08 for ratio in ratios) / len(ratios) >= 0.95
    assert sum(map(len, docs)) >= 300_000


def test_domains_differ(assets):
    prose = _english_ratio("".join(_texts(assets["prose_train"])))
    code = _english_ratio("".join(_texts(assets["code_train"])))
    assert prose > 0.2 and prose > 1.5 * code


def test_max_code_chars_caps_the_code_domain(tmp_path):
    corpora = qa.build_corpora(tmp_path, max_code_chars=200_000)
    chars = sum(len(doc) for split in ("code_train", "code_eval") for doc in _texts(corpora[split]))
    assert 150_000 <= chars <= 200_000


def test_builds_are_byte_identical(assets, tmp_path):
    again = _build_all(tmp_path)
    for split in qa.SPLITS:
        assert assets[split].read_bytes() == again[split].read_bytes(), split
    assert (assets["prose_train"].parent / qa.CORPUS_MARKER).read_bytes() == (
        again["prose_train"].parent / qa.CORPUS_MARKER
    ).read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (assets["tokenizer"] / name).read_bytes() == (again["tokenizer"] / name).read_bytes(), name
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (assets["base"] / name).read_bytes() == (again["base"] / name).read_bytes(), name


def test_corpus_build_is_skipped_when_up_to_date_and_repaired_when_not(tmp_path):
    corpora = qa.build_corpora(tmp_path, max_code_chars=100_000)
    stamps = {split: path.stat().st_mtime_ns for split, path in corpora.items()}
    original = corpora["code_eval"].read_bytes()

    assert qa.build_corpora(tmp_path, max_code_chars=100_000) == corpora
    assert {split: path.stat().st_mtime_ns for split, path in corpora.items()} == stamps

    corpora["code_eval"].write_text('{"text": "tampered"}\n', encoding="utf-8")
    qa.build_corpora(tmp_path, max_code_chars=100_000)
    assert corpora["code_eval"].read_bytes() == original

    qa.build_corpora(tmp_path, max_code_chars=120_000)
    marker = json.loads((tmp_path / qa.CORPUS_MARKER).read_text(encoding="utf-8"))
    assert marker["params"]["max_code_chars"] == 120_000


def test_tokenizer_is_retrained_only_when_its_inputs_change(assets, tmp_path):
    small = qa.build_corpora(tmp_path / "data", max_code_chars=50_000)
    tok_dir = qa.build_tokenizer(tmp_path / "tok", [small["code_train"]], vocab_size=512)
    stamp = (tok_dir / "tokenizer.json").stat().st_mtime_ns
    qa.build_tokenizer(tok_dir, [small["code_train"]], vocab_size=512)
    assert (tok_dir / "tokenizer.json").stat().st_mtime_ns == stamp
    qa.build_tokenizer(tok_dir, [small["code_train"]], vocab_size=600)
    assert len(json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]) == 600


def test_tokenizer_round_trips_held_out_text(assets, tokenizer):
    for split in ("prose_eval", "code_eval"):
        for doc in _texts(assets[split]):
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == doc
    tricky = "def f(x):\n\tif x:\n        return  '  é ✓ 🐍'\r\n\n\n    # trailing   \n"
    assert tokenizer.decode(tokenizer(tricky, add_special_tokens=False)["input_ids"]) == tricky


def test_tokenizer_compresses_both_domains(assets, tokenizer):
    for split in ("prose_eval", "code_eval"):
        text = "".join(_texts(assets[split]))
        assert len(text) / len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= 3.0, split


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == 4096
    assert [tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token] == list(
        qa.SPECIAL_TOKENS
    )
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id}
    assert len(ids) == 4
    assert tokenizer("</s>", add_special_tokens=False)["input_ids"] == [tokenizer.eos_token_id]
    assert tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=True) == ""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    assert tokenizer.bos_token_id not in plain and tokenizer.eos_token_id not in plain
    assert tokenizer.decode(plain) == "x"


def test_base_config_builds_a_working_llama(assets, tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(assets["base"])
    assert config.model_type == "llama"
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert config.tie_word_embeddings is True
    assert config.rms_norm_eps == 1e-5
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (256, 4, 2)

    generation = GenerationConfig.from_pretrained(assets["base"])
    assert generation.eos_token_id == tokenizer.eos_token_id and generation.pad_token_id == tokenizer.pad_token_id

    base_tokenizer = AutoTokenizer.from_pretrained(assets["base"])
    sample = "import os\n\nThe path is joined.\n"
    assert base_tokenizer(sample)["input_ids"] == tokenizer(sample)["input_ids"]

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([base_tokenizer(sample)["input_ids"] + [base_tokenizer.eos_token_id]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert math.isfinite(out.loss.item())
    assert abs(out.loss.item() - math.log(len(tokenizer))) < 1.0
    assert 3_000_000 < sum(p.numel() for p in model.parameters()) < 5_000_000


def test_base_config_rejects_inconsistent_heads(assets, tmp_path):
    with pytest.raises(ValueError, match="num_kv_heads"):
        qa.build_base_config(tmp_path, assets["tokenizer"], num_heads=4, num_kv_heads=3)
