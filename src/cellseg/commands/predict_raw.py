"""``cellseg predict-raw``: cache an ensemble's pre-fusion predictions on train images for tuning."""

from __future__ import annotations

import argparse
from pathlib import Path

from cellseg.commands.common import add_device, command_inputs, positive_int
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
    g.add_argument("--images", type=positive_int, help="cache a random sample of N train images")
    p.add_argument("-k", "--folds", type=int, default=5, help="number of folds for --fold (default 5)")
    p.add_argument("--seed", type=int, default=0, help="fold / sample seed (default 0)")
    p.add_argument(
        "--folds-csv",
        type=Path,
        default=None,
        metavar="CSV",
        help="take the folds from this `cellseg folds` CSV (as train's data.folds_csv) instead of -k / --seed",
    )
    add_device(p)
    p.add_argument("--quiet", action="store_true", help="no progress")


#: what a cache folder holds (tune writes its plots into plots/ by default; .* = temporaries of a killed run)
CACHE_ENTRIES = ("index.json", "*.npz", "plots", ".*")


def _remove_if_unused(out: Path, existed: bool) -> None:
    """Remove a cache folder this run created when it holds no prediction (only its index): a failed
    first run leaves no folder stamped with an ensemble whose predictions it does not hold."""
    if existed or not out.is_dir() or any(out.glob("*.npz")):
        return
    for p in out.iterdir():
        if p.is_file() and (p.name == "index.json" or p.name.startswith(".")):
            p.unlink()
    if not any(out.iterdir()):
        out.rmdir()


def run(args: argparse.Namespace) -> int:
    # lazy imports: `cellseg <command> --help` imports this module and must stay instant (no torch)
    from cellseg.inference.device import resolve_device
    from cellseg.io import check_fresh_dir, check_writable, write_errors
    from cellseg.tuning.raw_cache import predict_raw

    # before the models load; a folder of other files is not a cache (tune's plots live in one)
    check_writable(args.out, "dir", inputs=command_inputs(args.data, args.weights, args.folds_csv))
    check_fresh_dir(args.out, False, own=CACHE_ENTRIES, flag="a new --out")
    comp = CompetitionPaths(args.data).require("train_csv", "train_dir")
    ids = select_ids(read_train_csv(comp.train_csv), args.fold, args.folds, args.seed, args.images, args.folds_csv)
    device = str(resolve_device(args.device))  # before the cache is stamped with the ensemble
    before = sum((args.out / f"{i}.npz").is_file() for i in ids)
    existed = args.out.exists()
    try:
        with write_errors(args.out):
            out = predict_raw(args.data, args.weights, args.out, ids, device=device, progress=not args.quiet)
    except BaseException:
        _remove_if_unused(args.out, existed)
        raise
    print(
        f"cached {len(ids)} image(s) in {out}"
        + (f" ({before} were already cached, {len(ids) - before} predicted now)" if before else "")
    )
    return 0
