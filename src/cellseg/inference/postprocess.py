"""Post-processing of one image's fused detections, as small pure functions in this order:

score threshold -> mask binarisation -> hole filling -> minimum pixels -> overlap removal (higher
score keeps contested pixels). The cell-type vote comes before fusion
(:func:`cellseg.inference.ensemble.vote_cell_type`). The caller encodes the surviving crops
(:func:`cellseg.data.rle.encode_crop`: the folder runner for submission.csv, pseudo-labels for their csv).

Every threshold comes from the weights manifest (:class:`cellseg.config.manifest.ClassThresholds` of the
image's voted cell type, :class:`cellseg.config.manifest.PostprocessConfig`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellseg.config.manifest import ClassThresholds, PostprocessConfig
from cellseg.data.masks import CropMask, fill_holes
from cellseg.inference.fusion import Detections, SoftCrop


def score_filter(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Indices (K,) of scores >= threshold, in the given order."""
    return np.flatnonzero(np.asarray(scores) >= threshold)


def binarize(soft: SoftCrop, threshold: float) -> CropMask:
    """``prob >= threshold`` as a CropMask shrunk to its pixels (empty stays empty, same box)."""
    return CropMask(soft.top, soft.left, soft.prob >= threshold).tight()


def min_pixels_filter(crops: Sequence[CropMask], min_pixels: int) -> np.ndarray:
    """Indices of crops with at least ``min_pixels`` pixels (and at least one)."""
    return np.array([i for i, c in enumerate(crops) if c.area >= max(min_pixels, 1)], dtype=np.int64)


def remove_overlaps(
    crops: Sequence[CropMask],
    scores: np.ndarray,
    height: int,
    width: int,
    max_lost_fraction: float = 0.5,
    min_pixels: int = 0,
) -> tuple[list[CropMask], np.ndarray]:
    """Make masks disjoint: in descending score order each instance keeps only unclaimed pixels.

    An instance that lost more than ``max_lost_fraction`` of its pixels, or keeps fewer than
    ``min_pixels`` (and at least 1), is dropped and claims nothing. Returns the surviving crops
    (tightened) and their indices into ``crops``, in descending score order.
    """
    taken = np.zeros((height, width), dtype=bool)
    out, kept = [], []
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        c = crops[i]
        h, w = c.mask.shape
        view = taken[c.top : c.top + h, c.left : c.left + w]
        own = c.mask & ~view
        n_own, n_all = int(own.sum()), c.area
        if n_own < max(min_pixels, 1) or n_all - n_own > max_lost_fraction * n_all:
            continue
        view |= own
        out.append(CropMask(c.top, c.left, own).tight())
        kept.append(int(i))
    return out, np.asarray(kept, dtype=np.int64)


def postprocess(
    dets: Detections, thresholds: ClassThresholds, config: PostprocessConfig, height: int, width: int
) -> tuple[list[CropMask], np.ndarray]:
    """Fused detections of one image -> final disjoint instances and their scores (descending).

    ``thresholds`` are those of the image's voted cell type; applies score threshold, binarisation,
    hole filling, minimum pixels and overlap removal.
    """
    idx = score_filter(dets.scores, thresholds.score)
    crops = [binarize(dets.masks[i], thresholds.mask_threshold) for i in idx]
    scores = dets.scores[idx]
    if config.fill_holes:
        crops = [fill_holes(c) for c in crops]
    keep = min_pixels_filter(crops, thresholds.min_pixels)
    crops, scores = [crops[i] for i in keep], scores[keep]
    crops, kept = remove_overlaps(crops, scores, height, width, config.max_lost_fraction, thresholds.min_pixels)
    return crops, scores[kept]
