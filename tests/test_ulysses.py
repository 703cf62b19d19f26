"""Sequence parallelism's pieces against Hugging Face's own model on whole sequences (launcher/engine/ulysses.py).

Ranks of a group each run the model on their part of every sequence, attention exchanging heads by all-to-all; the
parts of the loss must add up to transformers' own loss of the whole micro-batch (``model(..., labels=...).loss``),
and the gradients summed over the group to its gradients, with causal attention and with packed documents (whose
whole-sequence mask transformers builds itself from the position ids at N=1)."""

from __future__ import annotations

import pytest
import torch
from conftest import run_distributed

B, T = 2, 32


def _batch(vocab: int, documents: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    batch["labels"][0, 5:9] = -100  # some ignored targets, as padding gives
    if documents:
        # documents of 11, 13 and 8 tokens in row 0, of 20 and 12 in row 1: positions restart at each
        batch["position_ids"] = torch.cat(
            [torch.cat([torch.arange(11), torch.arange(13), torch.arange(8)])[None],
             torch.cat([torch.arange(20), torch.arange(12)])[None]]
        )  # fmt: skip
    return batch


def _model(path: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False  # as the launcher trains: no cache, so packed position ids mask documents
    return model


def _reference(path: str, documents: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """transformers' loss and gradients of the whole micro-batch in one process (no sequence parallelism)."""
    model = _model(path)
    batch = _batch(model.config.vocab_size, documents)
    kwargs = {"position_ids": batch["position_ids"]} if documents else {}
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"], **kwargs).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _sharded(path: str, documents: bool, fused: bool, compiled: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    """This rank's part of the loss and the group's summed gradients, under launcher.engine.ulysses; with
    ``compiled`` each decoder layer goes through torch.compile (aot_eager: dynamo traces the exchanges into the
    layer's graph, as inductor does on a GPU, without generating code on CPU)."""
    import torch.distributed as dist

    from launcher.engine.base import forward_loss
    from launcher.engine.loss import install_fused_loss
    from launcher.engine.ulysses import join

    model = _model(path)
    sp = join(model, dist.get_world_size(), dist.group.WORLD)
    if fused:
        assert install_fused_loss(model)
    if compiled:
        for layer in model.model.layers:
            layer.compile(backend="aot_eager", fullgraph=True)
    batch = _batch(model.config.vocab_size, documents)
    part = forward_loss(model, model, batch, torch.device("cpu"), fused, sp)
    part.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    return part.item(), {n: g.numpy() for n, g in grads.items()}  # by value: the process ends before it is read


@pytest.mark.parametrize(
    "documents, fused, compiled",
    [(False, False, False), (True, False, False), (False, True, False), (True, True, False), (True, True, True)],
    ids=["causal", "documents", "causal-fused-loss", "documents-fused-loss", "documents-fused-loss-compiled"],
)
def test_parts_of_a_group_add_up_to_the_whole_sequence_loss_and_gradients(assets, documents, fused, compiled):
    path = str(assets["base"])
    want_loss, want_grads = _reference(path, documents)
    got = run_distributed(_sharded, 2, path, documents, fused, compiled)
    assert sum(part for part, _ in got) == pytest.approx(want_loss, rel=1e-6, abs=1e-6)
    # each rank's part is its own tokens' share, not the mean of its slice
    assert got[0][0] != pytest.approx(want_loss / 2, rel=1e-3)
    for name, want in want_grads.items():
        for rank, (_, grads) in enumerate(got):
            torch.testing.assert_close(
                torch.from_numpy(grads[name]), want, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}"
            )
