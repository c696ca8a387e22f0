"""Instance-label datasets (CellPose, StarDist, one folder per sample) -> the competition layout.

Output, built in a staging folder beside ``out`` and renamed into place (never half-written)::

    <out>/train/<id>.png          8-bit grey tiles, ``tile`` sized (520 x 704 by default)
    <out>/train.csv               id, annotation, width, height, cell_type, plate_time, sample_date,
                                  sample_id, elapsed_timedelta (one row per instance, row-major RLE)
    <out>/sample_submission.csv   ``id,predicted`` header only (an imported set has no test images)
    <out>/cellseg-import.json     marker: source, layout, transform, tile, licence (first line of the
                                  source's LICENSE), median cell area, counts
    <out>/LICENSE*, README*       copied from the top of the source, so a licence travels with the data

Layouts (``layout="auto"`` picks the first that matches):

- ``stardist``: ``SRC/images/X`` with ``SRC/masks/X`` (same stem, any supported extension);
- ``cellpose``: ``SRC/X.tif|png`` with ``SRC/X_masks.tif|png`` (``X_flows`` files are ignored);
- ``folders``: one sub-folder per sample holding ``image_name`` and ``label_name`` (Usiigaci:
  ``setN/raw.tif`` and ``setN/instances_ids.png``).

Intensity (any 8/16/32-bit grey TIFF or PNG to 8 bits), per source image, before tiling:

- ``standardize`` (default): ``128 + 20 * (x - mean) / std``, rounded and clipped to 0..255: the
  competition images' statistics (mean ~128, std ~20), whatever the microscope's range; a constant
  image becomes 128;
- ``stretch``: the 1st and 99th percentiles map to 0 and 255 (linear, clipped);
- ``none``: 8-bit values kept; 16-bit divided by 257 (65535 -> 255), as ``cellseg.io.read_gray``.

Tiling: an image of the tile's size is kept whole. Otherwise each axis longer than the tile gets
``ceil(length / tile)`` tiles spread evenly from edge to edge (so they overlap unless the length is
a multiple of the tile), and an axis shorter than the tile is kept at its own length. Each label value
in a tile becomes one RLE row; an instance that the tile edge cuts is kept when at least ``min_area``
of its pixels fall inside the tile, an instance wholly inside is always kept. Tiles left without an
instance are not written (train.csv cannot list an image without rows). All tiles of one source
image share its ``sample_id``, so sample-grouped folds never split them.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellseg import CELL_TYPES, IMAGE_SHAPE
from cellseg.config.provenance import IMPORT_MARKER
from cellseg.data.masks import CropMask, instances
from cellseg.data.rle import encode_crop
from cellseg.data.truth import TRAIN_COLUMNS
from cellseg.errors import CellsegError
from cellseg.io import check_replaceable, open_image, replace_dir, staging, write_gray

MARKER = IMPORT_MARKER
#: what a replaceable --out holds, for the error (a folder of other files needs --force)
WHAT = "an earlier import-labels output (it holds other files)"
IMAGE_EXTS = (".tif", ".tiff", ".png")
LAYOUTS = ("auto", "stardist", "cellpose", "folders")
INTENSITY = ("standardize", "stretch", "none")
#: Median cell area (px) the recipes' input scales are set for: the competition's astro median
#: (665 px; cort 208, shsy5y 197). Larger cells get ``model.input_scale`` < 1, see
#: :func:`suggest_input_scale` and docs/TRAINING.md.
REFERENCE_AREA = 665.0
#: Target statistics of ``standardize``: the competition images' grey mean and standard deviation.
TARGET_MEAN, TARGET_STD = 128.0, 20.0


@dataclass(frozen=True)
class Pair:
    """One source sample: its name (the ``sample_id``), image file and label file."""

    sample: str
    image: Path
    labels: Path


# ----------------------------------------------------------------------------------------------
# finding the pairs


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _by_stem(files: list[Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in files:
        out.setdefault(p.stem, p)
    return out


def _stardist(src: Path) -> list[Pair]:
    masks = _by_stem(_images_in(src / "masks"))
    pairs = []
    for p in _images_in(src / "images"):
        if p.stem not in masks:
            raise CellsegError(f"{p}: image without a label (expected {src / 'masks' / p.stem}.tif|png)")
        pairs.append(Pair(p.stem, p, masks[p.stem]))
    return pairs


def _cellpose(src: Path) -> list[Pair]:
    files = _by_stem(_images_in(src))
    pairs = []
    for stem, p in files.items():
        if stem.endswith(("_masks", "_flows")):
            continue
        if f"{stem}_masks" not in files:
            raise CellsegError(f"{p}: image without a label (expected {src / stem}_masks.tif|png)")
        pairs.append(Pair(stem, p, files[f"{stem}_masks"]))
    return pairs


def _folders(src: Path, image_name: str, label_name: str) -> list[Pair]:
    pairs = []
    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        image, labels = d / image_name, d / label_name
        if not image.is_file():
            continue
        if not labels.is_file():
            raise CellsegError(f"{image}: image without a label (expected {labels})")
        pairs.append(Pair(d.name, image, labels))
    return pairs


def _natural(pair: Pair) -> list:
    """Sort key: ``set2`` before ``set10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", pair.sample)]


def find_pairs(
    src: str | Path, layout: str = "auto", image_name: str = "raw.tif", label_name: str = "instances_ids.png"
) -> tuple[str, list[Pair]]:
    """The (layout, image/label pairs) of a source folder, pairs in natural name order.

    Raises CellsegError for a missing folder, an unknown layout, an image without its label, or no
    pair at all ("empty dataset").
    """
    src = Path(src)
    if not src.is_dir():
        raise CellsegError(f"{src}: not a folder")
    if layout not in LAYOUTS:
        raise CellsegError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    finders: dict[str, Callable[[], list[Pair]]] = {
        "stardist": lambda: _stardist(src),
        "cellpose": lambda: _cellpose(src),
        "folders": lambda: _folders(src, image_name, label_name),
    }
    if layout == "auto":
        if (src / "images").is_dir() and (src / "masks").is_dir():
            layout = "stardist"
        elif any(p.stem.endswith("_masks") for p in _images_in(src)):
            layout = "cellpose"
        else:
            layout = "folders"
    pairs = finders[layout]()
    if not pairs:
        raise CellsegError(
            f"{src}: empty dataset, no image/label pair found (layout {layout}; folders need "
            f"<sample>/{image_name} and <sample>/{label_name}, cellpose X.tif + X_masks.tif, stardist images/ + masks/)"
        )
    return layout, sorted(pairs, key=_natural)


# ----------------------------------------------------------------------------------------------
# reading and converting


def _read_array(path: Path) -> tuple[np.ndarray, str]:
    """(H, W) array exactly as stored, and the PIL mode. Colour images raise CellsegError."""
    with open_image(path) as im:
        mode = im.mode
        if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA"):
            raise CellsegError(f"{path}: a {mode} image; expected one grey channel")
        return np.asarray(im), mode


def to_uint8(image: np.ndarray, intensity: str = "standardize") -> np.ndarray:
    """Convert a (H, W) grey image of any integer or float type to uint8 (see the module docstring).

    Args:
        image: (H, W) array, 8/16/32-bit integer or float.
        intensity: ``standardize``, ``stretch`` or ``none``.

    Returns:
        (H, W) uint8.
    """
    a = np.asarray(image, dtype=np.float64)
    if intensity == "standardize":
        std = float(a.std())
        out = TARGET_MEAN + (TARGET_STD / std) * (a - a.mean()) if std > 0 else np.full_like(a, TARGET_MEAN)
    elif intensity == "stretch":
        lo, hi = np.percentile(a, [1.0, 99.0])
        out = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.full_like(a, 128.0)
    elif intensity == "none":
        out = a / 257.0 if image.dtype.itemsize > 1 else a
    else:
        raise CellsegError(f"unknown intensity transform {intensity!r}; expected one of {', '.join(INTENSITY)}")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def read_labels(path: Path) -> np.ndarray:
    """(H, W) int64 label image (0 = background). A non-integer or negative label image raises."""
    a, mode = _read_array(path)
    if mode == "1":
        return a.astype(np.int64)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or np.any(a != np.rint(a)):
            raise CellsegError(f"{path}: not an integer label image (mode {mode} holds fractional values)")
    elif a.dtype.kind not in "iub":
        raise CellsegError(f"{path}: not an integer label image (dtype {a.dtype})")
    labels = a.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise CellsegError(f"{path}: not a label image (negative value {labels.min()})")
    return labels


def read_pair(pair: Pair, intensity: str) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8, labels int64), both (H, W); sizes that differ raise CellsegError."""
    raw, _ = _read_array(pair.image)
    labels = read_labels(pair.labels)
    if raw.shape != labels.shape:
        raise CellsegError(
            f"{pair.image}: size {raw.shape[0]}x{raw.shape[1]} does not match its label "
            f"{pair.labels} ({labels.shape[0]}x{labels.shape[1]}, height x width)"
        )
    return to_uint8(raw, intensity), labels


# ----------------------------------------------------------------------------------------------
# tiling


def tile_starts(length: int, tile: int) -> list[int]:
    """Start offsets of the tiles along one axis: ``ceil(length / tile)`` tiles spread evenly from
    edge to edge; ``[0]`` when the axis is not longer than the tile."""
    if length <= tile:
        return [0]
    n = math.ceil(length / tile)
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def cut_tiles(
    image: np.ndarray, labels: np.ndarray, tile: tuple[int, int], min_area: int
) -> list[tuple[int, int, np.ndarray, list[CropMask]]]:
    """Cut an image and its labels into tiles.

    Args:
        image: (H, W) uint8.
        labels: (H, W) int label image.
        tile: (height, width) of a tile.
        min_area: a cut instance needs this many pixels inside the tile to be kept.

    Returns:
        ``(top, left, tile image (h, w) uint8, instances)`` per tile with at least one instance;
        instances are CropMasks in the tile's frame, ascending by label value.
    """
    h, w = labels.shape
    th, tw = min(tile[0], h), min(tile[1], w)
    total = np.bincount(labels.ravel())
    out = []
    for top in tile_starts(h, th):
        for left in tile_starts(w, tw):
            sub = labels[top : top + th, left : left + tw]
            kept = [c for v, c in instances(sub) if c.area >= min_area or c.area == total[v]]
            if kept:
                out.append((top, left, image[top : top + th, left : left + tw], kept))
    return out


# ----------------------------------------------------------------------------------------------
# the dataset


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "sample"


def _rows(tile_id: str, sample: str, cell_type: str, shape: tuple[int, int], cells: list[CropMask]) -> dict:
    h, w = shape
    n = len(cells)
    return {
        "id": [tile_id] * n,
        "annotation": [encode_crop(c, h, w) for c in cells],
        "width": [w] * n,
        "height": [h] * n,
        "cell_type": [cell_type] * n,
        "plate_time": ["00h00m00s"] * n,
        "sample_date": ["1970-01-01"] * n,
        "sample_id": [sample] * n,
        "elapsed_timedelta": ["0 days 00:00:00"] * n,
    }


def licence_name(path: Path) -> str | None:
    """The first non-empty line of a licence file (``MIT License`` for Usiigaci), at most 100
    characters; None when the file is empty or not text. Training records it in the provenance."""
    try:
        lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    first = next((line.strip() for line in lines if line.strip()), "")
    return first[:100] or None


def _copy_licence(src: Path, tmp: Path) -> str | None:
    """Copy the source's top-level LICENSE/LICENCE/COPYING/README files into ``tmp``; returns the
    licence's name (:func:`licence_name` of the first licence file) or None."""
    licence = None
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name.upper().startswith(("LICENSE", "LICENCE", "COPYING", "README")):
            shutil.copyfile(p, tmp / p.name)
            if licence is None and not p.name.upper().startswith("README"):
                licence = licence_name(p)
    return licence


def suggest_input_scale(median_area: float) -> float:
    """``model.input_scale`` that brings cells of ``median_area`` px to the competition's size.

    ``sqrt(REFERENCE_AREA / median_area)`` (the side ratio), rounded to a quarter and clipped to
    0.25-2.0: 1.0 for cells of the competition's size, 0.5 for Usiigaci's (median 1,892 px).

    Args:
        median_area: median instance area in pixels (> 0).

    Returns:
        The scale, a multiple of 0.25.
    """
    side = math.sqrt(REFERENCE_AREA / max(float(median_area), 1.0))
    return float(min(2.0, max(0.25, round(side * 4) / 4)))


def _write_pair(tmp: Path, pair: Pair, opts: dict, rows: dict[str, list]) -> dict:
    image, labels = read_pair(pair, opts["intensity"])
    sample = _safe(pair.sample)
    tiles = cut_tiles(image, labels, opts["tile"], opts["min_area"])
    whole = len(tiles) == 1 and tiles[0][2].shape == image.shape
    for top, left, img, cells in tiles:
        tile_id = sample if whole else f"{sample}_r{top}c{left}"
        write_gray(tmp / "train" / f"{tile_id}.png", img)
        for k, v in _rows(tile_id, sample, opts["cell_type"], img.shape, cells).items():
            rows[k] += v
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    return {
        "sample": sample,
        "tiles": len(tiles),
        "instances": int(areas.size),
        "median_area": float(np.median(areas)) if areas.size else 0.0,
        "areas": areas,
    }


def import_labels(
    src: str | Path,
    out: str | Path,
    *,
    cell_type: str = "astro",
    tile: tuple[int, int] = IMAGE_SHAPE,
    layout: str = "auto",
    image_name: str = "raw.tif",
    label_name: str = "instances_ids.png",
    intensity: str = "standardize",
    min_area: int = 30,
    samples: Callable[[str], bool] | None = None,
    force: bool = False,
) -> dict:
    """Convert an instance-label dataset to the competition layout (see the module docstring).

    Args:
        src: source folder.
        out: folder to create; an existing one is replaced only when empty, made by this function
            (holds the marker) or ``force``.
        cell_type: the ``cell_type`` written for every row (one of ``cellseg.CELL_TYPES``).
        tile: (height, width) of the tiles.
        layout, image_name, label_name: how to find the pairs (:func:`find_pairs`).
        intensity: ``standardize``, ``stretch`` or ``none`` (:func:`to_uint8`).
        min_area: pixels a cut instance needs inside a tile to be kept.
        samples: keep only the samples (source names) it returns True for.
        force: replace a folder holding other files.

    Returns:
        Summary: ``out``, ``layout``, ``samples``, ``tiles``, ``rows``, ``median_area`` (px, of
        the whole instances in the source images), ``suggested_input_scale``
        (:func:`suggest_input_scale`), ``per_sample`` (sample, tiles, instances in the source image,
        their median area).
    """
    if cell_type not in CELL_TYPES:
        raise CellsegError(f"unknown cell type {cell_type!r}; expected one of {', '.join(CELL_TYPES)}")
    if min(tile) < 1 or min_area < 1:
        raise CellsegError(f"tile sides and min_area must be >= 1, got tile {tile[0]}x{tile[1]}, min_area {min_area}")
    if intensity not in INTENSITY:
        raise CellsegError(f"unknown intensity transform {intensity!r}; expected one of {', '.join(INTENSITY)}")
    src, out = Path(src), Path(out)
    check_replaceable(out, MARKER, WHAT, force)
    layout, pairs = find_pairs(src, layout, image_name, label_name)
    if samples is not None:
        pairs = [p for p in pairs if samples(p.sample)]
        if not pairs:
            raise CellsegError(f"{src}: empty dataset, no sample selected")
    th, tw = tile
    opts = {"intensity": intensity, "tile": (th, tw), "min_area": min_area, "cell_type": cell_type}
    rows: dict[str, list] = {c: [] for c in TRAIN_COLUMNS}
    with staging(out) as tmp:
        (tmp / "train").mkdir()
        per_sample = [_write_pair(tmp, p, opts, rows) for p in pairs]
        if not rows["id"]:
            raise CellsegError(f"{src}: empty dataset, no instance in any label image")
        median_area = float(np.median(np.concatenate([s.pop("areas") for s in per_sample])))
        pd.DataFrame(rows, columns=list(TRAIN_COLUMNS)).to_csv(tmp / "train.csv", index=False)
        pd.DataFrame({"id": [], "predicted": []}).to_csv(tmp / "sample_submission.csv", index=False)
        licence = _copy_licence(src, tmp)
        summary = {
            "source": str(src.resolve()),
            "layout": layout,
            "intensity": intensity,
            "tile": [th, tw],
            "min_area": min_area,
            "cell_type": cell_type,
            "licence": licence,
            "samples": len(pairs),
            "tiles": len(set(rows["id"])),
            "rows": len(rows["id"]),
            "median_area": median_area,
            "suggested_input_scale": suggest_input_scale(median_area),
            "per_sample": per_sample,
        }
        (tmp / MARKER).write_text(json.dumps(summary, indent=1) + "\n")
        replace_dir(tmp, out, MARKER, WHAT, force)
    return {"out": str(out), **summary}
