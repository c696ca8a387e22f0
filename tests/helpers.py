"""Small builders shared by tests: hand-made competition folders with real PNGs and CSVs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellseg import rle
from cellseg.data import TRAIN_COLUMNS
from cellseg.io import write_gray


def train_rows(image_id, cell_type, masks, sample_id=None, h=None, w=None):
    h = h or masks[0].shape[0]
    w = w or masks[0].shape[1]
    return [
        {
            "id": image_id, "annotation": rle.encode(m), "width": w, "height": h, "cell_type": cell_type,
            "plate_time": "11h30m00s", "sample_date": "2019-06-16",
            "sample_id": sample_id or f"{cell_type}[x]_{image_id}", "elapsed_timedelta": "0 days 00:00:00",
        }
        for m in masks
    ]


def write_train_csv(path: Path, rows) -> Path:
    pd.DataFrame(rows, columns=list(TRAIN_COLUMNS)).to_csv(path, index=False)
    return path


def write_test_dir(folder: Path, ids, shape=(20, 30)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in ids:
        write_gray(folder / f"{i}.png", rng.integers(0, 255, shape, dtype=np.uint8))
    return folder
