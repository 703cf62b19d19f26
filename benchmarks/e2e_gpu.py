"""End-to-end GPU run: the 1.1B Llama shape from a config, on real text, with both engines, through `cpt run`.

    python benchmarks/e2e_gpu.py --out runs/e2e --steps 300 [--engines deepspeed fsdp]

Real text that exists offline everywhere: Python's standard library source and its English documentation topics
(the quickstart corpora, at full size), with a 32K BPE tokenizer trained on them. Writes
``benchmarks/results/<date>-e2e-<card>.json`` with the command, card, losses and perplexities of each engine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.quickstart_assets import build_corpora, build_tokenizer  # noqa: E402

ENGINE_CONFIG = {"deepspeed": "zero3.json", "fsdp": "fsdp.yaml"}


def model_dir(out: Path, tokenizer: Path) -> Path:
    """recipes/models/llama-1b.json with the vocabulary of our tokenizer, plus the tokenizer itself."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = json.loads((REPO / "recipes/models/llama-1b.json").read_text())
    cfg.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)  # fmt: skip
    d = out / "llama-1b"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(d)
    return d


def git_revision() -> str:
    """The revision that runs. ``CPT_GIT_REVISION`` first: a working tree copied to a GPU host may carry a stale
    .git that names an older commit."""
    git = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return os.environ.get("CPT_GIT_REVISION") or git.stdout.strip()


def card() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/e2e")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--engines", nargs="+", default=["deepspeed", "fsdp"])
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    out = Path(args.out).resolve()
    t0 = time.time()
    corpora = build_corpora(out / "data", max_code_chars=20_000_000)
    tok = build_tokenizer(out / "tokenizer", [corpora["prose_train"], corpora["code_train"]], vocab_size=32000)
    mdir = model_dir(out, tok)
    c = corpora
    print(f"assets ready in {time.time() - t0:.0f} s", flush=True)
    import torch

    gpus = torch.cuda.device_count()
    record = {"date": datetime.date.today().isoformat(), "card": card(), "gpus": gpus, "runs": {}}
    record["git_revision"] = git_revision()
    record["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    for engine in args.engines:
        run_dir = out / engine
        cmd = [
            sys.executable, "-m", "launcher", "run", str(REPO / "recipes/llama-1b-scratch.yaml"),
            f"output_dir={run_dir}", f"model.from_config={mdir}", f"model.tokenizer={mdir}",
            f"data.train=[{{path: {c['code_train']}, weight: 0.8}}, {{path: {c['prose_train']}, weight: 0.2}}]",
            f"eval.sets={{fineweb: null, code: {{path: {c['code_eval']}}}, prose: {{path: {c['prose_eval']}}}}}",
            "eval.max_blocks=64", "eval.every=100", "eval.at_start=true", "eval.micro_batch_size=8",
            f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_size={args.micro_batch * gpus}", "train.lr=6e-4", "train.warmup_steps=30",
            "train.log_every=10", "train.save_every=0", "data.num_workers=2", "logging.wandb=offline",
            "logging.progress=true", f"parallel.engine={engine}", f"parallel.config={ENGINE_CONFIG[engine]}",
            *args.overrides,
        ]  # fmt: skip
        print(" ".join(cmd), flush=True)
        start = time.time()
        rc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "NCCL_NVLS_ENABLE": "0"}).returncode
        wall = time.time() - start
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        train = [x for x in lines if "loss" in x]
        evals = [x for x in lines if "eval" in x]
        steady = train[len(train) // 2 :]
        record["runs"][engine] = {
            "rc": rc,
            "wall_s": round(wall, 1),
            "command": " ".join(cmd),
            "losses": {x["step"]: round(x["loss"], 4) for x in train},
            "evals": {x["step"]: x["eval"] for x in evals},
            "tokens_per_s_per_gpu": sum(x["tokens_per_s_per_device"] for x in steady) / max(1, len(steady)),
            "mfu": sum((x["mfu"] or 0) for x in steady) / max(1, len(steady)),
            "peak_mem_gib": max((x.get("mem_peak_gib", 0) for x in train), default=0),
        }
        print(json.dumps({k: v for k, v in record["runs"][engine].items() if k not in ("losses", "command")}),
              flush=True)  # fmt: skip
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    name = record["card"].replace(" ", "-").replace("/", "-")
    path = res / f"{record['date']}-e2e-{name}.json"
    path.write_text(json.dumps(record, indent=2))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return 0 if all(r["rc"] == 0 for r in record["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
