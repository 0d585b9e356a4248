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
    from opera_jax.train.trainer import train_and_evaluate

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"optim.max_steps={args.max_steps}")
    if args.eval_every is not None:
        overrides.append(f"train.eval_every={args.eval_every}")
    config = load_config(args.config, overrides)
    out = args.out or Path("runs") / Path(args.config).stem
    result = train_and_evaluate(config, out)
    print(f"final: ndcg@10 {result['ndcg@10']:.4f} recall@20 {result['recall@20']:.4f}; outputs in {out}")


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opera-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="evaluate a retriever on a BEIR-layout collection")
    ev.add_argument("--model", required=True, help="local model directory or Hugging Face hub id")
    ev.add_argument("--data", required=True, help="collection directory, or a name under $OPERA_DATA_DIR")
    ev.add_argument("--split", default="test", help="qrels split to evaluate (default: test)")
    ev.add_argument("--out", type=Path, default=None, help="write metrics.json and run.trec here")
    ev.add_argument("--batch-size", type=_positive, default=128, help="texts per encoder batch (default: 128)")
    ev.add_argument("--max-query-len", type=_positive, default=None, help="query tokens (default: the model's max)")
    ev.add_argument("--max-passage-len", type=_positive, default=None, help="passage tokens (default: the model's max)")
    ev.add_argument("--empty", choices=("error", "skip"), default="error",
                    help="an empty query or document: stop with an error, or skip it and count")
    ev.set_defaults(func=_eval)

    tr = sub.add_parser("train", help="finetune a retriever (basic, sp, dp or infobatch) from a YAML config")
    tr.add_argument("config", help="YAML config (ours, or an OPERA release file)")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.learning_rate=1e-5 seed=1")
    tr.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<config name>)")
    tr.add_argument("--max-steps", type=_positive, default=None, help="override optim.max_steps")
    tr.add_argument("--eval-every", type=int, default=None, help="override train.eval_every (0: only at the end)")
    tr.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
