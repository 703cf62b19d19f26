"""The plain FSDP2 loop a careful user writes (torchtitan's recipe on a Hugging Face Llama): the baseline for our
engine, run in the same call on the same machine by ``speed_gpu.py``.

    torchrun --nproc-per-node N benchmarks/plain_fsdp_gpu.py --config recipes/models/llama-3.2-3b.json \
        --micro-batch 2 --seq-len 4096 --steps 12 --warmup 4 [--float8 off|rowwise|tensorwise] --out OUT.json

The model is built on the meta device from ``--config`` (a model directory or a config .json), optionally converted
to torchao float8 training (the decoder layers' linear layers), each decoder layer compiled and sharded with
``fully_shard`` (bf16 parameters, fp32 gradient reduction), then the root; the shards are materialised and
initialised in place. Fused AdamW at lr 3e-4, gradient clipping at 1.0, the model's own loss (full logits, then
cross-entropy) on random tokens. Tokens/s per GPU is over the steps after ``--warmup``; MFU uses the formula of our
training logs (FLOPs/token = 6(N - N_embedding) + 12·L·H·Q·T against 989 TFLOP/s). Without a GPU it runs on CPU
with gloo (float8 needs a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PEAK_FLOPS = 989e12  # H200 / H100 SXM dense bf16, as speed_gpu.py


def float8_filter(module, fqn: str) -> bool:
    """Linear layers whose both dimensions are multiples of 16: the shapes torch._scaled_mm accepts."""
    import torch.nn as nn

    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a model directory with config.json, or a config .json")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the timing (compilation)")
    p.add_argument("--float8", choices=["off", "rowwise", "tensorwise"], default="off")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="per-layer torch.compile")
    p.add_argument("--out", required=True, help="result JSON")
    args = p.parse_args()
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup: no step would be timed")

    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.metrics import flops_per_token, mfu
    from launcher.model import param_counts

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)

    config = AutoConfig.from_pretrained(args.config)
    config.use_cache = False  # a training forward keeps no KV cache
    # Parameters on the meta device; buffers (the rotary tables, computed, not initialised) are real and kept.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    layers = list(model.model.layers)

    tensorwise_all_gather = args.float8 == "tensorwise" and world > 1
    if args.float8 != "off":
        from torchao.float8 import (
            Float8LinearConfig,
            convert_to_float8_training,
            precompute_float8_dynamic_scale_for_fsdp,
        )

        f8 = Float8LinearConfig.from_recipe_name(args.float8)
        if tensorwise_all_gather:
            # each rank casts its own shard to float8 and FSDP2 all-gathers the float8 bytes (half of bf16); the
            # scales then come from one all-reduce after each optimizer step (precompute_... below)
            f8 = dataclasses.replace(f8, enable_fsdp_float8_all_gather=True)
        # the decoder layers only: the embeddings and the output projection stay in bf16, as in torchtitan
        for layer in layers:
            convert_to_float8_training(layer, config=f8, module_filter_fn=float8_filter)
    if args.compile:
        # Under float8, dynamo compiles each decoder layer again (its guards hold per layer instance); at the
        # default recompile limit (8) the layers after the 8th would run uncompiled.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(layers) + 8)
        for layer in layers:
            layer.compile()

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed again as soon as the backward starts: keep them gathered
        fully_shard(layer, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mp_policy=mp)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, config.initializer_range)
            elif "RMSNorm" in type(m).__name__:
                m.weight.fill_(1.0)
    if config.tie_word_embeddings:
        model.tie_weights()

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True if cuda else None)
    generator = torch.Generator(device=device).manual_seed(1234 + rank)
    shape = (args.micro_batch, args.seq_len)
    losses = []
    start = 0.0
    for step in range(args.steps):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        tokens = torch.randint(0, config.vocab_size, shape, device=device, generator=generator)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if tensorwise_all_gather:
            precompute_float8_dynamic_scale_for_fsdp(model)
        losses.append(loss.detach())
    if cuda:
        torch.cuda.synchronize()
    step_time = (time.perf_counter() - start) / (args.steps - args.warmup)

    mean_losses = torch.stack(losses).float()
    dist.all_reduce(mean_losses)
    mean_losses /= world
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) if cuda else 0], dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    per_gpu = args.micro_batch * args.seq_len / step_time
    fpt = flops_per_token(config, args.seq_len, param_counts(config).total)
    record = {
        "engine": "plain-fsdp2", "config": args.config, "float8": args.float8, "compile": args.compile,
        "gpus": world, "micro_batch": args.micro_batch, "global_batch": args.micro_batch * world,
        "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup, "step_time_s": round(step_time, 4),
        "tokens_per_s_per_gpu": round(per_gpu), "mfu": round(mfu(per_gpu, fpt, PEAK_FLOPS) or 0, 4),
        "peak_mem_gib": round(float(peak.item()) / 2**30, 2) if cuda else None,
        "losses": [round(x, 4) for x in mean_losses.tolist()],
        "command": " ".join(["torchrun", f"--nproc-per-node={world}", "benchmarks/plain_fsdp_gpu.py", *sys.argv[1:]]),
    }  # fmt: skip
    if rank == 0:
        Path(args.out).write_text(json.dumps(record, indent=2))
        print(json.dumps({k: v for k, v in record.items() if k != "losses"}), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
