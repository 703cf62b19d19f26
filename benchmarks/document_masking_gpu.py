"""GPU speed cost of ``data.document_masking``: one training step (forward, backward) with and without it.

    python benchmarks/document_masking_gpu.py [--seq-len 2048 8192] [--micro-batch 4] [--layers 22]
                                               [--attn sdpa flash_attention_2] [--doc-tokens 600]

The 1.1B Llama shape (``recipes/models/llama-1b.json``, optionally fewer layers) in bf16 with random weights, on
packed blocks of random tokens whose documents (EOS-separated) have exponentially distributed lengths with the
given mean. Without masking the model gets ``input_ids`` only (sdpa runs its causal kernel); with masking it also
gets ``position_ids`` from :func:`launcher.data.document_position_ids`, exactly as the training engines pass them:
sdpa then builds a block-diagonal mask of B x T x T, flash_attention_2 runs its varlen kernel. Reports ms per step,
tokens/s and peak memory per case, and the slowdown with masking. Writes
``benchmarks/results/<date>-masking-<card>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.e2e_gpu import git_revision  # noqa: E402
from launcher.data import document_position_ids  # noqa: E402


def packed_blocks(batch: int, seq_len: int, vocab: int, eos: int, mean_doc: float, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    ids[ids == eos] = (eos + 1) % vocab
    for row in range(batch):
        at = 0
        while True:
            at += 1 + int(torch.empty(1).exponential_(1 / mean_doc, generator=g).item())
            if at >= seq_len:
                break
            ids[row, at - 1] = eos
    return ids


def step_time(model, ids, position_ids, steps: int) -> tuple[float, float]:
    import torch

    from launcher.engine.base import causal_lm_loss

    inputs = {"input_ids": ids} if position_ids is None else {"input_ids": ids, "position_ids": position_ids}
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss = causal_lm_loss(model(**inputs).logits, ids)
        loss.backward()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated() / 2**30


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--attn", nargs="+", default=["sdpa", "flash_attention_2"])
    p.add_argument("--doc-tokens", type=float, default=600.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg_dict = json.loads((REPO / "recipes/models/llama-1b.json").read_text())
    if args.layers:
        cfg_dict["num_hidden_layers"] = args.layers
    card = torch.cuda.get_device_name(0)
    record: dict = {
        "date": datetime.date.today().isoformat(),
        "card": card,
        "command": " ".join(["python", "benchmarks/document_masking_gpu.py", *sys.argv[1:]]),
        "git_revision": git_revision(),
        "model": {k: cfg_dict.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")},
        "micro_batch": args.micro_batch,
        "mean_doc_tokens": args.doc_tokens,
        "results": [],
    }
    for attn in args.attn:
        cfg = LlamaConfig(**{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type")})
        cfg.use_cache = False  # as in training: with a KV cache transformers ignores packed position_ids
        try:
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.bfloat16).cuda()
        except (ImportError, ValueError) as e:
            print(f"{attn}: not available ({e})", flush=True)
            continue
        model.train()
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else 2
        for seq_len in args.seq_len:
            ids = packed_blocks(args.micro_batch, seq_len, cfg.vocab_size, eos, args.doc_tokens).cuda()
            row: dict = {"attn": attn, "seq_len": seq_len}
            for masking in (False, True):
                pos = document_position_ids(ids, eos) if masking else None
                try:
                    seconds, mem = step_time(model, ids, pos, args.steps)
                except torch.OutOfMemoryError:
                    row["masked" if masking else "plain"] = {"oom": True}
                    torch.cuda.empty_cache()
                    continue
                row["masked" if masking else "plain"] = {
                    "ms_per_step": round(seconds * 1000, 1),
                    "tokens_per_s": round(ids.numel() / seconds),
                    "peak_gib": round(mem, 2),
                }
            if "ms_per_step" in row.get("plain", {}) and "ms_per_step" in row.get("masked", {}):
                row["slowdown"] = round(row["masked"]["ms_per_step"] / row["plain"]["ms_per_step"] - 1, 3)
            record["results"].append(row)
            print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    path = res / f"{record['date']}-masking-{card.replace(' ', '-').replace('/', '-')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
