"""``cellseg tune``: choose per-class post-processing thresholds on cached predictions."""

from __future__ import annotations

import argparse
from pathlib import Path

from cellseg.data.truth import read_train_csv
from cellseg.tune import TuneGrid


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", required=True, type=Path, help="folder written by `cellseg predict-raw`")
    p.add_argument("--truth", required=True, type=Path, help="train.csv with the cached images' ground truth")
    p.add_argument(
        "--weights", required=True, type=Path, help="the manifest to tune; the old version is kept as manifest.vN.yaml"
    )
    p.add_argument("--folds", type=int, default=3, help="sample-grouped folds for the out-of-fold check (default 3)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument(
        "--plots", type=Path, help="folder for one score-vs-threshold plot per class (default: beside the cache)"
    )
    p.add_argument("--no-write", action="store_true", help="report only; leave the manifest as it is")
    p.add_argument("--fill-holes", action="store_true", help="fill holes of the ground-truth masks first")
    d = TuneGrid()
    for name, kind in (("nms_iou", float), ("mask_threshold", float), ("min_pixels", int), ("score", float)):
        default = getattr(d, name)
        shown = (
            ",".join(map(str, default)) if len(default) < 10 else f"{default[0]}..{default[-1]} ({len(default)} values)"
        )
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=_values(kind),
            default=None,
            metavar="V1,V2,...",
            help=f"candidate values (default {shown}; the manifest's current value is always added)",
        )


def _values(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    return parse


def run(args: argparse.Namespace) -> int:
    from cellseg.io import check_writable
    from cellseg.model.manifest import load_manifest
    from cellseg.tune import plot_curves, report_table, tune, write_tuned_manifest

    check_writable(args.plots or args.cache / "plots", "dir")
    if not args.no_write:
        check_writable(args.weights / "manifest.yaml" if args.weights.is_dir() else args.weights, "file")
    manifest = load_manifest(args.weights, verify=False)
    truth = read_train_csv(args.truth, fill_holes=args.fill_holes).images
    grid = TuneGrid(
        **{k: getattr(args, k) for k in ("nms_iou", "mask_threshold", "min_pixels", "score") if getattr(args, k)}
    )
    res = tune(args.cache, truth, manifest, grid=grid, folds=args.folds, jobs=args.jobs)
    print(report_table(res))
    print(f"({res.images} images in {res.seconds:.1f}s; out-of-fold = thresholds chosen without the image's fold)")
    for p in plot_curves(res, args.plots or args.cache / "plots"):
        print(f"plot: {p}")
    if not args.no_write:
        new, old = write_tuned_manifest(args.weights, manifest, res)
        print(f"wrote tuned thresholds to {new} (previous version kept as {old})")
    return 0
