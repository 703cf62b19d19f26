"""``cpt quickstart``: the whole workflow on any machine, with nothing downloaded.

1. Corpora from what CPython ships: English prose (``pydoc_data.topics``) and Python source (the standard library).
2. A byte-level BPE tokenizer and a ~4M-parameter Llama config, built here.
3. A base model pretrained from scratch on prose (``recipes/quickstart-base.yaml``), built once and reused while
   its data, tokenizer and config stay the same.
4. Continual pretraining of that base on code (``recipes/quickstart.yaml``): 2 workers, DeepSpeed ZeRO-3,
   evaluated on both domains before and after, so adaptation (code) and forgetting (prose) show in perplexity.
5. The same run replaying prose (``recipes/quickstart-replay.yaml``: a share of prose that falls from 30% to 10%
   over the run): the closing lines compare how much prose perplexity rose with replay and without.
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
        print(f"[quickstart] stage 1/3: base model already built at {base / 'final'}", flush=True)
    else:
        if base.exists():
            # A base model trained on other splits could have seen today's held-out prose, and one with another
            # tokenizer cannot read today's data; the run after it is stale too.
            print(f"[quickstart] {base} was built from other data, tokenizer or config: building it again", flush=True)
            shutil.rmtree(base)
            shutil.rmtree(cpt, ignore_errors=True)
        print("[quickstart] stage 1/3: pretraining the base model on English prose", flush=True)
        rc = run_recipe(
            str(RECIPE_DIR / "quickstart-base.yaml"),
            [f"output_dir={base}", f"model.from_config={config_dir}", f"data.train=[{{path: {data['prose_train']}}}]",
             f"eval.sets.prose.path={data['prose_eval']}", *short],
        )  # fmt: skip
        if rc:
            return rc
        atomic_write(base / BUILT_FROM, built_from)

    print("[quickstart] stage 2/3: continual pretraining on Python source, 2 workers, DeepSpeed ZeRO-3", flush=True)
    stage2 = [f"model.name_or_path={base / 'final'}", f"eval.sets.code.path={data['code_eval']}",
              f"eval.sets.prose.path={data['prose_eval']}", *(short + ["train.save_every=3", "eval.every=3"] if fast
                                                               else [])]  # fmt: skip
    rc = run_recipe(
        str(RECIPE_DIR / "quickstart.yaml"),
        [f"output_dir={cpt}", f"data.train=[{{path: {data['code_train']}}}]", *stage2],
    )
    if rc:
        return rc
    replay = out / "cpt-replay"
    print("[quickstart] stage 3/3: the same, replaying English prose (30% of the tokens, falling to 10%)", flush=True)
    end = 6 if fast else 80
    rc = run_recipe(
        str(RECIPE_DIR / "quickstart-replay.yaml"),
        [f"output_dir={replay}", f"data.train.0.path={data['code_train']}", f"data.train.1.path={data['prose_train']}",
         f"data.train.0.weight={{0: 0.7, {end}: 0.9}}", f"data.train.1.weight={{0: 0.3, {end}: 0.1}}", *stage2],
    )  # fmt: skip
    if rc:
        return rc
    summarize(cpt, time.time() - start)
    compare_replay(cpt, replay)
    return 0


def _evals(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if "eval" in r]


def compare_replay(plain: Path, replay: Path) -> None:
    """The closing lines: the rise of prose perplexity (forgetting) and the fall of code perplexity (adaptation),
    without replay and with it."""
    print("\n[quickstart] replay: perplexity before -> after, without replay | with prose replay (30% -> 10%):")
    runs = {"without": _evals(plain), "with": _evals(replay)}
    for name in runs["without"][-1]["eval"]:
        change = {k: e[-1]["eval"][name]["perplexity"] / e[0]["eval"][name]["perplexity"] - 1 for k, e in runs.items()}
        print(f"  {name:>6}: {change['without']:+.0%} without replay | {change['with']:+.0%} with replay")
    prose = {k: e[-1]["eval"]["prose"]["perplexity"] / e[0]["eval"]["prose"]["perplexity"] for k, e in runs.items()}
    verdict = "less" if prose["with"] < prose["without"] else "not less"
    print(f"  prose perplexity rose {verdict} with replay; outputs of the replay run in {replay}")


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
