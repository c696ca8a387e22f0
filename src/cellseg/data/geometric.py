"""Geometric augmentation as ``torchvision.transforms.v2`` transforms that move masks box by box.

Every transform maps one sample ``(image, target)`` with::

    image:  tv_tensors.Image (C, H, W)
    target: {"boxes": tv_tensors.BoundingBoxes (N, 4), "labels": (N,) int64,
             "masks": tv_tensors.Mask (N, H, W) uint8, ...other keys passed through}

to the same structure. :class:`RandomFlipRot90` (flips + rot90 as one op) and
:class:`RandomScaleCrop` (multi-scale short side + random crop) move the (N, H, W) masks box by box
(:mod:`cellseg.data.mask_stack`); :class:`TightBoxes` recomputes tight boxes from the moved masks
and drops instances under a minimum area; :class:`SanitizeBoundingBoxes` is torchvision's, minus its
full copy of the mask stack when every box is valid. :func:`cellseg.data.transforms.build_transform`
chains them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cellseg.data.mask_stack import dihedral_masks, resized_crop_masks, take_rows, tight_boxes_near


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


def _select(t: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """``t[idx]`` along dim 0 (:func:`take_rows` on CPU), keeping the tv_tensor type."""
    if t.device.type == "cpu":
        out = torch.from_numpy(take_rows(t.as_subclass(torch.Tensor).numpy(), idx))
    else:
        out = t.as_subclass(torch.Tensor).index_select(0, torch.as_tensor(idx, device=t.device))
    return tv_tensors.wrap(out, like=t) if isinstance(t, tv_tensors.TVTensor) else out


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


class RandomFlipRot90(v2.Transform):
    """Horizontal flip (p ``hflip``), vertical flip (p ``vflip``) and rotation by 90/270 degrees
    (p ``rot90``), drawn independently -- the same distribution as ``v2.RandomHorizontalFlip``,
    ``v2.RandomVerticalFlip`` and a random 90/270 degree rotation in a row -- applied as one operation.

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
