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


@pytest.mark.parametrize(
    "chunk,terms", [(1, "eager"), (7, "eager"), (64, "eager"), (7, "pointwise"), (64, "pointwise"), (7, "compiled")]
)
def test_fused_linear_loss_matches_projection_then_cross_entropy(chunk, terms):
    """Each form of a chunk's element-wise part against the plain projection and cross-entropy; chunk 7 leaves a
    shorter last chunk (the compiled form's second, shape-generic variant)."""
    from launcher.engine import loss

    fn = {"eager": loss.eager_terms, "pointwise": loss.pointwise_terms, "compiled": loss.compiled_terms()}[terms]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 17, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 17), generator=g)
    labels[0, 5:9] = -100
    labels[2, 16] = -100
    expected = causal_lm_loss(hidden @ weight.t(), labels)
    expected.backward(torch.tensor(0.25))
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = loss.linear_cross_entropy(hidden, weight, labels, chunk=chunk, terms=fn)
    got.backward(torch.tensor(0.25))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(hidden.grad, want_h)
    torch.testing.assert_close(weight.grad, want_w)


def test_compiled_loss_terms_match_the_eager_ones_on_bf16_logits():
    """The training dtype: both forms take bf16 logits, work in fp32 and give the gradient in bf16."""
    from launcher.engine.loss import compiled_terms, eager_terms

    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(24, 300, generator=g)).to(torch.bfloat16)
    labels = torch.randint(0, 300, (24,), generator=g)
    labels[[2, 11]] = -100
    count = torch.tensor(22.0)
    want_loss, want_grad = eager_terms(logits.clone(), labels, count, True)
    got_loss, got_grad = compiled_terms()(logits, labels, count, True)
    assert got_grad is not None and want_grad is not None and got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got_loss, want_loss)
    torch.testing.assert_close(got_grad, want_grad)
    assert not got_grad[[2, 11]].any()


@pytest.mark.parametrize("compile_layers", [True, False])
def test_the_fused_loss_is_compiled_with_the_layers(assets, compile_layers):
    from transformers import AutoModelForCausalLM

    from launcher.engine.loss import compiled_terms, eager_terms
    from launcher.engine.options import apply_training_options

    model = AutoModelForCausalLM.from_pretrained(assets["base"])
    recipe = Recipe()
    recipe.train.compile = compile_layers
    assert apply_training_options(model, recipe)["fused_loss"]
    assert model.lm_head.terms is (compiled_terms() if compile_layers else eager_terms)


def test_chunk_size_keeps_fp32_logits_under_the_budget():
    from launcher.engine.loss import CHUNK_BYTES, chunk_tokens

    assert chunk_tokens(32000) == 8192 and chunk_tokens(128256) == 2048
    for vocab in (1000, 32000, 50257, 128256, 262144):
        rows = chunk_tokens(vocab)
        assert rows * vocab * 4 <= CHUNK_BYTES < 2 * rows * vocab * 4


def test_fused_head_gives_the_models_loss_and_leaves_the_model_as_it_was(assets):
    """On a real (tiny) Llama: same loss and gradients as the model's own logits, same state-dict names, tied
    weights still one parameter, plain logits again as soon as no labels are pending (evaluation)."""
    from transformers import AutoModelForCausalLM

    from launcher.engine.base import forward_loss
    from launcher.engine.loss import FusedLossHead, install_fused_loss

    for tied in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(assets["base"], tie_word_embeddings=tied)
        keys = list(model.state_dict())
        ids = torch.randint(0, model.config.vocab_size, (2, 16))
        batch = {"input_ids": ids, "labels": ids}
        expected = forward_loss(model, model, batch, torch.device("cpu"), fused=False)
        expected.backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        assert install_fused_loss(model) and isinstance(model.lm_head, FusedLossHead)
        got = forward_loss(model, model, batch, torch.device("cpu"), fused=True)
        got.backward()
        torch.testing.assert_close(got, expected)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], msg=n)
        assert list(model.state_dict()) == keys
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        torch.testing.assert_close(model(input_ids=ids).logits, logits)


def test_selective_activation_checkpointing_marks_every_kth_layer(assets):
    from transformers import AutoModelForCausalLM

    from launcher.engine.options import apply_training_options

    model = AutoModelForCausalLM.from_pretrained(assets["base"])
    recipe = Recipe()
    recipe.model.activation_checkpointing = True
    recipe.model.checkpoint_every = 2
    applied = apply_training_options(model, recipe)
    flags = [layer.gradient_checkpointing for layer in model.model.layers]
    assert flags == [i % 2 == 0 for i in range(len(flags))] and applied["checkpointed_layers"] == sum(flags)
