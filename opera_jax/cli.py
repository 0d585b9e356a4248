"""The ``opera-jax`` command line. Parsing only: each subcommand calls one library function.

Bad input (an ``InputError``) prints one line, ``error: ...``, and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opera_jax.errors import InputError


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
