"""``cellseg validate``: check a submission.csv as the Kaggle scorer would; exit 0 only when valid."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cellseg.data.submission import validate_submission
from cellseg.data.truth import read_sample_submission


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("submission", type=Path, help="submission.csv to check")
    p.add_argument("--test-dir", required=True, type=Path, help="folder of the test PNGs (ids and sizes)")
    p.add_argument(
        "--sample-submission",
        type=Path,
        default=None,
        metavar="CSV",
        help="sample_submission.csv: its ids must have a row too (an empty one when they have no PNG)",
    )


def run(args: argparse.Namespace) -> int:
    sample = read_sample_submission(args.sample_submission) if args.sample_submission else []
    problems = validate_submission(args.submission, args.test_dir, sample)
    for p in problems:
        print(f"{args.submission}: {p}", file=sys.stderr)
    if problems:
        print(f"{args.submission}: INVALID ({len(problems)} problem(s))", file=sys.stderr)
        return 1
    print(f"{args.submission}: valid")
    return 0
