"""The callbacks driven by a fake run: real files, a real offline W&B run."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path

import pytest
from conftest import cpt, read_metrics, tiny_recipe, write_recipe
from conftest import run as run_command

from launcher.callbacks import (
    CallbackList,
    LossPlot,
    MetricsJsonl,
    ModelCard,
    ProgressBar,
    RunInfo,
    WandbCallback,
    default_callbacks,
    plot_metrics,
)
from launcher.callbacks.wandb import wandb_mode
from launcher.config import LoggingConfig, Recipe, SourceConfig
from launcher.redact import is_secret_key, redact_args, scrub

SECRETS = ("secret-env-123", "secret-recipe-456", "secret-cmd-789", "secret-argv-000")


@pytest.fixture(autouse=True)
def wandb_env(tmp_path, monkeypatch):
    """No credentials and no W&B state outside the test's directory."""
    home = tmp_path / "home"
    home.mkdir()
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "NETRC", "CPT_PEAK_TFLOPS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")


def make_recipe(out: Path, **logging) -> Recipe:
    r = Recipe(output_dir=str(out))
    r.model.name_or_path = "TinyLlama/TinyLlama_v1.1"
    r.data.train = [
        SourceConfig(path="HuggingFaceFW/fineweb-edu", name="sample-10BT", weight=3.0),
        SourceConfig(path=str(out.parent / "domain.jsonl"), weight=1.0),
    ]
    r.data.seq_len = 128
    r.eval.sets = {"domain": SourceConfig(path="data/domain-eval.jsonl"), "web": SourceConfig(path="org/web-eval")}
    r.parallel.deepspeed = {"zero_optimization": {"stage": 3}, "comet": {"api_key": "secret-recipe-456"}}
    r.logging = LoggingConfig(**{"wandb": "offline", "progress": True, "run_name": "tiny-cpt", **logging})
    return r


def make_run(recipe: Recipe, *, start_step: int = 0, resumed: bool = False, max_steps: int = 10) -> RunInfo:
    return RunInfo(
        recipe=recipe,
        output_dir=Path(recipe.output_dir),
        world_size=2,
        grad_accum=2,
        global_batch_size=8,
        tokens_per_step=8 * 128,
        n_params=1_100_048_384,
        start_step=start_step,
        max_steps=max_steps,
        resumed=resumed,
        command="cpt run recipes/tiny.yaml train.max_steps=10 hf_token=secret-cmd-789",
    )


def train_metrics(step: int) -> dict:
    return {
        "loss": 3.0 - 0.1 * step,
        "lr": 1e-4,
        "grad_norm": 0.5,
        "tokens_per_s": 2048.0,
        "tokens_per_s_per_device": 1024.0,
        "mfu": None,
        "tokens_seen": step * 8 * 128,
        "step_time": 0.5,
        "mem_rss_gib": 1.5,
    }


EVAL_BASE = {
    "domain": {"loss": 2.5, "perplexity": 12.1825, "tokens": 4096},
    "web": {"loss": 2.0, "perplexity": 7.389, "tokens": 2048},
}
EVAL_LAST = {
    "domain": {"loss": 1.75, "perplexity": 5.7546, "tokens": 4096},
    "web": {"loss": 2.1, "perplexity": 8.1662, "tokens": 2048},
}


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_and_eval_results(tmp_path):
    recipe = make_recipe(tmp_path / "run")
    cb = MetricsJsonl()
    run = make_run(recipe)
    began = time.time()
    cb.on_train_start(run)
    cb.on_eval(0, EVAL_BASE)
    for step in range(1, 11):
        cb.on_step(step, train_metrics(step))
    cb.on_eval(10, EVAL_LAST)
    cb.on_train_end(run, None)
    ended = time.time()

    lines = read_lines(run.output_dir / "metrics.jsonl")
    train = [{k: v for k, v in r.items() if k != "time"} for r in lines if "eval" not in r]
    assert train == [{"step": step, **train_metrics(step)} for step in range(1, 11)]
    assert [r["step"] for r in lines] == [0, *range(1, 11), 10]
    assert lines[0].keys() == {"step", "eval", "time"} and lines[0]["eval"] == EVAL_BASE
    assert lines[-1]["eval"] == EVAL_LAST
    # each line is stamped with the wall-clock time it was written at
    times = [r["time"] for r in lines]
    assert began <= times[0] and times == sorted(times) and times[-1] <= ended
    assert json.loads((run.output_dir / "eval_results.json").read_text()) == EVAL_LAST
    # written atomically (through a private temporary file), yet as readable as a plainly opened file
    plain_file = tmp_path / "plain"
    plain_file.write_text("")
    assert (run.output_dir / "eval_results.json").stat().st_mode == plain_file.stat().st_mode


def test_resume_drops_the_steps_after_the_checkpoint(tmp_path):
    recipe = make_recipe(tmp_path / "run")
    first = MetricsJsonl()
    first.on_train_start(make_run(recipe))
    for step in range(1, 11):
        first.on_step(step, train_metrics(step))
    first.on_train_end(make_run(recipe), None)
    path = Path(recipe.output_dir) / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 11, "loss": 1.')  # a line cut short by the crash

    run = make_run(recipe, start_step=5, resumed=True)
    again = MetricsJsonl()
    again.on_train_start(run)
    for step in range(6, 9):
        again.on_step(step, train_metrics(step))
    again.on_train_end(run, None)
    assert [r["step"] for r in read_lines(path)] == list(range(1, 9))

    fresh = MetricsJsonl()  # not resumed: a new record
    fresh.on_train_start(make_run(recipe))
    fresh.on_step(1, train_metrics(1))
    fresh.on_train_end(make_run(recipe), None)
    assert [r["step"] for r in read_lines(path)] == [1]


def drive(callbacks: list, run: RunInfo, final_dir: Path | None = None) -> None:
    cbs = CallbackList(callbacks)
    cbs.on_train_start(run)
    if not run.resumed:
        cbs.on_eval(0, EVAL_BASE)
    for step in range(run.start_step + 1, run.max_steps + 1):
        cbs.on_step(step, train_metrics(step))
        if step == 5:
            cbs.on_eval(5, {k: {**v, "loss": v["loss"] - 0.1} for k, v in EVAL_BASE.items()})
    cbs.on_eval(run.max_steps, EVAL_LAST)
    cbs.on_train_end(run, final_dir)


def test_loss_plot_is_a_png(tmp_path):
    recipe = make_recipe(tmp_path / "run")
    run = make_run(recipe)
    drive([MetricsJsonl(), LossPlot()], run)
    png = run.output_dir / "loss.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert plot_metrics(tmp_path / "missing.jsonl", tmp_path / "x.png") is None
    again = plot_metrics(run.output_dir / "metrics.jsonl", tmp_path / "again.png")
    assert again is not None and again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_card(tmp_path):
    recipe = make_recipe(tmp_path / "run")
    run = make_run(recipe)
    final = run.output_dir / "final"
    final.mkdir(parents=True)
    drive([MetricsJsonl(), ModelCard()], run, final_dir=final)
    card = (run.output_dir / "README.md").read_text()
    assert (final / "README.md").read_text() == card
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "base_model: TinyLlama/TinyLlama_v1.1" in front
    assert "continual-pretraining" in front
    assert "HuggingFaceFW/fineweb-edu" in front and "org/web-eval" in front and "domain.jsonl" not in front
    # base (step 0) next to last (step 10), with the values fed
    assert "| domain | 2.5000 | 12.18 | 1.7500 | 5.75 | -52.8% | 4,096 |" in card
    assert "| web | 2.0000 | 7.39 | 2.1000 | 8.17 | +10.5% | 2,048 |" in card
    assert "Tokens seen | 10,240 |" in card
    assert "DeepSpeed ZeRO stage 3" in card
    assert f'AutoModelForCausalLM.from_pretrained("{final}")' in card
    assert "hf_token=***" in card


def test_model_card_without_metrics_file_or_second_eval(tmp_path):
    recipe = make_recipe(tmp_path / "run")
    run = make_run(recipe, max_steps=0)
    cb = ModelCard()
    cb.on_train_start(run)
    cb.on_eval(0, EVAL_BASE)
    cb.on_train_end(run, None)
    card = (run.output_dir / "README.md").read_text()
    assert "| domain | 2.5000 | 12.18 | 4,096 |" in card
    assert "only evaluated" in card and 'from_pretrained("TinyLlama/TinyLlama_v1.1")' in card

    run = make_run(recipe, max_steps=3)
    cb = ModelCard()
    cb.on_train_start(run)
    cb.on_step(3, train_metrics(3))
    cb.on_train_end(run, None)
    card = (run.output_dir / "README.md").read_text()
    assert "No evaluation was run." in card and "cpt export" in card and "step-3" in card


def test_progress_lines_when_not_a_terminal(tmp_path):
    recipe = make_recipe(tmp_path / "run")
    stream = io.StringIO()
    run = make_run(recipe, max_steps=40)
    bar = ProgressBar(stream=stream)
    bar.on_train_start(run)
    for step in range(1, 41):
        bar.on_step(step, {**train_metrics(step), "mfu": 0.123})
    bar.on_train_end(run, None)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20
    assert lines[0].startswith("step 2/40 (5%) | loss 2.8000 | 2.05k tok/s | MFU 12.3% | eta")
    assert lines[-1].startswith("step 40/40 (100%)")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_in_a_terminal(tmp_path):
    recipe = make_recipe(tmp_path / "run")
    stream = FakeTerminal()
    run = make_run(recipe, start_step=4, resumed=True, max_steps=10)
    bar = ProgressBar(stream=stream)
    bar.on_train_start(run)
    for step in range(5, 11):
        bar.on_step(step, {**train_metrics(step), "mfu": 0.123})
    bar.on_train_end(run, None)
    text = stream.getvalue()
    assert "tiny-cpt" in text and "10/10" in text and "mfu=12.3%" in text


def test_wandb_mode_resolution(tmp_path, monkeypatch):
    assert wandb_mode(LoggingConfig(wandb="auto")) == "offline"
    assert wandb_mode(LoggingConfig(wandb="online")) == "offline"  # no credentials: never a login prompt
    assert wandb_mode(LoggingConfig(wandb="disabled")) == "disabled"
    netrc = Path.home() / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abcdef\n")
    netrc.chmod(0o600)
    assert wandb_mode(LoggingConfig(wandb="auto")) == "online"
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(LoggingConfig(wandb="auto")) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(LoggingConfig(wandb="auto")) == "offline"
    recipe = make_recipe(tmp_path / "run", wandb="disabled", progress=False)
    names = [type(cb).__name__ for cb in default_callbacks(recipe)]
    assert names == ["MetricsJsonl", "LossPlot", "ModelCard"]


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (``run-<id>.wandb``), parsed with W&B's own protobuf schema. The file is
    LevelDB's log format behind a 7-byte header (``:W&B``, magic 0xBEE1, version 0): 32 KiB blocks of chunks, each
    ``crc32 | length | type | data``, where type 1 is a whole record and 2, 3, 4 its first, middle and last piece;
    a block's tail too short for a chunk header is padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    block, header, full, last = 32768, 7, 1, 4
    data = path.read_bytes()
    assert data[:header] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", header
    while pos + header <= len(data):
        if block - pos % block < header:
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + header : pos + header + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {pos} of {path}"
        pos += header + length
        pending += chunk
        if kind in (full, last):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(path: Path) -> tuple[str, dict[int, dict[str, float]]]:
    """The run id a transaction log names and its history: {step: {key: value}}, W&B's own ``_`` keys left out."""
    records = wandb_records(path)
    [run_id] = [r.run.run_id for r in records if r.WhichOneof("record_type") == "run"]
    history: dict[int, dict[str, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = history.setdefault(r.history.step.num, {})
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    row[key] = json.loads(item.value_json)
    return run_id, history


def metrics_as_logged(out: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl under the names the W&B callback documents: ``train/<name>`` (None left out) and
    ``eval/<set>/<loss|perplexity|tokens>``, one row per step."""
    rows: dict[int, dict[str, float]] = {}
    for rec in read_lines(out / "metrics.jsonl"):
        row = rows.setdefault(rec["step"], {})
        if "eval" in rec:
            row.update({f"eval/{name}/{k}": v for name, res in rec["eval"].items() for k, v in res.items()})
        else:
            row.update({f"train/{k}": v for k, v in rec.items() if k not in ("step", "time") and v is not None})
    return rows


def wandb_logs(out: Path) -> list[Path]:
    """Every transaction log W&B wrote under ``out``, once W&B has finished writing them. ``run.finish()`` returns
    before W&B's service process has written the run's records (the log can still be its bare 7-byte header), so
    this first shuts the service down, as the end of the training process does."""
    import wandb

    wandb.teardown()
    # Each start gets a directory of its own: offline-run-<time>-<id>, with -1, -2, ... when two fall in one second.
    return sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_offline_run_and_resume(tmp_path):
    recipe = make_recipe(tmp_path / "run", wandb="auto")
    out = Path(recipe.output_dir)
    drive([MetricsJsonl(), WandbCallback(recipe)], make_run(recipe, max_steps=6))
    run_id = (out / "wandb_run_id").read_text().strip()
    resumed = make_run(recipe, start_step=6, resumed=True, max_steps=8)
    drive([MetricsJsonl(), WandbCallback(recipe)], resumed)

    logs = wandb_logs(out)
    runs = [wandb_run(path) for path in logs]
    assert [rid for rid, _ in runs] == [run_id, run_id], "the resumed run is not the same W&B run"
    assert sorted(sorted(history) for _, history in runs) == [[0, 1, 2, 3, 4, 5, 6], [7, 8]]
    logged = {step: row for _, history in runs for step, row in history.items()}
    assert logged == metrics_as_logged(out)
    assert logged[8]["train/loss"] == train_metrics(8)["loss"]
    assert logged[8]["eval/domain/loss"] == EVAL_LAST["domain"]["loss"]

    drive([WandbCallback(recipe)], make_run(recipe, max_steps=2))  # a fresh start is a new W&B run
    fresh = (out / "wandb_run_id").read_text().strip()
    assert fresh != run_id
    [new_log] = set(wandb_logs(out)) - set(logs)
    fresh_id, history = wandb_run(new_log)
    assert fresh_id == fresh and sorted(history) == [0, 1, 2]


def test_no_secret_reaches_any_file(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret-env-123")
    monkeypatch.setattr(sys, "argv", [sys.argv[0], "parallel.deepspeed.comet.api_key=secret-argv-000"])
    recipe = make_recipe(tmp_path / "run", wandb="offline", tags=["cpt", "tiny"])
    run = make_run(recipe)
    final = run.output_dir / "final"
    final.mkdir(parents=True)
    callbacks = default_callbacks(recipe)
    assert [type(cb).__name__ for cb in callbacks] == [
        "MetricsJsonl",
        "WandbCallback",
        "ProgressBar",
        "LossPlot",
        "ModelCard",
    ]
    drive(callbacks, run, final_dir=final)
    [log] = wandb_logs(run.output_dir)
    # the W&B log holds the run's config (so a secret in it would show), less the secret-looking keys
    assert b"HuggingFaceFW/fineweb-edu" in log.read_bytes() and b"zero_optimization" in log.read_bytes()
    written = [p for p in run.output_dir.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"metrics.jsonl", "eval_results.json", "loss.png", "README.md", "wandb_run_id"} <= names
    for p in written:
        data = p.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data, f"{secret} leaked into {p}"


def test_secret_helpers():
    assert is_secret_key("api_key") and is_secret_key("HF_TOKEN") and is_secret_key("clientSecret")
    plain = ["tokenizer", "tokens_seen", "keep_last", "max_tokens", "monkey", "token_budget", "num_key_value_heads"]
    assert not any(map(is_secret_key, plain))
    assert scrub({"a": {"password": 1, "b": [{"token": 2, "c": 3}]}}) == {"a": {"b": [{"c": 3}]}}
    assert redact_args(["--hf-token", "x", "lr=1", "s3_secret=y", "https://u:p@host/x"]) == [
        "--hf-token",
        "***",
        "lr=1",
        "s3_secret=***",
        "https://***@host/x",
    ]


# ------------------------------------------------------------------------------------- a real run


ENV_SECRET = "secret-env-" + "0123456789abcdef" * 2  # as long as a W&B API key
RECIPE_SECRET = "secret-recipe-fedcba9876543210"


@pytest.fixture(scope="module")
def secret_run(assets, tmp_path_factory) -> tuple[Path, str]:
    """Two ranks with ``WANDB_API_KEY`` in the environment and an API key in the recipe (DeepSpeed's comet
    section), logging to W&B offline, checkpointing every step; (output_dir, everything the run printed)."""
    root = tmp_path_factory.mktemp("secrets")
    home = root / "home"
    home.mkdir()
    out = root / "run"
    recipe = write_recipe(root / "r.yaml", tiny_recipe(
        assets, out, train={"max_steps": 2, "save_every": 1, "log_every": 1},
        eval={"sets": {"code": {"path": str(assets["code_eval"])}}, "max_blocks": 4},
        parallel={"engine": "deepspeed", "config": "zero3.json", "nproc_per_node": 2,
                  "deepspeed": {"comet": {"enabled": False, "api_key": RECIPE_SECRET}}},
        logging={"wandb": "offline", "progress": True}))  # fmt: skip
    # A HOME of its own keeps W&B away from the user's settings; DeepSpeed's compiled ops stay where they are:
    # where torch puts them for every other run of the session (its default follows HOME and XDG_CACHE_HOME, which
    # need not be the passwd home), so that this run loads the shared-memory op instead of compiling it again.
    from torch.utils.cpp_extension import get_default_build_root

    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    env = {"WANDB_API_KEY": ENV_SECRET, "WANDB_MODE": "offline", "HOME": str(home), "WANDB_SILENT": "true",
           "WANDB_X_DISABLE_STATS": "true", "TORCH_EXTENSIONS_DIR": extensions}  # fmt: skip
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(home / var.lower())
    p = cpt("run", str(recipe), **env)
    return out, p.stdout + p.stderr


def leaks(files: list[Path]) -> list[str]:
    secrets = (ENV_SECRET, RECIPE_SECRET)
    return [f"{secret} in {f}" for f in files for secret in secrets if secret.encode() in f.read_bytes()]


def test_no_secret_reaches_the_log_or_any_file_of_a_real_run(secret_run):
    out, log = secret_run
    assert ENV_SECRET not in log and RECIPE_SECRET not in log
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"resolved_recipe.yaml", "README.md", "metrics.jsonl", "manifest.json", "wandb_run_id"} <= names
    assert any(p.name.endswith("_states.pt") for p in files)
    [wandb_log] = [p for p in files if p.suffix == ".wandb"]
    assert str(out).encode() in wandb_log.read_bytes(), "the W&B log holds no config: a leak could not show"
    assert not leaks(files)
    # Masked, not dropped: the reader sees that a key was set.
    for recipe in [out / "resolved_recipe.yaml", *(out / "checkpoints").glob("step-*/resolved_recipe.yaml")]:
        assert re.search(r"api_key: .\*\*\*.$", recipe.read_text(), re.MULTILINE), recipe


def remote_code_model(assets, root: Path, marker: Path) -> Path:
    """The tiny base model with its classes shipped as Python next to the weights, as hub models with their own
    architecture are; importing that code creates ``marker``."""
    model = root / "remote-code-model"
    shutil.copytree(assets["base"], model)
    (model / "custom_llama.py").write_text(
        "from pathlib import Path\n\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n"
        f"Path({str(marker)!r}).touch()\n\n\n"
        "class CustomLlamaConfig(LlamaConfig):\n"
        "    pass\n\n\n"
        "class CustomLlamaForCausalLM(LlamaForCausalLM):\n"
        "    config_class = CustomLlamaConfig\n"
    )
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_llama.CustomLlamaConfig",
                          "AutoModelForCausalLM": "custom_llama.CustomLlamaForCausalLM"}  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("trust", [False, True])
def test_model_code_runs_only_with_trust_remote_code_and_then_the_log_says_so(assets, tmp_path, trust):
    marker = tmp_path / "remote-code-ran"
    model = remote_code_model(assets, tmp_path, marker)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        assets, out, model={"name_or_path": str(model), "trust_remote_code": trust},
        train={"max_steps": 1, "save_every": 0, "export_final": False}, eval={"sets": {}},
        parallel={"engine": "fsdp", "config": "fsdp.yaml", "nproc_per_node": 1}))  # fmt: skip
    p = run_command(
        [sys.executable, "-m", "launcher.train", str(recipe)], HF_MODULES_CACHE=str(tmp_path / "hf-modules")
    )
    log = p.stdout + p.stderr
    assert read_metrics(out)[-1]["step"] == 1
    assert marker.exists() == trust
    assert ("model.trust_remote_code is on" in log) == trust, log[-3000:]
    if trust:
        for what in ("model config", "tokenizer", "model"):
            assert f"Python code that comes with the {what} at {model} may run" in log
