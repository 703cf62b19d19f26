"""The data position through real training runs: 2 ranks x 2 DataLoader workers, checkpoint, resume."""

from __future__ import annotations

import pytest
from conftest import cpt, read_metrics, tiny_recipe, write_recipe


def _data_log(out) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(out) if "loss" in m}


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """The same recipe -- a mixture of two sources, shuffled, 2 ranks x 2 workers -- run straight to step 6,
    and run to step 3, stopped, and resumed from its checkpoint to step 6."""
    root = tmp_path_factory.mktemp("data-loop")
    outs = {}
    for name in ("straight", "resumed"):
        out = root / name
        tree = tiny_recipe(
            assets, out,
            data={"train": [{"path": str(assets["code_train"]), "weight": 3},
                            {"path": str(assets["prose_train"]), "weight": 1}],
                  "seq_len": 64, "num_workers": 2, "shuffle_buffer": 8},
            train={"max_steps": 6, "schedule": "constant", "global_batch_size": 8},
            eval={"sets": {}},
            parallel={"engine": "fsdp", "config": "fsdp.yaml", "nproc_per_node": 2},
        )  # fmt: skip
        write_recipe(root / f"{name}.yaml", tree)
        outs[name] = out
    cpt("run", str(root / "straight.yaml"))
    cpt("run", str(root / "resumed.yaml"), "train.max_steps=3")
    cpt("run", str(root / "resumed.yaml"))
    return root, outs


def test_resume_through_a_checkpoint_gives_the_same_batches(runs):
    """After a real checkpoint save and load (model, optimizer, data position of every rank and worker), steps
    4-6 consume exactly the token ids of the uninterrupted run: data/batch_hash hashes every token id every rank
    consumed, in order."""
    _, outs = runs
    straight, resumed = _data_log(outs["straight"]), _data_log(outs["resumed"])
    assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    hashes = [straight[s]["data/batch_hash"] for s in range(1, 7)]
    assert len(set(hashes)) == 6, "every step consumes new data"
    for step in range(1, 7):
        a, b = straight[step], resumed[step]
        assert b["data/batch_hash"] == a["data/batch_hash"], step
        for key in ("data/mix/code_train", "data/mix/prose_train"):
            assert b[key] == a[key], (step, key)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), step
    mix = straight[6]["data/mix/code_train"]
    assert straight[6]["data/mix/prose_train"] == pytest.approx(1 - mix)
    assert 0.5 < mix < 0.95  # weights 3:1 over 6 x 8 x 64 tokens; documents are long, so the mix is coarse
