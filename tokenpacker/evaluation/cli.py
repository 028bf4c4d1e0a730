"""The `tokenpacker-eval` command: `generate` answers a question file, `score` scores an answers file."""

import argparse
import sys

from .generate import add_generate_parser
from .scoring import add_score_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tokenpacker-eval", description="Answer the original's benchmark question files and score the answers."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    add_score_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as error:
        print(f"tokenpacker-eval {args.command}: error: {error}", file=sys.stderr)
        return 1
