"""``cellseg pseudo-label``: confident ensemble predictions on the unlabeled images -> train.csv format."""

from __future__ import annotations

import argparse
from pathlib import Path

from cellseg.commands.common import add_device, command_inputs, finite_float, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="competition-layout folder with train_semi_supervised/")
    p.add_argument("--weights", required=True, type=Path, help="ensemble manifest (weights/<name>/manifest.yaml)")
    p.add_argument("--out", required=True, type=Path, help="output CSV (train.csv columns + source)")
    p.add_argument("--images", type=positive_int, help="label a random sample of N >= 1 images (default: all)")
    p.add_argument(
        "--score-margin",
        type=finite_float,
        default=0.1,
        help="added to each class's score threshold (default 0.1: stricter than submission)",
    )
    p.add_argument(
        "--min-pixels-factor",
        type=finite_float,
        default=1.5,
        help="multiplies each class's minimum pixels (default 1.5)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed for --images (default 0)")
    add_device(p)


def run(args: argparse.Namespace) -> int:
    # lazy imports: `cellseg <command> --help` imports this module and must stay instant (no torch)
    from cellseg.inference.pseudo import pseudo_label
    from cellseg.io import check_writable

    check_writable(args.out, "file", inputs=command_inputs(args.data, args.weights))  # before the models load
    res = pseudo_label(
        args.data,
        args.weights,
        args.out,
        args.images,
        args.score_margin,
        args.min_pixels_factor,
        args.seed,
        args.device,
    )
    print(res.table.to_string(float_format=lambda v: f"{v:.3f}"))
    print(
        f"wrote {res.path}: {res.rows} pseudo-labelled instance(s); train with "
        f"`cellseg train --config ... --data ... --pseudo {res.path}`"
    )
    return 0
