"""``cpt quickstart``: the whole workflow on any machine, with nothing downloaded.

1. Corpora from what CPython ships: English prose (``pydoc_data.topics``) and Python source (the standard library).
2. A byte-level BPE tokenizer and a ~4M-parameter Llama config, built here.
3. A base model pretrained from scratch on prose (``recipes/quickstart-base.yaml``), built once and reused while
   its data, tokenizer and config stay the same.
4. Continual pretraining of that base on code (``recipes/quickstart.yaml``): 2 workers, DeepSpeed ZeRO-3,
   evaluated on both domains before and after, so adaptation (code) and forgetting (prose) show in perplexity.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from .config import RECIPE_DIR
from .files import atomic_write
from .quickstart_assets import build_base_config, build_corpora, build_tokenizer
from .run import run_recipe

BUILT_FROM = "built_from.sha256"
"""In the base model's output_dir: what it was trained from (prose splits, tokenizer, config), hashed."""


def _fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return h.hexdigest() + "\n"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def run_quickstart(out: Path, *, fast: bool = False) -> int:
    """Build what is missing, run both stages, and say what happened. ``fast`` shortens every stage."""
    start = time.time()
    out = Path(out)
    assets = out / "assets"
    print(f"[quickstart] building corpora, tokenizer and model config under {assets}", flush=True)
    corpora = build_corpora(assets / "data", max_code_chars=400_000 if fast else 2_000_000)
    tok = build_tokenizer(assets / "tokenizer", [corpora["prose_train"], corpora["code_train"]],
                          vocab_size=1024 if fast else 4096)  # fmt: skip
    size = (
        {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}
        if fast
        else {}
    )
    config_dir = build_base_config(assets / "base-config", tok, **size)
    data = {name: str(path) for name, path in corpora.items()}
    short = ["train.max_steps=6", "data.seq_len=64", "train.log_every=1", "eval.max_blocks=16"] if fast else []

    base, cpt = out / "base", out / "cpt"
    built_from = _fingerprint([corpora["prose_train"], corpora["prose_eval"], tok / "tokenizer.json",
                               config_dir / "config.json"])  # fmt: skip
    if (base / "final" / "config.json").is_file() and _read(base / BUILT_FROM) == built_from:
        print(f"[quickstart] stage 1/2: base model already built at {base / 'final'}", flush=True)
    else:
        if base.exists():
            # A base model trained on other splits could have seen today's held-out prose, and one with another
            # tokenizer cannot read today's data; the run after it is stale too.
            print(f"[quickstart] {base} was built from other data, tokenizer or config: building it again", flush=True)
            shutil.rmtree(base)
            shutil.rmtree(cpt, ignore_errors=True)
        print("[quickstart] stage 1/2: pretraining the base model on English prose", flush=True)
        rc = run_recipe(
            str(RECIPE_DIR / "quickstart-base.yaml"),
            [f"output_dir={base}", f"model.from_config={config_dir}", f"data.train=[{{path: {data['prose_train']}}}]",
             f"eval.sets.prose.path={data['prose_eval']}", *short],
        )  # fmt: skip
        if rc:
            return rc
        atomic_write(base / BUILT_FROM, built_from)

    print("[quickstart] stage 2/2: continual pretraining on Python source, 2 workers, DeepSpeed ZeRO-3", flush=True)
    rc = run_recipe(
        str(RECIPE_DIR / "quickstart.yaml"),
        [f"output_dir={cpt}", f"model.name_or_path={base / 'final'}", f"data.train=[{{path: {data['code_train']}}}]",
         f"eval.sets.code.path={data['code_eval']}", f"eval.sets.prose.path={data['prose_eval']}",
         *(short + ["train.save_every=3", "eval.every=3"] if fast else [])],
    )  # fmt: skip
    if rc:
        return rc
    summarize(cpt, time.time() - start)
    return 0


def summarize(run_dir: Path, seconds: float) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if "eval" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    first, last = evals[0], evals[-1]
    print(f"\n[quickstart] done in {seconds:.0f} s. Perplexity before -> after continual pretraining on code, on "
          "held-out text:")  # fmt: skip
    for name in last["eval"]:
        before, after = first["eval"][name]["perplexity"], last["eval"][name]["perplexity"]
        what = "adaptation" if after < before else "forgetting"
        tokens = int(last["eval"][name]["tokens"])
        print(f"  {name:>6}: {before:10.2f} -> {after:10.2f}  ({what}, {after / before - 1:+.0%}; {tokens:,} tokens)")
    # Averages over several steps: one step's loss (16 blocks of 256 tokens) moves by a tenth either way.
    k = max(1, min(10, len(losses) // 4))
    if losses:
        first_k, last_k = ("first step", "last") if k == 1 else (f"first {k} steps", f"last {k}")
        print(f"  train loss on code: {sum(losses[:k]) / k:.2f} over the {first_k} -> {sum(losses[-k:]) / k:.2f} "
              f"over the {last_k}")  # fmt: skip
    print(f"  outputs in {run_dir}: metrics.jsonl, eval_results.json, loss.png, README.md, checkpoints/, final/")
    print(f"  load it: AutoModelForCausalLM.from_pretrained('{run_dir / 'final'}')")
