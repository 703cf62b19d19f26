"""Background checkpoints (``train.async_save``) on GPUs: the state's copy runs on a stream of its own into
page-locked host memory while the next step's forward and backward run, and only the optimizer step waits for it
(on the GPU). The CPU suite (tests/test_async_checkpoint.py) checks the same commits bit for bit; on a card the
copy's ordering against the training stream is what can go wrong, and what this test catches."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import job_output, read_metrics, start_job, tiny_recipe, write_recipe
from test_async_checkpoint import committed, dcp_tensors, run_holding_a_save

from launcher.checkpoint import verify

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: copies on a stream of their own"),
]

CUDA = {"DS_ACCELERATOR": "cuda"}


def test_on_gpus_each_background_save_holds_the_state_of_its_own_step(assets, tmp_path):
    gpus = min(2, torch.cuda.device_count())

    def recipe(name: str, **train):
        train = {"max_steps": 6, "keep_last": 6, "log_every": 1, "schedule": "constant", "precision": "bf16",
                 "micro_batch_size": 4, **train}  # fmt: skip
        tree = tiny_recipe(assets, tmp_path / name, train=train, eval={"sets": {}},
                           parallel={"engine": "fsdp", "config": "fsdp.yaml", "nproc_per_node": gpus})  # fmt: skip
        return write_recipe(tmp_path / f"{name}.yaml", tree), tmp_path / name

    # the reference: a synchronous checkpoint after every step
    sync_recipe, sync = recipe("sync", save_every=1, async_save=False)
    proc = start_job(sync_recipe, tmp_path / "sync.log", **CUDA)
    log = job_output(proc, tmp_path / "sync.log", timeout=300)
    assert proc.returncode == 0, log[-5000:]

    background_recipe, background = recipe("async", save_every=2, async_save=True)
    # one save's write held until the step after it has changed the model on the GPU
    _, log = run_holding_a_save(background_recipe, background, tmp_path / "async.log", rank=gpus - 1, **CUDA)
    assert re.search(r"host copy for background checkpoints: [\d.]+ GiB page-locked, made in", log), log[-5000:]
    assert committed(background) == [2, 4, 6]

    # Each background checkpoint against the synchronous ones of its own step and of the step after: the GPU's
    # reductions are not bit-exact from run to run, but a copy that read the state after the next optimizer step
    # (or before this one) would be as far from its own step as one step's update.
    for step in (2, 4):
        ckpt = background / "checkpoints" / f"step-{step}"
        assert verify(ckpt) is None
        ours = dcp_tensors(ckpt, tmp_path / "ours.pt")
        same, after = (dcp_tensors(sync / "checkpoints" / f"step-{s}", tmp_path / f"{s}.pt") for s in (step, step + 1))
        assert ours.keys() == same.keys() and any(".exp_avg_sq" in k for k in ours)
        moved = {k for k in same if same[k].is_floating_point() and not torch.equal(same[k], after[k])}
        assert moved, "a step changed nothing: the comparison would prove nothing"
        off = sum((ours[k].double() - same[k].double()).abs().sum().item() for k in moved)
        step_size = sum((after[k].double() - same[k].double()).abs().sum().item() for k in moved)
        assert off < 0.05 * step_size, (step, off, step_size)

    losses = [m["loss"] for m in read_metrics(background) if "loss" in m]
    reference = [m["loss"] for m in read_metrics(sync) if "loss" in m]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=2e-2, atol=0)
