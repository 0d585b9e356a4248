"""Quality against wall-clock for every method, with identical hyperparameters and seeds.

    python benchmarks/wallclock.py --data scifact --model sentence-transformers/all-MiniLM-L6-v2 \\
        --methods pretrain,basic,sp,dp,infobatch --max-steps 200 --eval-every 25 --seeds 0,1,2 \\
        --out runs/wallclock-scifact [--config configs/minilm-scifact-basic.yaml] [key=value ...]

Each (method, seed) is one ``train_and_evaluate`` run under ``OUT/runs/``
(re-running the command resumes or reuses finished runs). ``pretrain`` is the
zero-shot model: step 0 of the runs. Wall-clock is training time (evaluation
excluded, XLA compilation excluded and reported apart) plus the method's own set-up
(SP/DP: the base model's pair scores).

Writes
- ``OUT/results.json``: per method, the curve (mean and per seed: step, seconds, examples,
  NDCG@10, Recall@20), final metrics (mean, std, per seed), total train seconds, the time to
  reach basic's final NDCG@10 (or null), and a paired per-query comparison with basic
  (mean difference of per-query NDCG@10 / Recall@20 over queries and seeds, wins/ties/losses,
  and a paired sign-flip permutation p-value);
- ``OUT/curves.png``: NDCG@10 and Recall@20 against wall-clock, a line per method, mean and
  min-max band over seeds;
- ``OUT/summary.md``: the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

METHODS = ("pretrain", "basic", "sp", "dp", "infobatch")
HEADLINE = ("ndcg@10", "recall@20")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--eval-every", type=int, required=True)
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", default=None, help="base config (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    return p.parse_args(argv)


def run_all(args) -> dict[str, dict[int, list[dict]]]:
    from opera_jax.config import load_config
    from opera_jax.train.trainer import train_and_evaluate

    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s): {', '.join(sorted(unknown))}")
    seeds = [int(s) for s in args.seeds.split(",")]
    trained = [m for m in methods if m != "pretrain"] or ["basic"]
    rows: dict[str, dict[int, list[dict]]] = {m: {} for m in trained}
    for seed in seeds:
        for method in trained:
            config = load_config(args.config, [
                *args.overrides, f"data.path={args.data}", f"model.name={args.model}", f"method.name={method}",
                f"seed={seed}", f"optim.max_steps={args.max_steps}", f"train.eval_every={args.eval_every}",
                f"train.checkpoint_every={args.max_steps}",
            ])
            workdir = args.out / "runs" / f"{method}-seed{seed}"
            metrics = workdir / "metrics.jsonl"
            done = metrics.exists() and any(json.loads(x)["step"] == args.max_steps
                                            for x in metrics.read_text().splitlines())
            if not done:
                print(f"== {method}, seed {seed}", flush=True)
                train_and_evaluate(config, workdir)
            by_step = {r["step"]: r for r in map(json.loads, metrics.read_text().splitlines())}  # one row a step
            rows[method][seed] = [by_step[k] for k in sorted(by_step)]
    if "pretrain" in methods:  # the zero-shot model: step 0 of every run
        rows = {"pretrain": {s: rows[trained[0]][s][:1] for s in seeds}, **rows}
    return rows


def _seconds(row: dict, method: str) -> float:
    return row["train_seconds"] + (row.get("method_setup_s", 0.0) if method in ("sp", "dp") else 0.0)


def summarise(rows: dict, args) -> dict:
    from opera_jax.data.beir import load_split, resolve_data_dir
    from opera_jax.eval.metrics import per_query, read_trec_run

    out = {"setup": {"data": args.data, "model": args.model, "max_steps": args.max_steps,
                     "eval_every": args.eval_every, "seeds": sorted(next(iter(rows.values()))),
                     "overrides": args.overrides},
           "methods": {}}
    for method, by_seed in rows.items():
        seeds = sorted(by_seed)
        steps = [r["step"] for r in by_seed[seeds[0]]]
        curve = []
        for i, step in enumerate(steps):
            pts = [by_seed[s][i] for s in seeds]
            curve.append({"step": step, "seconds": float(np.mean([_seconds(p, method) for p in pts])),
                          "examples_seen": pts[0]["examples_seen"],
                          **{k: float(np.mean([p[k] for p in pts])) for k in HEADLINE},
                          **{f"{k}_min": float(np.min([p[k] for p in pts])) for k in HEADLINE},
                          **{f"{k}_max": float(np.max([p[k] for p in pts])) for k in HEADLINE}})
        finals = [by_seed[s][-1] for s in seeds]
        out["methods"][method] = {
            "curve": curve,
            "per_seed": {s: [{"step": r["step"], "seconds": _seconds(r, method), **{k: r[k] for k in HEADLINE}}
                             for r in by_seed[s]] for s in seeds},
            "final": {k: {"mean": float(np.mean([f[k] for f in finals])), "std": float(np.std([f[k] for f in finals])),
                          "per_seed": [f[k] for f in finals]} for k in HEADLINE},
            "train_seconds": float(np.mean([_seconds(f, method) for f in finals])),
        }
    if "basic" in out["methods"]:
        target = out["methods"]["basic"]["final"]["ndcg@10"]["mean"]
        out["target_ndcg@10"] = target
        for method, res in out["methods"].items():
            reached = [p for p in res["curve"] if p["ndcg@10"] >= target]
            res["time_to_basic_final_ndcg@10"] = reached[0]["seconds"] if reached and method != "pretrain" else None
        split = load_split(resolve_data_dir(args.data), "test")
        base = _per_query_runs(args, "basic", split, per_query, read_trec_run)
        for method in out["methods"]:
            if method in ("basic", "pretrain"):
                continue
            other = _per_query_runs(args, method, split, per_query, read_trec_run)
            out["methods"][method]["paired_vs_basic"] = {k: _paired(other[k], base[k]) for k in HEADLINE}
    return out


def _per_query_runs(args, method, split, per_query, read_trec_run) -> dict[str, np.ndarray]:
    """Per-query final metrics, concatenated over seeds in the same query order."""
    vals = {k: [] for k in HEADLINE}
    for seed in [int(s) for s in args.seeds.split(",")]:
        pq = per_query(split.qrels, read_trec_run(args.out / "runs" / f"{method}-seed{seed}" / "run.trec"))
        qids = sorted(pq["ndcg@10"])
        for k in HEADLINE:
            vals[k].extend(pq[k][q] for q in qids)
    return {k: np.asarray(v) for k, v in vals.items()}


def _paired(a: np.ndarray, b: np.ndarray, rounds: int = 10000) -> dict:
    """Mean per-query difference a - b, wins/ties/losses, and a two-sided sign-flip permutation p-value."""
    d = a - b
    rng = np.random.default_rng(0)
    flips = rng.choice([-1.0, 1.0], size=(rounds, len(d)))
    null = np.abs((flips * d).mean(axis=1))
    return {"mean_diff": float(d.mean()), "wins": int((d > 0).sum()), "ties": int((d == 0).sum()),
            "losses": int((d < 0).sum()), "p_value": float((null >= abs(d.mean()) - 1e-12).mean())}


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('plots need matplotlib: pip install "opera-jax[plots]"') from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(axes, HEADLINE, ("NDCG@10", "Recall@20")):
        for method, res in results["methods"].items():
            if method == "pretrain":
                ax.axhline(res["final"][key]["mean"], color="gray", ls=":", label="pretrain")
                continue
            x = [p["seconds"] for p in res["curve"]]
            ax.plot(x, [p[key] for p in res["curve"]], marker="o", ms=3, label=method)
            ax.fill_between(x, [p[f"{key}_min"] for p in res["curve"]], [p[f"{key}_max"] for p in res["curve"]],
                            alpha=0.15)
        ax.set_xlabel("training wall-clock (s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    s = results["setup"]
    fig.suptitle(f"{s['data']}, {s['model']}, {s['max_steps']} steps, seeds {s['seeds']} (mean, min-max band)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: dict) -> str:
    lines = ["| method | NDCG@10 | Recall@20 | train s | time to basic's final NDCG@10 | paired vs basic (NDCG@10, p) |",
             "|---|---|---|---|---|---|"]
    for method, res in results["methods"].items():
        f = res["final"]
        reach = res.get("time_to_basic_final_ndcg@10")
        paired = res.get("paired_vs_basic", {}).get("ndcg@10")
        lines.append(
            f"| {method} | {f['ndcg@10']['mean']:.4f} ± {f['ndcg@10']['std']:.4f} "
            f"| {f['recall@20']['mean']:.4f} ± {f['recall@20']['std']:.4f} | {res['train_seconds']:.0f} "
            f"| {'-' if reach is None else f'{reach:.0f} s'} "
            f"| {'-' if paired is None else '{:+.4f}, p={:.3f}'.format(paired['mean_diff'], paired['p_value'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from opera_jax.io_utils import write_json, write_text

    rows = run_all(args)
    results = summarise(rows, args)
    write_json(args.out / "results.json", results)
    plot(results, args.out / "curves.png")
    write_text(args.out / "summary.md", table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
