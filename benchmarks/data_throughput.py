"""CPU throughput of the training data pipeline: read, tokenize, mix and pack, in DataLoader workers.

    python benchmarks/data_throughput.py [--out runs/data-bench] [--code-chars 8000000] [--vocab 4096 32000]
                                         [--workers 0 1 2] [--seconds 20] [--repeat 3]

Real text that exists offline everywhere (the quickstart corpora: Python's standard library source and its English
documentation topics) in 8 JSON Lines files per domain, mixed 80/20, read through ``TrainStream`` exactly as
training reads it (seq_len 2048, micro-batch 8, shuffle window 1024), with byte-level BPE tokenizers trained on the
same text. For each vocabulary size and number of DataLoader workers it reports:

* tokens/s of the whole pipeline and per worker (the trainer process itself when num_workers is 0), the median of
  ``--repeat`` runs;
* tokens per CPU-second of the processes doing the work, which other load on the machine does not change;
* the trainer's own CPU time per batch, the time to the first batch, and the machine's load average (other
  processes competing for the cores lower tokens/s, much less tokens per CPU-second);
* tokens per CPU-second of the tokenizer alone on the same documents in the same 80/20 token mixture, for scale.

``TOKENIZERS_PARALLELISM=false`` throughout, as in the DataLoader workers, so the numbers are per core. Writes
``benchmarks/results/<date>-data-cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.quickstart_assets import build_corpora, build_tokenizer, read_jsonl_texts  # noqa: E402

SEQ_LEN = 2048
MICRO_BATCH = 8
SHUFFLE = 1024
FILES_PER_DOMAIN = 8


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def split_corpus(src: Path, out_dir: Path, n: int) -> Path:
    """``src`` (jsonl) as ``n`` files of consecutive documents, so readers get whole files as on a real corpus."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [x for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    size = -(-len(lines) // n)
    for i in range(n):
        (out_dir / f"part-{i:02d}.jsonl").write_text("".join(x + "\n" for x in lines[i * size : (i + 1) * size]))
    return out_dir


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids() -> list[int]:
    """This process's children: the DataLoader workers."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def measure_stream(sources, tokenizer, num_workers: int, seconds: float) -> dict:
    """Tokens/s of ``TrainStream`` after its first batches, tokens per CPU-second of the processes that read,
    tokenize and pack (robust to other load on the machine), and the time to the first batch."""
    from launcher.data import TrainStream

    stream = TrainStream(
        sources, tokenizer, seq_len=SEQ_LEN, micro_batch_size=MICRO_BATCH, rank=0, world_size=1, seed=0,
        num_workers=num_workers, prefetch_factor=4, shuffle_buffer=SHUFFLE,
    )  # fmt: skip
    per_batch = SEQ_LEN * MICRO_BATCH
    start = time.perf_counter()
    it = iter(stream)
    next(it)
    first = time.perf_counter() - start
    # Warm-up: the workers' prefetch queues fill while the first batches are taken.
    for _ in range(4 * max(1, num_workers)):
        next(it)
    workers = child_pids()
    assert len(workers) == num_workers, workers
    n = 0
    cpu0 = [cpu_seconds(p) for p in workers]
    main0 = time.process_time()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    elapsed = time.perf_counter() - t0
    main_cpu = time.process_time() - main0
    worker_cpu = sum(cpu_seconds(p) for p in workers) - sum(cpu0)
    mix = stream.gather_metrics()
    del it
    tokens = n * per_batch
    return {
        "num_workers": num_workers,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "batches": n,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed),
        "tokens_per_s_per_worker": round(tokens / elapsed / max(1, num_workers)),
        # Where the work runs: the workers, or the trainer process itself without workers.
        "tokens_per_cpu_s": round(tokens / (worker_cpu if num_workers else main_cpu)),
        "trainer_cpu_ms_per_batch": round(1000 * main_cpu / n, 2),
        "first_batch_s": round(first, 2),
        "mix": {k.removeprefix("data/mix/"): round(v, 3) for k, v in mix.items() if k.startswith("data/mix/")},
    }


def tokenizer_rate(tokenizer, texts: list[str], seconds: float) -> tuple[float, float]:
    """Tokens per CPU-second of the tokenizer alone on ``texts``, called as the pipeline calls it (batches of 64
    documents, one thread), and characters per token."""
    from launcher.data.packing import encode

    tokens, chars, n, t0, cpu0 = 0, 0, 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        start = (n * 64) % len(texts)
        batch = texts[start : start + 64]
        tokens += sum(len(x) for x in encode(tokenizer, batch))
        chars += sum(map(len, batch))
        n += 1
    return tokens / (time.process_time() - cpu0), chars / tokens


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/data-bench")
    p.add_argument("--code-chars", type=int, default=8_000_000)
    p.add_argument("--vocab", type=int, nargs="+", default=[4096, 32000])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()

    import torch
    from transformers import AutoTokenizer

    from launcher.config import SourceConfig

    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    corpora = build_corpora(out / "data", max_code_chars=args.code_chars)
    code = split_corpus(corpora["code_train"], out / "files" / "code", FILES_PER_DOMAIN)
    prose = split_corpus(corpora["prose_train"], out / "files" / "prose", FILES_PER_DOMAIN)
    sources = [SourceConfig(path=str(code), weight=0.8), SourceConfig(path=str(prose), weight=0.2)]
    texts = {k: list(read_jsonl_texts(corpora[k])) for k in ("code_train", "prose_train")}
    chars = {k: sum(map(len, v)) for k, v in texts.items()}

    git = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "launcher"], capture_output=True, text=True, cwd=REPO)
    import datasets
    import tokenizers

    record: dict = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/data_throughput.py", *sys.argv[1:]]),
        "git_revision": git.stdout.strip() if git.returncode == 0 else "",
        "git_dirty": bool(dirty.stdout.strip()),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "datasets": datasets.__version__,
        },
        "pipeline": {
            "seq_len": SEQ_LEN,
            "micro_batch_size": MICRO_BATCH,
            "shuffle_buffer": SHUFFLE,
            "sources": {
                "code": {"files": FILES_PER_DOMAIN, "chars": chars["code_train"], "weight": 0.8},
                "prose": {"files": FILES_PER_DOMAIN, "chars": chars["prose_train"], "weight": 0.2},
            },
            "tokenizers_parallelism": False,
        },
        "results": [],
    }
    for vocab in args.vocab:
        tok_dir = build_tokenizer(out / f"tokenizer-{vocab}", [corpora["code_train"], corpora["prose_train"]],
                                  vocab_size=vocab)  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        code_rate, code_chars = tokenizer_rate(tokenizer, texts["code_train"], min(args.seconds, 10))
        prose_rate, prose_chars = tokenizer_rate(tokenizer, texts["prose_train"], min(args.seconds, 10))
        # The pipeline's tokens are 80% code and 20% prose: the tokenizer alone would take 0.8/code + 0.2/prose s.
        alone = {"code": round(code_rate), "prose": round(prose_rate),
                 "mixture": round(1 / (0.8 / code_rate + 0.2 / prose_rate))}  # fmt: skip
        chars_per_token = {"code": round(code_chars, 2), "prose": round(prose_chars, 2)}
        print(f"vocab {vocab}: tokenizer alone {alone} tokens/CPU-s, {chars_per_token} chars/token", flush=True)
        for workers in args.workers:
            runs = [measure_stream(sources, tokenizer, workers, args.seconds) for _ in range(args.repeat)]
            best = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]  # the median run
            r = {**best, "runs_tokens_per_s": [x["tokens_per_s"] for x in runs], "vocab": vocab,
                 "chars_per_token": chars_per_token, "tokenizer_alone_tokens_per_cpu_s": alone}  # fmt: skip
            record["results"].append(r)
            print(json.dumps(r), flush=True)
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    path = res / f"{record['date']}-data-cpu.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
