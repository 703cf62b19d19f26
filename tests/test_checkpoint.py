"""Checkpoints you can trust: bit-exact resume after SIGKILL, fallback past a damaged checkpoint, safe loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    TRAINED,
    TRAINED_ENGINES,
    cpt,
    kill_whole_job,
    read_metrics,
    tiny_recipe,
    train_losses,
    trained_tree,
    worker_env,
    write_recipe,
)
from safetensors.torch import load_file

ENGINES = [("deepspeed", "zero3.json"), ("fsdp", "fsdp.yaml")]


def recipe_for(assets, tmp_path: Path, name: str, engine: str, config: str, **train) -> tuple[Path, Path]:
    out = tmp_path / name
    train = {**TRAINED, **train}  # max_steps 8, save_every 2, keep_last 3, log_every 1
    parallel = {"engine": engine, "config": config, "nproc_per_node": 2}
    tree = tiny_recipe(assets, out, train=train, eval={"sets": {}}, parallel=parallel)
    return write_recipe(tmp_path / f"{name}.yaml", tree), out


def committed_steps(out: Path) -> list[int]:
    names = [p.name for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp")]
    return sorted(int(n.split("-")[1]) for n in names)


@pytest.mark.parametrize("engine, config", ENGINES)
def test_sigkill_of_the_whole_job_then_resume_is_bit_exact(assets, tmp_path, trained_runs, engine, config):
    # The run straight through is the session's shared run of this engine (conftest.trained_runs); the killed
    # run has the same recipe but for output_dir.
    straight = trained_runs[engine]
    assert TRAINED_ENGINES[engine] == config
    killed = tmp_path / "killed"
    killed_recipe = write_recipe(tmp_path / "killed.yaml", trained_tree(assets, killed, engine))
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(killed_recipe)], cwd=REPO,
                            env=worker_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    end = time.time() + 240
    while time.time() < end and not (killed / "checkpoints" / "step-4").is_dir():
        assert proc.poll() is None, "run ended before it could be killed"
        time.sleep(0.05)
    kill_whole_job(proc)  # mid-step
    assert max(m["step"] for m in read_metrics(killed) if "loss" in m) < 8
    cpt("run", str(killed_recipe))
    a, b = train_losses(straight), train_losses(killed)
    assert sorted(b) == list(range(1, 9)), "metrics.jsonl holds each step once"
    # Same ranks, same reduction order, restored optimizer/scheduler/data/RNG: no tolerance is needed.
    assert b == a
    wa, wb = load_file(straight / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_damaged_newest_checkpoint_falls_back_to_the_previous(assets, tmp_path):
    recipe, out = recipe_for(assets, tmp_path, "damaged", "deepspeed", "zero2.json", max_steps=6)
    cpt("run", str(recipe))
    assert committed_steps(out) == [2, 4, 6]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-6"
    # Newest: a truncated shard. Next: its commit record is gone (as if the job died before the rename).
    shard = next((out / "checkpoints" / "step-6").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (out / "checkpoints" / "step-4" / "trainer_state.json").unlink()
    (out / "checkpoints" / "step-8.tmp").mkdir()  # a save that never committed
    p = cpt("run", str(recipe), "train.max_steps=7")
    assert "skipping checkpoint" in p.stderr and "step-6" in p.stderr and "bytes" in p.stderr
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in p.stderr
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == list(range(1, 8))


def test_a_checkpoint_cannot_run_code_when_loaded(assets, tmp_path, trained_runs):
    # a copy of the session's shared ZeRO-3 run (conftest.trained_runs): its newest checkpoint, step 8, is replaced
    out = tmp_path / "evil"
    shutil.copytree(trained_runs["deepspeed"], out)
    recipe = write_recipe(tmp_path / "evil.yaml", trained_tree(assets, out, "deepspeed"))
    ckpt = out / "checkpoints" / "step-8"
    assert (out / "checkpoints" / "latest").read_text().strip() == ckpt.name
    marker = tmp_path / "pwned"
    evil = ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    payload = tmp_path / "payload.py"
    payload.write_text(
        "import os, pickle, sys\n"
        "class Evil:\n"
        "    def __reduce__(self):\n"
        f"        return (os.system, ('touch {marker}',))\n"
        "pickle.dump({'module': Evil()}, open(sys.argv[1], 'wb'))\n"
    )
    subprocess.run([sys.executable, str(payload), str(evil)], check=True)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest[evil.name] = evil.stat().st_size  # the attacker also fixes the manifest
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    p = subprocess.run([sys.executable, "-m", "launcher", "run", str(recipe), "train.max_steps=9"], cwd=REPO,
                       env=worker_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode != 0
    assert "weights_only" in p.stderr or "Unpickl" in p.stderr, p.stderr[-3000:]
    assert not marker.exists(), "the checkpoint ran code"
