"""``cellseg predict-raw``: cache an ensemble's pre-fusion predictions on train images for tuning."""

from __future__ import annotations

import argparse
from pathlib import Path

from cellseg.data.folds import select_ids
from cellseg.data.truth import read_train_csv
from cellseg.paths import CompetitionPaths

DESCRIPTION = """\
Run an ensemble over hold-out train images once and cache, per image, the PRE-fusion detections of
every model x TTA view (boxes, scores, soft masks; nothing thresholded, fused or post-processed), so
that `cellseg tune` can search every threshold, NMS IoU included, without running the models again.
A cache folder belongs to one ensemble: its fingerprint (model checksums, TTA views, pre-fusion
settings) is recorded before the first image, re-running the same command resumes a killed run, and
another manifest is refused."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.add_argument("--data", required=True, type=Path, help="competition-layout folder (train.csv, train/)")
    p.add_argument("--weights", required=True, type=Path, help="ensemble manifest (weights/<name>/manifest.yaml)")
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="cache folder: one <id>.npz per image + index.json (this ensemble only); re-running resumes",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fold", type=int, help="cache this fold's hold-out (folds grouped by sample_id)")
    g.add_argument("--images", type=int, help="cache a random sample of N train images")
    p.add_argument("-k", "--folds", type=int, default=5, help="number of folds for --fold (default 5)")
    p.add_argument("--seed", type=int, default=0, help="fold / sample seed (default 0)")
    p.add_argument(
        "--folds-csv",
        type=Path,
        default=None,
        metavar="CSV",
        help="take the folds from this `cellseg folds` CSV (as train's data.folds_csv) instead of -k / --seed",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress")


def run(args: argparse.Namespace) -> int:
    # lazy imports: `cellseg <command> --help` imports this module and must stay instant (no torch)
    from cellseg.io import check_writable
    from cellseg.tuning.raw_cache import predict_raw

    check_writable(args.out, "dir")  # before the models load
    comp = CompetitionPaths(args.data).require("train_csv", "train_dir")
    ids = select_ids(read_train_csv(comp.train_csv), args.fold, args.folds, args.seed, args.images, args.folds_csv)
    before = sum((args.out / f"{i}.npz").is_file() for i in ids)
    out = predict_raw(args.data, args.weights, args.out, ids, device=args.device, progress=not args.quiet)
    print(
        f"cached {len(ids)} image(s) in {out}"
        + (f" ({before} were already cached, {len(ids) - before} predicted now)" if before else "")
    )
    return 0
