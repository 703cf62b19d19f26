"""Hugging Face models written without gathering the whole model in one process: a run's ``final/`` and ``cpt
export`` of a checkpoint hold exactly the trained weights (checked against each engine's own consolidation tool)
for DeepSpeed ZeRO-3 and FSDP2, tied embeddings stored once, shards with a correct index; an export holds about
one shard plus one decoder layer in memory; an interrupted export never leaves a model directory that looks
complete."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, TRAINED_ENGINES, cpt, worker_env
from safetensors import safe_open
from safetensors.torch import load_file

from launcher.cli import main
from launcher.export import INDEX, WEIGHTS, parse_size, write_hf_model

ENGINES = [("deepspeed", "zero3.json"), ("fsdp", "fsdp.yaml")]
MIB = 2**20


def reference_weights(engine: str, checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's whole fp32 state dict as the engine's own library consolidates it in memory."""
    if engine == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, scratch / "reference.pt")
    return torch.load(scratch / "reference.pt", weights_only=True)["model"]


def stored(model_dir: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """Every tensor in the model directory's safetensors files: key -> (file, tensor); checks each file's
    metadata as transformers writes it."""
    found: dict[str, tuple[str, torch.Tensor]] = {}
    for path in sorted(model_dir.glob("model*.safetensors")):
        with safe_open(path, "pt") as f:
            assert f.metadata() == {"format": "pt"}, path
            for key in f.keys():  # noqa: SIM118 (a safetensors file is not iterable)
                assert key not in found, f"{key} stored twice"
                found[key] = (path.name, f.get_tensor(key))
    return found


def loaded(model_dir: Path) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return model.state_dict(), model


@pytest.mark.parametrize("engine, config", ENGINES)
def test_final_and_cpt_export_hold_exactly_the_trained_weights(assets, tmp_path, trained_runs, engine, config):
    # the session's shared run of this engine (conftest.trained_runs: 2 ranks, 8 steps, checkpoints at 4, 6 and 8),
    # read only: its final/ was written at step 8, the checkpoint exported here
    out = trained_runs[engine]
    assert TRAINED_ENGINES[engine] == config
    step = out / "checkpoints" / "step-8"
    exported = tmp_path / "exported"
    # the destination already holds an earlier model (one file) and a file of the user's
    exported.mkdir()
    (exported / WEIGHTS).write_bytes((assets["base"] / WEIGHTS).read_bytes())
    (exported / "notes.txt").write_text("mine")
    cpt("export", str(step), str(exported), "--max-shard-size", "100KB")

    reference = reference_weights(engine, step, tmp_path)
    base = load_file(assets["base"] / WEIGHTS)
    assert [k for k in base if torch.equal(base[k], reference[k])] == [], "the run did not train every weight"
    for model_dir in (out / "final", exported):
        weights, model = loaded(model_dir)
        assert weights.keys() == reference.keys(), model_dir
        for key, value in reference.items():
            assert weights[key].dtype == torch.float32 and torch.equal(weights[key], value), (model_dir, key)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "embeddings untied"
        # tied embeddings are stored once, under the name from_pretrained ties lm_head to (as save_pretrained does)
        assert set(stored(model_dir)) == set(reference) - {"lm_head.weight"}, model_dir

    # final/ fits one file under the default 5GB; the export was split at 100 KB, with an index transformers reads
    assert not (out / "final" / INDEX).exists() and (out / "final" / WEIGHTS).is_file()
    assert not list((out / "final").parent.glob("final.tmp"))
    assert (exported / "notes.txt").read_text() == "mine"
    assert not (exported / WEIGHTS).exists(), "the earlier model's weights would shadow the new shards"
    files = stored(exported)
    shards = sorted({name for name, _ in files.values()})
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((exported / INDEX).read_text())
    assert index["weight_map"] == {key: name for key, (name, _) in files.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in files.values())
    for shard in shards:
        held = [t for name, t in files.values() if name == shard]
        size = sum(t.numel() * t.element_size() for t in held)
        assert len(held) == 1 or size <= 100_000, f"{shard}: {size} bytes in {len(held)} tensors"
    order = list(loaded(exported)[0])  # the model's state-dict order: shards are filled front to back
    assert [files[k][0] for k in order if k in files] == sorted(files[k][0] for k in order if k in files)


def tensors_of(weights: dict[str, torch.Tensor], stop_after: int | None = None):
    for i, item in enumerate(weights.items()):
        if stop_after is not None and i == stop_after:
            raise OSError(28, "No space left on device")
        yield item


def test_a_failed_or_killed_export_leaves_no_model_and_the_next_one_cleans_up(assets, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    config, tokenizer = AutoConfig.from_pretrained(assets["base"]), AutoTokenizer.from_pretrained(assets["base"])
    weights = load_file(assets["base"] / WEIGHTS)
    out = tmp_path / "final"
    with pytest.raises(OSError, match="No space left"):
        write_hf_model(tensors_of(weights, stop_after=5), config, tokenizer, out, torch.float32, "100KB")
    assert not out.exists() and not (tmp_path / "final.tmp").exists()

    # killed mid-export (no chance to clean up): the shards written so far stay aside, final/ does not exist
    script = textwrap.dedent(f"""
        import os, signal, torch
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoTokenizer
        from launcher.export import write_hf_model
        def tensors():
            for i, item in enumerate(load_file({str(assets["base"] / WEIGHTS)!r}).items()):
                if i == 15:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield item
        base = {str(assets["base"])!r}
        write_hf_model(tensors(), AutoConfig.from_pretrained(base), AutoTokenizer.from_pretrained(base),
                       {str(out)!r}, torch.float32, "100KB")
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=worker_env(), capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert p.returncode == -9, p.stderr[-3000:]
    assert not out.exists()
    assert list((tmp_path / "final.tmp").glob("model-*.safetensors")), "the killed export wrote no shard"

    write_hf_model(tensors_of(weights), config, tokenizer, out, torch.float32, "100KB")
    assert not (tmp_path / "final.tmp").exists()
    reloaded, _ = loaded(out)
    assert all(torch.equal(reloaded[k], v) for k, v in weights.items())


def test_weights_are_written_in_the_export_dtype_and_must_match_the_model(assets, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    config, tokenizer = AutoConfig.from_pretrained(assets["base"]), AutoTokenizer.from_pretrained(assets["base"])
    weights = load_file(assets["base"] / WEIGHTS)
    write_hf_model(tensors_of(weights), config, tokenizer, tmp_path / "bf16", torch.bfloat16)
    written = {k: t for k, (_, t) in stored(tmp_path / "bf16").items()}
    assert written.keys() == weights.keys()
    for key, value in weights.items():
        assert written[key].dtype == torch.bfloat16 and torch.equal(written[key], value.to(torch.bfloat16)), key
    saved = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert saved["dtype"] == "bfloat16" and saved["use_cache"] is True and saved["tie_word_embeddings"] is True

    missing = dict(weights)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(RuntimeError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        write_hf_model(tensors_of(missing), config, tokenizer, tmp_path / "missing", torch.float32)
    extra = {**weights, "model.layers.7.mlp.up_proj.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError, match=r"model.layers.7.mlp.up_proj.weight is not a weight of LlamaForCausalLM"):
        write_hf_model(tensors_of(extra), config, tokenizer, tmp_path / "extra", torch.float32)
    shard = {**weights, "model.norm.weight": weights["model.norm.weight"][:32]}  # one rank's half of it
    with pytest.raises(RuntimeError, match=r"model.norm.weight has shape \(32,\), the model's is \(64,\)"):
        write_hf_model(tensors_of(shard), config, tokenizer, tmp_path / "shard", torch.float32)
    assert not [p.name for p in tmp_path.iterdir() if p.name != "bf16"], "a failed export left files"


@pytest.mark.parametrize("size, expected", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                            ("100KB", 100_000), ("1234", 1234), (" 1.5 MB ", 1_500_000)])  # fmt: skip
def test_shard_sizes_are_read_with_their_unit(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5XB", "GB", "-1GB", "0", "five"])
def test_a_bad_max_shard_size_is_refused_before_anything_is_read(capsys, tmp_path, size):
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "nowhere"), str(tmp_path / "out"), f"--max-shard-size={size}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert f"argument --max-shard-size: {size!r}" in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- memory


def fsdp_checkpoint(path: Path, model, tokenizer_dir: Path) -> Path:
    """A committed FSDP2 checkpoint of ``model``'s weights, written by torch.distributed.checkpoint as a run
    writes it (one rank), with the files ``cpt export`` reads beside it."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoTokenizer

    dcp.save({"model": model.state_dict()}, checkpoint_id=str(path), no_dist=True)
    model.config.save_pretrained(path / "hf")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path / "hf")
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    (path / "manifest.json").write_text(json.dumps(files))
    state = {"step": 1, "world_size": 1, "engine": "fsdp", "dtype": "float32"}
    (path / "trainer_state.json").write_text(json.dumps(state))
    return path


PEAK = """
import sys
from launcher.cli import main
rc = main(["export", *sys.argv[1:]])
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print("peak-kib", status["VmHWM"].split()[0])
sys.exit(rc)
"""


def export_peak(checkpoint: Path, out: Path, shard: str) -> int:
    """Peak resident memory (bytes, the kernel's high-water mark) of a process that runs ``cpt export``."""
    p = subprocess.run([sys.executable, "-c", PEAK, str(checkpoint), str(out), "--max-shard-size", shard], cwd=REPO,
                       env=worker_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-4000:]
    return int(p.stdout.split("peak-kib")[-1].split()[0]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from /proc (Linux)")
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the checkpoint is written by one process
def test_cpt_export_holds_one_shard_and_one_layer_not_the_model(assets, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(assets["config"])
    config.update({"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 24, "num_attention_heads": 8,
                   "num_key_value_heads": 4, "head_dim": 64, "tie_word_embeddings": False})  # fmt: skip
    torch.manual_seed(0)
    big = AutoModelForCausalLM.from_config(config)
    weights = {k: v.clone() for k, v in big.state_dict().items()}
    model_bytes = sum(v.numel() * 4 for v in weights.values())
    layer_bytes = sum(p.numel() * 4 for p in big.model.layers[0].parameters())
    assert model_bytes > 250 * 10**6 and layer_bytes > 10 * 10**6  # ~70M parameters, ~2.9M per layer
    fsdp_checkpoint(tmp_path / "big", big, assets["tokenizer"])
    del big
    tiny = AutoModelForCausalLM.from_pretrained(assets["base"])
    fsdp_checkpoint(tmp_path / "tiny", tiny, assets["tokenizer"])

    shard = 20 * 10**6
    baseline = export_peak(tmp_path / "tiny", tmp_path / "tiny-out", "20MB")  # imports, config, tokenizer
    peak = export_peak(tmp_path / "big", tmp_path / "big-out", "20MB")
    grown = peak - baseline
    # one shard being filled, the decoder layer being read, and the allocator's and reader's working room
    slack = 32 * MIB
    assert grown < shard + layer_bytes + slack, (
        f"export of a {model_bytes / MIB:.0f} MiB model grew {grown / MIB:.0f} MiB past the baseline of a tiny one "
        f"(shard {shard / MIB:.0f} MiB + layer {layer_bytes / MIB:.0f} MiB + slack {slack / MIB:.0f} MiB)"
    )
    assert grown < model_bytes / 3

    assert len(list((tmp_path / "big-out").glob("model-*.safetensors"))) >= 14
    written = {k: t for k, (_, t) in stored(tmp_path / "big-out").items()}
    assert written.keys() == weights.keys() and "lm_head.weight" in written  # untied: both stored
    for key, value in weights.items():
        assert torch.equal(written[key], value), key
