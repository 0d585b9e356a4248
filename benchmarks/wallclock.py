"""Quality against wall-clock for every method, with identical hyperparameters and seeds.

    python benchmarks/wallclock.py --data scifact --model sentence-transformers/all-MiniLM-L6-v2 \\
        --methods pretrain,basic,sp,dp,infobatch --max-steps 200 --eval-every 25 --seeds 0,1,2 \\
        --out runs/wallclock-scifact [--config configs/minilm-scifact-basic.yaml] [key=value ...]
    python benchmarks/wallclock.py ... --passes 40 ...        # a budget in passes (optim.max_epochs)
    python benchmarks/wallclock.py --add-seeds 3,4 --out runs/wallclock-scifact   # more seeds, same setup
    python benchmarks/wallclock.py report OUT1 OUT2 ...     # across collections
    python benchmarks/wallclock.py pair RUN_A RUN_B        # two finished runs, paired per query (A - B)

Each (method, seed) is one ``train_and_evaluate`` run under ``OUT/runs/``; a run whose final
evaluation is written (``run.trec``) is reused, never rerun. ``OUT/setup.json`` records the
arguments, so ``--add-seeds`` runs only the new seeds of the same setup and summarises them all.

Each (method, seed) is one ``train_and_evaluate`` run under ``OUT/runs/``
(re-running the command resumes or reuses finished runs). ``pretrain`` is the
zero-shot model: step 0 of the runs. Wall-clock is training time (evaluation
excluded, XLA compilation excluded and reported apart) plus the method's own set-up
(SP/DP: the base model's pair scores).

Writes
- ``OUT/results.json``: per method, the curve (mean and per seed: step, seconds, examples,
  NDCG@10, Recall@20), final metrics (mean, std, per seed), total train seconds and compile
  seconds (apart), the time to reach basic's final NDCG@10 on the mean curve and per seed (or
  null), and a paired per-query comparison with basic
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
    p.add_argument("--data")
    p.add_argument("--model")
    p.add_argument("--methods", default=",".join(METHODS))
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=int)
    budget.add_argument("--passes", type=float, help="budget in passes over the training queries (optim.max_epochs)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--seeds", default="0")
    p.add_argument("--add-seeds", default=None, help="run these seeds too, with OUT/setup.json's arguments")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", default=None, help="base config (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    args = p.parse_args(argv)
    setup_file = args.out / "setup.json"
    if args.add_seeds is not None:
        if not setup_file.exists():
            p.error(f"--add-seeds: {setup_file} not found (run the full command once first)")
        saved = json.loads(setup_file.read_text())
        seeds = _seed_list(saved["seeds"]) + [
            s for s in _seed_list(args.add_seeds) if s not in _seed_list(saved["seeds"])
        ]
        args = argparse.Namespace(**{**saved, "seeds": ",".join(map(str, seeds)), "out": args.out, "add_seeds": None})
    else:
        missing = [f"--{k}" for k in ("data", "model", "eval_every") if getattr(args, k) is None]
        if args.max_steps is None and args.passes is None:
            missing.append("--max-steps or --passes")
        if missing:
            p.error("required: " + ", ".join(m.replace("_", "-") for m in missing))
        if setup_file.exists():
            saved = json.loads(setup_file.read_text())
            same = {k: v for k, v in saved.items() if k != "seeds"} == {
                k: v for k, v in _setup_of(args).items() if k != "seeds"
            }
            if not same:
                p.error(f"{args.out} holds runs of another setup ({setup_file}); use a new --out")
    return args


def _seed_list(text: str) -> list[int]:
    return [int(s) for s in str(text).split(",") if s.strip()]


def _setup_of(args) -> dict:
    return {
        k: getattr(args, k)
        for k in ("data", "model", "methods", "max_steps", "passes", "eval_every", "seeds", "config", "overrides")
    }


def run_all(args) -> dict[str, dict[int, list[dict]]]:
    from opera_jax.config import load_config
    from opera_jax.train.trainer import train_and_evaluate

    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s): {', '.join(sorted(unknown))}")
    seeds = _seed_list(args.seeds)
    trained = [m for m in methods if m != "pretrain"] or ["basic"]
    rows: dict[str, dict[int, list[dict]]] = {m: {} for m in trained}
    from opera_jax.io_utils import write_json

    write_json(args.out / "setup.json", _setup_of(args))
    budget = (
        [f"optim.max_steps={args.max_steps}", f"train.checkpoint_every={args.max_steps}"]
        if args.passes is None
        else [f"optim.max_epochs={args.passes}", "train.checkpoint_every=0"]
    )
    for seed in seeds:
        for method in trained:
            config = load_config(
                args.config,
                [
                    *args.overrides,
                    f"data.path={args.data}",
                    f"model.name={args.model}",
                    f"method.name={method}",
                    f"seed={seed}",
                    f"train.eval_every={args.eval_every}",
                    *budget,
                ],
            )
            workdir = args.out / "runs" / f"{method}-seed{seed}"
            metrics = workdir / "metrics.jsonl"
            done = metrics.exists() and (workdir / "run.trec").exists()  # written by the final evaluation only
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
    from opera_jax.eval.metrics import per_query, read_trec_run

    out = {
        "setup": {
            "data": args.data,
            "model": args.model,
            "max_steps": args.max_steps,
            "passes": getattr(args, "passes", None),
            "config": args.config,
            "eval_every": args.eval_every,
            "seeds": sorted(next(iter(rows.values()))),
            "overrides": args.overrides,
        },
        "methods": {},
    }
    for method, by_seed in rows.items():
        seeds = sorted(by_seed)
        steps = [r["step"] for r in by_seed[seeds[0]]]
        curve = []
        for i, step in enumerate(steps):
            pts = [by_seed[s][i] for s in seeds]
            curve.append(
                {
                    "step": step,
                    "seconds": float(np.mean([_seconds(p, method) for p in pts])),
                    "examples_seen": pts[0]["examples_seen"],
                    **{k: float(np.mean([p[k] for p in pts])) for k in HEADLINE},
                    **{f"{k}_min": float(np.min([p[k] for p in pts])) for k in HEADLINE},
                    **{f"{k}_max": float(np.max([p[k] for p in pts])) for k in HEADLINE},
                }
            )
        finals = [by_seed[s][-1] for s in seeds]
        out["methods"][method] = {
            "curve": curve,
            "per_seed": {
                s: [
                    {"step": r["step"], "seconds": _seconds(r, method), **{k: r[k] for k in HEADLINE}}
                    for r in by_seed[s]
                ]
                for s in seeds
            },
            "final": {
                k: {
                    "mean": float(np.mean([f[k] for f in finals])),
                    "std": float(np.std([f[k] for f in finals])),
                    "per_seed": [f[k] for f in finals],
                }
                for k in HEADLINE
            },
            "train_seconds": float(np.mean([_seconds(f, method) for f in finals])),
            "compile_seconds": float(np.mean([f.get("compile_seconds", 0.0) for f in finals])),
            "final_step": finals[0]["step"],
        }
    if "basic" in out["methods"]:
        target = out["methods"]["basic"]["final"]["ndcg@10"]["mean"]
        out["target_ndcg@10"] = target
        for method, res in out["methods"].items():
            trained = method != "pretrain"
            res["time_to_basic_final_ndcg@10"] = time_to_target(res["curve"], target) if trained else None
            res["time_to_basic_final_ndcg@10_per_seed"] = (
                {s: time_to_target(c, target) for s, c in res["per_seed"].items()} if trained else None
            )
        split = _evaluation_split(args, rows)
        base = _per_query_runs(args, "basic", split, per_query, read_trec_run)
        for method in out["methods"]:
            if method in ("basic", "pretrain"):
                continue
            other = _per_query_runs(args, method, split, per_query, read_trec_run)
            out["methods"][method]["paired_vs_basic"] = {k: _paired(other[k], base[k]) for k in HEADLINE}
    return out


def time_to_target(curve: list[dict], target: float) -> float | None:
    """The seconds of the first point of ``curve`` at or above ``target`` NDCG@10 (None if never)."""
    reached = [p for p in curve if p["ndcg@10"] >= target]
    return reached[0]["seconds"] if reached else None


def _evaluation_split(args, rows):
    """The split the runs were evaluated on (test, or the validation queries of data.valid_fraction)."""
    from opera_jax.config import load_config
    from opera_jax.train.setup import evaluation_split

    method = next(m for m in rows if m != "pretrain")
    seed = sorted(rows[method])[0]
    return evaluation_split(load_config(args.out / "runs" / f"{method}-seed{seed}" / "config.yaml"))


def _per_query_runs(args, method, split, per_query, read_trec_run) -> dict[str, np.ndarray]:
    """Per-query final metrics, concatenated over seeds in the same query order."""
    runs = [
        _per_query_run(args.out / "runs" / f"{method}-seed{seed}", split, per_query, read_trec_run)
        for seed in _seed_list(args.seeds)
    ]
    return {k: np.concatenate([r[k] for r in runs]) for k in HEADLINE}


def _per_query_run(run: Path, split, per_query, read_trec_run) -> dict[str, np.ndarray]:
    """One finished run's per-query final metrics, in query-id order."""
    pq = per_query(split.qrels, read_trec_run(run / "run.trec"))
    qids = sorted(pq["ndcg@10"])
    return {k: np.asarray([pq[k][q] for q in qids]) for k in HEADLINE}


def _paired(a: np.ndarray, b: np.ndarray, rounds: int = 10000) -> dict:
    """Mean per-query difference a - b, wins/ties/losses, and a two-sided sign-flip permutation p-value."""
    d = a - b
    rng = np.random.default_rng(0)
    flips = rng.choice([-1.0, 1.0], size=(rounds, len(d)))
    null = np.abs((flips * d).mean(axis=1))
    return {
        "mean_diff": float(d.mean()),
        "wins": int((d > 0).sum()),
        "ties": int((d == 0).sum()),
        "losses": int((d < 0).sum()),
        "p_value": float((null >= abs(d.mean()) - 1e-12).mean()),
    }


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
            ax.fill_between(
                x, [p[f"{key}_min"] for p in res["curve"]], [p[f"{key}_max"] for p in res["curve"]], alpha=0.15
            )
        ax.set_xlabel("training wall-clock (s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    s = results["setup"]
    budget = f"{s['max_steps']} steps" if s.get("passes") is None else f"{s['passes']} passes"
    fig.suptitle(f"{s['data']}, {s['model']}, {budget}, seeds {s['seeds']} (mean, min-max band)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _fmt_s(v) -> str:
    return "-" if v is None else f"{v:.0f} s"


def _fmt_paired(paired) -> str:
    return "-" if paired is None else f"{paired['mean_diff']:+.4f}, p={paired['p_value']:.3f}"


def table(results: dict) -> str:
    lines = [
        "| method | NDCG@10 | Recall@20 | train s | compile s | time to basic's final NDCG@10: mean curve "
        "(per seed) | paired vs basic NDCG@10 | paired vs basic Recall@20 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, res in results["methods"].items():
        f = res["final"]
        per_seed = res.get("time_to_basic_final_ndcg@10_per_seed") or {}
        seeds = ", ".join(_fmt_s(v) for _, v in sorted(per_seed.items(), key=lambda kv: int(kv[0])))
        paired = res.get("paired_vs_basic", {})
        lines.append(
            f"| {method} | {f['ndcg@10']['mean']:.4f} ± {f['ndcg@10']['std']:.4f} "
            f"| {f['recall@20']['mean']:.4f} ± {f['recall@20']['std']:.4f} | {res['train_seconds']:.0f} "
            f"| {res.get('compile_seconds', 0.0):.0f} "
            f"| {_fmt_s(res.get('time_to_basic_final_ndcg@10'))}{f' ({seeds})' if seeds else ''} "
            f"| {_fmt_paired(paired.get('ndcg@10'))} | {_fmt_paired(paired.get('recall@20'))} |"
        )
    return "\n".join(lines) + "\n"


def cross_collection(results: list[dict]) -> dict:
    """Per collection and method: final mean ± std and the paired difference with basic; then, per method,
    the mean over the collections that ran it (final means, and paired differences with basic)."""
    per = {}
    for r in results:
        name = r["setup"]["data"]
        per[name] = {
            m: {
                **{k: {"mean": res["final"][k]["mean"], "std": res["final"][k]["std"]} for k in HEADLINE},
                "seeds": len(res["final"]["ndcg@10"]["per_seed"]),
                "paired_vs_basic": res.get("paired_vs_basic"),
            }
            for m, res in r["methods"].items()
        }
    methods = list(dict.fromkeys(m for c in per.values() for m in c))
    mean = {}
    for m in methods:
        cols = [c[m] for c in per.values() if m in c]
        mean[m] = {"collections": len(cols), **{k: float(np.mean([c[k]["mean"] for c in cols])) for k in HEADLINE}}
        paired = [c["paired_vs_basic"] for c in cols if c["paired_vs_basic"]]
        if paired:
            mean[m]["mean_diff_vs_basic"] = {k: float(np.mean([p[k]["mean_diff"] for p in paired])) for k in HEADLINE}
    return {"collections": per, "mean": mean}


def report_table(rep: dict) -> str:
    lines = [
        "| collection | method | seeds | NDCG@10 | Recall@20 | paired vs basic NDCG@10 | paired vs basic Recall@20 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, methods in rep["collections"].items():
        for m, r in methods.items():
            p = r["paired_vs_basic"] or {}
            lines.append(
                f"| {name} | {m} | {r['seeds']} | {r['ndcg@10']['mean']:.4f} ± {r['ndcg@10']['std']:.4f} "
                f"| {r['recall@20']['mean']:.4f} ± {r['recall@20']['std']:.4f} "
                f"| {_fmt_paired(p.get('ndcg@10'))} | {_fmt_paired(p.get('recall@20'))} |"
            )
    for m, r in rep["mean"].items():
        d = r.get("mean_diff_vs_basic")
        diff = "-" if d is None else f"{d['ndcg@10']:+.4f}"
        diff_r = "-" if d is None else f"{d['recall@20']:+.4f}"
        lines.append(
            f"| mean of {r['collections']} | {m} | | {r['ndcg@10']:.4f} | {r['recall@20']:.4f} | {diff} | {diff_r} |"
        )
    return "\n".join(lines) + "\n"


def report(outs: list[str]) -> int:
    """``report OUT1 OUT2 ...``: the cross-collection table from each OUT's results.json."""
    if not outs:
        raise SystemExit("usage: wallclock.py report OUT1 [OUT2 ...]")
    results = []
    for o in outs:
        f = Path(o) / "results.json"
        if not f.exists():
            raise SystemExit(f"{f}: not found (run the harness on {o} first)")
        results.append(json.loads(f.read_text()))
    rep = cross_collection(results)
    print(report_table(rep))
    return 0


def pair(runs: list[str]) -> dict:
    """``pair RUN_A RUN_B``: A - B per test query of two finished runs on the same evaluation split
    (e.g. ``OUT/runs/dp-seed0`` of two OUTs), as the paired columns against basic are computed."""
    if len(runs) != 2:
        raise SystemExit("usage: wallclock.py pair RUN_A RUN_B")
    from opera_jax.config import load_config
    from opera_jax.eval.metrics import per_query, read_trec_run
    from opera_jax.train.setup import evaluation_split

    dirs = [Path(r) for r in runs]
    for d in dirs:
        if not (d / "run.trec").exists():
            raise SystemExit(f"{d / 'run.trec'}: not found (not a finished harness run)")
    split = evaluation_split(load_config(dirs[0] / "config.yaml"))
    a, b = (_per_query_run(d, split, per_query, read_trec_run) for d in dirs)
    out = {k: _paired(a[k], b[k]) for k in HEADLINE}
    for k, r in out.items():
        print(f"{k}: {r['mean_diff']:+.4f} ({r['wins']}/{r['ties']}/{r['losses']}, p = {r['p_value']:.3f})")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        return report(argv[1:])
    if argv[:1] == ["pair"]:
        pair(argv[1:])
        return 0
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
