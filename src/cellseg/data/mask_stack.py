"""Operations on (N, H, W) instance-mask stacks that touch each mask only inside its box.

A 340-cell 520 x 704 image carries a ~124 MB mask stack; flipping, rotating, resizing or re-boxing it
frame by frame costs several full copies. These helpers work box by box instead (the boxes must
contain their masks, as the dataset's do), so hundreds of cells cost about one zeroed stack plus N
box-sized copies. Used by the augmentation transforms (:mod:`cellseg.data.geometric`) and copy-paste
(:mod:`cellseg.data.copy_paste`); benchmarks/bench_dataset.py has the figures.
"""

from __future__ import annotations

import numpy as np


def take_rows(a: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a[idx]`` along axis 0 as one block copy per row: for (N, H, W) mask stacks this beats
    numpy fancy indexing / ``np.take`` and torch indexing (each several times slower on uint8)."""
    idx = np.asarray(idx, dtype=np.int64)
    if out is None:
        out = np.empty((idx.size,) + a.shape[1:], dtype=a.dtype)
    for j, i in enumerate(idx):
        out[j] = a[i]
    return out


def _rot90_boxes(b: np.ndarray, k: int, h: int, w: int) -> np.ndarray:
    """xyxy boxes on an (h, w) canvas after ``torch.rot90(., k, dims=(-2, -1))`` (k in 1, 3)."""
    x0, y0, x1, y1 = b.T
    if k == 1:  # pixel (r, c) -> (w - 1 - c, r)
        return np.stack([y0, w - x1, y1, w - x0], axis=1)
    return np.stack([h - y1, x0, h - y0, x1], axis=1)  # k == 3: (r, c) -> (c, h - 1 - r)


def dihedral_masks(
    masks: np.ndarray, boxes: np.ndarray, hflip: bool, vflip: bool, k: int, pad: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip, then vertical flip, then ``rot90`` by ``k`` of a mask stack, box by box.

    Args:
        masks: (N, H, W) bool/uint8; boxes: (N, 4) xyxy containing each mask (grown by ``pad``
            pixels for safety; pixels further out are not moved).
    Returns:
        masks (N, H', W') uint8 ((W, H) when k is odd) and the moved windows (N, 4) float32 xyxy,
        which contain the moved masks. Equal to flipping / rotating the whole stack, at the cost of
        one zeroed stack plus N window copies instead of full-frame copies.
    """
    n, h, w = masks.shape
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    win = (
        np.stack(
            [
                np.clip(np.floor(b[:, 0]) - pad, 0, w),
                np.clip(np.floor(b[:, 1]) - pad, 0, h),
                np.clip(np.ceil(b[:, 2]) + pad, 0, w),
                np.clip(np.ceil(b[:, 3]) + pad, 0, h),
            ],
            axis=1,
        )
        .astype(np.int64)
        .reshape(-1, 4)
    )
    moved = win.copy()
    if hflip:
        moved[:, [0, 2]] = w - moved[:, [2, 0]]
    if vflip:
        moved[:, [1, 3]] = h - moved[:, [3, 1]]
    if k:
        moved = _rot90_boxes(moved, k, h, w)
    oh, ow = (w, h) if k % 2 else (h, w)
    out = np.zeros((n, oh, ow), dtype=np.uint8)
    for i in range(n):
        x0, y0, x1, y1 = win[i]
        if x1 <= x0 or y1 <= y0:
            continue
        sub = masks[i, y0:y1, x0:x1]
        if hflip:
            sub = sub[:, ::-1]
        if vflip:
            sub = sub[::-1]
        if k:
            sub = np.rot90(sub, k)
        X0, Y0, X1, Y1 = moved[i]
        out[i, Y0:Y1, X0:X1] = sub
    return out, moved.astype(np.float32)


def resized_crop_masks(
    masks: np.ndarray,
    boxes: np.ndarray,
    top: int,
    left: int,
    height: int,
    width: int,
    size: tuple[int, int],
    index: np.ndarray | None = None,
    return_boxes: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour ``resized_crop`` of a mask stack, one instance box at a time.

    Args:
        masks: (N, H, W) bool/uint8; boxes: (N, 4) xyxy that contain each mask (pixels outside a
            box are ignored); top, left, height, width: the source window; size: output (h, w);
        index: the instances to keep (default all), in output order.
    Returns:
        (len(index), h, w) uint8, sampled like ``torch.nn.functional.interpolate(mode="nearest")``
        (source index = floor(dst * in / out)). Cost ~ N box-sized copies plus one zeroed stack,
        instead of resampling N full frames. With ``return_boxes`` also the (len(index), 4) float32
        xyxy output windows, which contain each output mask.
    """
    ch, cw = size
    ys = np.minimum((np.arange(ch) * (height / ch)).astype(np.int64), height - 1) + top
    xs = np.minimum((np.arange(cw) * (width / cw)).astype(np.int64), width - 1) + left
    index = np.arange(len(masks)) if index is None else np.asarray(index, dtype=np.int64)
    out = np.zeros((index.size, ch, cw), dtype=np.uint8)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[index]
    r0 = np.searchsorted(ys, np.floor(b[:, 1]), "left")
    r1 = np.searchsorted(ys, np.ceil(b[:, 3]), "left")
    c0 = np.searchsorted(xs, np.floor(b[:, 0]), "left")
    c1 = np.searchsorted(xs, np.ceil(b[:, 2]), "left")
    for i, k in enumerate(index):
        if r0[i] < r1[i] and c0[i] < c1[i]:
            out[i, r0[i] : r1[i], c0[i] : c1[i]] = masks[k][ys[r0[i] : r1[i]]][:, xs[c0[i] : c1[i]]]
    if return_boxes:
        return out, np.stack([c0, r0, c1, r1], axis=1).astype(np.float32).reshape(-1, 4)
    return out


def tight_boxes_near(masks: np.ndarray, boxes: np.ndarray, pad: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Tight boxes and areas of ``masks`` (N, H, W), scanning only around approximate ``boxes``.

    ``boxes`` (N, 4) xyxy must hold each mask to within ``pad`` pixels (true after flips/rot90,
    and after nearest-neighbour resizing, which moves an edge by at most one pixel). An instance
    whose pixels reach the edge of its scanned window is re-scanned over the whole frame, so a
    wrong box costs time, never correctness. Returns boxes (N, 4) float32 (exclusive max corner;
    empty masks -> zeros) and areas (N,) int64. Reads ~N box-sized windows instead of N * H * W.
    """
    n, h, w = masks.shape
    out = np.zeros((n, 4), dtype=np.float32)
    area = np.zeros(n, dtype=np.int64)
    b = np.nan_to_num(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    x0s = np.clip(np.floor(b[:, 0]) - pad, 0, w).astype(int)
    y0s = np.clip(np.floor(b[:, 1]) - pad, 0, h).astype(int)
    x1s = np.clip(np.ceil(b[:, 2]) + pad, 0, w).astype(int)
    y1s = np.clip(np.ceil(b[:, 3]) + pad, 0, h).astype(int)
    for i in range(n):
        y0, y1, x0, x1 = y0s[i], y1s[i], x0s[i], x1s[i]
        sub = masks[i, y0:y1, x0:x1]
        rows = np.flatnonzero(sub.any(axis=1))
        if rows.size:
            cols = np.flatnonzero(sub.any(axis=0))
            touches = (
                (rows[0] == 0 and y0 > 0)
                or (rows[-1] == sub.shape[0] - 1 and y1 < h)
                or (cols[0] == 0 and x0 > 0)
                or (cols[-1] == sub.shape[1] - 1 and x1 < w)
            )
        if not rows.size or touches:  # empty window or mask may continue outside: scan the frame
            y0 = x0 = 0
            sub = masks[i]
            rows = np.flatnonzero(sub.any(axis=1))
            if not rows.size:
                continue
            cols = np.flatnonzero(sub.any(axis=0))
        out[i] = (x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1)
        area[i] = np.count_nonzero(sub)
    return out, area
