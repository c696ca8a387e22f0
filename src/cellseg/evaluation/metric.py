"""The exact competition metric.

Per image and threshold t in 0.50, 0.55, ..., 0.95, a prediction matches a ground-truth object when
IoU > t (strictly: IoU exactly 0.5 is not a match). precision(t) = TP / (TP + FP + FN); the image
score is the mean over the 10 thresholds and the dataset score is the mean over images (not counts
summed over images). Per cell type: the mean over that type's images.

Edge cases (documented choices): no predictions on an image with cells -> 0.0; no cells and no
predictions -> 1.0; no cells but predictions -> 0.0.

IoUs come from label images with one ``bincount`` over the pixels both label images cover (sparse:
only intersecting pairs exist; nothing of shape (n, H*W) is built). Within one label image instances
cannot overlap, and for t >= 0.5 that makes every match unique, so TP(t) = #pairs with IoU > t.

Where a score is lost: :attr:`ScoreReport.per_threshold` holds TP, FP and FN summed over images and
the dataset score at each threshold alone (the mean over images of that threshold's TP / (TP + FP +
FN)); the dataset score is the mean of those ten. A model that finds its cells but draws them loosely
scores high at 0.50 and falls off towards 0.95; one that misses cells is low at 0.50 already.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cellseg.data.masks import CropMask, label_image
from cellseg.errors import CellsegError

THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


def matched_pairs(
    gt: np.ndarray, pred: np.ndarray, n_gt: int, n_pred: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All intersecting (gt, pred) pairs: gt labels (P,), pred labels (P,) (1-based) and IoUs (P,).

    Args:
        gt: (H, W) int label image, 0 = background, objects 1..n_gt.
        pred: (H, W) int label image, objects 1..n_pred.
    """
    g = gt.ravel()
    p = pred.ravel()
    fg = (g | p) != 0  # pixels covered by either image; background/background pairs are not needed
    keys = g[fg].astype(np.int64) * (n_pred + 1) + p[fg]
    # (n_gt + 1) x (n_pred + 1) contingency table: memory is O(objects^2), never O(objects x pixels)
    table = np.bincount(keys, minlength=(n_gt + 1) * (n_pred + 1)).reshape(n_gt + 1, n_pred + 1)
    area_g = table.sum(axis=1)
    area_p = table.sum(axis=0)
    gi, pi = np.nonzero(table[1:, 1:])
    gi, pi = gi + 1, pi + 1
    inter = table[gi, pi]
    union = area_g[gi] + area_p[pi] - inter
    return gi, pi, inter / union


def matched_ious(gt: np.ndarray, pred: np.ndarray, n_gt: int, n_pred: int) -> np.ndarray:
    """IoUs of all intersecting (gt, pred) pairs, shape (P,) float64 (see :func:`matched_pairs`)."""
    return matched_pairs(gt, pred, n_gt, n_pred)[2]


def iou_matrix(gt: np.ndarray, pred: np.ndarray, n_gt: int | None = None, n_pred: int | None = None) -> np.ndarray:
    """Dense (n_gt, n_pred) IoU matrix from two label images (for inspection and small cases)."""
    n_gt = int(gt.max()) if n_gt is None else n_gt
    n_pred = int(pred.max()) if n_pred is None else n_pred
    g = gt.ravel().astype(np.int64)
    p = pred.ravel().astype(np.int64)
    area_g = np.bincount(g, minlength=n_gt + 1)
    area_p = np.bincount(p, minlength=n_pred + 1)
    inter = np.bincount(g * (n_pred + 1) + p, minlength=(n_gt + 1) * (n_pred + 1)).reshape(n_gt + 1, n_pred + 1)
    inter = inter[1:, 1:].astype(np.float64)
    union = area_g[1:, None] + area_p[None, 1:] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def true_positives(ious: np.ndarray) -> np.ndarray:
    """TP at each of :data:`THRESHOLDS`, shape (10,) int64, from the IoUs (P,) of intersecting pairs."""
    return (np.asarray(ious)[None, :] > THRESHOLDS[:, None]).sum(axis=1)


def threshold_scores(tp: np.ndarray, n_gt: int, n_pred: int) -> np.ndarray:
    """One image's TP / (TP + FP + FN) at each threshold, shape (10,) float64, from ``tp`` (10,).

    No cells and no predictions -> 1.0 at every threshold; cells without predictions, or the
    reverse -> 0.0.
    """
    if n_gt == 0 and n_pred == 0:
        return np.ones(len(THRESHOLDS))
    if n_gt == 0 or n_pred == 0:
        return np.zeros(len(THRESHOLDS))
    return tp / (n_gt + n_pred - tp)


def score_from_ious(ious: np.ndarray, n_gt: int, n_pred: int) -> float:
    """Image score from the IoUs of intersecting pairs (see module docstring)."""
    return float(np.mean(threshold_scores(true_positives(ious), n_gt, n_pred)))


def image_score(gt: np.ndarray, pred: np.ndarray, n_gt: int | None = None, n_pred: int | None = None) -> float:
    """Competition score of one image from (H, W) label images.

    ``n_gt``/``n_pred`` default to the maximum label; pass them when some object may have no pixels
    left (it then counts as unmatched).
    """
    n_gt = int(gt.max()) if n_gt is None else n_gt
    n_pred = int(pred.max()) if n_pred is None else n_pred
    return score_from_ious(matched_ious(gt, pred, n_gt, n_pred), n_gt, n_pred)


@dataclass
class ScoreReport:
    """Dataset score, per-type scores and a per-image table (id, cell_type, score, n_true, n_pred).

    ``missing``: truth ids the predictions have no entry for at all (scored 0, as an image with no
    predictions), sorted; callers warn about them (``cellseg score``) or refuse them (``--strict``).
    ``per_threshold``: one row per IoU threshold (columns iou, tp, fp, fn summed over images, and
    score: the mean over images of TP / (TP + FP + FN) at that threshold); ``score`` is the mean of
    its score column.
    """

    score: float
    per_class: dict[str, float]
    per_image: pd.DataFrame
    per_threshold: pd.DataFrame
    missing: list[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        return len(self.per_image)

    def to_json(self) -> dict:
        return {
            "score": self.score,
            "per_class": self.per_class,
            "images": self.images,
            "per_threshold": self.per_threshold_records(),
        }

    def per_threshold_records(self) -> list[dict]:
        """``per_threshold`` as JSON-ready rows: {"iou", "tp", "fp", "fn", "score"}."""
        return [
            {"iou": float(r.iou), "tp": int(r.tp), "fp": int(r.fp), "fn": int(r.fn), "score": float(r.score)}
            for r in self.per_threshold.itertuples()
        ]

    def threshold_table(self) -> str:
        """``per_threshold`` as text: where the score is lost, threshold by threshold."""
        lines = [f"{'IoU >':<6} {'TP':>7} {'FP':>7} {'FN':>7} {'score':>7}"]
        for r in self.per_threshold.itertuples():
            lines.append(f"{r.iou:<6.2f} {r.tp:>7d} {r.fp:>7d} {r.fn:>7d} {r.score:>7.4f}")
        lines.append(f"{'mean':<6} {'':>7} {'':>7} {'':>7} {self.score:>7.4f}")
        return "\n".join(lines)

    def table(self) -> str:
        lines = [f"{'cell type':<10} {'images':>6} {'score':>7}"]
        for ct, s in self.per_class.items():
            n = int((self.per_image["cell_type"] == ct).sum())
            lines.append(f"{ct:<10} {n:>6} {s:>7.4f}")
        lines.append(f"{'overall':<10} {self.images:>6} {self.score:>7.4f}")
        return "\n".join(lines)


def score_images(truth: Mapping, preds: Mapping[str, Sequence[CropMask]]) -> ScoreReport:
    """Score predictions against ground truth.

    Args:
        truth: image id -> :class:`cellseg.data.truth.ImageAnnotation` (id, cell_type, height, width, instances).
        preds: image id -> predicted instances. Ids in ``truth`` but not in ``preds`` score 0 (no
            predictions) and are listed in ``ScoreReport.missing``; ids in ``preds`` but not in
            ``truth`` are an error.

    Raises:
        CellsegError: unknown ids, or overlapping predicted masks in an image (the Kaggle scorer
            rejects those submissions).
    """
    unknown = sorted(set(preds) - set(truth))
    if unknown:
        raise CellsegError(f"{len(unknown)} predicted image id(s) not in the truth, e.g. {unknown[0]!r}")
    rows = []
    counts = np.zeros((3, len(THRESHOLDS)), dtype=np.int64)  # TP, FP, FN summed over images
    at_threshold = np.zeros(len(THRESHOLDS))  # summed over images
    for image_id, ann in truth.items():
        gt, _ = label_image(ann.instances, ann.height, ann.width)
        crops = list(preds.get(image_id, ()))
        pr, overlap = label_image(crops, ann.height, ann.width)
        if overlap:
            raise CellsegError(
                f"image {image_id}: predicted masks overlap on {overlap} pixel(s); the Kaggle scorer rejects this"
            )
        n_gt, n_pred = len(ann.instances), len(crops)
        ious = matched_ious(gt, pr, n_gt, n_pred)
        tp = true_positives(ious)
        counts += np.stack([tp, n_pred - tp, n_gt - tp])
        image = threshold_scores(tp, n_gt, n_pred)
        at_threshold += image
        rows.append((image_id, ann.cell_type, float(np.mean(image)), n_gt, n_pred))
    per_image = pd.DataFrame(rows, columns=["id", "cell_type", "score", "n_true", "n_pred"])
    per_class = {ct: float(g["score"].mean()) for ct, g in per_image.groupby("cell_type", sort=True)}
    score = float(per_image["score"].mean()) if len(per_image) else 0.0
    missing = sorted(set(truth) - set(preds))
    per_threshold = pd.DataFrame(
        {
            "iou": THRESHOLDS,
            "tp": counts[0],
            "fp": counts[1],
            "fn": counts[2],
            "score": at_threshold / max(len(rows), 1),
        }
    )
    return ScoreReport(score, per_class, per_image, per_threshold, missing)
