"""Offline ingredients for the quickstart: two text domains, a tokenizer and a small Llama config.

The quickstart has to demonstrate continual pretraining on a machine with no network access, so everything here is
built from files that ship with CPython itself:

* domain A, English prose: the reference-manual topics bundled in ``pydoc_data.topics`` (what ``help("with")`` shows);
* domain B, Python code: the standard-library sources under ``sysconfig.get_paths()["stdlib"]``.

Every builder is deterministic: the same Python version produces the same bytes, so quickstart numbers are comparable
between machines and reruns.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from .files import atomic_write

CORPUS_FORMAT_VERSION = 2
TOKENIZER_FORMAT_VERSION = 1

CORPUS_MARKER = "corpora.json"
TOKENIZER_MARKER = "tokenizer_build.json"

SPLITS = ("prose_train", "prose_eval", "code_train", "code_eval")
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>")

# One document in every N of each domain goes to its held-out split, spread over the whole domain. The prose domain
# is small (about 120K tokens): one in 20 would leave its eval set at about 5.7K tokens, too few to tell forgetting
# from noise, so a fifth of it is held out (about 25K tokens); code has plenty, and one in 20 gives about 31K.
EVAL_EVERY = {"prose": 5, "code": 20}

PROSE_DOC_CHARS = 2_000
CODE_DOC_CHARS = 8_000

# Directories that are tests, bundled third-party code, build products, or the prose domain itself.
_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__", "pydoc_data"}
)


# --------------------------------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------------------------------


def _pack(pieces: Iterable[str], limit: int) -> list[str]:
    """Greedily concatenate consecutive pieces into chunks of at most ``limit`` chars (a lone oversized piece stays
    whole), so that chunks joined back together give exactly the input."""
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + len(piece) > limit:
            chunks.append(current)
            current = ""
        current += piece
    if current:
        chunks.append(current)
    return chunks


def _split_paragraphs(text: str) -> list[str]:
    """Split at blank lines, keeping the separators attached so nothing is lost."""
    pieces: list[str] = []
    current: list[str] = []
    for line in text.splitlines(keepends=True):
        if current and not line.strip() and current[-1].strip():
            pieces.append("".join(current))
            current = []
        current.append(line)
    if current:
        pieces.append("".join(current))
    return pieces


def _prose_documents() -> list[str]:
    """Reference-manual topics, sorted by name, cut into paragraph groups of about ``PROSE_DOC_CHARS``."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for name in sorted(topics):
        text = topics[name].strip("\n") + "\n"
        docs.extend(chunk.strip("\n") + "\n" for chunk in _pack(_split_paragraphs(text), PROSE_DOC_CHARS))
    return docs


def _code_blocks(text: str, limit: int) -> list[str]:
    """Split source into pieces that start at a blank line, preferring top-level statement boundaries so that a chunk
    of a long file still reads like a run of whole functions and classes."""
    lines = text.splitlines(keepends=True)
    top: list[list[str]] = [[]]
    for i, line in enumerate(lines):
        starts_top_level = line.strip() and not line[0].isspace() and i > 0 and not lines[i - 1].strip()
        if starts_top_level and top[-1]:
            top.append([])
        top[-1].append(line)
    pieces: list[str] = []
    for block_lines in top:
        block = "".join(block_lines)
        if len(block) <= limit:
            pieces.append(block)
            continue
        for paragraph in _split_paragraphs(block):
            if len(paragraph) <= limit:
                pieces.append(paragraph)
            else:
                pieces.extend(_pack(paragraph.splitlines(keepends=True), limit))
    return pieces


def stdlib_source_files() -> list[Path]:
    """Standard-library ``.py`` files in sorted relative-path order, without tests, IDLE, lib2to3, bundled packages,
    build-configuration modules and the pydoc topics (which are the prose domain)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata"):
            continue
        if not path.is_file():
            continue
        files.append((rel.as_posix(), path))
    return [path for _, path in sorted(files)]


def _code_files(max_chars: int) -> Iterator[list[str]]:
    """Per source file, its documents (one per file, or ~``CODE_DOC_CHARS`` chunks for long files), stopping at
    ``max_chars`` in total."""
    total = 0
    for path in stdlib_source_files():
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue
        if not text.endswith("\n"):
            text += "\n"
        docs = [text] if len(text) <= CODE_DOC_CHARS else _pack(_code_blocks(text, CODE_DOC_CHARS), CODE_DOC_CHARS)
        kept = []
        for doc in docs:
            if total + len(doc) > max_chars:
                break
            kept.append(doc)
            total += len(doc)
        if kept:
            yield kept
        if len(kept) < len(docs):
            return


def _dedup(docs: Iterable[str], seen: set[str]) -> list[str]:
    out = []
    for doc in docs:
        if doc.strip() and doc not in seen:
            seen.add(doc)
            out.append(doc)
    return out


def _jsonl_bytes(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs).encode("utf-8")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _corpus_params(max_code_chars: int) -> dict:
    return {
        "format_version": CORPUS_FORMAT_VERSION,
        "python": ".".join(map(str, sys.version_info[:3])),
        "max_code_chars": max_code_chars,
        "eval_every": EVAL_EVERY,
    }


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _corpora_up_to_date(out_dir: Path, params: dict) -> bool:
    marker = _read_marker(out_dir / CORPUS_MARKER)
    if not marker or marker.get("params") != params:
        return False
    for split in SPLITS:
        path = out_dir / f"{split}.jsonl"
        if not path.is_file() or marker.get("splits", {}).get(split, {}).get("sha256") != _sha256(path):
            return False
    return True


def _held_out(i: int, domain: str) -> bool:
    """Whether the ``i``-th document of ``domain`` is held out: one in every ``EVAL_EVERY[domain]``, from the middle
    of each run of that many."""
    every = EVAL_EVERY[domain]
    return i % every == every // 2


def build_corpora(out_dir: Path, *, max_code_chars: int = 2_000_000) -> dict[str, Path]:
    """Write the prose and code domains as ``{"text": ...}`` jsonl files and return their paths by split name.

    Every 5th prose and every 20th code document is held out for evaluation (``EVAL_EVERY``), which spreads the
    held-out text over the whole domain rather than over a few topics or modules. Identical documents are kept once,
    so no text is both trained on and evaluated. ``corpora.json`` records parameters, sizes and hashes; when it
    matches the files on disk the build is skipped.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {split: out_dir / f"{split}.jsonl" for split in SPLITS}
    params = _corpus_params(max_code_chars)
    if _corpora_up_to_date(out_dir, params):
        return paths

    seen: set[str] = set()
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for i, doc in enumerate(_dedup(_prose_documents(), seen)):
        splits["prose_eval" if _held_out(i, "prose") else "prose_train"].append(doc)
    code_docs = _dedup((doc for file_docs in _code_files(max_code_chars) for doc in file_docs), seen)
    for i, doc in enumerate(code_docs):
        splits["code_eval" if _held_out(i, "code") else "code_train"].append(doc)

    stats = {}
    for split, docs in splits.items():
        data = _jsonl_bytes(docs)
        atomic_write(paths[split], data)
        stats[split] = {"docs": len(docs), "chars": sum(map(len, docs)), "sha256": hashlib.sha256(data).hexdigest()}
    marker = {"params": params, "splits": stats}
    atomic_write(out_dir / CORPUS_MARKER, (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return paths


def read_jsonl_texts(path: Path) -> Iterator[str]:
    """The ``text`` field of every line of a jsonl corpus file."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------


def _tokenizer_params(train_files: list[Path], vocab_size: int) -> dict:
    import tokenizers

    return {
        "format_version": TOKENIZER_FORMAT_VERSION,
        "tokenizers": tokenizers.__version__,
        "vocab_size": vocab_size,
        "train_files_sha256": [_sha256(Path(p)) for p in train_files],
    }


def _make_tokenizer_config_portable(out_dir: Path) -> None:
    """Name the generic fast-tokenizer class, which every transformers version resolves, and drop load-time keys
    that newer versions write back, so the saved files stay the same wherever they were loaded from."""
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    atomic_write(path, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def build_tokenizer(out_dir: Path, train_files: list[Path], *, vocab_size: int = 4096) -> Path:
    """Train a byte-level BPE tokenizer on the ``text`` fields of ``train_files`` and save it as a Hugging Face
    tokenizer in ``out_dir``.

    Byte-level BPE with no normalizer and no prefix space is lossless, so decoding gives back code with its exact
    indentation. No special tokens are added on encode: sequence packing appends ``</s>`` itself. Training is skipped
    when ``tokenizer_build.json`` shows the same inputs were already used.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = _tokenizer_params(train_files, vocab_size)
    marker = _read_marker(out_dir / TOKENIZER_MARKER)
    if marker == params and (out_dir / "tokenizer.json").is_file():
        return out_dir

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts() -> Iterator[str]:
        for path in train_files:
            yield from read_jsonl_texts(path)

    tok.train_from_iterator(texts(), trainer=trainer)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.save_pretrained(out_dir)
    _make_tokenizer_config_portable(out_dir)
    atomic_write(out_dir / TOKENIZER_MARKER, (json.dumps(params, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return out_dir


# --------------------------------------------------------------------------------------------------------------------
# Model config
# --------------------------------------------------------------------------------------------------------------------


def build_base_config(
    out_dir: Path,
    tokenizer_dir: Path,
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 688,
    max_position_embeddings: int = 1024,
) -> Path:
    """Write a small Llama ``config.json``, ``generation_config.json`` and the tokenizer into ``out_dir``, so it can
    stand in for a hub model id: ``AutoConfig``, ``AutoTokenizer`` and ``AutoModelForCausalLM.from_config`` all work
    on it. The defaults give about 4M parameters, small enough to pretrain in minutes on a CPU."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}) and num_heads by "
            f"num_kv_heads ({num_kv_heads})"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    rope_theta = 10_000.0
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        rope_kwargs: dict = {"rope_parameters": {"rope_type": "default", "rope_theta": rope_theta}}
    else:
        rope_kwargs = {"rope_theta": rope_theta}

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        **rope_kwargs,
        **ids,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out_dir)
    GenerationConfig(**ids).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _make_tokenizer_config_portable(out_dir)
    return out_dir
