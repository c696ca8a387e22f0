import numpy as np
import pytest

from cellseg.data.masks import CropMask
from cellseg.data.truth import ImageAnnotation
from cellseg.errors import CellsegError
from cellseg.evaluation import metric


def dense_reference(gt_masks, pred_masks):
    """Straightforward metric: dense IoU from mask stacks, greedy-free counting per threshold."""
    if len(gt_masks) == 0 and len(pred_masks) == 0:
        return 1.0
    if len(gt_masks) == 0 or len(pred_masks) == 0:
        return 0.0
    iou = np.zeros((len(gt_masks), len(pred_masks)))
    for i, g in enumerate(gt_masks):
        for j, p in enumerate(pred_masks):
            union = np.logical_or(g, p).sum()
            iou[i, j] = np.logical_and(g, p).sum() / union if union else 0
    scores = []
    for t in np.arange(0.5, 1.0, 0.05):
        m = iou > t
        tp = np.sum(m.sum(axis=1) == 1)
        fp = np.sum(m.sum(axis=0) == 0)
        fn = np.sum(m.sum(axis=1) == 0)
        scores.append(tp / (tp + fp + fn))
    return float(np.mean(scores))


def random_labels(rng, h, w, n):
    """Random non-overlapping instances: a label image from random rectangles painted in order."""
    lab = np.zeros((h, w), np.int32)
    for k in range(1, n + 1):
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        lab[y : y + rng.integers(2, 12), x : x + rng.integers(2, 12)] = k
    # relabel to consecutive ids of the objects still present
    ids = np.unique(lab[lab > 0])
    remap = np.zeros(n + 1, np.int32)
    remap[ids] = np.arange(1, len(ids) + 1)
    return remap[lab], len(ids)


@pytest.mark.parametrize("seed", range(40))
def test_matches_dense_reference(seed):
    rng = np.random.default_rng(seed)
    h, w = 40, 50
    gt, ng = random_labels(rng, h, w, rng.integers(0, 15))
    # predictions: perturbed truth plus noise objects
    pred = gt.copy()
    pred = np.roll(pred, rng.integers(-2, 3), axis=rng.integers(0, 2))
    extra, ne = random_labels(rng, h, w, rng.integers(0, 5))
    pred = np.where((pred == 0) & (extra > 0), extra + pred.max(), pred)
    ids = np.unique(pred[pred > 0])
    remap = np.zeros(pred.max() + 1, np.int32)
    remap[ids] = np.arange(1, len(ids) + 1)
    pred, npred = remap[pred], len(ids)
    gm = [gt == k for k in range(1, ng + 1)]
    pm = [pred == k for k in range(1, npred + 1)]
    assert metric.image_score(gt, pred, ng, npred) == pytest.approx(dense_reference(gm, pm), abs=1e-12)
    if ng and npred:
        dense = np.array([[np.logical_and(g, p).sum() / np.logical_or(g, p).sum() for p in pm] for g in gm])
        assert np.allclose(metric.iou_matrix(gt, pred, ng, npred), dense)


def test_iou_exactly_half_is_not_a_match():
    gt = np.zeros((2, 4), np.int32)
    gt[0, :4] = 1  # 4 px
    pred = np.zeros((2, 4), np.int32)
    pred[0, :2] = 1  # 2 px inside -> IoU 0.5
    assert metric.image_score(gt, pred) == 0.0


def test_one_prediction_covering_two_cells():
    gt = np.zeros((4, 8), np.int32)
    gt[:, :4], gt[:, 4:] = 1, 2
    pred = np.ones((4, 8), np.int32)  # IoU 0.5 with each -> no match: TP 0, FP 1, FN 2
    assert metric.image_score(gt, pred) == 0.0
    gt2 = gt.copy()
    gt2[:, 6:] = 0  # cell 1 (16 px) and cell 2 (8 px); pred covers 32 -> IoUs .5 and .25
    assert metric.image_score(gt2, pred) == 0.0


def test_hand_computed_partial_match():
    # 2 cells, 3 predictions: one perfect, one with IoU 0.8, one spurious
    gt = np.zeros((10, 30), np.int32)
    gt[0:5, 0:5] = 1
    gt[0:5, 10:15] = 2
    pred = np.zeros_like(gt)
    pred[0:5, 0:5] = 1
    pred[0:5, 10:14] = 2  # 20/25 = 0.8
    pred[8:10, 20:25] = 3
    # t in .50..  .75: TP 2, FP 1, FN 0 -> 2/3 (6 thresholds: .5,.55,.6,.65,.7,.75)
    # t in .80.. .95: TP 1, FP 2, FN 1 -> 1/4 (4 thresholds); IoU 0.8 is not > 0.8
    expected = (6 * (2 / 3) + 4 * (1 / 4)) / 10
    assert metric.image_score(gt, pred) == pytest.approx(expected)


def test_empty_cases():
    gt = np.zeros((5, 5), np.int32)
    gt[1:3, 1:3] = 1
    empty = np.zeros((5, 5), np.int32)
    assert metric.image_score(gt, empty) == 0.0
    assert metric.image_score(empty, gt) == 0.0
    assert metric.image_score(empty, empty) == 1.0


def _ann(image_id, cell_type, crops, h=20, w=20):
    return ImageAnnotation(image_id, cell_type, h, w, crops)


def test_score_images_means_over_images_and_types():
    a = CropMask(0, 0, np.ones((4, 4), bool))
    b = CropMask(10, 10, np.ones((4, 4), bool))
    truth = {"i1": _ann("i1", "cort", [a, b]), "i2": _ann("i2", "astro", [a]), "i3": _ann("i3", "cort", [b])}
    preds = {"i1": [a], "i2": [a]}  # i1: TP1 FN1 -> .5 ; i2 perfect ; i3 missing -> 0
    rep = metric.score_images(truth, preds)
    assert rep.score == pytest.approx((0.5 + 1 + 0) / 3)
    assert rep.per_class == {"astro": 1.0, "cort": pytest.approx(0.25)}
    assert rep.images == 3
    assert rep.to_json()["images"] == 3


def test_score_images_rejects_overlaps_and_unknown_ids():
    a = CropMask(0, 0, np.ones((4, 4), bool))
    a2 = CropMask(2, 2, np.ones((4, 4), bool))
    truth = {"i1": _ann("i1", "cort", [a])}
    with pytest.raises(CellsegError, match="overlap"):
        metric.score_images(truth, {"i1": [a, a2]})
    with pytest.raises(CellsegError, match="not in the truth"):
        metric.score_images(truth, {"zz": [a]})


def test_per_threshold_counts_and_scores_a_loose_mask():
    """One 10 x 10 cell predicted shifted by 2 columns: IoU 80 / 120 = 0.667, a match up to 0.65 only."""
    gt = CropMask(0, 0, np.ones((10, 10), bool))
    loose = CropMask(0, 2, np.ones((10, 10), bool))
    extra = CropMask(15, 15, np.ones((3, 3), bool))
    other = CropMask(12, 0, np.ones((4, 4), bool))
    truth = {
        "loose": _ann("loose", "cort", [gt]),
        "missed": _ann("missed", "cort", [other]),  # a cell and no prediction: FN everywhere
        "empty": _ann("empty", "astro", []),  # no cells, no predictions: 1.0 at every threshold
    }
    rep = metric.score_images(truth, {"loose": [loose, extra]})
    per = rep.per_threshold
    assert list(per.columns) == ["iou", "tp", "fp", "fn", "score"] and list(per["iou"]) == list(metric.THRESHOLDS)
    matched = per["iou"] < 0.667
    assert list(per["tp"]) == [1 if m else 0 for m in matched]
    assert list(per["fp"]) == [1 if m else 2 for m in matched]  # the extra square, and the loose one past 0.65
    assert list(per["fn"]) == [1 if m else 2 for m in matched]
    # loose image: TP / (1 cell + 2 predictions - TP) = 1 / 2 while matched, else 0; missed: 0; empty: 1
    expected = [(1 / 2 + 0 + 1) / 3 if m else 1 / 3 for m in matched]
    assert per["score"].tolist() == pytest.approx(expected)
    assert rep.score == pytest.approx(per["score"].mean())
    assert rep.to_json()["per_threshold"][3] == {"iou": 0.65, "tp": 1, "fp": 1, "fn": 1, "score": pytest.approx(1 / 2)}
    table = rep.threshold_table().splitlines()
    assert len(table) == 12 and table[-1].split() == ["mean", f"{rep.score:.4f}"]


def test_per_threshold_scores_average_to_the_score():
    rng = np.random.default_rng(3)
    truth, preds = {}, {}
    for k in range(6):
        cells = [CropMask(int(y), int(x), rng.random((6, 6)) > 0.2) for y, x in rng.integers(0, 30, (4, 2))]
        gt = _disjoint(cells, 40, 40)
        pred = _disjoint(
            [CropMask(c.top + int(rng.integers(-1, 2)), c.left + 1, c.mask) for c in gt[: k % 4 + 1]], 40, 40
        )
        truth[f"i{k}"] = _ann(f"i{k}", "shsy5y", gt, 40, 40)
        preds[f"i{k}"] = pred
    rep = metric.score_images(truth, preds)
    assert rep.score == pytest.approx(rep.per_threshold["score"].mean(), abs=1e-12)
    n_true = int(rep.per_image["n_true"].sum())
    n_pred = int(rep.per_image["n_pred"].sum())
    assert ((rep.per_threshold["tp"] + rep.per_threshold["fn"]) == n_true).all()
    assert ((rep.per_threshold["tp"] + rep.per_threshold["fp"]) == n_pred).all()
    assert rep.per_threshold["tp"].is_monotonic_decreasing and rep.per_threshold["tp"].iloc[0] > 0


def _disjoint(crops, h, w):
    """The crops clipped to (h, w) with earlier ones keeping contested pixels (no overlaps, none empty)."""
    taken = np.zeros((h, w), bool)
    out = []
    for c in crops:
        full = np.zeros((h, w), bool)
        y0, x0 = max(c.top, 0), max(c.left, 0)
        sub = c.mask[y0 - c.top :, x0 - c.left :]
        full[y0 : y0 + sub.shape[0], x0 : x0 + sub.shape[1]] = sub[: h - y0, : w - x0]
        full &= ~taken
        if full.any():
            taken |= full
            out.append(CropMask(0, 0, full).tight())
    return out
