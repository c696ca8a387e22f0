"""``cellseg import-labels``: an instance-label dataset (CellPose, StarDist, per-sample folders) -> the
competition layout, so own annotated images can be trained on, dry-run and tuned."""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_tile(text: str) -> tuple[int, int]:
    """``HxW`` (e.g. ``520x704``) as (height, width); an argparse type (benchmarks/bench_real.py uses it too)."""
    h, sep, w = text.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) < 1 or int(w) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 520x704, got {text!r}")
    return int(h), int(w)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Convert instance-label images to the competition layout (train/*.png, train.csv, "
        "sample_submission.csv). Layouts: cellpose (X.tif + X_masks.tif), stardist (images/X + masks/X), "
        "folders (<sample>/<image-name> + <sample>/<label-name>, Usiigaci's setN/raw.tif + "
        "setN/instances_ids.png). Images become 8-bit (default: mean 128, std 20 per image) and are cut "
        "into overlapping tiles; each label value is one RLE row; the tiles of one source image share "
        "its sample_id."
    )
    p.add_argument("src", type=Path, help="source folder")
    p.add_argument("--out", required=True, type=Path, help="folder to create (refused when it holds other files)")
    p.add_argument("--cell-type", default="astro", help="cell_type of every row (default astro)")
    p.add_argument("--tile", type=parse_tile, default=(520, 704), metavar="HxW", help="tile size (default 520x704)")
    p.add_argument("--layout", default="auto", choices=["auto", "stardist", "cellpose", "folders"])
    p.add_argument("--image-name", default="raw.tif", help="image file in each sample folder (default raw.tif)")
    p.add_argument(
        "--label-name", default="instances_ids.png", help="label file in each sample folder (default instances_ids.png)"
    )
    p.add_argument(
        "--intensity",
        default="standardize",
        choices=["standardize", "stretch", "none"],
        help="to 8 bits: standardize = 128 + 20 z-score (default), stretch = 1st-99th percentile to 0-255, "
        "none = 8-bit kept, 16-bit / 257",
    )
    p.add_argument(
        "--min-area", type=int, default=30, help="pixels a tile-cut instance needs inside the tile (default 30)"
    )
    p.add_argument(
        "--samples", default=None, metavar="A-B", help="only samples whose name ends in a number in A-B (e.g. 1-30)"
    )
    p.add_argument("--force", action="store_true", help="replace an --out that holds other files")


def _sample_filter(spec: str | None):
    if spec is None:
        return None
    import re

    from cellseg.errors import CellsegError

    m = re.fullmatch(r"(\d+)-(\d+)", spec)
    if not m:
        raise CellsegError(f"--samples: expected A-B such as 1-30, got {spec!r}")
    lo, hi = int(m[1]), int(m[2])

    def keep(name: str) -> bool:
        num = re.search(r"(\d+)$", name)
        return num is not None and lo <= int(num[1]) <= hi

    return keep


def run(args: argparse.Namespace) -> int:
    # lazy imports: `cellseg <command> --help` imports this module and must stay instant (no torch)
    from cellseg.data.import_labels import import_labels

    s = import_labels(
        args.src,
        args.out,
        cell_type=args.cell_type,
        tile=args.tile,
        layout=args.layout,
        image_name=args.image_name,
        label_name=args.label_name,
        intensity=args.intensity,
        min_area=args.min_area,
        samples=_sample_filter(args.samples),
        force=args.force,
    )
    print(
        f"wrote {s['out']}: {s['samples']} samples ({s['layout']} layout) -> {s['tiles']} images of at most "
        f"{s['tile'][0]}x{s['tile'][1]}, {s['rows']} instances, intensity {s['intensity']}"
    )
    scale = s["suggested_input_scale"]
    print(
        f"median cell area {s['median_area']:,.0f} px (the competition's: 197-665 px by type): "
        + ("train at the recipes' scale" if scale == 1.0 else f"train with model.input_scale={scale:g}")
        + " (docs/TRAINING.md, 'Cell size')"
    )
    return 0
