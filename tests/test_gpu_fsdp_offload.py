"""FSDP2 CPU offload, on a GPU: without one it is a no-op (the launcher logs so and trains plain FSDP2), so these
tests are all that tests it. The parity recipe of tests/test_distributed.py runs under fsdp.yaml and
fsdp-offload.yaml on up to two GPUs; rank 0 reports after every step where its shards of the parameters and of
AdamW's states live and what the GPU holds between steps."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run, tiny_recipe, train_losses, write_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU: FSDP2 CPU offload is a no-op without one, so its tests need a card",
    ),
]

# The worker entry point (as launcher/train.py runs it) with one more callback on rank 0.
DRIVER = """
import json, os, sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from launcher import launch
from launcher.callbacks import Callback, default_callbacks
from launcher.loop import Trainer
from launcher.preflight import load_recipe


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


class WhereTheStatesLive(Callback):
    def __init__(self, report):
        self.report, self.trainer, self.steps = Path(report), None, []

    def on_step(self, step, metrics):
        engine = self.trainer.engine
        params = [local(p) for p in engine.module.parameters()]
        states = [local(v) for s in engine.optimizer.state.values() for k, v in s.items() if k != "step"]
        self.steps.append({
            "step": step,
            "params": sorted({t.device.type for t in params}),
            "states": sorted({t.device.type for t in states}),
            "params_pinned": all(t.is_pinned() for t in params),
            "state_bytes": sum(t.numel() * t.element_size() for t in params + states),
            "cuda_allocated": torch.cuda.memory_allocated(),
            "cuda_peak": torch.cuda.max_memory_allocated(),
        })

    def on_train_end(self, run, final_dir):
        self.report.write_text(json.dumps(self.steps))


recipe_path, report = sys.argv[1:3]
launch.apply_launcher_env()
recipe = load_recipe(recipe_path, world_size=int(os.environ["WORLD_SIZE"]), check_files=True)
info = launch.init_distributed(recipe.parallel.timeout_minutes)
probe = WhereTheStatesLive(report)
trainer = Trainer(recipe, info, callbacks=[*default_callbacks(recipe), probe])
probe.trainer = trainer
trainer.fit()
launch.teardown()
"""


@pytest.fixture(scope="module")
def gpu_runs(assets, tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """The parity recipe (5 steps, global batch 8, evaluation, checkpoints) in fp32 under plain FSDP2 and under
    CPU offload: {config: (output_dir, rank 0's report per step)}."""
    root = tmp_path_factory.mktemp("gpu-offload")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    gpus = min(2, torch.cuda.device_count())
    importable = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    runs = {}
    for config in ("fsdp.yaml", "fsdp-offload.yaml"):
        out = root / config.removesuffix(".yaml")
        tree = tiny_recipe(assets, out, train={"max_steps": 5, "global_batch_size": 8, "save_every": 2,
                                               "log_every": 1, "precision": "fp32"},
                           parallel={"engine": "fsdp", "config": config, "nproc_per_node": gpus})  # fmt: skip
        recipe = write_recipe(root / f"{out.name}.yaml", tree)
        report = root / f"{out.name}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
        # the driver is a file outside the repository: it imports the launcher from this checkout
        run([*command, str(driver), str(recipe), str(report)], PYTHONPATH=importable)
        runs[config] = (out, json.loads(report.read_text()))
    return runs


def test_offloaded_shards_and_optimizer_states_live_in_host_memory_during_training(gpu_runs):
    _, offload = gpu_runs["fsdp-offload.yaml"]
    _, plain = gpu_runs["fsdp.yaml"]
    assert [s["step"] for s in offload] == [s["step"] for s in plain] == [1, 2, 3, 4, 5]
    for off, on in zip(offload, plain):
        # in page-locked host memory, so that the all-gathers copy them to the GPU asynchronously
        assert off["params"] == ["cpu"] and off["states"] == ["cpu"] and off["params_pinned"], off
        assert on["params"] == ["cuda"] and on["states"] == ["cuda"], on
        assert off["cuda_peak"] > 0, "the forward and backward did not run on the GPU"
        # Between steps the GPU holds the same buffers in both runs (CUDA libraries' workspaces among them), and
        # without offload the parameter and Adam shards besides: offload takes at least those bytes off the GPU.
        assert on["cuda_allocated"] - off["cuda_allocated"] >= off["state_bytes"] == on["state_bytes"], (on, off)


def test_offload_gives_the_loss_curve_of_plain_fsdp(gpu_runs):
    """Within the parity tolerance of tests/test_distributed.py: fp32, the same weights, data and optimizer; the
    offloaded AdamW steps on the CPU, plain FSDP2's fused on the GPU."""
    (plain_out, _), (offload_out, _) = gpu_runs["fsdp.yaml"], gpu_runs["fsdp-offload.yaml"]
    ref, curve = train_losses(plain_out), train_losses(offload_out)
    assert sorted(ref) == [1, 2, 3, 4, 5] and ref[5] < ref[1], ref
    assert curve.keys() == ref.keys()
    for step in ref:
        assert curve[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, curve[step], ref[step])
    for s in ("code", "prose"):
        a = json.loads((plain_out / "eval_results.json").read_text())[s]
        b = json.loads((offload_out / "eval_results.json").read_text())[s]
        assert b["tokens"] == a["tokens"] > 0 and b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5)
