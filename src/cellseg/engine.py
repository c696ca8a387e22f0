"""Model outputs -> competition instances, and the validation pass used during training.

:func:`predict_crops` runs a torchvision Mask R-CNN on grey images and returns, per image, the
instances as non-overlapping :class:`~cellseg.data.masks.CropMask` objects (soft masks thresholded,
overlaps removed by painting in descending score order). It never materialises the
(N, 1, H, W) full-frame mask stack torchvision's ``postprocess`` builds (1000 detections on a
520 x 704 image would be 1.4 GB): each 28 x 28 mask is resized into its own box only, exactly as
``torchvision.models.detection.roi_heads.paste_mask_in_image`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import resize_boxes

from cellseg.data.masks import CropMask
from cellseg.io import read_gray
from cellseg.metric import ScoreReport, score_images
from cellseg.progress import progress as progress_bar


def gray_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W) uint8 grey -> (3, H, W) float32 in [0, 1] (grey repeated), the models' input."""
    t = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(torch.float32).div_(255.0)  # writable copy
    return t.unsqueeze(0).expand(3, -1, -1).contiguous()


@dataclass
class Detections:
    """Raw detections of one image in original pixel coordinates (scores descending).

    boxes (N, 4) float32 x0, y0, x1, y1; scores (N,); labels (N,) int64; masks (N, M, M) float32
    soft masks on the boxes (torchvision's 28 x 28 mask-head output after the sigmoid).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor


@torch.no_grad()
def detect(model: nn.Module, images: Sequence[torch.Tensor]) -> list[Detections]:
    """Run ``model`` (eval mode) on (3, H, W) images; detections in original coordinates, masks unpasted."""
    sizes = [tuple(int(s) for s in im.shape[-2:]) for im in images]
    m: Any = model  # torchvision's parts are typed nn.Module: calls through them are dynamic
    image_list, _ = m.transform(list(images))
    features = m.backbone(image_list.tensors)
    proposals, _ = m.rpn(image_list, features)
    dets, _ = m.roi_heads(features, proposals, image_list.image_sizes)
    out = []
    for det, resized, orig in zip(dets, image_list.image_sizes, sizes):
        out.append(
            Detections(
                boxes=resize_boxes(det["boxes"], resized, orig).float().cpu(),
                scores=det["scores"].float().cpu(),
                labels=det["labels"].cpu(),
                masks=det["masks"][:, 0].float().cpu(),
            )
        )
    return out


def paste_crops(
    masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5
) -> list[CropMask]:
    """Binarise (N, M, M) soft masks on their (N, 4) boxes into crops of a (height, width) image.

    Same geometry as torchvision's ``paste_masks_in_image`` (1 px padding, bilinear resize, box
    rounded to ints, clipped to the image), but each mask only on its box. Returns N crops (tight;
    an empty mask gives a (0, 0) crop).
    """
    if len(masks) == 0:
        return []
    padded, scale = expand_masks(masks[:, None], padding=1)
    ex = expand_boxes(boxes, scale).to(torch.int64)
    out = []
    for m, b in zip(padded, ex):
        x0, y0, x1, y1 = (int(v) for v in b)
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        soft = F.interpolate(m[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x1 + 1, width), min(y1 + 1, height)
        if cx1 <= cx0 or cy1 <= cy0:
            out.append(CropMask(0, 0, np.zeros((0, 0), dtype=bool)))
            continue
        crop = (soft[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] > threshold).numpy()
        out.append(CropMask(cy0, cx0, crop).tight() if crop.any() else CropMask(0, 0, np.zeros((0, 0), dtype=bool)))
    return out


def remove_overlaps(
    crops: Sequence[CropMask], height: int, width: int, min_pixels: int = 1
) -> tuple[list[CropMask], list[int]]:
    """Paint crops in the given order (highest score first): a pixel goes to the first crop claiming it.

    Returns the surviving crops (tight, >= ``min_pixels`` pixels left) and their indices in ``crops``.
    """
    taken = np.zeros((height, width), dtype=bool)
    kept, idx = [], []
    for i, c in enumerate(crops):
        if c.mask.size == 0:
            continue
        h, w = c.mask.shape
        view = taken[c.top : c.top + h, c.left : c.left + w]
        own = c.mask & ~view
        n = int(own.sum())
        if n < max(1, min_pixels):
            continue
        view |= own
        kept.append(CropMask(c.top, c.left, own).tight())
        idx.append(i)
    return kept, idx


def detections_to_crops(
    det: Detections, height: int, width: int, score_thresh: float = 0.5, mask_thresh: float = 0.5, min_pixels: int = 1
) -> list[CropMask]:
    """Score threshold -> binarise -> overlap removal in descending score order."""
    keep = det.scores >= score_thresh
    order = torch.argsort(det.scores[keep], descending=True)
    crops = paste_crops(det.masks[keep][order], det.boxes[keep][order], height, width, mask_thresh)
    return remove_overlaps(crops, height, width, min_pixels)[0]


def predict_crops(
    model: nn.Module,
    images: Sequence[np.ndarray],
    device: str | torch.device = "cpu",
    score_thresh: float = 0.5,
    mask_thresh: float = 0.5,
    min_pixels: int = 1,
) -> list[list[CropMask]]:
    """Instances of each (H, W) uint8 grey image, non-overlapping, highest score first."""
    model.eval()
    out = []
    for image in images:
        det = detect(model, [gray_to_tensor(image).to(device)])[0]
        out.append(detections_to_crops(det, image.shape[0], image.shape[1], score_thresh, mask_thresh, min_pixels))
    return out


def evaluate(
    model: nn.Module,
    truth: Mapping,
    image_dir: str | Path,
    device: str | torch.device = "cpu",
    score_thresh: float = 0.5,
    mask_thresh: float = 0.5,
    min_pixels: int = 1,
    progress: bool = True,
) -> ScoreReport:
    """Competition score of ``model`` on the images of ``truth`` (id -> ImageAnnotation) in ``image_dir``."""
    was_training = model.training
    preds = {}
    bar = progress_bar(total=len(truth), desc="validate", unit="img", enabled=progress, leave=False)
    for image_id in list(truth):
        image = read_gray(Path(image_dir) / f"{image_id}.png")
        preds[image_id] = predict_crops(model, [image], device, score_thresh, mask_thresh, min_pixels)[0]
        bar.update()
    bar.close()
    model.train(was_training)
    return score_images(truth, preds)
