"""``cellseg bundle``: stage the Kaggle dataset bundle (wheel, weights, manifest, metadata, marker)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cellseg import paths
from cellseg.commands.common import command_inputs
from cellseg.io import check_writable, write_errors
from cellseg.kaggle import bundle


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Stage the folder that goes up as the Kaggle dataset: our wheel (built from the checkout), "
        "wheels of extra inference dependencies, the ensemble's checkpoints + manifest (sha256 checked), "
        "dataset-metadata.json filled with your user name, and the marker cellseg-bundle.json the kernel "
        "looks for. Only whitelisted files go in; staging is atomic. Upload it with tools/push.py dataset."
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="MANIFEST",
        help="weights/<name>/manifest.yaml of the ensemble to ship (default: weights/demo/manifest.yaml)",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="bundle folder to create (an earlier bundle there is replaced)"
    )
    p.add_argument(
        "--username",
        default=None,
        help="Kaggle user name that owns the dataset (default: KAGGLE_USERNAME, then kaggle.json)",
    )
    p.add_argument(
        "--extra-wheels",
        nargs="*",
        default=list(bundle.EXTRA_WHEELS),
        metavar="NAME",
        help="inference dependencies the Kaggle image lacks, shipped as wheels (default: none)",
    )
    p.add_argument(
        "--wheel-dir",
        default=None,
        metavar="DIR",
        help="take the extra wheels from this folder instead of `pip download --no-deps`",
    )
    p.add_argument(
        "--repo",
        default=None,
        metavar="DIR",
        help="source checkout to build the wheel from (default: the one cellseg runs from)",
    )


def run(args: argparse.Namespace) -> int:
    manifest = Path(args.weights) if args.weights else paths.demo_manifest()
    # the bundle is staged beside --out and renamed into place; never over the weights it packs
    check_writable(args.out, "dir", inputs=command_inputs(None, manifest))
    check_writable(Path(args.out).resolve().parent, "dir")
    with write_errors(args.out):
        b = bundle.stage_bundle(
            manifest,
            args.out,
            username=args.username,
            repo=args.repo,
            extra_wheels=args.extra_wheels,
            wheel_dir=args.wheel_dir,
        )
    print(f"staged {b.metadata['id']} in {b.root}")
    print(bundle.format_table(b.files))
    print(bundle.format_provenance(b))
    return 0
