"""``cpt`` as a user meets it: bad input to every subcommand ends in one message naming the path and what to pass
instead (exit 2, no traceback); hub models and datasets that cannot be reached are named before any worker starts;
``cpt plan`` does not wait on an unreachable hub and warns before the GPU is full; overrides go before or after the
flags; ``--version`` and help for every flag; a launch says what it is doing."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, cpt, read_metrics, tiny_recipe, worker_env, write_recipe

from launcher.cli import build_parser, main

CLOSED_PORT = "http://127.0.0.1:9"
"""A hub endpoint whose connection is refused at once: a machine without a route to the hub."""
TINY_ID = "acme/tiny-llama"
"""The tiny test model under a hub id, served from a local Hugging Face cache only."""


def cpt_result(*args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """``cpt ARGS`` from the repository root, whatever its exit code."""
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, env=worker_env(**env),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def refused(*args: str, **env: str) -> str:
    """The message of a ``cpt`` command that must be refused as bad input: one ``error:`` (a line, or a list of a
    recipe's problems), exit code 2, no traceback."""
    p = cpt_result(*args, **env)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert p.stderr.count("error: ") == 1, p.stderr[-3000:]
    return p.stderr[p.stderr.index("error: ") :].strip()


def refused_here(capsys, *args: str) -> str:
    """:func:`refused` for a command whose refusal comes before any worker or library is started, run in this
    process: the same code, without paying for a new interpreter."""
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse, and a recipe that does not load
        rc = e.code
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert captured.err.count("error: ") == 1, captured.err
    return captured.err[captured.err.index("error: ") :].strip()


def hub_cache(hf_home: Path, repo_id: str, files: list[Path]) -> Path:
    """A Hugging Face cache (``HF_HOME``) holding ``files`` of hub model ``repo_id`` at ``main``, laid out as the
    hub's downloads leave it."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "5f3c0d6e1a2b4c8d9e0f1a2b3c4d5e6f7a8b9c0d"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in files:
        shutil.copy(f, snapshot / f.name)
    return hf_home


def offline(hf_home: Path) -> dict[str, str]:
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def unreachable(hf_home: Path) -> dict[str, str]:
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "HF_ENDPOINT": CLOSED_PORT}


@pytest.fixture(scope="module")
def hub_run(assets, tmp_path_factory) -> tuple[Path, str]:
    """A real two-step run of the tiny model named by a hub id, read from the local cache with HF_HUB_OFFLINE set,
    checkpointed at steps 1 and 2 and exported to final/; its output_dir and its log."""
    root = tmp_path_factory.mktemp("hub_run")
    hf_home = hub_cache(root / "hf", TINY_ID, sorted(assets["base"].iterdir()))
    out = root / "run"
    tree = tiny_recipe(assets, out, model={"name_or_path": TINY_ID}, eval={"max_blocks": 4},
                       train={"max_steps": 2, "save_every": 1, "export_final": True})  # fmt: skip
    p = cpt("run", str(write_recipe(root / "run.yaml", tree)), **offline(hf_home))
    return out, p.stdout + p.stderr


# ------------------------------------------------------------------------------------ bad paths, every subcommand


def test_bad_paths_get_one_line_naming_the_path_and_what_to_pass(assets, tmp_path, capsys):
    missing, a_file, a_dir = tmp_path / "missing", tmp_path / "notes.txt", tmp_path / "something"
    a_file.write_text("not a checkpoint\n")
    a_dir.mkdir()
    (a_dir / "notes.txt").write_text("not a run\n")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(assets, tmp_path / "out"))
    cases = [
        (["run", str(missing)], f"{missing}: no such recipe file (the shipped ones are in {REPO / 'recipes'})"),
        (["plan", str(a_dir)], f"{a_dir}: is a directory; pass a recipe file"),
        (["export", str(missing), str(tmp_path / "m")], f"{missing}: no such directory; pass a checkpoint folder"),
        (["export", str(a_file), str(tmp_path / "m")], f"{a_file}: not a directory; pass a checkpoint folder"),
        (["export", str(a_dir), str(tmp_path / "m")], f"{a_dir}: no trainer_state.json, so not a checkpoint; pass"),
        (["export", str(assets["base"]), str(tmp_path / "m")], f"{assets['base']}: already a Hugging Face model"),
        (["eval", str(missing), str(assets["code_eval"])], f"{missing}: no such directory; pass a Hugging Face model"),
        (["eval", str(a_dir), str(assets["code_eval"])], f"{a_dir}: no config.json, so not a Hugging Face model"),
        (["eval", str(assets["base"]), str(missing)], f"{missing}: no such file or directory; pass a data file"),
        (["status", str(missing)], f"{missing}: no such directory; pass a run's output_dir"),
        (["status", str(a_file)], f"{a_file}: not a directory; pass a run's output_dir"),
        (["status", str(a_dir)], f"{a_dir}: not a run's output_dir"),
        (["quickstart", "--output-dir", str(a_file)], f"--output-dir {a_file}: not a directory"),
    ]
    for args, says in cases:
        message = refused_here(capsys, *args)
        assert says in message and "\n" not in message, (args, message)
    assert not (tmp_path / "m").exists() and not (tmp_path / "out").exists()
    # the traceback users met, from the command line itself
    assert f"{missing}: no such directory; pass a checkpoint folder" in refused("export", str(missing), str(a_dir))
    with pytest.raises(SystemExit) as stopped:
        main(["plan", str(recipe), "--nodes", "0"])
    assert stopped.value.code == 2 and "argument --nodes: must be positive, got 0" in capsys.readouterr().err


def test_export_of_a_run_folder_names_its_newest_checkpoint_and_that_one_exports(hub_run, tmp_path, capsys):
    out, _ = hub_run
    newest = out / "checkpoints" / "step-2"
    model = tmp_path / "model"
    line = refused("export", str(out), str(model))
    assert f"{out}: a run's output_dir, not a checkpoint; pass its newest checkpoint {newest}" in line
    line = refused_here(capsys, "export", str(out / "checkpoints"), str(model))
    assert f"pass one of them, the newest is {newest}" in line
    unfinished = out / "checkpoints" / "step-3.tmp"
    unfinished.mkdir()
    try:
        line = refused_here(capsys, "export", str(unfinished), str(model))
    finally:
        unfinished.rmdir()
    assert f"{unfinished}: an unfinished checkpoint (its save did not complete); pass a complete one: " in line
    assert line.endswith(f"the newest is {newest}")
    line = refused_here(capsys, "export", str(newest), str(newest / "hf"))
    assert f"{newest / 'hf'}: inside the checkpoint {newest}" in line
    cpt("export", str(newest), str(model))  # the checkpoint the message named is the one to pass
    assert json.loads((model / "config.json").read_text())["model_type"] == "llama"


def test_status_and_eval_name_the_folder_to_pass_instead(hub_run, capsys):
    out, _ = hub_run
    step = out / "checkpoints" / "step-1"
    assert f"{step}: a checkpoint; pass the run's output_dir {out}" in refused_here(capsys, "status", str(step))
    assert f"the runs in it: {out}" in refused_here(capsys, "status", str(out.parent))
    line = refused_here(capsys, "eval", str(step), str(out / "resolved_recipe.yaml"))
    assert f"{step}: a checkpoint, not a model; export it first (`cpt export {step} OUT`)" in line
    line = refused_here(capsys, "eval", str(out), str(out / "resolved_recipe.yaml"))
    assert f"{out}: a run's output_dir, not a model; pass its final model {out / 'final'}" in line
    assert main(["status", str(out)]) == 0
    assert f"last checkpoint: {out / 'checkpoints' / 'step-2'}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ the hub


@pytest.mark.parametrize(
    "env, why",
    [
        (offline, "HF_HUB_OFFLINE is set"),
        (
            unreachable,
            f"the connection to the hub failed ({CLOSED_PORT}: ConnectError: [Errno 111] Connection refused)",
        ),
    ],
    ids=["HF_HUB_OFFLINE", "connection-refused"],
)
def test_unreachable_hub_ids_are_named_before_any_worker_starts(assets, tmp_path, env, why):
    out = tmp_path / "out"
    tree = tiny_recipe(assets, out, model={"name_or_path": "acme/base-nowhere", "tokenizer": "acme/tokenizer-nowhere"},
                       data={"train": [{"path": str(assets["code_train"])}, {"path": "acme/corpus-nowhere"}]},
                       eval={"sets": {"web": {"path": "acme/web-nowhere"}}})  # fmt: skip
    start = time.time()
    p = cpt_result("run", str(write_recipe(tmp_path / "r.yaml", tree)), **env(tmp_path / "hf"))
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "rank 0/" not in p.stderr, p.stderr[-3000:]
    cache = tmp_path / "hf" / "hub"
    lines = p.stderr.splitlines()
    for key, repo_id, hint in [
        ("model.name_or_path", "acme/base-nowhere", "download it first (`hf download acme/base-nowhere`)"),
        ("model.tokenizer", "acme/tokenizer-nowhere", "download it first (`hf download acme/tokenizer-nowhere`)"),
        ("data.train[1].path", "acme/corpus-nowhere", "`hf download --repo-type dataset acme/corpus-nowhere"),
        ("eval.sets.web.path", "acme/web-nowhere", "`hf download --repo-type dataset acme/web-nowhere"),
    ]:
        [line] = [line for line in lines if f"{key}: {repo_id} is " in line]
        assert f" and {why}; " in line and hint in line, line
        assert "pass a local path" in line or "pass the local path of its data files" in line, line
        if key.startswith("model."):
            assert f"not in the local Hugging Face cache ({cache})" in line, line
    assert not out.exists()
    assert time.time() - start < 90


def test_a_model_only_partly_in_the_cache_names_what_is_missing(assets, tmp_path):
    hf_home = hub_cache(tmp_path / "hf", TINY_ID, [assets["base"] / "config.json"])
    tree = tiny_recipe(assets, tmp_path / "out", model={"name_or_path": TINY_ID})
    line = refused("run", str(write_recipe(tmp_path / "r.yaml", tree)), **offline(hf_home))
    assert (
        f"model.name_or_path: {TINY_ID} is only partly in the local Hugging Face cache ({hf_home / 'hub'}: no "
        "weights, no tokenizer) and HF_HUB_OFFLINE is set; download it first" in line
    ), line


def test_a_hub_model_in_the_local_cache_runs_offline(hub_run):
    out, log = hub_run
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2]
    assert (out / "final" / "model.safetensors").is_file()


# -------------------------------------------------------------------------------------------------- cpt plan


def test_plan_uses_the_shipped_config_of_a_hub_model_it_cannot_reach(assets, tmp_path):
    index = json.loads((REPO / "recipes" / "models" / "index.json").read_text())
    repo_id, name = next((k, v) for k, v in index.items() if not k.startswith("_"))
    expected = json.loads((REPO / "recipes" / "models" / name).read_text())
    tree = tiny_recipe(assets, tmp_path / "out", model={"name_or_path": repo_id})
    p = cpt("plan", str(write_recipe(tmp_path / "r.yaml", tree)), **unreachable(tmp_path / "hf"))
    assert (
        f"model config: recipes/models/{name}, shipped with cpt: {repo_id} is not in the local Hugging Face cache "
        f"and the connection to the hub failed ({CLOSED_PORT}" in p.stdout
    ), p.stdout[-2000:]
    assert f"model: {expected['model_type']}, " in p.stdout
    assert "total (estimate):" in p.stdout


def test_plan_does_not_wait_on_an_unreachable_hub(assets, tmp_path):
    """transformers alone retries an unreachable hub for about 25 s before it gives up."""
    local = write_recipe(tmp_path / "local.yaml", tiny_recipe(assets, tmp_path / "out"))
    start = time.time()
    cpt("plan", str(local), **unreachable(tmp_path / "hf"))
    baseline = time.time() - start

    nowhere = write_recipe(tmp_path / "hub.yaml", tiny_recipe(assets, tmp_path / "out", model={
        "name_or_path": "acme/base-nowhere", "tokenizer": str(assets["tokenizer"])}))  # fmt: skip
    start = time.time()
    p = cpt("plan", str(nowhere), **unreachable(tmp_path / "hf"))
    assert time.time() - start < baseline + 10
    assert (
        f"model: model.name_or_path: acme/base-nowhere is not in the local Hugging Face cache and the connection to "
        f"the hub failed ({CLOSED_PORT}" in p.stdout
    ), p.stdout[-2000:]
    assert "`hf download acme/base-nowhere config.json`" in p.stdout

    hf_home = hub_cache(tmp_path / "hf-cached", TINY_ID, [assets["base"] / "config.json"])
    cached = write_recipe(tmp_path / "cached.yaml", tiny_recipe(assets, tmp_path / "out", model={
        "name_or_path": TINY_ID, "tokenizer": str(assets["tokenizer"])}))  # fmt: skip
    start = time.time()
    p = cpt("plan", str(cached), **unreachable(hf_home))
    assert time.time() - start < baseline + 10
    assert "model: llama, " in p.stdout and "model config:" not in p.stdout, p.stdout[-2000:]


def _plan_8b(*args: str) -> subprocess.CompletedProcess:
    return cpt("plan", "recipes/llama3-8b-fsdp.yaml", "model.name_or_path=null", "model.tokenizer=acme/tokenizer",
               "model.from_config=recipes/models/llama3-8b.json", "--gpus-per-node", "8", *args)  # fmt: skip


@pytest.mark.parametrize("share, warned", [(0.95, True), (0.8, False)])
def test_plan_warns_from_90_percent_of_the_gpu(share, warned):
    total = float(re.search(r"total \(estimate\):\s+([\d.]+) GiB", _plan_8b("--gpu-memory-gib", "10000").stdout)[1])
    p = _plan_8b("--gpu-memory-gib", f"{total / share:.4f}")
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning: the estimate")]
    if not warned:
        assert warnings == [], warnings
        return
    [line] = warnings
    assert f"is {share:.0%} of the GPU's {total / share:.1f} GiB, above 90%" in line, line
    assert "lower train.micro_batch_size (to 1), turn on model.activation_checkpointing, or offload to the CPU" in line


# -------------------------------------------------------------------------------------------- the command line


def test_overrides_go_before_or_after_the_flags(assets, tmp_path):
    recipe = str(write_recipe(tmp_path / "r.yaml", tiny_recipe(assets, tmp_path / "out")))
    after = cpt("plan", recipe, "--gpus-per-node", "2", "train.max_steps=7", "train.lr=1e-4").stdout
    assert "max_steps: 7" in after and "lr: 0.0001" in after and "1 node(s) x 2 worker(s)" in after
    before = cpt("plan", recipe, "train.max_steps=9", "--nodes", "2", "train.global_batch_size=8").stdout
    assert "max_steps: 9" in before and "2 node(s) x " in before and "global_batch_size: 8" in before


def test_version_is_the_installed_package():
    p = cpt("--version")
    assert p.stdout.strip() == f"cpt {importlib.metadata.version('cpt-launcher')}"


def test_every_argument_of_every_subcommand_has_help():
    parser, commands = build_parser()
    assert set(commands) == {"run", "plan", "eval", "export", "status", "quickstart"}
    for name, sub in [("cpt", parser), *commands.items()]:
        for action in sub._actions:
            assert action.help, f"{name} {'/'.join(action.option_strings) or action.dest} has no help text"


def test_cpt_commands_in_recipes_and_readme_use_flags_that_exist():
    _, commands = build_parser()
    flags = {name: {s for a in sub._actions for s in a.option_strings} for name, sub in commands.items()}
    documents = [REPO / "README.md", *sorted((REPO / "recipes").glob("*.yaml"))]
    seen = 0
    for path in documents:
        for line in path.read_text().splitlines():
            for m in re.finditer(r"\bcpt (run|plan|eval|export|status|quickstart)\b([^`#\n]*)", line):
                seen += 1
                for flag in re.findall(r"(?<!\S)--[\w-]+", m[2]):
                    assert flag in flags[m[1]], f"{path.name}: `cpt {m[1]}` has no flag {flag}: {line.strip()}"
    assert seen > 5


# ----------------------------------------------------------------------------------------- a launch says what


def test_a_launch_logs_each_stage_with_its_time_and_no_progress_bars(hub_run):
    _, log = hub_run
    stages = [
        r"tokenizer and model config loaded in \d+\.\d s",
        r"building the model under deepspeed \(zero3\.json\)",
        r"DeepSpeed communication ready in \d+\.\d s",
        rf"ZeRO stage 3: every rank reads its partition of {TINY_ID}",
        r"model built in \d+\.\d s",
        r"weights loaded in \d+\.\d s \(0\.\d\d GB read by this rank\)",
        r"DeepSpeed engine initialised in \d+\.\d s",
        r"engine ready in \d+\.\d s",
        r"training data opened in \d+\.\d s",
        r"eval sets read in \d+\.\d s \(code: \d+, prose: \d+ blocks on this rank\)",
        r"set up in \d+\.\d s",
    ]
    positions = []
    for stage in stages:
        m = re.search(rf"\[rank0\] INFO [\w.]+: {stage}", log)
        assert m, f"no {stage!r} in the log:\n{log[-4000:]}"
        positions.append(m.start())
    assert positions == sorted(positions)
    # DeepSpeed's own print as it joins on CPU comes through the log, stamped, not as a bare line
    built = r"DeepSpeed \S*shm_comm_op built successfully"
    assert re.search(rf"\[rank0\] INFO launcher\.engine\.deepspeed: {built}", log)
    assert not re.search(rf"^{built}", log, re.M), log[-4000:]
    # transformers' bars for reading and writing weights (final/ is written at the end)
    assert "Writing model shards" not in log and "Loading weights" not in log and "it/s]" not in log, log[-4000:]
