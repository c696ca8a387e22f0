"""``cellseg score``: the exact competition score of a submission against train.csv."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cellseg.data.submission import decode_submission
from cellseg.data.truth import read_train_csv
from cellseg.errors import CellsegError
from cellseg.evaluation.metric import score_images
from cellseg.io import list_pngs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--truth", required=True, type=Path, help="train.csv-format ground truth")
    p.add_argument("--submission", required=True, type=Path, help="submission.csv (id,predicted)")
    p.add_argument(
        "--images-dir",
        type=Path,
        help="score only the images whose PNG is in this folder (default: every image in the truth)",
    )
    p.add_argument("--fill-holes", action="store_true", help="fill holes of the ground-truth masks first")
    p.add_argument("--json", action="store_true", help="print one JSON object: score, per_class, images, per_threshold")
    p.add_argument(
        "--by-threshold",
        action="store_true",
        help="also print TP, FP, FN and the score at each IoU threshold 0.50-0.95: where the score is lost "
        "(missed or extra cells lower every row; loose masks lower the high thresholds)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="an image of the truth with no row in the submission is an error (default: a warning; it scores 0)",
    )


def run(args: argparse.Namespace) -> int:
    truth = read_train_csv(args.truth, fill_holes=args.fill_holes).images
    if not truth:
        raise CellsegError(f"{args.truth}: holds no annotated image (header only); nothing to score against")
    if args.images_dir is not None:
        if not args.images_dir.is_dir():
            raise CellsegError(f"{args.images_dir}: folder not found")
        keep = set(list_pngs(args.images_dir))
        truth = {k: v for k, v in truth.items() if k in keep}
        if not truth:
            raise CellsegError(f"no image of {args.truth} has a PNG in {args.images_dir}")
    sizes = {k: (v.height, v.width) for k, v in truth.items()}
    preds = decode_submission(args.submission, sizes)
    report = score_images(truth, preds)
    if report.missing:
        first = ", ".join(report.missing[:3]) + (", ..." if len(report.missing) > 3 else "")
        if preds:
            msg = f"{args.submission} has no row for {len(report.missing)} of {len(truth)} image(s) ({first}); they score 0"
        else:
            msg = f"{args.submission} has no rows (header only): all {len(truth)} image(s) ({first}) score 0"
        if args.strict:
            raise CellsegError(msg + " (--strict)")
        print(f"cellseg score: warning: {msg}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(report.table())
        if args.by_threshold:
            print()
            print(report.threshold_table())
    return 0
