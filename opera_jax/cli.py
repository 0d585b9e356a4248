"""The ``opera-jax`` command line. Parsing only: each subcommand calls one library function.

Bad input (an ``InputError``) prints one line, ``error: ...``, and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opera_jax.errors import InputError, TrainingDiverged


def _eval(args: argparse.Namespace) -> None:
    from opera_jax.eval.report import run_eval

    run_eval(
        model=args.model,
        data=args.data,
        split=args.split,
        out=args.out,
        batch_size=args.batch_size,
        max_query_len=args.max_query_len,
        max_passage_len=args.max_passage_len,
        empty=args.empty,
    )


def _train(args: argparse.Namespace) -> None:
    from opera_jax.config import load_config
    from opera_jax.train import run_dir
    from opera_jax.train.trainer import train_and_evaluate

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides += [f"optim.max_steps={args.max_steps}", "optim.max_epochs=null"]  # steps win over passes
    if args.eval_every is not None:
        overrides.append(f"train.eval_every={args.eval_every}")
    config = load_config(args.config, overrides)
    out = args.out or Path("runs") / Path(args.config).stem
    finished = run_dir.inspect(out, config, new_run=args.new_run) == run_dir.FINISHED
    result = train_and_evaluate(config, out, new_run=args.new_run)
    import jax

    if jax.process_index() != 0:  # one line per job, not per process
        return
    scores = (
        f"ndcg@10 {result['ndcg@10']:.4f} recall@20 {result['recall@20']:.4f}"
        if "ndcg@10" in result
        else "no evaluation logged"
    )
    if finished:
        print(
            f"{out}: this run already finished (step {result.get('step', '?')}: {scores}); nothing to do "
            "(--new-run discards it and trains again)"
        )
    else:
        print(f"final: {scores}; outputs in {out}")


def _config(args: argparse.Namespace):
    from opera_jax.config import load_config

    return load_config(args.config, list(args.overrides))


def _mine(args: argparse.Namespace) -> None:
    from opera_jax.preflight import check_output_file
    from opera_jax.sharding import make_mesh
    from opera_jax.train.setup import mine, prepare

    config = _config(args)
    check_output_file(args.out, "negatives artifact")
    mesh = make_mesh()
    result = mine(config, prepare(config), mesh, progress=True, path=args.out)
    counts = result.counts
    print(
        f"{len(counts)} queries, {int(counts.sum())} negatives (min {counts.min()}, max {counts.max()} per query); "
        f"wrote {args.out}"
    )


def _prune(args: argparse.Namespace) -> None:
    from opera_jax.methods.static import kept_pairs, write_kept_pairs
    from opera_jax.preflight import check_output_file, check_sp_keeps
    from opera_jax.sharding import make_mesh
    from opera_jax.train.setup import base_scores, prepare

    config = _config(args)
    check_output_file(args.out, "kept pairs file")
    setup, sp = prepare(config), config.method.sp
    check_sp_keeps(sp.kept_pct, setup.ts.num_pairs, config.data.train_split)
    scores = base_scores(config, setup.encoder, setup.ts, setup.query_tokens, setup.doc_tokens, make_mesh())
    keep = kept_pairs(scores, sp.kept_pct, sp.mode, config.seed)
    write_kept_pairs(args.out, setup.ts, setup.train_split.corpus.ids, scores, keep)
    kept_queries = len(set(setup.ts.pair_query[keep].tolist()))
    print(
        f"kept {int(keep.sum())} of {len(keep)} pairs ({sp.mode}, kept_pct {sp.kept_pct}); "
        f"{kept_queries} of {setup.ts.num_queries} queries keep a pair; wrote {args.out}"
    )


def _export(args: argparse.Namespace) -> None:
    from opera_jax.train.export_run import export_run

    print(f"wrote {export_run(args.run, args.out, args.step)}")
    if args.push_to_hub:
        from opera_jax.models.publish import push_to_hub

        print(f"pushed to {push_to_hub(args.out, args.push_to_hub, private=args.private)}")


def _plan(args: argparse.Namespace) -> None:
    import os

    # Simulated CPU devices, asked for before jax starts its backends (the planner only compiles).
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from opera_jax.memory_plan import plan_memory, write_json

    config = _config(args)
    result = plan_memory(config, args.devices, args.fsdp if args.fsdp is not None else config.mesh.fsdp)
    print(result.summary())
    if args.json is not None:
        write_json(result, args.json)
        print(f"wrote {args.json}")


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opera-jax", description="Finetune dense retrievers in JAX, with OPERA data pruning."
    )
    from opera_jax import __version__

    parser.add_argument("--version", action="version", version=f"opera-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="evaluate a retriever on a BEIR-layout collection")
    ev.add_argument("--model", required=True, help="local model directory or Hugging Face hub id")
    ev.add_argument("--data", required=True, help="collection directory, or a name under $OPERA_DATA_DIR")
    ev.add_argument("--split", default="test", help="qrels split to evaluate (default: test)")
    ev.add_argument("--out", type=Path, default=None, help="write metrics.json and run.trec here")
    ev.add_argument("--batch-size", type=_positive, default=128, help="texts per encoder batch (default: 128)")
    ev.add_argument("--max-query-len", type=_positive, default=None, help="query tokens (default: the model's max)")
    ev.add_argument("--max-passage-len", type=_positive, default=None, help="passage tokens (default: the model's max)")
    ev.add_argument(
        "--empty",
        choices=("error", "skip"),
        default="error",
        help="an empty query or document: stop with an error, or skip it and count",
    )
    ev.set_defaults(func=_eval)

    tr = sub.add_parser("train", help="finetune a retriever (basic, sp, dp or infobatch) from a YAML config")
    tr.add_argument("config", help="YAML config (ours, or an OPERA release file)")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.learning_rate=1e-5 seed=1")
    tr.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<config name>)")
    tr.add_argument("--max-steps", type=_positive, default=None, help="override optim.max_steps")
    tr.add_argument("--eval-every", type=int, default=None, help="override train.eval_every (0: only at the end)")
    tr.add_argument(
        "--new-run",
        action="store_true",
        help="--out holds a run of another config: discard it (checkpoints, logs, model) and start "
        "over. Without it the same config resumes, and a different one is refused",
    )
    tr.set_defaults(func=_train)

    mi = sub.add_parser("mine", help="mine hard negatives for a config's training data")
    mi.add_argument("config")
    mi.add_argument("overrides", nargs="*", help="key=value overrides")
    mi.add_argument("--out", type=Path, required=True, help="the .npz artifact (negatives + metadata)")
    mi.set_defaults(func=_mine)

    pr = sub.add_parser("prune", help="static pruning: write the pairs SP keeps, with base-model scores")
    pr.add_argument("config")
    pr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.sp.kept_pct=0.5")
    pr.add_argument("--out", type=Path, required=True, help="TSV: query-id, corpus-id, score")
    pr.set_defaults(func=_prune)

    ex = sub.add_parser("export", help="export a run's checkpoint in Hugging Face / sentence-transformers format")
    ex.add_argument("run", type=Path, help="the run directory (holds config.yaml and checkpoints/)")
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ex.add_argument(
        "--push-to-hub",
        metavar="NAME",
        default=None,
        help="also upload the export to the Hugging Face hub as NAME (owner/model)",
    )
    ex.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    ex.set_defaults(func=_export)

    pl = sub.add_parser("plan", help="per-device memory and FLOPs of a config's train step (compiled, no weights)")
    pl.add_argument("config", help="YAML config")
    pl.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.remat=full optim.batch_size=256")
    pl.add_argument(
        "--devices", type=_positive, default=8, help="devices in the mesh, simulated on the CPU (default: 8)"
    )
    pl.add_argument(
        "--fsdp",
        type=_positive,
        default=None,
        help="devices that split parameters and optimizer state (default: the config's mesh.fsdp)",
    )
    pl.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    pl.set_defaults(func=_plan)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, with ``key=value`` overrides accepted anywhere after the config (before or after options)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [x for x in extra if "=" in x and not x.startswith("-")]
    if len(overrides) < len(extra) or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from opera_jax.distributed import initialize

        initialize()  # a multi-process job when the environment says so (see opera_jax/distributed.py)
        args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def prepare_process() -> None:
    """Set this process up as the ``opera-jax`` command runs. On a CPU host (``platforms.py``): malloc
    on transparent huge pages (``cpu/host_memory.py``; re-executes the command once) and XLA:CPU's lone
    matrix multiplications through Eigen (``cpu/xla_flags.py``); on GPU and TPU hosts neither. Everywhere:
    torch hidden from transformers, which imports it whenever it is installed (~200 MB of memory and
    seconds of start-up that opera-jax never uses). Call it first thing, before jax computes anything;
    the benchmarks' JAX processes call it too."""
    from opera_jax.platforms import accelerator_expected

    if not accelerator_expected():
        from opera_jax.cpu.host_memory import use_huge_pages
        from opera_jax.cpu.xla_flags import use_xla_cpu_flags

        use_huge_pages()  # re-executes this command once, before anything is allocated
        use_xla_cpu_flags()  # before jax starts its CPU backend
    sys.modules.setdefault("torch", None)  # hidden from this process only


def entry() -> int:
    """The ``opera-jax`` command: :func:`main` in a process set up by :func:`prepare_process`."""
    prepare_process()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
