"""Competition data: train.csv (ground truth), the test folder and sample_submission.csv.

``train.csv`` has one row per annotated instance and 9 columns::

    id, annotation, width, height, cell_type, plate_time, sample_date, sample_id, elapsed_timedelta

Rows are grouped per image into :class:`ImageAnnotation` whose instances are :class:`CropMask`
objects (each mask kept on its bounding box). Every error names the file and the 1-based CSV line
(line 1 is the header).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cellseg import CELL_TYPES
from cellseg.data.masks import CropMask, fill_holes_all, label_image, stack
from cellseg.data.rle import BatchDecodeError, decode_crops
from cellseg.errors import CellsegError
from cellseg.io import list_pngs

TRAIN_COLUMNS = (
    "id",
    "annotation",
    "width",
    "height",
    "cell_type",
    "plate_time",
    "sample_date",
    "sample_id",
    "elapsed_timedelta",
)
META_COLUMNS = ("plate_time", "sample_date", "sample_id", "elapsed_timedelta")


@dataclass
class ImageAnnotation:
    """Ground truth of one image.

    Attributes:
        id: image id (file stem).
        cell_type: one of ``cellseg.CELL_TYPES``.
        height, width: image size in pixels.
        instances: one CropMask per annotated cell, in CSV order.
        meta: plate_time, sample_date, sample_id, elapsed_timedelta (strings; missing keys absent).
        lines: 1-based CSV line of each instance.
    """

    id: str
    cell_type: str
    height: int
    width: int
    instances: list[CropMask]
    meta: dict[str, str] = field(default_factory=dict)
    lines: list[int] = field(default_factory=list)

    def label_image(self) -> np.ndarray:
        """(height, width) int32 label image, instance i -> i + 1 (later instances win overlaps)."""
        return label_image(self.instances, self.height, self.width)[0]

    def masks(self) -> np.ndarray:
        """(N, height, width) bool mask stack."""
        return stack(self.instances, self.height, self.width)


@dataclass
class TrainSet:
    """All images of a train.csv, in order of first appearance."""

    path: Path
    images: dict[str, ImageAnnotation]
    holes_filled: int = 0

    def __len__(self) -> int:
        return len(self.images)

    def summary(self) -> pd.DataFrame:
        """Per cell type: images, instances, mean instances per image, mean area."""
        rows = []
        for img in self.images.values():
            areas = [c.area for c in img.instances]
            rows.append((img.cell_type, len(areas), float(np.mean(areas)) if areas else 0.0))
        df = pd.DataFrame(rows, columns=["cell_type", "instances", "mean_area"])
        return df.groupby("cell_type").agg(
            images=("instances", "size"),
            instances=("instances", "sum"),
            per_image=("instances", "mean"),
            mean_area=("mean_area", "mean"),
        )


def _fail(path: Path, line: int, msg: str) -> CellsegError:
    return CellsegError(f"{path}:{line}: {msg}")


def read_train_records(path: str | Path) -> pd.DataFrame:
    """Read and validate train.csv as a DataFrame (all columns str except width/height int).

    Adds a ``line`` column: the 1-based CSV line of each row. Checks the 9 columns, integer
    width/height, known cell types, and one width/height/cell type per image id.
    """
    path = Path(path)
    if not path.is_file():
        raise CellsegError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise CellsegError(f"{path}: not a readable CSV ({type(e).__name__}: {e})") from None
    missing = [c for c in TRAIN_COLUMNS if c not in df.columns]
    if missing:
        raise CellsegError(f"{path}:1: missing column(s) {', '.join(missing)} (expected {', '.join(TRAIN_COLUMNS)})")
    extra = [c for c in df.columns if c not in TRAIN_COLUMNS and c != "source"]
    if extra:
        raise CellsegError(f"{path}:1: unexpected column(s) {', '.join(extra)}")
    df["line"] = np.arange(len(df)) + 2
    for col in ("width", "height"):
        ok = df[col].str.fullmatch(r"[1-9][0-9]*")
        if not ok.all():
            i = int(np.flatnonzero(~ok.to_numpy())[0])
            raise _fail(path, int(df["line"].iat[i]), f"{col} must be a positive integer, got {df[col].iat[i]!r}")
        df[col] = df[col].astype(np.int64)
    bad_type = ~df["cell_type"].isin(CELL_TYPES)
    if bad_type.any():
        i = int(np.flatnonzero(bad_type.to_numpy())[0])
        raise _fail(
            path,
            int(df["line"].iat[i]),
            f"unknown cell_type {df['cell_type'].iat[i]!r} (known: {', '.join(CELL_TYPES)})",
        )
    empty_id = df["id"].str.strip() == ""
    if empty_id.any():
        i = int(np.flatnonzero(empty_id.to_numpy())[0])
        raise _fail(path, int(df["line"].iat[i]), "empty id")
    for col in ("width", "height", "cell_type"):
        first = df.groupby("id", sort=False)[col].transform("first")
        diff = df[col] != first
        if diff.any():
            i = int(np.flatnonzero(diff.to_numpy())[0])
            raise _fail(
                path,
                int(df["line"].iat[i]),
                f"{col} {df[col].iat[i]} of image {df['id'].iat[i]} differs from its first row ({first.iat[i]})",
            )
    return df


def read_train_csv(path: str | Path, fill_holes: bool = False, progress: bool = False) -> TrainSet:
    """Load train.csv into a :class:`TrainSet`.

    Args:
        path: the CSV file.
        fill_holes: fill holes of every annotation on its crop (``scipy.ndimage.binary_fill_holes``);
            ``TrainSet.holes_filled`` reports how many masks changed.
        progress: show a tqdm bar over rows.
    """
    path = Path(path)
    df = read_train_records(path)
    images: dict[str, ImageAnnotation] = {}
    ann = df["annotation"].tolist()
    lines = df["line"].tolist()
    for image_id, idx in tqdm(
        df.groupby("id", sort=False).indices.items(), desc="train.csv", unit="img", disable=not progress
    ):
        first = int(idx[0])
        h, w = int(df["height"].iat[first]), int(df["width"].iat[first])
        try:
            crops = decode_crops([ann[i] for i in idx], h, w)
        except BatchDecodeError as e:
            raise _fail(path, lines[idx[e.index]], f"bad annotation: {e}") from None
        for i, crop in zip(idx, crops):
            if crop.mask.size == 0:
                raise _fail(path, lines[i], "empty annotation")
        images[image_id] = ImageAnnotation(
            id=image_id,
            cell_type=str(df["cell_type"].iat[first]),
            height=h,
            width=w,
            instances=crops,
            meta={c: str(df[c].iat[first]) for c in META_COLUMNS},
            lines=[lines[i] for i in idx],
        )
    changed = 0
    if fill_holes:
        for img in images.values():
            img.instances, n = fill_holes_all(img.instances)
            changed += n
    return TrainSet(path=path, images=images, holes_filled=changed)


def image_ids(folder: str | Path) -> list[str]:
    """Sorted ids (file stems) of the PNGs in ``folder`` (``.png`` in any letter case; a name that is
    not valid UTF-8 skipped with a warning, :func:`cellseg.io.list_pngs`); CellsegError if the folder
    is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CellsegError(f"{folder}: folder not found")
    return list(list_pngs(folder))


def read_sample_submission(path: str | Path) -> list[str]:
    """Test ids in the order of ``sample_submission.csv`` (columns ``id,predicted``)."""
    path = Path(path)
    if not path.is_file():
        raise CellsegError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise CellsegError(f"{path}: not a readable CSV ({type(e).__name__}: {e})") from None
    if "id" not in df.columns:
        raise CellsegError(f"{path}:1: no 'id' column")
    return list(dict.fromkeys(df["id"].tolist()))


_SEMI_TYPE = re.compile(r"^(shsy5y|astro|cort)", re.IGNORECASE)


def cell_type_from_filename(name: str) -> str | None:
    """Cell type from an unlabeled image's file name (``shsy5y[diff]_E10-4_..._0001.png`` -> 'shsy5y')."""
    m = _SEMI_TYPE.match(Path(name).name)
    return m.group(1).lower() if m else None
