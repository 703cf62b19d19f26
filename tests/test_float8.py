"""float8 training (``train.float8``) where a CPU can check it: which layers torchao converts, that weights and
state-dict names stay the model's own, the refusals before launch, the recompile limit a compiled run sets and the
log line when a function hits it anyway, and the memory the plan gives FSDP2's float8 all-gather and gradient
accumulation. Training in float8 runs on a card: tests/test_gpu_parity.py."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_recipe, worker_env, write_recipe
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from launcher.config import PACKAGE_ROOT, ConfigError
from launcher.engine.float8 import convert_to_float8, float8_problem
from launcher.engine.options import apply_training_options
from launcher.memory import estimate
from launcher.model import param_counts
from launcher.preflight import load_recipe

# torchao is not in the dev install: once installed, transformers imports it in every process that loads a model
# (its quantizer registry), 1.6 s each on 2 CPU cores. `make install` puts it in a directory of its own
# (FLOAT8_SITE, default .venv/float8) that only this test process reads: the tests that convert layers run here
# and the workers the other tests start do not pay for it. Without it they are skipped and say so.
FLOAT8_SITE = Path(os.environ.get("FLOAT8_SITE", REPO / ".venv" / "float8"))
if importlib.util.find_spec("torchao") is None and (FLOAT8_SITE / "torchao").is_dir():
    sys.path.append(str(FLOAT8_SITE))
needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao is not installed (pip install '.[float8]')"
)


def recipe_for(tmp_path, assets, **sections):
    tree = tiny_recipe(assets, tmp_path / "out", **sections)
    return load_recipe(write_recipe(tmp_path / "r.yaml", tree), check_files=False)


def llama(intermediate: int = 128, layers: int = 3) -> nn.Module:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


@needs_torchao
@pytest.mark.parametrize("mode", ["rowwise", "tensorwise"])
def test_the_decoder_linears_are_converted_and_the_head_and_embeddings_are_not(tmp_path, assets, mode):
    from torchao.float8.float8_linear import Float8Linear

    recipe = recipe_for(tmp_path, assets, train={"float8": mode})
    model = llama()
    names = {k: v.dtype for k, v in model.state_dict().items()}
    # the linear layers of the decoder, counted by module type, before anything is converted
    decoder = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"}
    assert len(decoder) == 3 * 7  # q, k, v, o, gate, up, down
    assert convert_to_float8(model, recipe) == len(decoder)
    float8 = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert float8 == decoder
    assert type(model.lm_head) is nn.Linear and type(model.get_input_embeddings()) is nn.Embedding
    # checkpoints and exports see the same names and dtypes: no float8 weights
    assert {k: v.dtype for k, v in model.state_dict().items()} == names


@needs_torchao
def test_layers_whose_dimensions_are_not_multiples_of_16_stay_in_bf16_and_are_named(tmp_path, assets, caplog):
    from torchao.float8.float8_linear import Float8Linear

    recipe = recipe_for(tmp_path, assets, train={"float8": "rowwise"})
    model = llama(intermediate=72)  # gate, up (64 -> 72) and down (72 -> 64): 72 is not a multiple of 16
    with caplog.at_level(logging.INFO, logger="launcher.engine.float8"):
        converted = convert_to_float8(model, recipe)
    assert converted == 3 * 4
    kept = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert {n.split(".")[-1] for n in kept if ".layers." in n} == {"gate_proj", "up_proj", "down_proj"}
    assert not any(isinstance(m, Float8Linear) for m in model.model.layers[0].mlp.modules())
    assert "9 linear layer(s) stay in bf16" in caplog.text and "layers.0.mlp.gate_proj (64 -> 72)" in caplog.text


# (mode, hidden, kv heads, FFN) -> the projections that stay in bf16 under train.float8_skip_small, worked out by
# hand from the (output, input) thresholds torchao's float8 README gives for H100: rowwise gains only with output >
# 2048, input > 1024 and not both <= (4096, 2048); tensorwise loses only with input <= 4096 and output <= 1024.
SMALL = {
    # Llama 3.2 3B: q/o 3072x3072, k/v 1024x3072, gate/up 8192x3072, down 3072x8192
    ("rowwise", 3072, 8, 8192): {"k_proj", "v_proj"},
    ("tensorwise", 3072, 8, 8192): {"k_proj", "v_proj"},
    # the 1.1B shape: q/o 2048x2048, k/v 256x2048, gate/up 5632x2048, down 2048x5632
    ("rowwise", 2048, 4, 5632): {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"},
    ("tensorwise", 2048, 4, 5632): {"k_proj", "v_proj"},
}


@needs_torchao
@pytest.mark.parametrize("mode, hidden, kv_heads, ffn", list(SMALL))
def test_skip_small_keeps_the_layers_torchao_finds_too_small_in_bf16(tmp_path, assets, caplog, mode, hidden,
                                                                      kv_heads, ffn):  # fmt: skip
    from torchao.float8.float8_linear import Float8Linear

    heads = hidden // 128
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=256)  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    recipe = recipe_for(tmp_path, assets, train={"float8": mode, "float8_skip_small": True})
    with caplog.at_level(logging.INFO, logger="launcher.engine.float8"):
        converted = convert_to_float8(model, recipe)
    kept = {n.split(".")[-1] for n, m in model.named_modules() if type(m) is nn.Linear and ".layers." in n}
    in_float8 = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert kept == SMALL[(mode, hidden, kv_heads, ffn)]
    assert converted == 2 * (7 - len(kept)) and len(in_float8) == 7 - len(kept)
    assert f"{2 * len(kept)} linear layer(s) stay in bf16, below torchao's sizes" in caplog.text
    # without the key every one of them runs in float8
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert convert_to_float8(model, recipe_for(tmp_path, assets, train={"float8": mode})) == 2 * 7


def test_float8_is_refused_without_a_gpu_that_has_float8_products(tmp_path, assets):
    recipe = recipe_for(tmp_path, assets, train={"float8": "tensorwise", "precision": "bf16"})
    assert "there is none here" in float8_problem(recipe, None)
    problem = float8_problem(recipe, (8, 0))  # A100
    assert "compute capability >= 8.9" in problem and "this GPU has 8.0" in problem
    on_hopper = float8_problem(recipe, (9, 0))  # H100 / H200: only a missing torchao stands in the way
    assert on_hopper is None if importlib.util.find_spec("torchao") else "pip install 'torchao" in on_hopper
    fp32 = recipe_for(tmp_path, assets, train={"float8": "rowwise", "precision": "fp32"})
    assert "train.precision: fp32" in float8_problem(fp32, (9, 0))


def test_cpt_run_refuses_float8_on_cpu_before_any_worker_starts(tmp_path, assets):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(assets, out, train={"float8": "rowwise"}))
    p = subprocess.run([sys.executable, "-m", "launcher", "run", str(recipe)], cwd=REPO, env=worker_env(),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode != 0
    assert "train.float8: rowwise needs a CUDA GPU" in p.stderr, p.stderr[-3000:]
    assert not (out / "logs").exists() and not (out / "metrics.jsonl").exists()  # no worker ever ran


def test_a_bare_off_in_yaml_is_the_off_value(tmp_path, assets):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(assets, tmp_path / "o", train={"float8": "VALUE"}))
    path.write_text(path.read_text().replace("float8: VALUE", "float8: off"))
    assert "float8: off" in path.read_text()  # YAML reads this as false
    assert load_recipe(path, check_files=False).train.float8 == "off"
    assert load_recipe(path, ["train.float8=off"], check_files=False).train.float8 == "off"
    assert load_recipe(path, ["train.float8=rowwise"], check_files=False).train.float8 == "rowwise"


def test_a_compiled_run_raises_the_recompile_limit_and_says_when_a_function_hits_it(tmp_path, assets, caplog):
    import torch._dynamo

    recipe = recipe_for(tmp_path, assets, train={"compile": True})
    model = llama(layers=5)
    with torch._dynamo.config.patch(recompile_limit=8):
        apply_training_options(model, recipe)
        assert torch._dynamo.config.recompile_limit == 5 + 8
        # a function that needs a new variant for every input dtype, under a limit of 1: torch gives up on it
        torch._dynamo.config.recompile_limit = 1
        double = torch.compile(lambda x: x * 2, backend="eager")
        with caplog.at_level(logging.WARNING):
            for dtype in (torch.float32, torch.float64, torch.int64):
                assert torch.equal(double(torch.ones(3, dtype=dtype)), torch.full((3,), 2, dtype=dtype))
    ours = [r for r in caplog.records if r.name == "launcher.engine.options"]
    assert len(ours) == 1 and "gave up recompiling a function after 1 variants" in ours[0].getMessage()
    assert "5 decoder layers" in ours[0].getMessage()


@pytest.mark.parametrize(
    "float8, setting, tuned",
    [
        ("rowwise", "auto", True),  # measured: 3B on an H200, 1.11x bf16 tuned against 1.08x
        ("tensorwise", "auto", False),
        ("off", "auto", False),  # bf16 gained nothing
        ("off", True, True),
        ("rowwise", False, False),
    ],
)
def test_compile_tuning_auto_tunes_the_compiled_kernels_of_rowwise_float8_only(tmp_path, assets, float8, setting,
                                                                               tuned):  # fmt: skip
    from launcher.engine.options import compile_tuning

    train = {"compile": True, "float8": float8} | ({} if setting == "auto" else {"compile_tuning": setting})
    assert compile_tuning(recipe_for(tmp_path, assets, train=train)) is tuned


@pytest.mark.parametrize("setting", [True, "auto"])
def test_compile_tuning_reaches_the_compiler_of_the_layers(tmp_path, assets, setting):
    import torch._dynamo
    import torch._inductor.config

    recipe = recipe_for(tmp_path, assets, train={"compile": True, "compile_tuning": setting})  # bf16
    with torch._inductor.config.patch(coordinate_descent_tuning=False), torch._dynamo.config.patch(recompile_limit=8):
        applied = apply_training_options(llama(layers=2), recipe)
        assert torch._inductor.config.coordinate_descent_tuning is (setting is True)
    assert applied["compile_tuning"] is (setting is True)


def test_compile_tuning_without_compile_is_refused_naming_the_key(tmp_path, assets):
    with pytest.raises(ConfigError, match=r"train\.compile_tuning: true tunes the kernels torch\.compile generates"):
        recipe_for(tmp_path, assets, train={"compile_tuning": True})
    assert recipe_for(tmp_path, assets, train={"compile_tuning": False}).train.compile_tuning is False


def test_plan_gathers_tensorwise_weights_in_one_byte_and_counts_unreduced_gradients(tmp_path, assets):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(PACKAGE_ROOT / "recipes" / "models" / "llama-1b.json")
    counts = param_counts(cfg)
    fsdp = {"engine": "fsdp", "config": "fsdp.yaml"}
    accum = {"micro_batch_size": 2, "global_batch_size": 16}  # 2 ranks: accumulation 4
    runs = {
        "bf16": recipe_for(tmp_path, assets, parallel=fsdp, train=accum),
        "tensorwise": recipe_for(tmp_path, assets, parallel=fsdp, train={**accum, "float8": "tensorwise"}),
        "rowwise": recipe_for(tmp_path, assets, parallel=fsdp, train={**accum, "float8": "rowwise"}),
        "once": recipe_for(
            tmp_path, assets, train=accum, parallel={**fsdp, "fsdp": {"reduce_every_micro_batch": False}}
        ),  # fmt: skip
    }
    parts = {k: estimate(r, cfg, 2).parts for k, r in runs.items()}
    layers_in_flight = 1 + runs["bf16"].parallel.fsdp.prefetch_layers
    # one byte instead of two for every gathered decoder-layer weight
    saved = parts["bf16"]["gathered params"] - parts["tensorwise"]["gathered params"]
    assert saved == counts.layer * layers_in_flight
    assert parts["rowwise"] == parts["bf16"]  # rowwise gathers bf16
    # once per step: fp32 gradients of every parameter, unsharded, on every rank
    assert parts["once"]["unsharded grads (accumulation)"] == 4 * counts.total
    assert "unsharded grads (accumulation)" not in parts["bf16"]
    no_accum = recipe_for(tmp_path, assets, parallel={**fsdp, "fsdp": {"reduce_every_micro_batch": False}})
    assert "unsharded grads (accumulation)" not in estimate(no_accum, cfg, 2).parts
