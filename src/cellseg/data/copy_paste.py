"""Copy-paste augmentation (Ghiasi et al. 2021) on numpy arrays, run by the dataset before the transforms.

:func:`copy_paste` pastes 1..``max_cells`` cells of a source image onto a target image at their own
place; covered target cells lose the pasted pixels and are dropped when too little is left.
:func:`copy_paste_indexed` also says which input and source instances survive, so the dataset can
carry their boxes along instead of recomputing them.
"""

from __future__ import annotations

import numpy as np

from cellseg.data.mask_stack import take_rows


def _fit(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Crop or zero-pad the last two axes of ``a`` to (h, w)."""
    out = np.zeros(a.shape[:-2] + (h, w), dtype=a.dtype)
    hh, ww = min(h, a.shape[-2]), min(w, a.shape[-1])
    out[..., :hh, :ww] = a[..., :hh, :ww]
    return out


def copy_paste(
    image: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    src_image: np.ndarray,
    src_masks: np.ndarray,
    src_labels: np.ndarray,
    rng: np.random.Generator,
    max_cells: int,
    min_area: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simple copy-paste (Ghiasi et al. 2021): paste 1..``max_cells`` source cells at their own place.

    Args:
        image: (H, W) grey (any dtype) target image; masks (N, H, W) bool/uint8; labels (N,) int.
        src_image: (H', W') source image, same dtype; src_masks (M, H', W'); src_labels (M,).
            A source of another size is cropped/zero-padded at its top-left corner to (H, W).
        rng: numpy Generator choosing how many (uniform in 1..min(max_cells, M)) and which cells.
        max_cells: most cells pasted; < 1 or no non-empty source cell returns the inputs unchanged.
        min_area: instances (old or pasted) with fewer pixels left are dropped.

    Returns:
        ``(image, masks, labels)``: pasted pixels take the source's values; existing masks lose the
        pixels under pasted cells and are dropped when fully covered (or under ``min_area``);
        pasted masks are appended after the surviving ones in source order. masks come back (N'', H, W)
        bool, labels int64. The inputs are not modified.
    """
    image, masks, labels, _, _ = copy_paste_indexed(
        image, masks, labels, src_image, src_masks, src_labels, rng, max_cells, min_area
    )
    return image, masks, labels


def copy_paste_indexed(
    image: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    src_image: np.ndarray,
    src_masks: np.ndarray,
    src_labels: np.ndarray,
    rng: np.random.Generator,
    max_cells: int,
    min_area: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`copy_paste` that also returns ``kept`` (indices of the surviving input instances) and
    ``pasted`` (indices of the pasted source instances), in output order, e.g. to carry boxes along."""
    h, w = image.shape[-2:]
    masks = np.asarray(masks).astype(bool, copy=False)
    labels = np.asarray(labels, dtype=np.int64)
    min_area = max(1, int(min_area))
    src = np.asarray(src_masks).astype(bool, copy=False)
    if src.shape[-2:] != (h, w):
        src = _fit(src, h, w)
        src_image = _fit(np.asarray(src_image), h, w)
    areas = src.reshape(len(src), -1).sum(1) if len(src) else np.zeros(0, dtype=np.int64)
    candidates = np.flatnonzero(areas >= min_area)
    if max_cells < 1 or candidates.size == 0:
        return image, masks, labels, np.arange(len(masks)), np.zeros(0, dtype=np.int64)
    k = int(rng.integers(1, min(max_cells, candidates.size) + 1))
    chosen = np.sort(rng.choice(candidates, size=k, replace=False))
    pasted = src[chosen]
    alpha = pasted.any(axis=0)
    out_image = np.array(image, copy=True)
    out_image[alpha] = np.asarray(src_image)[alpha]
    keep = np.ones(len(masks), dtype=bool)
    hit = np.zeros(0, dtype=np.int64)
    if len(masks):
        hit = np.flatnonzero(masks[:, alpha].any(axis=1))  # only instances touching pasted pixels change
        if hit.size:
            covered = masks[hit] & ~alpha
            keep[hit] = covered.reshape(hit.size, -1).sum(1) >= min_area
    kept = np.flatnonzero(keep)
    # one copy of the surviving masks straight into the output (the stack can be ~100 MB)
    out_masks = np.empty((kept.size + k, h, w), dtype=bool)
    take_rows(masks, kept, out=out_masks[: kept.size])
    if hit.size:
        survivors = keep[hit]
        out_masks[np.searchsorted(kept, hit[survivors])] = covered[survivors]
    out_masks[kept.size :] = pasted
    out_labels = np.concatenate([labels[kept], np.asarray(src_labels, dtype=np.int64)[chosen]])
    return out_image, out_masks, out_labels, kept, chosen
