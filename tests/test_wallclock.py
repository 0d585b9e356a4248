"""The wall-clock harness on a tiny model: every output file, and its bookkeeping."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out: README "Tests"

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "wallclock.py"


def _harness():
    spec = importlib.util.spec_from_file_location("wallclock", HARNESS)
    wallclock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wallclock)
    return wallclock


def test_time_to_target_is_the_first_point_at_or_above_it():
    w = _harness()
    curve = [
        {"seconds": 0, "ndcg@10": 0.3},
        {"seconds": 10, "ndcg@10": 0.41},
        {"seconds": 20, "ndcg@10": 0.39},
        {"seconds": 30, "ndcg@10": 0.45},
    ]
    assert w.time_to_target(curve, 0.4) == 10
    assert w.time_to_target(curve, 0.45) == 30
    assert w.time_to_target(curve, 0.46) is None


def _result(data, finals, paired=None):
    methods = {}
    for m, per_seed in finals.items():
        methods[m] = {
            "final": {
                k: {"mean": sum(v) / len(v), "std": 0.0, "per_seed": v}
                for k, v in (("ndcg@10", per_seed), ("recall@20", [x + 0.1 for x in per_seed]))
            }
        }
        if paired and m in paired:
            methods[m]["paired_vs_basic"] = {
                k: {"mean_diff": paired[m], "p_value": 0.5} for k in ("ndcg@10", "recall@20")
            }
    return {"setup": {"data": data}, "methods": methods}


def test_cross_collection_report_means_over_collections(tmp_path, capsys):
    w = _harness()
    a = _result("cranfield", {"basic": [0.3, 0.5], "dp": [0.2, 0.4]}, {"dp": -0.1})
    b = _result("npl", {"basic": [0.2, 0.2, 0.2], "dp": [0.3, 0.3, 0.3], "sp": [0.1]}, {"dp": 0.1, "sp": -0.1})
    rep = w.cross_collection([a, b])
    assert rep["collections"]["cranfield"]["dp"]["ndcg@10"]["mean"] == pytest.approx(0.3)
    assert rep["collections"]["npl"]["dp"]["seeds"] == 3
    assert rep["mean"]["basic"]["ndcg@10"] == pytest.approx((0.4 + 0.2) / 2)
    assert rep["mean"]["dp"]["ndcg@10"] == pytest.approx((0.3 + 0.3) / 2)
    assert rep["mean"]["dp"]["mean_diff_vs_basic"]["ndcg@10"] == pytest.approx(0.0)
    assert rep["mean"]["sp"]["collections"] == 1 and "mean_diff_vs_basic" not in rep["mean"]["basic"]
    for name, res in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    assert w.main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "| npl | sp | 1 |" in out and "| mean of 2 | dp |" in out


def test_add_seeds_takes_the_saved_setup_and_a_new_setup_needs_a_new_out(tmp_path):
    w = _harness()
    first = [
        "--data",
        "med",
        "--model",
        "m",
        "--passes",
        "40",
        "--eval-every",
        "5",
        "--seeds",
        "0,1",
        "--out",
        str(tmp_path),
        "optim.learning_rate=1e-5",
    ]
    args = w.parse_args(first)
    assert args.passes == 40 and args.max_steps is None
    (tmp_path / "setup.json").write_text(json.dumps(w._setup_of(args)))
    more = w.parse_args(["--add-seeds", "1,2,3", "--out", str(tmp_path)])
    assert more.seeds == "0,1,2,3" and more.passes == 40 and more.overrides == ["optim.learning_rate=1e-5"]
    assert w.parse_args(first[:-4] + ["0,1,2", "--out", str(tmp_path), "optim.learning_rate=1e-5"]).seeds == "0,1,2"
    with pytest.raises(SystemExit):
        w.parse_args(first[:-1] + ["optim.learning_rate=1e-4"])  # another setup in the same OUT
    with pytest.raises(SystemExit):
        w.parse_args(["--add-seeds", "2", "--out", str(tmp_path / "none")])


@pytest.mark.slow
def test_harness_writes_results_curves_and_summary(tiny_bert_dir, tmp_path):
    wallclock = _harness()
    out = tmp_path / "out"
    args = [
        "--data",
        "med",
        "--model",
        str(tiny_bert_dir),
        "--methods",
        "pretrain,basic,dp",
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--seeds",
        "0",
        "--out",
        str(out),
        "model.pooling=mean",
        "model.normalize=true",
        "data.query_max_len=16",
        "data.passage_max_len=32",
        "optim.batch_size=8",
        "optim.learning_rate=1e-3",
        "mining.rank_start=0",
        "mining.rank_end=20",
        "mining.num_negatives=8",
    ]
    assert wallclock.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"pretrain", "basic", "dp"}
    basic, dp = results["methods"]["basic"], results["methods"]["dp"]
    assert [p["step"] for p in basic["curve"]] == [0, 2, 4]
    assert results["methods"]["pretrain"]["curve"][0]["step"] == 0
    assert "paired_vs_basic" in dp and dp["paired_vs_basic"]["ndcg@10"]["wins"] >= 0
    assert 0 <= dp["paired_vs_basic"]["recall@20"]["p_value"] <= 1
    # `pair RUN_A RUN_B` compares two runs as the harness compares a method with basic
    runs = out / "runs"
    assert wallclock.pair([str(runs / "dp-seed0"), str(runs / "basic-seed0")]) == dp["paired_vs_basic"]
    assert (out / "curves.png").stat().st_size > 10_000
    assert "| dp |" in (out / "summary.md").read_text()
    # Re-running reuses the finished runs.
    before = (out / "runs" / "dp-seed0" / "metrics.jsonl").read_text()
    assert wallclock.main(args) == 0
    assert (out / "runs" / "dp-seed0" / "metrics.jsonl").read_text() == before
    # A seed added later: only it runs; the summary covers both, per-seed times to target included.
    assert wallclock.main(["--add-seeds", "1", "--out", str(out)]) == 0
    assert (out / "runs" / "dp-seed0" / "metrics.jsonl").read_text() == before
    results = json.loads((out / "results.json").read_text())
    assert results["setup"]["seeds"] == [0, 1]
    basic = results["methods"]["basic"]
    assert basic["final"]["ndcg@10"]["mean"] == pytest.approx(sum(basic["final"]["ndcg@10"]["per_seed"]) / 2)
    assert set(results["methods"]["dp"]["time_to_basic_final_ndcg@10_per_seed"]) == {"0", "1"}
    assert results["methods"]["dp"]["compile_seconds"] > 0
