import numpy as np
import pytest
import torch
from torchvision.ops import box_iou, nms

from cellseg.config.manifest import ClassThresholds, FusionConfig
from cellseg.inference.fusion import (
    Detections,
    SoftCrop,
    average_crops,
    box_iou_sparse,
    fuse,
    greedy_nms,
    mask_iou_sparse,
)


def th(nms_iou: float, mask_threshold: float = 0.5) -> ClassThresholds:
    return ClassThresholds(nms_iou=nms_iou, mask_threshold=mask_threshold)


def random_crops(rng, n, height=60, width=80):
    out = []
    for _ in range(n):
        h, w = rng.integers(3, 20, size=2)
        top, left = rng.integers(0, height - h), rng.integers(0, width - w)
        out.append(SoftCrop(int(top), int(left), rng.random((h, w)).astype(np.float32)))
    return out


def dense_iou(crops, thr, height, width):
    full = np.zeros((len(crops), height, width), bool)
    for i, c in enumerate(crops):
        h, w = c.prob.shape
        full[i, c.top : c.top + h, c.left : c.left + w] = c.prob >= thr
    flat = full.reshape(len(crops), -1).astype(np.float64)
    inter = flat @ flat.T
    area = flat.sum(1)
    union = area[:, None] + area[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0)


def test_mask_iou_sparse_equals_dense_reference():
    rng = np.random.default_rng(0)
    crops = random_crops(rng, 40)
    sp = mask_iou_sparse(crops, 0.5, 60, 80).toarray()
    np.testing.assert_allclose(sp, dense_iou(crops, 0.5, 60, 80), atol=1e-6)


def test_box_iou_sparse_equals_torchvision():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 50, (30, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 15, (30, 2))], 1).astype(np.float32)
    sp = box_iou_sparse(boxes, chunk=7).toarray()
    np.testing.assert_allclose(sp, box_iou(torch.tensor(boxes), torch.tensor(boxes)).numpy(), atol=1e-6)


def test_greedy_nms_matches_torchvision_nms():
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 60, (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 20, (200, 2))], 1).astype(np.float32)
    scores = rng.random(200).astype(np.float32)
    keep, owner = greedy_nms(box_iou_sparse(boxes), scores, 0.4)
    ref = nms(torch.tensor(boxes), torch.tensor(scores), 0.4).numpy()
    assert keep.tolist() == ref.tolist()
    assert set(owner.tolist()) == set(keep.tolist())
    iou = box_iou(torch.tensor(boxes), torch.tensor(boxes)).numpy()
    for i, o in enumerate(owner):  # everyone merged into a higher-scored keeper it overlaps
        if o != i:
            assert scores[o] >= scores[i] and iou[i, o] > 0.4


def _blob(top, left, h, w, value=0.9):
    return SoftCrop(top, left, np.full((h, w), value, np.float32))


def test_fuse_merges_duplicates_and_averages_masks():
    a = _blob(10, 10, 10, 10)  # two views of one cell, shifted by a pixel
    b = _blob(11, 10, 10, 10)
    c = _blob(40, 40, 8, 8)  # another cell
    dets = Detections(
        np.array([m.box for m in (a, b, c)], np.float32),
        np.array([0.9, 0.6, 0.8], np.float32),
        np.array([1, 1, 1]),
        [a, b, c],
        np.array([0, 1, 0]),
        np.array([1.0, 1.0, 1.0], np.float32),
    )
    out = fuse(dets, th(0.5), FusionConfig(iou_type="mask", average_masks=True), 64, 64)
    assert len(out) == 2 and out.scores.tolist() == pytest.approx([0.9, 0.8])
    m = out.masks[0]
    assert (m.top, m.left, m.prob.shape) == (10, 10, (11, 10))
    assert m.prob[0, 0] == pytest.approx(0.9 * 0.9 / 1.5)  # only a covers the first row
    assert m.prob[5, 5] == pytest.approx(0.9)
    assert out.boxes[0].tolist() == [10, 10, 20, 21]
    plain = fuse(dets, th(0.5), FusionConfig(iou_type="box", average_masks=False), 64, 64)
    assert len(plain) == 2 and plain.masks[0] is a


def test_fuse_is_class_wise_with_the_thresholds_nms_iou():
    a, b = _blob(10, 10, 10, 10), _blob(12, 10, 10, 10)  # IoU 80/120 = 0.67
    boxes = np.array([a.box, b.box], np.float32)
    same = Detections(boxes, np.array([0.9, 0.8], np.float32), np.array([2, 2]), [a, b])
    assert len(fuse(same, th(0.5), FusionConfig(), 40, 40)) == 1
    assert len(fuse(same, th(0.7), FusionConfig(), 40, 40)) == 2
    other = Detections(boxes, np.array([0.9, 0.8], np.float32), np.array([2, 3]), [a, b])
    assert len(fuse(other, th(0.3), FusionConfig(), 40, 40)) == 2
    # the mask threshold binarises the soft masks for the IoU: at 0.95 the 0.9 blobs are empty, IoU 0
    assert len(fuse(same, th(0.5, mask_threshold=0.95), FusionConfig(), 40, 40)) == 2


def test_mean_score_mode_rewards_agreement():
    crops = [_blob(5, 5, 8, 8) for _ in range(3)] + [_blob(30, 30, 8, 8)]
    dets = Detections(
        np.array([c.box for c in crops], np.float32),
        np.array([0.8, 0.6, 0.7, 0.9], np.float32),
        np.array([1, 1, 1, 1]),
        crops,
        np.array([0, 1, 1, 2]),
        np.ones(4, np.float32),
    )
    out = fuse(dets, th(0.5), FusionConfig(score_mode="mean"), 48, 48, total_weight=3.0)
    # cell 1 seen by sources 0 and 1 (best of source 1 is 0.7): (0.8 + 0.7) / 3; cell 2 by one source
    assert out.scores.tolist() == pytest.approx([0.5, 0.3])


def test_average_crops_union_box():
    m = average_crops([_blob(0, 0, 2, 2, 1.0), _blob(1, 1, 2, 2, 0.5)], np.array([1.0, 3.0]))
    assert m.prob.shape == (3, 3)
    assert m.prob[0, 0] == pytest.approx(0.25) and m.prob[1, 1] == pytest.approx((1 + 1.5) / 4)


def test_empty_input():
    assert len(fuse(Detections.empty(), th(0.5), FusionConfig(), 10, 10)) == 0
