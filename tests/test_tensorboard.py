"""logging.tensorboard: rank 0 writes event files under output_dir/tensorboard holding what metrics.jsonl holds, and
a resumed run continues them without showing a step twice."""

from __future__ import annotations

import pytest
from conftest import cpt, read_metrics, tiny_recipe, write_recipe

from launcher.callbacks import RunInfo, TensorBoard, default_callbacks
from launcher.config import Recipe


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same_as_metrics(out) -> dict[str, list[tuple[int, float]]]:
    got = scalars(out / "tensorboard")
    metrics = read_metrics(out)
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval" in m]
    for key in ("loss", "lr", "grad_norm", "tokens_seen"):
        assert [s for s, _ in got[f"train/{key}"]] == [m["step"] for m in train], key
        assert [v for _, v in got[f"train/{key}"]] == pytest.approx([m[key] for m in train], rel=1e-6), key
    for name in ("code", "prose"):
        for key in ("loss", "perplexity", "tokens"):
            tag = f"eval/{name}/{key}"
            assert [s for s, _ in got[tag]] == [e["step"] for e in evals], tag
            assert [v for _, v in got[tag]] == pytest.approx([e["eval"][name][key] for e in evals], rel=1e-6), tag
    return got


def test_only_asked_for():
    r = Recipe()
    assert not any(isinstance(c, TensorBoard) for c in default_callbacks(r))
    r.logging.tensorboard = True
    assert any(isinstance(c, TensorBoard) for c in default_callbacks(r))


def log_run(out, start: int, end: int, *, resumed: bool, offset: float) -> None:
    """What the loop tells the callback in a run from ``start`` to ``end`` (losses ``step + offset``)."""
    cb = TensorBoard()
    cb.on_train_start(RunInfo(recipe=Recipe(output_dir=str(out)), output_dir=out, world_size=1, grad_accum=1,
                              global_batch_size=1, tokens_per_step=1, n_params=1, start_step=start, max_steps=end,
                              resumed=resumed, command="cpt run r.yaml"))  # fmt: skip
    for step in range(start + 1, end + 1):
        cb.on_step(step, {"loss": step + offset, "mfu": None, "data/batch_hash": 2**47 + 1})
    cb.on_eval(end, {"code": {"loss": end + offset, "perplexity": 1.5, "tokens": 640}})
    cb.on_train_end(None, None)  # type: ignore[arg-type]


def test_a_fresh_start_in_the_same_directory_hides_the_earlier_run(tmp_path):
    log_run(tmp_path, 0, 3, resumed=False, offset=0.0)
    log_run(tmp_path, 0, 2, resumed=False, offset=10.0)
    got = scalars(tmp_path / "tensorboard")
    assert got["train/loss"] == [(1, 11.0), (2, 12.0)]
    assert got["eval/code/loss"] == [(2, 12.0)]
    # Missing values are left out, and so is the data hash, which a float32 scalar cannot hold.
    assert set(got) == {"train/loss", "eval/code/loss", "eval/code/perplexity", "eval/code/tokens"}


@pytest.mark.slow
def test_event_files_hold_the_metrics_and_a_resume_appends(assets, tmp_path):
    out = tmp_path / "run"
    train = {"max_steps": 3, "save_every": 2, "save_final": False, "export_final": False}
    # FSDP2, which starts faster than DeepSpeed: rank 0's callback gets the same metrics from the loop under either
    # engine, and a ZeRO-3 resume is bit-exact in test_checkpoint.py.
    tree = tiny_recipe(assets, out, train=train, eval={"at_start": True, "max_blocks": 4},
                       logging={"wandb": "disabled", "progress": False, "tensorboard": True},
                       parallel={"engine": "fsdp", "config": "fsdp.yaml", "nproc_per_node": 2})  # fmt: skip
    recipe = write_recipe(tmp_path / "r.yaml", tree)
    cpt("run", str(recipe))
    got = assert_same_as_metrics(out)
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3]
    assert [s for s, _ in got["eval/code/loss"]] == [0, 3]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1, "a rank other than 0 wrote events"

    # Step 3 and its evaluation came after the last checkpoint (step 2): the resumed run trains step 3 again, and
    # TensorBoard shows the new step 3 only.
    cpt("run", str(recipe), "train.max_steps=4")
    got = assert_same_as_metrics(out)
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in got["eval/code/loss"]] == [0, 4]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
