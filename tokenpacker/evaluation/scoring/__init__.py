"""`tokenpacker-eval score BENCHMARK`: scores answers files the way the original's evaluation scripts do.

One module per benchmark (NAME, HELP, `score_<name>(...)` returning a dict of results, `add_arguments`, `from_args`);
files.py reads and writes with errors that name the file, answers.py holds the VQA answer normalization and
accuracy, report.py the text rendering. Imports only the standard library (openpyxl, optional, for MMBench's .xlsx).
"""

import argparse
import json
import sys

from . import gqa, mmbench, mme, pope, scienceqa, textvqa, vizwiz, vqav2
from .report import render

BENCHMARKS = (pope, textvqa, vqav2, vizwiz, gqa, scienceqa, mme, mmbench)


def _run(benchmark, args: argparse.Namespace) -> int:
    try:
        results = benchmark.from_args(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"tokenpacker-eval score {benchmark.NAME}: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 0


def add_score_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `score` and its one sub-command per benchmark on an argparse sub-parsers object; each sets
    `func(args) -> exit code`."""
    parser = subparsers.add_parser(
        "score",
        help="score an answers file like the original's evaluation scripts",
        description="Scores an answers file (from `tokenpacker-eval generate` or the original's scripts) against "
        "the benchmark's annotations, and writes the files that evaluation servers take.",
    )
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for benchmark in BENCHMARKS:
        command = benchmarks.add_parser(benchmark.NAME, help=benchmark.HELP, description=benchmark.__doc__)
        command.add_argument("--answers", required=True, help="the answers file (.jsonl)")
        benchmark.add_arguments(command)
        command.add_argument("--json", action="store_true", help="print the results as JSON")
        command.set_defaults(func=lambda args, benchmark=benchmark: _run(benchmark, args))
    return parser


__all__ = ["BENCHMARKS", "add_score_parser"]
