"""``cellseg dry-run``: the kernel's exact predict path on train images, scored, with a report folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from cellseg.commands.common import add_device, command_inputs, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="competition-layout folder with train.csv and train/")
    p.add_argument("--weights", required=True, type=Path, help="the ensemble's manifest.yaml (or its folder)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--fold", type=int, default=None, help="predict this fold's hold-out (folds grouped by sample_id)"
    )
    which.add_argument(
        "--images",
        type=positive_int,
        default=None,
        help="predict this many sampled train images (default 24 when --fold is not given)",
    )
    p.add_argument("-k", "--folds", type=int, default=5, help="number of folds for --fold (default 5)")
    p.add_argument("--seed", type=int, default=0, help="sampling / fold seed (default 0)")
    p.add_argument(
        "--folds-csv", type=Path, default=None, metavar="CSV", help="take --fold from this `cellseg folds` CSV"
    )
    p.add_argument(
        "--report",
        type=Path,
        default=Path("dry-run"),
        help="report folder: submission.csv, per_image.csv, per_threshold.csv, overlays/, score_by_class.png, "
        "summary.json",
    )
    p.add_argument("--time-budget", default=None, metavar="DURATION", help="as for `cellseg predict`")
    add_device(p)
    p.add_argument(
        "--force", action="store_true", help="write into a --report folder that already holds files (replacing them)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    # lazy imports: `cellseg <command> --help` imports this module and must stay instant (no torch)
    from cellseg.evaluation.dry_run import HIDDEN_TEST_IMAGES, dry_run
    from cellseg.io import check_fresh_dir, check_writable, write_errors

    check_writable(args.report, "dir", inputs=command_inputs(args.data, args.weights, args.folds_csv))
    check_fresh_dir(args.report, args.force)  # an earlier report is never replaced silently
    images = args.images if args.images is not None or args.fold is not None else 24
    with write_errors(args.report):  # a full disk in the report: one line
        res = dry_run(
            args.data,
            args.weights,
            args.report,
            fold=args.fold,
            images=images,
            seed=args.seed,
            folds=args.folds,
            device=args.device,
            time_budget=args.time_budget,
            progress=not args.no_progress,
            folds_csv=args.folds_csv,
        )
    print(res.table)
    s = res.summary
    print(
        f"device {s['device']}: {s['seconds_per_image']:.2f} s/image ({s['forward_seconds_per_image']:.2f} s in "
        f"the models); projected {HIDDEN_TEST_IMAGES} hidden-test images: {res.projected_s / 60:.1f} min"
    )
    print(f"report: {res.report_dir}")
    return 0
