"""``cellseg tune``: choose per-class post-processing thresholds on cached predictions."""

from __future__ import annotations

import argparse
from pathlib import Path

from cellseg.commands.common import finite_float, non_negative_int, positive_int
from cellseg.data.truth import read_train_csv
from cellseg.tuning.report import MIN_GAIN
from cellseg.tuning.tune import TuneGrid

DESCRIPTION = """\
Choose per-class post-processing thresholds (score, mask binarisation, NMS IoU, minimum pixels) on
the predictions cached by `cellseg predict-raw`, and write them into the manifest only where they
are shown to generalise: a class changes when the OUT-OF-FOLD score of its tuned thresholds (chosen
without the image's sample-group fold) beats the current thresholds by at least --min-gain. The
in-sample tuned score is reported but never decides. Images are grouped by their true cell type.
The previous manifest is kept as manifest.vN.yaml."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.add_argument("--cache", required=True, type=Path, help="folder written by `cellseg predict-raw`")
    p.add_argument("--truth", required=True, type=Path, help="train.csv with the cached images' ground truth")
    p.add_argument(
        "--weights", required=True, type=Path, help="the manifest to tune; the old version is kept as manifest.vN.yaml"
    )
    p.add_argument(
        "--folds", type=positive_int, default=3, help="sample-grouped folds for the out-of-fold check (default 3)"
    )
    p.add_argument("--jobs", type=positive_int, default=1, help="worker processes (default 1)")
    p.add_argument(
        "--plots", type=Path, help="folder for one score-vs-threshold plot per class (default: beside the cache)"
    )
    p.add_argument("--no-write", action="store_true", help="report only; leave the manifest as it is")
    p.add_argument(
        "--min-gain",
        type=finite_float,
        default=MIN_GAIN,
        metavar="G",
        help=f"a class changes only when its out-of-fold score beats the current one by >= G (default {MIN_GAIN})",
    )
    p.add_argument(
        "--force", action="store_true", help="write every class's tuned thresholds, whatever the out-of-fold check says"
    )
    p.add_argument("--fill-holes", action="store_true", help="fill holes of the ground-truth masks first")
    p.add_argument(
        "--extend-grid",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="when a threshold is chosen at the edge of its grid while the score still rises towards it, add "
        "the two values past it and tune again, at most N times (default 0: warn only; each round re-scores "
        "the whole grid)",
    )
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


#: what tune writes into its plots folder (and may replace there)
PLOT_FILES = ("tune_*.png", ".*")


def run(args: argparse.Namespace) -> int:
    # lazy imports: `cellseg <command> --help` imports this module and must stay instant (no torch)
    from cellseg.config.manifest import load_manifest
    from cellseg.errors import CellsegError
    from cellseg.io import check_fresh_dir, check_writable
    from cellseg.tuning.report import decide, extended_grid, grid_edges, report, write_tuned_manifest
    from cellseg.tuning.tune import plot_curves, tune

    plots = args.plots or args.cache / "plots"
    check_writable(plots, "dir", inputs=[args.truth, args.weights])
    check_fresh_dir(plots, False, own=PLOT_FILES, flag="another --plots folder")  # replaces its own plots only
    if not args.no_write:
        check_writable(args.weights / "manifest.yaml" if args.weights.is_dir() else args.weights, "file")
    grid = TuneGrid(
        **{
            k: getattr(args, k)
            for k in ("nms_iou", "mask_threshold", "min_pixels", "score")
            if getattr(args, k) is not None
        }
    ).check()  # every value inside its threshold's range: the manifest written can always be loaded
    manifest = load_manifest(args.weights, verify=False)
    truth = read_train_csv(args.truth, fill_holes=args.fill_holes).images
    if not truth:
        raise CellsegError(f"{args.truth}: holds no annotated image (header only); nothing to tune against")
    res = tune(args.cache, truth, manifest, grid=grid, folds=args.folds, jobs=args.jobs)
    seconds = res.seconds
    for _ in range(args.extend_grid):
        edges = grid_edges(res)
        bigger = extended_grid(grid, edges)
        if bigger is None:
            break
        print("extending the grid: " + "; ".join(f"{e.cell_type} {e.name} past {e.chosen:g}" for e in edges))
        grid = bigger
        res = tune(args.cache, truth, manifest, grid=grid, folds=args.folds, jobs=args.jobs)
        seconds += res.seconds
    decision = decide(res, min_gain=args.min_gain, force=args.force)
    print(report(res, decision))
    print(f"({res.images} image(s) in {seconds:.1f}s)")
    for p in plot_curves(res, args.plots or args.cache / "plots"):
        print(f"plot: {p}")
    if args.no_write:
        print("--no-write: the manifest is left as it is")
    elif decision.write:
        new, old = write_tuned_manifest(args.weights, manifest, decision.classes)
        what = ", ".join(decision.changed) or "unchanged"
        print(f"wrote {what} thresholds to {new} (previous version kept as {old})")
    else:
        print(f"no class passed the out-of-fold check: {args.weights} is left as it is (--force writes anyway)")
    return 0
