"""Small builders shared by tests: hand-made competition folders with real PNGs and CSVs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellseg.data import rle
from cellseg.data.truth import TRAIN_COLUMNS
from cellseg.io import write_gray


def train_rows(image_id, cell_type, masks, sample_id=None, h=None, w=None):
    h = h or masks[0].shape[0]
    w = w or masks[0].shape[1]
    return [
        {
            "id": image_id,
            "annotation": rle.encode(m),
            "width": w,
            "height": h,
            "cell_type": cell_type,
            "plate_time": "11h30m00s",
            "sample_date": "2019-06-16",
            "sample_id": sample_id or f"{cell_type}[x]_{image_id}",
            "elapsed_timedelta": "0 days 00:00:00",
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


#: config overrides that shrink any shipped model to a toy: 2 returned levels, 16 FPN channels, tiny
#: heads, 100 proposals (backbone and data sections stay the config's own).
TOY_MODEL_OVERRIDES = [
    "model.returned_layers=[1, 2]",
    "model.anchor_sizes=[[8], [16], [32]]",
    "model.fpn_channels=16",
    "model.box_head_dim=32",
    "model.mask_head_convs=1",
    "model.rpn_post_nms_top_n_train=100",
    "model.rpn_post_nms_top_n_test=100",
    "model.box_batch_size_per_image=32",
    "model.box_detections_per_img=30",
]


#: A tiny Mask R-CNN (ResNet-18 with one block per stage) for fast CPU tests.
TINY = dict(
    backbone="resnet18",
    backbone_blocks=[1, 1, 1, 1],
    norm="bn",
    trainable_backbone_layers=5,
    returned_layers=[1, 2],
    anchor_sizes=[[8], [16], [32]],
    fpn_channels=16,
    box_head_dim=32,
    mask_head_convs=1,
    input_scale=1.0,
    rpn_post_nms_top_n_train=200,
    rpn_post_nms_top_n_test=200,
    box_batch_size_per_image=32,
    box_detections_per_img=50,
)
