"""Pieces both engines share: the learning-rate schedule, the loss, evaluation batching."""

from __future__ import annotations

import math

import pytest
import torch

from launcher.config import Recipe, TrainConfig
from launcher.engine.base import causal_lm_loss, lr_lambda
from launcher.evaluate import batches


def schedule(**train) -> list[float]:
    f = lr_lambda(Recipe(train=TrainConfig(**train)))
    return [f(s) for s in range(train["max_steps"])]


def test_warmup_then_cosine_to_the_floor():
    lr = schedule(max_steps=110, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr[:10] == pytest.approx([(i + 1) / 11 for i in range(10)])
    assert lr[10] == pytest.approx(1.0)
    assert lr[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert lr[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))


def test_linear_and_constant():
    lin = schedule(max_steps=11, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert lin == pytest.approx([1 - i / 11 for i in range(11)])
    assert schedule(max_steps=5, warmup_steps=2, schedule="constant") == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])


def test_loss_matches_transformers_and_ignores_padding():
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.randn(2, 7, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(1))
    labels[1, 5:] = -100
    ours = causal_lm_loss(logits, labels)
    theirs = ForCausalLMLoss(logits, labels, vocab_size=11)
    torch.testing.assert_close(ours, theirs)
    total = causal_lm_loss(logits, labels, reduction="sum")
    assert total.item() == pytest.approx(ours.item() * (6 + 4), rel=1e-6)


def test_eval_batches_pad_the_short_block_with_ignored_labels():
    out = batches([[1, 2, 3], [4, 5], [6, 7, 8]], micro_batch_size=2, pad_id=0)
    assert len(out) == 2
    ids, labels = out[0]
    assert ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert labels.tolist() == [[1, 2, 3], [4, 5, -100]]
    assert out[1][0].tolist() == [[6, 7, 8]]
