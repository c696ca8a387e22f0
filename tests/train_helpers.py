"""The tiny training world several test modules share: a 9-image competition folder, the demo config
shrunk to a toy, and the `cellseg train` command line over them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from cellseg.io import write_gray
from cellseg.paths import configs_dir
from helpers import TOY_MODEL_OVERRIDES, train_rows, write_train_csv

H, W = 64, 80
#: the demo config shrunk to a toy: 2-level slim backbone, 16 FPN channels, tiny heads, no crops.
TINY_OVERRIDES = [
    *TOY_MODEL_OVERRIDES,
    "train.epochs=3",
    "train.batch_size=2",
    "train.num_workers=0",
    "train.threads=1",
    "train.warmup_iters=2",
    "train.val_every=1",
    "train.val_max_images=1",
    "train.val_thresholds.score=0.0",
    "train.log_every=0",
    "data.folds=3",
    "augment.crop_size=[0, 0]",
]


def make_tiny_data(root: Path) -> Path:
    """9 images of 64 x 80 (3 per cell type, each its own sample) with 3-6 bright elliptic cells, in the
    competition layout under ``root``; the ``tiny_data`` fixture (conftest.py) is one per test module."""
    (root / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:H, :W]
    rows = []
    for i, cell_type in enumerate(["shsy5y", "astro", "cort"] * 3):
        image_id = f"{i:012x}"
        image = rng.normal(100, 5, (H, W))
        masks, taken = [], np.zeros((H, W), bool)
        for _ in range(int(rng.integers(3, 7))):
            cy, cx, ry, rx = rng.integers(8, H - 8), rng.integers(8, W - 8), rng.integers(3, 7), rng.integers(3, 7)
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            m &= ~taken
            if m.sum() < 10:
                continue
            taken |= m
            masks.append(m)
            image[m] = 170 + 10 * len(masks)
        write_gray(root / "train" / f"{image_id}.png", np.clip(image, 0, 255).astype(np.uint8))
        rows += train_rows(image_id, cell_type, masks, sample_id=f"{cell_type}[x]_s{i}")
    write_train_csv(root / "train.csv", rows)
    return root


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellseg", *args], capture_output=True, text=True, timeout=300, **kw)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        str(configs_dir() / "demo.yaml"),
        "--data",
        str(data),
        "--fold",
        "0",
        "--out",
        str(out),
        "--quiet",
        *TINY_OVERRIDES,
        *extra,
    ]
