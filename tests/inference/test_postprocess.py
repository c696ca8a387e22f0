import numpy as np
import pytest

from cellseg.config.manifest import ClassThresholds, PostprocessConfig
from cellseg.data.masks import CropMask, label_image
from cellseg.data.rle import decode, encode_crop
from cellseg.inference.fusion import Detections, SoftCrop
from cellseg.inference.postprocess import (
    binarize,
    min_pixels_filter,
    postprocess,
    remove_overlaps,
    score_filter,
)


def disk(cy, cx, r, size=40):
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_score_filter_and_binarize():
    assert score_filter(np.array([0.2, 0.5, 0.7]), 0.5).tolist() == [1, 2]
    prob = np.zeros((6, 8), np.float32)
    prob[2:4, 3:7] = 0.8
    prob[1, 1] = 0.49
    c = binarize(SoftCrop(10, 20, prob), 0.5)
    assert (c.top, c.left, c.mask.shape, c.area) == (12, 23, (2, 4), 8)


def test_min_pixels_filter():
    crops = [
        CropMask(0, 0, np.ones((2, 2), bool)),
        CropMask(0, 0, np.ones((3, 3), bool)),
        CropMask(0, 0, np.zeros((1, 1), bool)),
    ]
    assert min_pixels_filter(crops, 5).tolist() == [1]
    assert min_pixels_filter(crops, 0).tolist() == [0, 1]  # an empty mask never survives


def test_remove_overlaps_higher_score_keeps_pixels():
    a = CropMask.from_full(disk(20, 15, 8))
    b = CropMask.from_full(disk(20, 25, 8))  # overlaps a
    crops, kept = remove_overlaps([a, b], np.array([0.4, 0.9]), 40, 40, max_lost_fraction=0.5)
    assert kept.tolist() == [1, 0]
    assert crops[0].area == b.area  # the winner is untouched
    _, overlap = label_image(crops, 40, 40)
    assert overlap == 0
    assert crops[1].area == a.area - int((a.to_full(40, 40) & b.to_full(40, 40)).sum())


def test_remove_overlaps_drops_instances_that_lost_most():
    big = CropMask.from_full(disk(20, 20, 10))
    inner = CropMask.from_full(disk(20, 22, 6))  # mostly inside big
    crops, kept = remove_overlaps([big, inner], np.array([0.9, 0.5]), 40, 40, max_lost_fraction=0.5)
    assert kept.tolist() == [0]
    crops, kept = remove_overlaps([big, inner], np.array([0.9, 0.5]), 40, 40, max_lost_fraction=1.0, min_pixels=1)
    assert kept.tolist() == [0]  # lost everything -> below 1 pixel
    small = CropMask.from_full(disk(20, 28, 5))
    own = int((small.to_full(40, 40) & ~big.to_full(40, 40)).sum())
    assert 0 < own < 30 and own > 0.1 * small.area  # precondition: only the pixel minimum can drop it
    crops, kept = remove_overlaps([big, small], np.array([0.9, 0.5]), 40, 40, max_lost_fraction=0.9, min_pixels=30)
    assert kept.tolist() == [0]  # survivor pixels below the class minimum


def test_postprocess_chain_order_and_rle():
    ring = disk(20, 20, 9) & ~disk(20, 20, 3)  # a hole that hole filling closes
    p1 = np.where(ring, 0.9, 0.1).astype(np.float32)
    p2 = np.where(disk(20, 32, 4), 0.7, 0.0).astype(np.float32)  # small: under min_pixels
    p3 = np.where(disk(8, 8, 5), 0.8, 0.0).astype(np.float32)  # low score
    masks = [SoftCrop(0, 0, p1), SoftCrop(0, 0, p2), SoftCrop(0, 0, p3)]
    dets = Detections(np.zeros((3, 4), np.float32), np.array([0.9, 0.8, 0.2], np.float32), np.array([2, 2, 2]), masks)
    th = ClassThresholds(score=0.3, mask_threshold=0.5, nms_iou=0.3, min_pixels=60)
    crops, scores = postprocess(dets, th, PostprocessConfig(fill_holes=True), 40, 40)
    assert len(crops) == 1 and scores.tolist() == pytest.approx([0.9])
    assert np.array_equal(crops[0].to_full(40, 40), disk(20, 20, 9))
    rle = encode_crop(crops[0], 40, 40)
    assert np.array_equal(decode(rle, 40, 40), disk(20, 20, 9))
    crops, _ = postprocess(dets, th, PostprocessConfig(fill_holes=False), 40, 40)
    assert np.array_equal(crops[0].to_full(40, 40), ring)
