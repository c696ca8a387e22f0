"""Instance masks kept on their bounding-box crops.

A cell covers a few hundred pixels of a 520x704 image, so every per-instance operation in this
package works on a :class:`CropMask` (the tight box + a small boolean crop) and only label images
touch the full frame.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class CropMask:
    """One instance: ``mask`` (h, w) bool placed with its top-left corner at (``top``, ``left``)."""

    top: int
    left: int
    mask: np.ndarray

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), exclusive max corner (torchvision box convention)."""
        h, w = self.mask.shape
        return (self.left, self.top, self.left + w, self.top + h)

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def to_full(self, height: int, width: int) -> np.ndarray:
        """The (height, width) bool mask."""
        out = np.zeros((height, width), dtype=bool)
        h, w = self.mask.shape
        out[self.top : self.top + h, self.left : self.left + w] = self.mask
        return out

    def tight(self) -> CropMask:
        """The same pixels with the crop shrunk to their bounding box (an empty mask stays as is)."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        if rows.size == 0:
            return self
        cols = np.flatnonzero(self.mask.any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        return CropMask(self.top + int(r0), self.left + int(c0), self.mask[r0:r1, c0:c1])

    @classmethod
    def from_full(cls, mask: np.ndarray) -> CropMask:
        """From a (H, W) bool mask."""
        return cls(0, 0, np.asarray(mask, dtype=bool)).tight()


def fill_holes(crop: CropMask) -> CropMask:
    """``scipy.ndimage.binary_fill_holes`` on the crop only (same box, holes set)."""
    return CropMask(crop.top, crop.left, ndimage.binary_fill_holes(crop.mask))


def fill_holes_all(crops: Sequence[CropMask]) -> tuple[list[CropMask], int]:
    """Fill holes of every instance; returns the new crops and how many masks changed."""
    out, changed = [], 0
    for c in crops:
        f = fill_holes(c)
        if not np.array_equal(f.mask, c.mask):
            changed += 1
        out.append(f)
    return out, changed


def label_image(crops: Iterable[CropMask], height: int, width: int) -> tuple[np.ndarray, int]:
    """Paint instances into a label image.

    Returns ``(labels, overlap)``: labels (height, width) int32 with 0 = background and instance i
    (0-based in ``crops``) as i + 1; where instances overlap the later one wins. ``overlap`` counts
    pixels claimed by more than one instance (the Kaggle scorer rejects a submission with any).
    """
    labels = np.zeros((height, width), dtype=np.int32)
    overlap = 0
    for i, c in enumerate(crops, start=1):
        h, w = c.mask.shape
        view = labels[c.top : c.top + h, c.left : c.left + w]
        overlap += int(np.count_nonzero(view[c.mask]))
        view[c.mask] = i
    return labels, overlap


def instances(labels: np.ndarray) -> list[tuple[int, CropMask]]:
    """(label value, CropMask) of every instance in a label image, ascending by value: the inverse
    of :func:`label_image`.

    Args:
        labels: (H, W) integer label image, 0 = background.

    Returns:
        One pair per label value present; each CropMask sits in ``labels``' frame.
    """
    out = []
    for value, sl in enumerate(ndimage.find_objects(labels.astype(np.int64)), start=1):
        if sl is not None:
            out.append((value, CropMask(sl[0].start, sl[1].start, labels[sl] == value)))
    return out


def stack(crops: Sequence[CropMask], height: int, width: int) -> np.ndarray:
    """(N, height, width) bool mask stack."""
    out = np.zeros((len(crops), height, width), dtype=bool)
    for i, c in enumerate(crops):
        h, w = c.mask.shape
        out[i, c.top : c.top + h, c.left : c.left + w] = c.mask
    return out


def boxes(crops: Sequence[CropMask]) -> np.ndarray:
    """(N, 4) float32 boxes x0, y0, x1, y1 (exclusive max corner)."""
    return np.array([c.box for c in crops], dtype=np.float32).reshape(-1, 4)
