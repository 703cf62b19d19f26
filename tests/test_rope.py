"""RoPE for longer contexts: ``model.rope_theta``, ``model.rope_scaling`` and ``model.max_position_embeddings``,
checked before launch, applied to the model config every engine builds, and carried into checkpoints, ``final/``,
the model card and ``cpt plan``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import cpt, tiny_recipe, write_recipe
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig

from launcher.config import ConfigError
from launcher.model import build_model, load_config
from launcher.preflight import load_recipe

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}  # fmt: skip
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 16, "beta_slow": 2}
BASE_POSITIONS = 256  # the tiny assets model's max_position_embeddings


def problems(assets, tmp_path: Path, *, check_files: bool = False, data: dict | None = None, **model) -> list[str]:
    """What the pre-flight check says of the tiny model's recipe with ``model`` keys added ([] when it loads)."""
    tree = tiny_recipe(assets, tmp_path / "out", model={"name_or_path": str(assets["base"]), **model},
                       data=data or {}, parallel={"engine": "fsdp", "config": "fsdp.yaml"})  # fmt: skip
    try:
        load_recipe(write_recipe(tmp_path / "r.yaml", tree), world_size=2, check_files=check_files, ask_hub=False)
    except ConfigError as e:
        return e.problems
    return []


def recipe(assets, tmp_path: Path, **model):
    tree = tiny_recipe(assets, tmp_path / "out", model={"name_or_path": str(assets["base"]), **model},
                       parallel={"engine": "fsdp", "config": "fsdp.yaml"})  # fmt: skip
    return load_recipe(write_recipe(tmp_path / "r.yaml", tree), world_size=2)


@pytest.mark.parametrize(
    "model, expected",
    [
        ({"rope_scaling": {**LLAMA3, "rope_type": "ntk"}},
         "model.rope_scaling.rope_type: must be one of llama3, yarn, linear, dynamic, got 'ntk'"),
        ({"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "rope_type"} | {"type": "llama3"}},
         "model.rope_scaling.rope_type: must be one of llama3, yarn, linear, dynamic, got none (write rope_type"),
        ({"rope_scaling": {**LLAMA3, "factor": 0.5}}, "model.rope_scaling.factor: must be a number > 1, got 0.5"),
        ({"rope_scaling": {**LLAMA3, "factor": "8"}}, "model.rope_scaling.factor: must be a number > 1, got '8'"),
        ({"rope_scaling": {**LLAMA3, "factor": True}}, "model.rope_scaling.factor: must be a number > 1, got True"),
        ({"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}},
         "model.rope_scaling.low_freq_factor: required for rope_type llama3"),
        ({"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}},
         "model.rope_scaling.high_freq_factor: must be > low_freq_factor 1.0, got 1.0"),
        ({"rope_scaling": {**LLAMA3, "low_freq_factor": -1}},
         "model.rope_scaling.low_freq_factor: must be a number > 0, got -1"),
        ({"rope_scaling": {**LLAMA3, "original_max_position_embeddings": 256.5}},
         "model.rope_scaling.original_max_position_embeddings: must be a whole number > 0, got 256.5"),
        ({"rope_scaling": {**LLAMA3, "low_freq_fator": 1.0}},
         "model.rope_scaling.low_freq_fator: not a key of rope_type llama3 (did you mean 'low_freq_factor'?)"),
        ({"rope_scaling": {**LLAMA3, "rope_theta": 5e5}},
         "model.rope_scaling.rope_theta: not a key of rope_type llama3 (set model.rope_theta)"),
        ({"rope_scaling": {k: v for k, v in YARN.items() if k != "original_max_position_embeddings"}},
         "model.rope_scaling.original_max_position_embeddings: required for rope_type yarn"),
        ({"rope_scaling": {**YARN, "beta_fast": 1}}, "model.rope_scaling.beta_fast: must be > beta_slow 2, got 1"),
        ({"rope_scaling": {**YARN, "attention_factor": float("nan")}},
         "model.rope_scaling.attention_factor: must be a number > 0, got nan"),
        ({"rope_scaling": {**YARN, "truncate": "yes"}},
         "model.rope_scaling.truncate: must be true or false, got 'yes'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 1}},
         "model.rope_scaling.factor: must be a number > 1, got 1"),
        ({"rope_scaling": {"rope_type": "dynamic"}}, "model.rope_scaling.factor: required for rope_type dynamic"),
        ({"rope_scaling": "llama3"}, "model.rope_scaling: expected a mapping, got 'llama3'"),
        ({"rope_theta": 0}, "model.rope_theta: must be a number > 0, got 0.0"),
        ({"rope_theta": "big"}, "model.rope_theta: expected float, got 'big'"),
        ({"max_position_embeddings": -5}, "model.max_position_embeddings: must be positive, got -5"),
        ({"max_position_embeddings": 128, "rope_scaling": LLAMA3},
         "model.max_position_embeddings: 128 is below model.rope_scaling.original_max_position_embeddings 256"),
    ],
)  # fmt: skip
def test_each_bad_rope_value_is_refused_naming_its_key(assets, tmp_path, model, expected):
    found = problems(assets, tmp_path, **model)
    assert any(p.startswith(expected) for p in found), found


@pytest.mark.parametrize(
    "scaling",
    [LLAMA3, YARN, {"rope_type": "linear", "factor": 2}, {"rope_type": "dynamic", "factor": 2.5},
     {**YARN, "attention_factor": 1.2, "mscale": 1, "mscale_all_dim": 1, "truncate": False}],
)  # fmt: skip
def test_every_rope_type_with_its_keys_is_accepted(assets, tmp_path, scaling):
    assert problems(assets, tmp_path, rope_scaling=scaling, rope_theta=5e5, max_position_embeddings=2048) == []


def test_seq_len_beyond_the_positions_is_refused_until_the_recipe_raises_them(assets, tmp_path):
    long = {"seq_len": 512}
    found = problems(assets, tmp_path, check_files=True, data=long)
    assert len(found) == 1, found
    assert found[0].startswith(f"data.seq_len: 512 is longer than the model's {BASE_POSITIONS} positions "
                               f"(max_position_embeddings of {assets['base'] / 'config.json'})")  # fmt: skip
    assert "raise model.max_position_embeddings to at least 512 and set model.rope_scaling" in found[0]

    raised = {"rope_scaling": LLAMA3, "rope_theta": 5e4, "max_position_embeddings": 2048}
    assert problems(assets, tmp_path, check_files=True, data=long, **raised) == []
    found = problems(assets, tmp_path, check_files=True, data={"seq_len": 4096}, **raised)
    assert found == [
        "data.seq_len: 4,096 is longer than the model's 2,048 positions (model.max_position_embeddings); to train on "
        "longer blocks raise model.max_position_embeddings to at least 4,096"
    ]
    # dynamic scaling rescales the frequencies beyond max_position_embeddings, up to factor times it
    dynamic = {"rope_scaling": {"rope_type": "dynamic", "factor": 4}}
    assert problems(assets, tmp_path, check_files=True, data={"seq_len": 4 * BASE_POSITIONS}, **dynamic) == []
    found = problems(assets, tmp_path, check_files=True, data={"seq_len": 4 * BASE_POSITIONS + 1}, **dynamic)
    assert len(found) == 1 and found[0].startswith("data.seq_len: 1,025 is longer than the model's 1,024 positions")


def test_rope_keys_on_a_model_without_one_rope_are_refused_before_launch(assets, tmp_path):
    from transformers import Gemma3TextConfig

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=512, n_positions=256, bos_token_id=0,
               eos_token_id=0).save_pretrained(gpt2)  # fmt: skip
    found = problems(assets, tmp_path, check_files=True, name_or_path=None, from_config=str(gpt2),
                     tokenizer=str(assets["tokenizer"]), max_position_embeddings=1024)  # fmt: skip
    assert found == [
        "model.max_position_embeddings: the model's config (GPT2Config) has no rotary position embedding "
        "(rope_parameters) to set"
    ]
    # Gemma 3 gives its sliding-window and full-attention layers a RoPE each
    gemma = tmp_path / "gemma"
    Gemma3TextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                     intermediate_size=32, vocab_size=512).save_pretrained(gemma)  # fmt: skip
    found = problems(assets, tmp_path, check_files=True, name_or_path=None, from_config=str(gemma),
                     tokenizer=str(assets["tokenizer"]), rope_scaling=LLAMA3)  # fmt: skip
    assert len(found) == 1 and found[0].startswith(
        "model.rope_scaling: the model's config (Gemma3TextConfig) gives each kind of layer a RoPE of its own"
    ), found


def llama3_inv_freq(theta: float, dim: int, factor: float, low: float, high: float, original: int) -> torch.Tensor:
    """Llama 3.1's frequencies, written out from its paper's description: wavelengths shorter than original/high
    are kept, longer than original/low divided by factor, and those between interpolated smoothly."""
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / theta ** (i / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(freq)
        elif wavelen > original / low:
            out.append(freq / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out, dtype=torch.float32)


def test_the_config_the_engines_build_carries_the_rope_keys(assets, tmp_path):
    r = recipe(assets, tmp_path, rope_scaling=LLAMA3, rope_theta=5e4, max_position_embeddings=2048)
    config = load_config(r)
    assert config.max_position_embeddings == 2048
    assert config.rope_parameters == {**LLAMA3, "rope_theta": 5e4}
    expected = llama3_inv_freq(5e4, config.head_dim, 8.0, 1.0, 4.0, 256)
    # the model FSDP2 and ZeRO-3 build from the config, and the one ZeRO 0-2 load with its weights
    built = AutoModelForCausalLM.from_config(config)
    loaded = build_model(r, config, torch.float32)
    for model in (built, loaded):
        torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected, rtol=1e-6, atol=0)
    base = AutoModelForCausalLM.from_pretrained(assets["base"])
    assert not torch.allclose(base.model.rotary_emb.inv_freq, expected)


def test_a_new_scaling_replaces_the_models_own_and_keeps_its_theta(assets, tmp_path):
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    cfg = json.loads((assets["base"] / "config.json").read_text())
    cfg["rope_parameters"] = {**LLAMA3, "rope_theta": 123456.0}
    (scaled / "config.json").write_text(json.dumps(cfg))
    r = recipe(assets, tmp_path, name_or_path=None, from_config=str(scaled), tokenizer=str(assets["tokenizer"]),
               rope_scaling={"rope_type": "linear", "factor": 2})  # fmt: skip
    config = load_config(r)
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2, "rope_theta": 123456.0}
    assert config.max_position_embeddings == BASE_POSITIONS
    # rope_theta alone keeps the model's scaling
    r = recipe(assets, tmp_path, name_or_path=None, from_config=str(scaled), tokenizer=str(assets["tokenizer"]),
               rope_theta=1e6)  # fmt: skip
    assert load_config(r).rope_parameters == {**LLAMA3, "rope_theta": 1e6}


def test_cpt_plan_shows_the_positions_the_run_sets(assets, tmp_path):
    tree = tiny_recipe(assets, tmp_path / "out", data={"seq_len": 512},
                       model={"rope_scaling": YARN, "max_position_embeddings": 1024})  # fmt: skip
    out = cpt("plan", str(write_recipe(tmp_path / "r.yaml", tree)), "--nodes", "1", "--gpus-per-node", "2").stdout
    assert (
        "positions: max_position_embeddings 1,024; rope_theta 10,000; rope_scaling yarn (beta_fast 16, beta_slow 2, "
        "factor 4, original_max_position_embeddings 256)"
    ) in out
    tree["model"] = {"name_or_path": str(assets["base"])}
    p = cpt("plan", str(write_recipe(tmp_path / "r.yaml", tree)), "--nodes", "1", "--gpus-per-node", "2")
    assert "positions: max_position_embeddings 256; rope_theta 10,000; no RoPE scaling" in p.stdout
    assert "warning: data.seq_len: 512 is longer than the model's 256 positions" in p.stderr


def test_a_two_rank_fsdp_run_trains_beyond_the_base_positions_and_exports_the_rope(assets, tmp_path):
    out = tmp_path / "run"
    rope = {"rope_scaling": LLAMA3, "rope_theta": 5e4, "max_position_embeddings": 2048}
    tree = tiny_recipe(
        assets, out, model={"name_or_path": str(assets["base"]), **rope},
        data={"seq_len": 2 * BASE_POSITIONS}, eval={"sets": {}},
        train={"max_steps": 2, "save_every": 2, "log_every": 1, "micro_batch_size": 1},
        parallel={"engine": "fsdp", "config": "fsdp.yaml", "nproc_per_node": 2},
    )  # fmt: skip
    cpt("run", str(write_recipe(tmp_path / "run.yaml", tree)))

    expected = {**LLAMA3, "rope_theta": 5e4}
    for model_dir in (out / "final", out / "checkpoints" / "step-2" / "hf"):
        saved = json.loads((model_dir / "config.json").read_text())
        assert saved["rope_parameters"] == expected and saved["max_position_embeddings"] == 2048, model_dir
    card = (out / "final" / "README.md").read_text()
    assert (
        "| Positions (RoPE) | max_position_embeddings 2,048; rope_theta 50,000; rope_scaling llama3 (factor 8, "
        "high_freq_factor 4, low_freq_factor 1, original_max_position_embeddings 256) |"
    ) in card

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoConfig.from_pretrained(assets["base"]).to_dict()
    reference = AutoModelForCausalLM.from_config(
        LlamaConfig(**{**base, "rope_parameters": expected, "max_position_embeddings": 2048})
    )
    rotary, ref = model.model.rotary_emb, reference.model.rotary_emb
    assert torch.equal(rotary.inv_freq, ref.inv_freq)
    positions = torch.tensor([[0, 1, 255, 256, 511, 2047]])
    x = torch.zeros(1, 6, 64)
    for got, want in zip(rotary(x, positions), ref(x, positions)):
        assert torch.equal(got, want)
    unscaled = AutoModelForCausalLM.from_pretrained(assets["base"]).model.rotary_emb
    assert not torch.allclose(rotary(x, positions)[0], unscaled(x, positions)[0])
