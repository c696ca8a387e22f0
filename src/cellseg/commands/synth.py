"""``cellseg synth``: write a synthetic dataset in the competition's folder layout."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write a synthetic dataset in the exact Kaggle layout (train/, train.csv, test/, "
        "train_semi_supervised/, sample_submission.csv): 520x704 phase-contrast-like grey PNGs of "
        "cort, shsy5y and astro cells with the real per-type counts, sizes and image shares, "
        "including hollow astro annotations. Same seed -> byte-identical files."
    )
    parser.add_argument("--out", required=True, help="folder to create (must be absent or empty unless --force)")
    parser.add_argument(
        "--train-images", type=int, default=606, metavar="N", help="annotated train images (default: 606)"
    )
    parser.add_argument("--test-images", type=int, default=3, metavar="N", help="test images (default: 3)")
    parser.add_argument(
        "--semi-images",
        type=int,
        default=200,
        metavar="N",
        help="unlabeled train_semi_supervised images (default: 200)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help=f"processes rendering images (default: all cores, here {os.cpu_count()})",
    )
    parser.add_argument(
        "--cell-zoom",
        type=float,
        default=1.0,
        metavar="Z",
        help="draw cells Z times wider (Z*Z times the area) and Z*Z times fewer, as a higher magnification "
        "shows them; the optics (halo, texture, noise) stay the same. 2 gives Usiigaci-sized cells "
        "(median 1,892 px). 1-8 (default: 1, the competition's sizes)",
    )
    parser.add_argument(
        "--look",
        choices=("classic", "phase", "optics"),  # synth_image.LOOKS (not imported: --help stays instant)
        default="classic",
        help="how cells are drawn: classic (flat darker bodies with a thin halo; the default, the demo "
        "model's and the tests' data) or phase (a bright, patchy band straddling every edge, pale nucleus, "
        "dark granules, bright rounded cells, polygon outlines with tails for most shsy5y and astro cells, "
        "unannotated textured clumps and out-of-focus rings: measured closer to real phase contrast, "
        "docs/TRAINING.md) or optics (the phase look's cells and clutter as a specimen of thin, "
        "phase-shifting cells imaged through a Zernike phase plate: halo, shade-off and bright rounded "
        "cells come from the optics; the best transfer to real pixels measured, docs/TRAINING.md)",
    )
    parser.add_argument(
        "--no-neurites",
        dest="neurites",
        action="store_false",
        help="leave the thin unannotated processes of shsy5y and astro cells out of the images (everything "
        "else stays as drawn with them): for real data that annotates thin processes as part of their cells, "
        "as Usiigaci does its fibroblasts' tails (docs/TRAINING.md)",
    )
    parser.add_argument(
        "--label-margin",
        type=float,
        default=None,
        metavar="PX",
        help="px the phase and optics looks' annotations reach past the drawn cells, as hand-drawn labels take "
        "in the inner halo (default: 1.45 x sqrt(cell zoom), 2.1 px at zoom 2; 2.7 at zoom 2 transferred best "
        "with --look optics --no-neurites, docs/TRAINING.md)",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    # lazy imports: `cellseg <command> --help` imports this module and must stay instant (no torch)
    from cellseg.data.synth import generate
    from cellseg.io import check_writable, write_errors

    check_writable(args.out, "dir")
    with write_errors(args.out):  # a full disk: one line
        s = generate(
            args.out,
            train_images=args.train_images,
            test_images=args.test_images,
            semi_images=args.semi_images,
            seed=args.seed,
            progress=True,
            force=args.force,
            workers=args.workers,
            cell_zoom=args.cell_zoom,
            look=args.look,
            neurites=args.neurites,
            label_margin=args.label_margin,
        )
    print(
        f"wrote {s['out']}: {s['train_images']} train ({s['instances']} cells), {s['test_images']} test, "
        f"{s['semi_images']} semi-supervised images in {s['seconds']:.1f} s"
    )
    for t, st in s["per_type"].items():
        print(
            f"  {t:7s} {st['images']:4d} images  cells/image {st['mean_instances']:.1f} "
            f"[{st['min_instances']}, {st['max_instances']}]  mean area {st['mean_area']:.0f} px"
            + (f"  broken {st['broken']} ({st['broken_share']:.0%})" if st["broken"] else "")
        )
    return 0
