"""Training augmentation: geometric + photometric transforms and copy-paste.

:class:`~cellseg.model.experiment.AugmentConfig` (defined with the rest of the experiment config, so the
inference path never imports this module) is the ``augment`` section of an experiment config (plain typed fields with
defaults, loaded by :func:`cellseg.config.from_dict`). Every field's "off" value is documented; the
defaults are a mild, always-safe policy (flips, rot90, small brightness/contrast changes).

:func:`build_transform` turns it into a ``torchvision.transforms.v2`` pipeline that maps one sample
``(image, target)`` with::

    image:  tv_tensors.Image (C, H, W) uint8 (C = 1: grey)
    target: {"boxes": tv_tensors.BoundingBoxes (N, 4) XYXY, "labels": (N,) int64,
             "masks": tv_tensors.Mask (N, H, W) uint8, ...other keys passed through}

to the same structure with the image float32 in [0, 1]. After the geometric ops the boxes are
recomputed from the masks (tight, exclusive max corner), instances under ``min_area`` pixels are
dropped, and ``v2.SanitizeBoundingBoxes`` removes anything degenerate; zero instances is fine.
Randomness comes from torch's global generator (seeded per DataLoader worker by torch).

Speed: a 340-cell image carries a ~124 MB (N, H, W) mask stack, so the geometric ops move masks box
by box (the sample's boxes must contain their masks, as the dataset's do) instead of copying whole
frames; images and boxes use torchvision's kernels. benchmarks/bench_dataset.py has the figures.

:func:`copy_paste` is the pure numpy copy-paste step (Ghiasi et al. 2021), run by the dataset
before the transforms.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cellseg.model.experiment import AugmentConfig


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of a (N, H, W) mask stack: (N, 4) float32 x0, y0, x1, y1, exclusive max corner.

    Empty masks get (0, 0, 0, 0). Vectorised (row/column ``any`` + argmax), unlike
    ``torchvision.ops.masks_to_boxes`` which loops over masks and uses an inclusive max corner.
    """
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    m = masks.bool()
    rows = m.any(dim=2)  # (N, H)
    cols = m.any(dim=1)  # (N, W)
    nonempty = rows.any(dim=1)
    y0 = rows.int().argmax(dim=1)
    y1 = h - rows.flip(1).int().argmax(dim=1)
    x0 = cols.int().argmax(dim=1)
    x1 = w - cols.flip(1).int().argmax(dim=1)
    out = torch.stack([x0, y0, x1, y1], dim=1).to(torch.float32)
    out[~nonempty] = 0
    return out


class RandomRot90(v2.Transform):
    """With probability ``p`` rotate by 90 or 270 degrees (equally likely); H and W swap.

    ``torch.rot90`` on images and masks (exact, no interpolation); boxes are mapped exactly.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if torch.rand(()) >= self.p:
            return {"k": 0}
        return {"k": 1 if torch.rand(()) < 0.5 else 3}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return rot90(inpt, params["k"])


def rot90(inpt: Any, k: int) -> Any:
    """``torch.rot90(., k, dims=(-2, -1))`` for images, masks and pure tensors; exact box mapping for
    BoundingBoxes (canvas (h, w) -> (w, h) for odd k); anything else unchanged."""
    k %= 4
    if k == 0:
        return inpt
    if k == 2:
        return rot90(rot90(inpt, 1), 1)
    if isinstance(inpt, tv_tensors.BoundingBoxes):
        h, w = inpt.canvas_size
        b = F.convert_bounding_box_format(inpt, new_format=tv_tensors.BoundingBoxFormat.XYXY).as_subclass(torch.Tensor)
        x0, y0, x1, y1 = b.unbind(-1)
        # torch.rot90 k=1 moves pixel (r, c) to (w-1-c, r); k=3 moves it to (c, h-1-r).
        nb = torch.stack([y0, w - x1, y1, w - x0], -1) if k == 1 else torch.stack([h - y1, x0, h - y0, x1], -1)
        out = tv_tensors.BoundingBoxes(nb, format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(w, h))
        return F.convert_bounding_box_format(out, new_format=inpt.format)
    if isinstance(inpt, tv_tensors.TVTensor):  # Image, Mask, Video
        return tv_tensors.wrap(torch.rot90(inpt.as_subclass(torch.Tensor), k, dims=(-2, -1)), like=inpt)
    if isinstance(inpt, torch.Tensor) and inpt.ndim >= 2:  # a pure tensor treated as the image
        return torch.rot90(inpt, k, dims=(-2, -1))
    return inpt


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


class RandomFlipRot90(v2.Transform):
    """Horizontal flip (p ``hflip``), vertical flip (p ``vflip``) and rotation by 90/270 degrees
    (p ``rot90``), drawn independently -- the same distribution as ``v2.RandomHorizontalFlip``,
    ``v2.RandomVerticalFlip`` and :class:`RandomRot90` in a row -- applied as one operation.

    Images and boxes go through torchvision's kernels (``F.horizontal_flip``, ``F.vertical_flip``)
    and ``torch.rot90``. The (N, H, W) "masks" of an ``(image, {"boxes", "masks", ...})`` sample
    move box by box (:func:`dihedral_masks`; boxes must contain their masks, as the dataset's do),
    which avoids three full copies of a ~100 MB stack; its boxes become the moved windows
    (TightBoxes makes them tight). Any other input is moved whole.
    """

    def __init__(self, hflip: float = 0.5, vflip: float = 0.5, rot90: float = 0.5) -> None:
        super().__init__()
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h = bool(torch.rand(()) < self.hflip)
        v = bool(torch.rand(()) < self.vflip)
        k = 0
        if torch.rand(()) < self.rot90:
            k = 1 if torch.rand(()) < 0.5 else 3
        return {"h": h, "v": v, "k": k}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["h"]:
            inpt = self._call_kernel(F.horizontal_flip, inpt)
        if params["v"]:
            inpt = self._call_kernel(F.vertical_flip, inpt)
        return rot90(inpt, params["k"])

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        flat, spec = tree_flatten(sample)
        needs = self._needs_transform_list(flat)
        params = self.make_params([x for x, nd in zip(flat, needs) if nd])
        if not (params["h"] or params["v"] or params["k"]):
            return sample
        target = _instance_target(sample)
        if target is None:
            return tree_unflatten([self.transform(x, params) if nd else x for x, nd in zip(flat, needs)], spec)
        masks = target["masks"]
        out_masks, moved = dihedral_masks(
            masks.as_subclass(torch.Tensor).numpy(), _xyxy(target["boxes"]), params["h"], params["v"], params["k"]
        )
        rest = {key: v for key, v in target.items() if key not in ("masks", "boxes")}
        flat, spec = tree_flatten((sample[0], rest, *sample[2:]))
        needs = self._needs_transform_list(flat)
        out = tree_unflatten([self.transform(x, params) if nd else x for x, nd in zip(flat, needs)], spec)
        out[1]["boxes"] = tv_tensors.BoundingBoxes(
            torch.from_numpy(moved), format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=tuple(out_masks.shape[-2:])
        )
        out[1]["masks"] = tv_tensors.wrap(torch.from_numpy(out_masks), like=masks)
        return out


def take_rows(a: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a[idx]`` along axis 0 as one block copy per row: for (N, H, W) mask stacks this beats
    numpy fancy indexing / ``np.take`` and torch indexing (each several times slower on uint8)."""
    idx = np.asarray(idx, dtype=np.int64)
    if out is None:
        out = np.empty((idx.size,) + a.shape[1:], dtype=a.dtype)
    for j, i in enumerate(idx):
        out[j] = a[i]
    return out


def _select(t: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """``t[idx]`` along dim 0 (:func:`take_rows` on CPU), keeping the tv_tensor type."""
    if t.device.type == "cpu":
        out = torch.from_numpy(take_rows(t.as_subclass(torch.Tensor).numpy(), idx))
    else:
        out = t.as_subclass(torch.Tensor).index_select(0, torch.as_tensor(idx, device=t.device))
    return tv_tensors.wrap(out, like=t) if isinstance(t, tv_tensors.TVTensor) else out


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


def _instance_target(sample: Any) -> dict | None:
    """The target dict of a CPU ``(image, {"boxes", "masks" (N, H, W), ...})`` sample, else None."""
    target = sample[1] if isinstance(sample, (tuple, list)) and len(sample) >= 2 else None
    if (
        isinstance(target, dict)
        and isinstance(target.get("boxes"), tv_tensors.BoundingBoxes)
        and isinstance(target.get("masks"), tv_tensors.Mask)
        and target["masks"].ndim == 3
        and target["masks"].shape[0] == target["boxes"].shape[0]
        and target["masks"].device.type == "cpu"
    ):
        return target
    return None


def _xyxy(boxes: tv_tensors.BoundingBoxes) -> np.ndarray:
    b = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY)
    return b.as_subclass(torch.Tensor).numpy().astype(np.float64).reshape(-1, 4)


class RandomScaleCrop(v2.Transform):
    """Multi-scale short side (Detectron2 ``ResizeShortestEdge``) followed by a random crop.

    The scale ``s`` is ``choice(short_sides) / short side`` when ``short_sides`` is given, otherwise
    ``U(scale_range)``; ``max_size`` caps the long side. The crop (``crop_size``, clipped to the
    resized image; (0, 0) = whole image) is chosen in the resized frame and done as one
    ``F.resized_crop`` of the matching source window. Image bilinear, masks nearest-neighbour.

    For a sample ``(image, target)`` whose target has "boxes" (containing their masks, as the
    dataset's do) and a (N, H, W) "masks": instances whose box misses the window are dropped first
    (with every (N, ...) entry of the target), and masks are resampled box by box
    (:func:`resized_crop_masks`), so hundreds of cells cost little. Other inputs go through
    ``F.resized_crop``.
    """

    def __init__(
        self,
        scale_range: tuple[float, float] = (1.0, 1.0),
        short_sides: tuple[int, ...] = (),
        max_size: int = 0,
        crop_size: tuple[int, int] = (0, 0),
    ) -> None:
        super().__init__()
        self.scale_range = tuple(scale_range)
        self.short_sides = tuple(short_sides)
        self.max_size = max_size
        self.crop_size = tuple(crop_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        if self.short_sides:
            i = int(torch.randint(len(self.short_sides), ()))
            s = self.short_sides[i] / min(h, w)
        else:
            lo, hi = self.scale_range
            s = lo + float(torch.rand(())) * (hi - lo)
        if self.max_size and max(h, w) * s > self.max_size:
            s = self.max_size / max(h, w)
        rh, rw = max(1, round(h * s)), max(1, round(w * s))
        ch = min(self.crop_size[0] or rh, rh)
        cw = min(self.crop_size[1] or rw, rw)
        # source window of the crop, in whole source pixels
        sh, sw = min(h, max(1, round(ch / s))), min(w, max(1, round(cw / s)))
        top = int(torch.randint(h - sh + 1, ()))
        left = int(torch.randint(w - sw + 1, ()))
        return {
            "top": top,
            "left": left,
            "height": sh,
            "width": sw,
            "size": [ch, cw],
            "noop": (sh, sw, ch, cw) == (h, w, h, w),
        }

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        flat, _ = tree_flatten(sample)
        needs = self._needs_transform_list(flat)
        params = self.make_params([x for x, nd in zip(flat, needs) if nd])
        if params["noop"]:
            return sample
        target = _instance_target(sample)
        if target is None:
            flat, spec = tree_flatten(sample)
            needs = self._needs_transform_list(flat)
            return tree_unflatten([self.transform(x, params) if nd else x for x, nd in zip(flat, needs)], spec)
        masks, boxes = target["masks"], target["boxes"]
        n = boxes.shape[0]
        b = _xyxy(boxes)
        t, l, h, w = params["top"], params["left"], params["height"], params["width"]
        idx = np.flatnonzero((b[:, 0] < l + w) & (b[:, 2] > l) & (b[:, 1] < t + h) & (b[:, 3] > t))
        out_masks, windows = resized_crop_masks(
            masks.as_subclass(torch.Tensor).numpy(), b, t, l, h, w, tuple(params["size"]), index=idx, return_boxes=True
        )
        rest = {}
        for key, v in target.items():
            if key in ("masks", "boxes"):
                continue
            if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n and idx.size < n:
                v = _select(v, idx)
            rest[key] = v
        flat, spec = tree_flatten((sample[0], rest, *sample[2:]))
        needs = self._needs_transform_list(flat)
        out = tree_unflatten([self.transform(x, params) if nd else x for x, nd in zip(flat, needs)], spec)
        # boxes: the output windows of the kept instances (they contain the masks; TightBoxes tightens)
        out[1]["boxes"] = tv_tensors.BoundingBoxes(
            torch.from_numpy(windows), format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=tuple(params["size"])
        )
        out[1]["masks"] = tv_tensors.wrap(torch.from_numpy(out_masks), like=masks)
        return out

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        args = (params["top"], params["left"], params["height"], params["width"])
        if isinstance(inpt, tv_tensors.Mask) and inpt.ndim == 3 and inpt.shape[0] == 0:
            return tv_tensors.wrap(inpt.new_zeros((0, *params["size"])), like=inpt)
        if isinstance(inpt, tv_tensors.Mask) and (params["height"], params["width"]) == tuple(params["size"]):
            return F.crop(inpt, *args)  # pure crop: a view, no resampling
        return self._call_kernel(F.resized_crop, inpt, *args, size=params["size"])


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


class TightBoxes(v2.Transform):
    """Recompute ``target["boxes"]`` from ``target["masks"]`` and drop instances under ``min_area`` px.

    Works on a sample ``(image, target)`` or a target dict with "boxes" and "masks"; every other
    (N, ...) tensor in the dict ("labels", ...) is filtered the same way. The incoming boxes only
    say where to look (see :func:`tight_boxes_near`), so this stays cheap for hundreds of masks.
    """

    def __init__(self, min_area: int = 1) -> None:
        super().__init__()
        self.min_area = max(1, int(min_area))

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        target = sample[1] if isinstance(sample, (tuple, list)) else sample
        masks: tv_tensors.Mask = target["masks"]
        n = masks.shape[0]
        old = F.convert_bounding_box_format(target["boxes"], new_format=tv_tensors.BoundingBoxFormat.XYXY)
        boxes, area = tight_boxes_near(masks.as_subclass(torch.Tensor).numpy(), old.as_subclass(torch.Tensor).numpy())
        keep = area >= self.min_area
        new = dict(target)
        if not keep.all():
            idx = np.flatnonzero(keep)
            for key, val in target.items():
                if isinstance(val, torch.Tensor) and val.ndim >= 1 and val.shape[0] == n and key != "boxes":
                    new[key] = _select(val, idx)
            boxes = boxes[keep]
        new["boxes"] = tv_tensors.BoundingBoxes(
            torch.from_numpy(boxes), format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=tuple(masks.shape[-2:])
        )
        if isinstance(sample, (tuple, list)):
            return type(sample)([sample[0], new, *sample[2:]])
        return new


class SanitizeBoundingBoxes(v2.SanitizeBoundingBoxes):
    """``v2.SanitizeBoundingBoxes`` that returns its inputs untouched when every box is valid
    (the stock one copies the whole (N, H, W) mask stack even then)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if bool(params["valid"].all()):
            return inpt
        if isinstance(inpt, tv_tensors.Mask) and inpt.ndim == 3 and inpt.shape[0] == params["valid"].shape[0]:
            return _select(inpt, np.flatnonzero(params["valid"].cpu().numpy()))
        return super().transform(inpt, params)


class RandomGamma(v2.Transform):
    """``F.adjust_gamma`` with gamma ~ U(lo, hi) on images (float in [0, 1] or uint8)."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, gamma: tuple[float, float]) -> None:
        super().__init__()
        self.gamma = tuple(gamma)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lo, hi = self.gamma
        return {"gamma": lo + float(torch.rand(())) * (hi - lo)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.adjust_gamma, inpt, gamma=params["gamma"])


def _is_range(r: tuple[float, float], neutral: float = 1.0) -> bool:
    return tuple(r) != (neutral, neutral)


def build_transform(cfg: AugmentConfig) -> v2.Compose:
    """The train-time pipeline for ``cfg`` (see the module docstring for the sample layout).

    Order: scale + crop, flips + rot90 (one :class:`RandomFlipRot90`) -> tight boxes, min area,
    SanitizeBoundingBoxes -> float
    [0, 1] -> brightness/contrast, gamma, noise. With ``cfg.enabled`` False only the dtype step and
    the box/area clean-up remain.
    """
    steps: list[v2.Transform] = []
    if cfg.enabled:
        # scale + crop first: the flips then copy only the cropped masks (a uniformly placed crop
        # commutes with the flips in distribution).
        if cfg.short_sides or _is_range(cfg.scale_range) or any(cfg.crop_size) or cfg.max_size:
            steps.append(RandomScaleCrop(cfg.scale_range, cfg.short_sides, cfg.max_size, cfg.crop_size))
        if cfg.hflip > 0 or cfg.vflip > 0 or cfg.rot90 > 0:
            steps.append(RandomFlipRot90(cfg.hflip, cfg.vflip, cfg.rot90))
    steps += [TightBoxes(cfg.min_area), SanitizeBoundingBoxes(min_size=1), v2.ToDtype(torch.float32, scale=True)]
    if cfg.enabled:
        if _is_range(cfg.brightness) or _is_range(cfg.contrast):
            steps.append(v2.ColorJitter(brightness=tuple(cfg.brightness), contrast=tuple(cfg.contrast)))
        if _is_range(cfg.gamma):
            steps.append(RandomGamma(cfg.gamma))
        if cfg.noise_sigma > 0 and cfg.noise_p > 0:
            steps.append(v2.RandomApply([v2.GaussianNoise(sigma=cfg.noise_sigma, clip=True)], p=cfg.noise_p))
    return v2.Compose(steps)


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
