"""``cellseg score``: the exact competition score of a submission against train.csv."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cellseg.data.truth import read_train_csv
from cellseg.errors import CellsegError
from cellseg.metric import score_images
from cellseg.submission import decode_submission


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--truth", required=True, type=Path, help="train.csv-format ground truth")
    p.add_argument("--submission", required=True, type=Path, help="submission.csv (id,predicted)")
    p.add_argument(
        "--images-dir",
        type=Path,
        help="score only the images whose PNG is in this folder (default: every image in the truth)",
    )
    p.add_argument("--fill-holes", action="store_true", help="fill holes of the ground-truth masks first")
    p.add_argument("--json", action="store_true", help="print one JSON object: score, per_class, images")


def run(args: argparse.Namespace) -> int:
    truth = read_train_csv(args.truth, fill_holes=args.fill_holes).images
    if args.images_dir is not None:
        if not args.images_dir.is_dir():
            raise CellsegError(f"{args.images_dir}: folder not found")
        keep = {p.stem for p in args.images_dir.glob("*.png")}
        truth = {k: v for k, v in truth.items() if k in keep}
        if not truth:
            raise CellsegError(f"no image of {args.truth} has a PNG in {args.images_dir}")
    sizes = {k: (v.height, v.width) for k, v in truth.items()}
    preds = decode_submission(args.submission, sizes)
    report = score_images(truth, preds)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(report.table())
    return 0
