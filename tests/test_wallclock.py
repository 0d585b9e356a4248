"""The wall-clock harness on a tiny model: every output file, and its bookkeeping."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "wallclock.py"


@pytest.mark.slow
def test_harness_writes_results_curves_and_summary(tiny_bert_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("wallclock", HARNESS)
    wallclock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wallclock)
    out = tmp_path / "out"
    args = ["--data", "med", "--model", str(tiny_bert_dir), "--methods", "pretrain,basic,dp", "--max-steps", "4",
            "--eval-every", "2", "--seeds", "0,1", "--out", str(out),
            "model.pooling=mean", "model.normalize=true", "data.query_max_len=16", "data.passage_max_len=32",
            "optim.batch_size=8", "optim.learning_rate=1e-3", "mining.rank_start=0", "mining.rank_end=20",
            "mining.num_negatives=8"]
    assert wallclock.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"pretrain", "basic", "dp"}
    basic, dp = results["methods"]["basic"], results["methods"]["dp"]
    assert [p["step"] for p in basic["curve"]] == [0, 2, 4]
    assert basic["final"]["ndcg@10"]["mean"] == pytest.approx(
        sum(basic["final"]["ndcg@10"]["per_seed"]) / 2)
    assert results["methods"]["pretrain"]["curve"][0]["step"] == 0
    assert "paired_vs_basic" in dp and dp["paired_vs_basic"]["ndcg@10"]["wins"] >= 0
    assert 0 <= dp["paired_vs_basic"]["recall@20"]["p_value"] <= 1
    assert (out / "curves.png").stat().st_size > 10_000
    assert "| dp |" in (out / "summary.md").read_text()
    # Re-running reuses the finished runs.
    before = (out / "runs" / "dp-seed1" / "metrics.jsonl").read_text()
    assert wallclock.main(args) == 0
    assert (out / "runs" / "dp-seed1" / "metrics.jsonl").read_text() == before
