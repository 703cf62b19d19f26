"""The quickstart path end to end, shortened: assets, base pretraining, continual pretraining, outputs."""

from __future__ import annotations

import json

from conftest import cpt, read_metrics


def test_quickstart_fast(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "qs"
    p = cpt("quickstart", "--fast", "--output-dir", str(out), timeout=600)
    assert "stage 1/3: pretraining the base model" in p.stdout
    assert "stage 2/3: continual pretraining" in p.stdout
    assert "stage 3/3: the same, replaying English prose" in p.stdout
    run = out / "cpt"
    results = json.loads((run / "eval_results.json").read_text())
    assert set(results) == {"code", "prose"}
    evals = [m for m in read_metrics(run) if "eval" in m]
    assert [e["step"] for e in evals] == [0, 3, 6]
    # The base model's prose perplexity, measured at the end of stage 1 under ZeRO-2, is what stage 2 measures
    # at its step 0 under ZeRO-3 after export and reload.
    base_eval = json.loads((out / "base" / "eval_results.json").read_text())["prose"]
    assert (
        evals[0]["eval"]["prose"]["perplexity"] == base_eval["perplexity"]
        or abs(evals[0]["eval"]["prose"]["loss"] - base_eval["loss"]) < 1e-5
    )
    assert evals[-1]["eval"]["code"]["loss"] < evals[0]["eval"]["code"]["loss"], "no adaptation to code"
    for line in ("Perplexity before -> after", "code:", "prose:", str(run)):
        assert line in p.stdout, line
    # The replay run mixes prose into the code by its falling schedule, and the closing lines compare the two runs.
    replay = [m for m in read_metrics(out / "cpt-replay") if "loss" in m]
    shares = [m["data/weight/prose-replay"] for m in replay]
    assert shares[0] == 0.3 and shares[0] > shares[-1] > 0.1, shares
    assert replay[-1]["data/mix/prose-replay"] > 0.1
    tail = p.stdout[p.stdout.index("[quickstart] replay:") :]
    assert "without replay" in tail and "with replay" in tail and "prose perplexity rose" in tail
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    ids = tok("def main():", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
    # A second quickstart reuses the base model and the assets.
    p2 = cpt("quickstart", "--fast", "--output-dir", str(out), timeout=600)
    assert "base model already built" in p2.stdout
