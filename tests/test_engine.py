"""Model outputs -> non-overlapping crop masks, checked against torchvision's own full-frame pasting."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from cellseg.data.masks import CropMask, label_image
from cellseg.engine import Detections, detections_to_crops, gray_to_tensor, paste_crops, predict_crops, remove_overlaps
from cellseg.model.build import build_model
from cellseg.model.experiment import ModelConfig
from helpers import TINY


def test_paste_crops_equals_torchvision_paste():
    g = torch.Generator().manual_seed(0)
    n, H, W = 40, 50, 70
    masks = torch.rand(n, 28, 28, generator=g)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([W - 2.0, H - 2.0]) - 4
    wh = torch.rand(n, 2, generator=g) * 25 + 6
    boxes = torch.cat([xy, xy + wh], 1)  # some cross the image border (torchvision fails on boxes fully outside)
    full = paste_masks_in_image(masks[:, None], boxes, (H, W), padding=1)[:, 0] > 0.5
    crops = paste_crops(masks, boxes, H, W, 0.5)
    assert len(crops) == n
    for c, ref in zip(crops, full):
        assert np.array_equal(c.to_full(H, W), ref.numpy())


def test_remove_overlaps_paints_in_order():
    a = CropMask(0, 0, np.ones((4, 4), bool))
    b = CropMask(2, 2, np.ones((4, 4), bool))  # shares 2x2 with a
    c = CropMask(1, 1, np.ones((2, 2), bool))  # fully under a
    kept, idx = remove_overlaps([a, b, c], 8, 8)
    assert idx == [0, 1]
    assert kept[0].area == 16 and kept[1].area == 12
    assert label_image(kept, 8, 8)[1] == 0
    assert remove_overlaps([a, b], 8, 8, min_pixels=13)[1] == [0]


def test_detections_to_crops_threshold_and_score_order():
    masks = torch.zeros(3, 28, 28)
    masks[:, 4:24, 4:24] = 0.9
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 15, 15], [30, 30, 40, 40]])
    det = Detections(boxes, torch.tensor([0.3, 0.9, 0.6]), torch.tensor([1, 1, 1]), masks)
    crops = detections_to_crops(det, 48, 48, score_thresh=0.5)
    assert [c.left // 10 for c in crops] == [0, 3] and crops[0].left >= 5  # score 0.3 dropped, 0.9 first
    overlap = detections_to_crops(det, 48, 48, score_thresh=0.0)
    assert len(overlap) == 3 and label_image(overlap, 48, 48)[1] == 0
    assert overlap[1].left >= 30 and overlap[2].area < overlap[0].area  # 0.3 lost pixels to 0.9


def test_predict_crops_runs_a_model_without_overlaps():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY)).eval()
    image = (np.random.default_rng(0).random((48, 64)) * 255).astype(np.uint8)
    assert torch.equal(gray_to_tensor(image)[0], gray_to_tensor(image)[2])
    (crops,) = predict_crops(model, [image], score_thresh=0.0)
    assert label_image(crops, 48, 64)[1] == 0
    assert all(c.area > 0 and c.top >= 0 and c.left >= 0 for c in crops)
