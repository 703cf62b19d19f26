"""Token-weighted perplexity across ranks.

Perplexity of a set = exp(sum of token NLL / number of predicted tokens), both summed over every rank: never a
mean of per-batch or per-rank means, which would weight short shards and partial blocks wrongly. Every rank
runs the same number of forward passes (a rank out of blocks runs a zero-weight batch), because under ZeRO-3
and FSDP each forward is a collective.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .engine import Engine, causal_lm_loss
from .engine.ulysses import sequence_loss, shifted

EvalResult = dict[str, float]


def batches(blocks: list[list[int]], micro_batch_size: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) batches; blocks shorter than the longest in a batch are right-padded with ignored
    labels. Right padding leaves the real tokens' causal attention untouched, so no mask is needed."""
    out = []
    for i in range(0, len(blocks), micro_batch_size):
        chunk = blocks[i : i + micro_batch_size]
        width = max(len(b) for b in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for j, b in enumerate(chunk):
            ids[j, : len(b)] = torch.tensor(b, dtype=torch.long)
            labels[j, : len(b)] = ids[j, : len(b)]
        out.append((ids, labels))
    return out


@torch.no_grad()
def evaluate(
    engine: Engine, sets: dict[str, list[list[int]]], micro_batch_size: int, pad_id: int
) -> dict[str, EvalResult]:
    """Loss, perplexity and predicted-token count per set, identical on every rank."""
    device, sp = engine.info.device, engine.sp
    engine.eval()
    results: dict[str, EvalResult] = {}
    for name, blocks in sets.items():
        local = batches(blocks, micro_batch_size, pad_id)
        n = torch.tensor([len(local)], device=device)
        if dist.is_initialized():
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
        nll = torch.zeros((), dtype=torch.float64, device=device)
        tokens = torch.zeros((), dtype=torch.float64, device=device)
        dummy = (torch.full((1, 2), pad_id, dtype=torch.long), torch.full((1, 2), -100, dtype=torch.long))
        for i in range(int(n.item())):
            ids, labels = local[i] if i < len(local) else dummy
            if sp is None:
                logits = engine.logits(ids)
                labels = labels.to(device)
                nll += causal_lm_loss(logits, labels, reduction="sum").double()
                tokens += (labels[:, 1:] != -100).sum()
                continue
            # sequence parallelism: this rank's part of each sequence (padded to split evenly) and the targets of
            # its tokens; the sums over every rank count each token once
            ids, labels = sp.pad(ids, labels, pad_id)
            target = sp.shard(shifted(labels)).to(device)
            inputs = sp.model_inputs(ids)
            logits = engine.logits(**inputs)
            nll += sequence_loss(logits, target, torch.ones((), device=device)).double()
            tokens += (target != -100).sum()
        if dist.is_initialized():
            both = torch.stack([nll, tokens])
            dist.all_reduce(both)
            nll, tokens = both[0], both[1]
        count = int(tokens.item())
        loss = nll.item() / count if count else float("nan")
        results[name] = {"loss": loss, "perplexity": math.exp(loss) if count else float("nan"), "tokens": count}
    engine.train()
    return results
