"""Fusion of the detections of all models x TTA views of one image.

Detections stay on their bounding-box crops throughout: a soft (float) mask per instance on its own
crop (:class:`SoftCrop`). Duplicates are found with NMS on mask IoU (sparse: a CSR matrix of the
binarised crops times its transpose, never a dense N x H*W array) or box IoU, between detections of
the same label only; optionally the suppressed duplicates' soft masks are averaged into their keeper.
:func:`fuse` takes its settings as config objects, like post-processing: the image's cell-type
:class:`~cellseg.config.manifest.ClassThresholds` and the manifest's :class:`~cellseg.config.manifest.FusionConfig`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import sparse
from torchvision.ops import box_iou

from cellseg.config.manifest import ClassThresholds, FusionConfig


@dataclass(frozen=True)
class SoftCrop:
    """Mask probabilities ``prob`` (h, w) float32 placed with the top-left corner at (top, left)."""

    top: int
    left: int
    prob: np.ndarray

    @property
    def box(self) -> tuple[int, int, int, int]:
        h, w = self.prob.shape
        return (self.left, self.top, self.left + w, self.top + h)


@dataclass
class Detections:
    """N detections of one image, struct-of-arrays.

    ``boxes`` (N, 4) float32 x0, y0, x1, y1 in image pixels; ``scores`` (N,) float32; ``labels`` (N,)
    int64 class ids (1 = shsy5y, 2 = astro, 3 = cort); ``masks``: N soft crops; ``source`` (N,) int64
    index of the (model, view) pair that produced it; ``weight`` (N,) float32 its model's ensemble
    weight.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: list[SoftCrop]
    source: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    weight: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    def __post_init__(self) -> None:
        n = len(self.scores)
        if len(self.source) != n:
            self.source = np.zeros(n, dtype=np.int64)
        if len(self.weight) != n:
            self.weight = np.ones(n, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, index: np.ndarray | Sequence[int]) -> Detections:
        idx = np.asarray(index, dtype=np.int64)
        return Detections(
            self.boxes[idx],
            self.scores[idx],
            self.labels[idx],
            [self.masks[i] for i in idx],
            self.source[idx],
            self.weight[idx],
        )

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), [])

    @classmethod
    def concat(cls, parts: Sequence[Detections]) -> Detections:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.labels for p in parts]),
            [m for p in parts for m in p.masks],
            np.concatenate([p.source for p in parts]),
            np.concatenate([p.weight for p in parts]),
        )


def binary_pixels_matrix(masks: Sequence[SoftCrop], threshold: float, height: int, width: int) -> sparse.csr_matrix:
    """(N, height*width) sparse bool matrix: row i holds the full-frame flat indices of mask i >= threshold."""
    rows, cols = [], []
    for i, m in enumerate(masks):
        r, c = np.nonzero(m.prob >= threshold)
        rows.append(np.full(r.size, i, dtype=np.int64))
        cols.append((r + m.top).astype(np.int64) * width + (c + m.left))
    row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    col = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    data = np.ones(row.size, dtype=np.int32)
    return sparse.csr_matrix((data, (row, col)), shape=(len(masks), height * width))


def mask_iou_sparse(masks: Sequence[SoftCrop], threshold: float, height: int, width: int) -> sparse.csr_matrix:
    """Pairwise IoU of the binarised masks, only for overlapping pairs: (N, N) CSR float32.

    Intersections come from one sparse product ``B @ B.T`` (cost ~ sum over pixels of depth^2).
    The diagonal is included (IoU 1 for non-empty masks).
    """
    b = binary_pixels_matrix(masks, threshold, height, width)
    area = np.asarray(b.sum(axis=1)).ravel().astype(np.float32)
    inter = (b @ b.T).tocoo()
    union = area[inter.row] + area[inter.col] - inter.data
    iou = np.where(union > 0, inter.data / np.maximum(union, 1), 0).astype(np.float32)
    return sparse.csr_matrix((iou, (inter.row, inter.col)), shape=(len(masks), len(masks)))


def box_iou_sparse(boxes: np.ndarray, chunk: int = 1024) -> sparse.csr_matrix:
    """Pairwise box IoU (torchvision.ops.box_iou) kept only where > 0: (N, N) CSR float32, in row chunks."""
    n = len(boxes)
    t = torch.as_tensor(boxes, dtype=torch.float32)
    rows, cols, vals = [], [], []
    for s in range(0, n, chunk):
        m = box_iou(t[s : s + chunk], t)
        r, c = torch.nonzero(m > 0, as_tuple=True)
        rows.append(r.numpy() + s)
        cols.append(c.numpy())
        vals.append(m[r, c].numpy())
    if not rows:
        return sparse.csr_matrix((n, n), dtype=np.float32)
    return sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n), dtype=np.float32
    )


def greedy_nms(iou: sparse.csr_matrix, scores: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy NMS on a sparse IoU matrix.

    Args:
        iou: (N, N) CSR pairwise IoU (pairs absent from it never suppress each other).
        scores: (N,) detection scores.
        threshold: the IoU above which a keeper suppresses a lower-scored neighbour (compared in float32).

    Returns:
        ``(keep, owner)``: kept indices in descending score order and (N,) int64 the keeper index each
        detection was merged into (itself for keepers).
    """
    thr = np.float32(threshold)
    n = len(scores)
    order = np.argsort(-scores, kind="stable")
    owner = np.full(n, -1, dtype=np.int64)
    keep = []
    indptr, indices, data = iou.indptr, iou.indices, iou.data
    for i in order:
        if owner[i] >= 0:
            continue
        owner[i] = i
        keep.append(i)
        nb = indices[indptr[i] : indptr[i + 1]]
        v = data[indptr[i] : indptr[i + 1]]
        nb = nb[(v > thr) & (owner[nb] < 0)]
        owner[nb] = i
    return np.asarray(keep, dtype=np.int64), owner


def average_crops(masks: Sequence[SoftCrop], weights: np.ndarray) -> SoftCrop:
    """Weighted mean of soft crops on the union of their boxes (a crop contributes 0 outside itself)."""
    if len(masks) == 1:
        return masks[0]
    top = min(m.top for m in masks)
    left = min(m.left for m in masks)
    bottom = max(m.top + m.prob.shape[0] for m in masks)
    right = max(m.left + m.prob.shape[1] for m in masks)
    acc = np.zeros((bottom - top, right - left), dtype=np.float32)
    for m, w in zip(masks, weights):
        h, ww = m.prob.shape
        acc[m.top - top : m.top - top + h, m.left - left : m.left - left + ww] += w * m.prob
    return SoftCrop(top, left, acc / max(float(np.sum(weights)), 1e-12))


def pairwise_iou(
    dets: Detections, height: int, width: int, iou_type: str = "mask", mask_threshold: float = 0.5
) -> sparse.csr_matrix:
    """Sparse (N, N) IoU of the detections: mask IoU of the binarised crops, or box IoU."""
    if iou_type == "mask":
        return mask_iou_sparse(dets.masks, mask_threshold, height, width)
    if iou_type == "box":
        return box_iou_sparse(dets.boxes)
    raise ValueError(f"iou_type must be 'mask' or 'box', got {iou_type!r}")


def fuse(
    dets: Detections,
    thresholds: ClassThresholds,
    config: FusionConfig,
    height: int,
    width: int,
    *,
    total_weight: float = 1.0,
    iou: sparse.csr_matrix | None = None,
) -> Detections:
    """Merge the duplicates that several views and models found of one object (greedy NMS, class-wise).

    Args:
        dets: N pre-fusion detections of one (height, width) image (any order).
        thresholds: the image's cell-type thresholds: ``nms_iou`` is the IoU above which a higher-scored
            detection suppresses a same-label one; ``mask_threshold`` binarises the soft masks for mask IoU.
        config: ``iou_type`` (mask or box IoU), ``average_masks`` (the keeper's mask becomes the
            score x model-weight average of its cluster) and ``score_mode`` (``max`` keeps the keeper's
            score; ``mean`` sums, per (model, view) source, the best score x model weight in the cluster
            and divides by ``total_weight``).
        total_weight: summed weight of every model x view that ran (``mean`` score mode only).
        iou: a precomputed :func:`pairwise_iou` of ``dets`` (lets a threshold search reuse it).

    Returns:
        The keepers as :class:`Detections` (descending score), boxes recomputed from their (averaged) crops.
    """
    n = len(dets)
    if n == 0:
        return Detections.empty()
    average_masks, score_mode = config.average_masks, config.score_mode
    if iou is None:
        iou = pairwise_iou(dets, height, width, config.iou_type, thresholds.mask_threshold)
    coo = iou.tocoo()
    same = dets.labels[coo.row] == dets.labels[coo.col]
    iou = sparse.csr_matrix((coo.data[same], (coo.row[same], coo.col[same])), shape=iou.shape)
    keep, owner = greedy_nms(iou, dets.scores, thresholds.nms_iou)
    if not average_masks and score_mode == "max":
        return dets.take(keep)
    members = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[members], keep, side="left"), np.searchsorted(owner[members], keep, side="right")
    masks, scores = [], []
    for k, lo, hi in zip(keep, *bounds):
        group = members[lo:hi]
        w = dets.scores[group] * dets.weight[group]
        masks.append(average_crops([dets.masks[g] for g in group], w) if average_masks else dets.masks[k])
        if score_mode == "mean":
            best: dict[int, float] = {}
            for g in group:
                s = float(dets.scores[g] * dets.weight[g])
                best[int(dets.source[g])] = max(best.get(int(dets.source[g]), 0.0), s)
            scores.append(sum(best.values()) / max(total_weight, 1e-12))
        else:
            scores.append(float(dets.scores[k]))
    out = Detections(
        np.array([m.box for m in masks], dtype=np.float32).reshape(-1, 4),
        np.asarray(scores, dtype=np.float32),
        dets.labels[keep].copy(),
        masks,
        dets.source[keep].copy(),
        dets.weight[keep].copy(),
    )
    order = np.argsort(-out.scores, kind="stable")
    return out.take(order)
