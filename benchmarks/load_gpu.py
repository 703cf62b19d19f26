"""Loading a large pretrained checkpoint: time from `cpt run` to the engine being ready, and every rank's peak host
memory, for this tree and (optionally) another revision of the launcher, both engines, in one call.

    python benchmarks/load_gpu.py --config recipes/models/llama-3.1-8b.json --assets bench_assets \
        [--old /tmp/old-tree] [--gpus N] --out $OUT

Writes the model once as Hugging Face safetensors (random bf16 values, 5 GB shards, written tensor by tensor: this
script never holds the model either), then runs `cpt run` with `train.max_steps=0` (load, build the engine, stop)
for each (tree, engine). Each rank's peak RSS is its VmHWM, sampled from /proc while it runs; "ready" is the time
of the launcher's log line that the weights are in place, measured from the start of `cpt run`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import psutil
import torch

GB = 1e9


def write_checkpoint(config_path: Path, tokenizer_dir: Path, out: Path, shard_bytes: float = 5e9) -> float:
    """Random bf16 weights of the model ``config_path`` describes, as sharded safetensors with an index."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "model.safetensors.index.json").is_file():
        return 0.0
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cfg = AutoConfig.from_pretrained(config_path)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    names = [
        (n, tuple(p.shape))
        for n, p in meta.state_dict().items()
        if not (cfg.tie_word_embeddings and n == "lm_head.weight")
    ]
    gen = torch.Generator(device="cuda").manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    files = []

    def flush() -> None:
        path = out / f"part-{len(files):05d}.safetensors"
        save_file(shards[-1], str(path), metadata={"format": "pt"})
        files.append((path, list(shards[-1])))
        shards[-1] = {}

    for name, shape in names:
        t = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
        if size and size + t.numel() * 2 > shard_bytes:
            flush()
            size = 0
        shards[-1][name] = t
        size += t.numel() * 2
    flush()
    weight_map, total = {}, 0
    for i, (path, keys) in enumerate(files):
        final = out / f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        path.rename(final)
        weight_map.update({k: final.name for k in keys})
    for _, shape in names:
        total += 2 * int(torch.tensor(shape).prod().item()) if shape else 2
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    cfg.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer"):
            (out / f.name).write_bytes(f.read_bytes())
    return time.perf_counter() - start


READY = re.compile(r"(weights loaded in|model sharded in|model initialised in|DeepSpeed engine initialised in)")


def drop_page_cache() -> bool:
    """Whether the page cache could be emptied (root only), so that a load reads from disk."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(tree: Path, recipe: Path, timeout: float) -> dict:
    """Run `cpt run RECIPE` from ``tree``; every rank's peak RSS and the times of the log lines that matter."""
    env = {**os.environ, "PYTHONPATH": f"{tree}:{os.environ.get('PYTHONPATH', '')}", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=tree, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    peaks: dict[int, int] = {}
    ranks: dict[int, int] = {}
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append((time.perf_counter() - start, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None and time.perf_counter() - start < timeout:
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for child in children:
            try:
                if child.pid not in ranks:
                    if "launcher.train" not in " ".join(child.cmdline()):
                        continue
                    ranks[child.pid] = int(child.environ().get("RANK", "0"))
                status = Path(f"/proc/{child.pid}/status").read_text()
            except (psutil.Error, OSError, ValueError):
                continue
            hwm = next((int(x.split()[1]) * 1024 for x in status.splitlines() if x.startswith("VmHWM:")), 0)
            peaks[ranks[child.pid]] = max(peaks.get(ranks[child.pid], 0), hwm)
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    reader.join(timeout=10)
    total = time.perf_counter() - start
    ready = [t for t, line in lines if READY.search(line)]
    return {
        "rc": proc.returncode,
        "seconds_to_exit": round(total, 1),
        "seconds_to_ready": round(max(ready), 1) if ready else None,
        "peak_rss_gb_by_rank": {r: round(v / GB, 2) for r, v in sorted(peaks.items())},
        "log_tail": [line for _, line in lines if "INFO" in line or "rror" in line][-14:],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--assets", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/load-bench/model"))
    ap.add_argument("--old", type=Path, default=None, help="another tree of the launcher to measure the same way")
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--engines", default="fsdp,deepspeed")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    args = ap.parse_args()
    here = Path(__file__).resolve().parent.parent
    written = write_checkpoint(args.config, args.assets / "tokenizer", args.model_dir)
    size = sum(f.stat().st_size for f in args.model_dir.glob("*.safetensors"))
    configs = {"fsdp": "fsdp.yaml", "deepspeed": "zero3.json"}
    results = {"date": str(date.today()), "card": torch.cuda.get_device_name(0), "gpus": args.gpus,
               "torch": torch.__version__, "checkpoint_gb": round(size / GB, 2), "write_s": round(written, 1),
               "command": " ".join(sys.argv), "runs": {}}  # fmt: skip
    trees = {"new": here} | ({"old": args.old.resolve()} if args.old else {})
    # "random": this tree from model.from_config, nothing read: the process's own host memory for this shape
    runs = [(name, tree, True) for name, tree in trees.items()] + [("random", here, False)]
    for engine in args.engines.split(","):
        for name, tree, pretrained in runs:
            out = Path("/tmp/load-bench") / f"{name}-{engine}"
            recipe = Path("/tmp/load-bench") / f"{name}-{engine}.json"
            recipe.write_text(json.dumps({
                "output_dir": str(out),
                "model": {"name_or_path": str(args.model_dir)} if pretrained else
                         {"from_config": str(args.model_dir), "tokenizer": str(args.model_dir)},
                "data": {"seq_len": 2048, "num_workers": 0},
                "train": {"max_steps": 0, "micro_batch_size": 1, "compile": False},
                "parallel": {"engine": engine, "config": configs[engine], "nproc_per_node": args.gpus},
                "logging": {"wandb": "disabled", "progress": False},
            }))  # fmt: skip
            cold = drop_page_cache()
            r = measure(tree, recipe, args.timeout) | {"page_cache_dropped": cold}
            results["runs"][f"{name}-{engine}"] = r
            print(json.dumps({f"{name}-{engine}": {k: v for k, v in r.items() if k != "log_tail"}}), flush=True)
            if r["rc"] != 0:
                print("\n".join(r["log_tail"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    card = re.sub(r"\W+", "-", results["card"]).strip("-")
    path = args.out / f"{date.today()}-load-{args.gpus}gpu-{card}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
