"""Raw inference: models x TTA views of one image -> detections with soft masks on their crops.

torchvision's Mask R-CNN would paste every 28 x 28 mask onto a full image (1000 x 520 x 704 floats
per view). Here the model's transform does not paste (``paste_masks = False``): the model returns
boxes in original-image coordinates and the 28 x 28 mask probabilities; :func:`paste_soft` then
samples each mask onto its own box crop only (``grid_sample``, vectorised in buckets of similar crop size).

Views (``identity``, ``hflip``, ``vflip``, ``hvflip``) are batched into one forward per model and
mapped back exactly: boxes mirrored, 28 x 28 masks flipped. On CUDA the convolutional parts (backbone,
RPN head, box head, mask head and mask predictor) run under fp16 autocast while box decoding stays in
fp32, with every BatchNorm folded into its convolution first (:func:`fold_batchnorm`), so the backbone
stays in half precision from end to end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cellseg import CELL_TYPES, CLASS_IDS
from cellseg.config.experiment import ModelConfig
from cellseg.config.manifest import FusionConfig, Manifest
from cellseg.errors import CellsegError
from cellseg.inference.fold import fold_batchnorm
from cellseg.inference.fusion import Detections, SoftCrop
from cellseg.model.build import image_tensor, set_input_scale
from cellseg.model.checkpoint import load_model
from cellseg.model.precision import half_precision

VIEW_FLIPS: dict[str, tuple[bool, bool]] = {  # view -> (horizontal, vertical)
    "identity": (False, False),
    "hflip": (True, False),
    "vflip": (False, True),
    "hvflip": (True, True),
}


def prepare_model(
    model: nn.Module,
    fusion: FusionConfig,
    device: torch.device,
    fp16: bool | None = None,
    fold_bn: bool = True,
) -> nn.Module:
    """Ready a torchvision MaskRCNN for ensemble inference (in place; returns it).

    Loosens the model's own filtering (``roi_heads.score_thresh``/``nms_thresh``/
    ``detections_per_img`` from the manifest's fusion section), keeps masks as 28 x 28
    probabilities, eval mode, moves to ``device``. ``fp16`` (default: on CUDA) runs the conv parts in
    fp16 autocast (:func:`cellseg.model.precision.half_precision`). ``fold_bn`` (default on) folds BatchNorms
    into their convolutions first (:func:`fold_batchnorm`), on every device, so the CPU runs (tests,
    dry runs) check the model the GPU runs; with the demo model the golden submission is unchanged.
    """
    if not hasattr(model, "roi_heads") or getattr(model.roi_heads, "mask_predictor", None) is None:
        raise CellsegError(f"{type(model).__name__} is not a Mask R-CNN (no roi_heads.mask_predictor)")
    # torchvision types a model's parts as nn.Module: attribute access on them is dynamic (Any)
    m: Any = model
    rh = m.roi_heads
    rh.score_thresh = float(fusion.model_score_thresh)
    rh.nms_thresh = float(fusion.model_nms_thresh)
    rh.detections_per_img = int(fusion.detections_per_view)
    if not hasattr(m.transform, "paste_masks"):
        raise CellsegError(
            f"{type(m.transform).__name__} cannot keep the masks for pasting on crops (not built by cellseg)"
        )
    m.transform.paste_masks = False  # boxes in the original frame, (N, 1, M, M) masks: paste_soft pastes them
    model.eval()
    if fp16 is None:
        fp16 = device.type == "cuda"
    if fold_bn:
        fold_batchnorm(model)
    model.to(device)
    if fp16:
        half_precision(model)
    return model


def flip_image(t: torch.Tensor, view: str) -> torch.Tensor:
    h, v = VIEW_FLIPS[view]
    dims = ([-1] if h else []) + ([-2] if v else [])
    return t.flip(dims) if dims else t


def unflip_boxes(boxes: torch.Tensor, view: str, height: int, width: int) -> torch.Tensor:
    """Boxes (N, 4) predicted on a flipped view -> original frame (a flip is its own inverse)."""
    h, v = VIEW_FLIPS[view]
    b = boxes.clone()
    if h:
        b[:, 0], b[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    if v:
        b[:, 1], b[:, 3] = height - boxes[:, 3], height - boxes[:, 1]
    return b


def unflip_masks(masks: torch.Tensor, view: str) -> torch.Tensor:
    """(N, M, M) mask probabilities on their boxes, flipped back like the boxes."""
    h, v = VIEW_FLIPS[view]
    dims = ([-1] if h else []) + ([-2] if v else [])
    return masks.flip(dims) if dims else masks


def crop_windows(boxes: np.ndarray, height: int, width: int, margin: int = 1) -> np.ndarray:
    """Integer crop (top, left, bottom, right) (N, 4) covering each box plus ``margin``, clipped."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    top = np.clip(np.floor(b[:, 1]) - margin, 0, height)
    left = np.clip(np.floor(b[:, 0]) - margin, 0, width)
    bottom = np.clip(np.ceil(b[:, 3]) + margin, 0, height)
    right = np.clip(np.ceil(b[:, 2]) + margin, 0, width)
    bottom = np.maximum(bottom, np.minimum(top + 1, height))
    right = np.maximum(right, np.minimum(left + 1, width))
    return np.stack([top, left, bottom, right], axis=1).astype(np.int64)


def paste_soft(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    height: int,
    width: int,
    bucket: int = 128,
    shift: float | np.ndarray = 0.25,
) -> list[SoftCrop]:
    """Paste (N, M, M) mask probabilities onto their boxes' crops, never onto the full image.

    Pixel (y, x) of the crop samples the M x M grid bilinearly at its centre, the mask spanning the
    box shifted by ``shift`` pixels down-right (the box edges are the outer edges of the mask's
    border cells; outside, the mask fades to 0 as in torchvision's zero-padded paste). Bilinear
    sampling with zero padding is separable, so each crop is ``Ry @ mask @ Rx.T`` with (h, M) and
    (w, M) tent-weight matrices (one batched numpy matmul per size bucket, no sampling grid; numpy
    because torch's intra-op threads only add overhead on these small arrays). torchvision
    builds the training targets with ``roi_align(aligned=False)``, which samples the truth half a
    pixel down-right and drops the box's left/top half pixel; pasting the targets of real masks
    back reproduces them best (IoU 0.998 vs 0.90 unshifted, tests/inference/test_forward.py) at 0.25 px, which
    also scores best with the trained demo model (benchmarks/README.md), the default (``fusion.paste_shift`` in the manifest). ``shift`` may be (N, 2) per-detection (x, y)
    shifts: a mask predicted on a flipped view is shifted in the flipped frame, so its shift
    changes sign along the flipped axis. Crops are the box + 1 px margin, clipped to
    the (height, width) image. Vectorised: detections sorted by crop size, padded to the largest
    crop of each ``bucket``. Returns N float32 SoftCrops in input order.
    """
    n = masks.shape[0]
    if n == 0:
        return []
    masks_np = masks.float().cpu().numpy()
    m_size = masks_np.shape[-1]
    boxes_np = boxes.float().cpu().numpy().astype(np.float64)
    sh = np.broadcast_to(
        np.asarray(shift, dtype=np.float64).reshape(-1, 2) if np.ndim(shift) else np.full((1, 2), float(shift)), (n, 2)
    )
    boxes_np = boxes_np + np.concatenate([sh, sh], axis=1)  # the mask's frame
    win = crop_windows(boxes_np, height, width)
    sizes = (win[:, 2] - win[:, 0]) * (win[:, 3] - win[:, 1])
    order = np.argsort(sizes, kind="stable")
    cells = np.arange(m_size, dtype=np.float32)
    win_list = win.tolist()
    out: list[SoftCrop | None] = [None] * n
    for s in range(0, n, bucket):
        idx = order[s : s + bucket]
        w = win[idx]
        hh, ww = int((w[:, 2] - w[:, 0]).max()), int((w[:, 3] - w[:, 1]).max())
        b = boxes_np[idx]
        bw = np.maximum(b[:, 2] - b[:, 0], 1e-3)
        bh = np.maximum(b[:, 3] - b[:, 1], 1e-3)
        # mask-cell coordinate of each crop row / column centre (cell centres at 0..M-1)
        u = ((w[:, 0:1] + np.arange(hh)[None] + 0.5 - b[:, 1:2]) / bh[:, None] * m_size - 0.5).astype(np.float32)
        v = ((w[:, 1:2] + np.arange(ww)[None] + 0.5 - b[:, 0:1]) / bw[:, None] * m_size - 0.5).astype(np.float32)
        # bilinear interpolation with zero padding is separable: tent weights max(0, 1 - |u - cell|)
        ry = np.maximum(1 - np.abs(u[..., None] - cells), 0)  # (k, hh, M)
        rx = np.maximum(1 - np.abs(v[..., None] - cells), 0)  # (k, ww, M)
        sampled = np.matmul(np.matmul(ry, masks_np[idx]), rx.transpose(0, 2, 1))  # (k, hh, ww)
        for j, i in enumerate(idx.tolist()):
            t, l, bo, r = win_list[i]
            out[i] = SoftCrop(t, l, sampled[j, : bo - t, : r - l].copy())
    return out  # type: ignore[return-value]


@dataclass
class RawView:
    """One model x view: boxes (N, 4), scores (N,), labels (N,) class ids, masks (N, M, M) probs,
    all in the original image frame, on CPU."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    model: int
    view: str


@dataclass
class LoadedModel:
    model: nn.Module
    weight: float
    label_map: np.ndarray  # model label -> competition class id (0 = drop)
    name: str = ""
    paste_shift: float = 0.25  # see paste_soft and ModelEntry.paste_shift


def label_map_for(class_names: Sequence[str] | None, num_classes: int) -> np.ndarray:
    """Model label i (1-based, ``class_names[i-1]``) -> competition class id; unknown names -> 0."""
    names = list(class_names) if class_names else list(CELL_TYPES)
    lut = np.zeros(max(num_classes, len(names) + 1), dtype=np.int64)
    for i, name in enumerate(names, start=1):
        lut[i] = CLASS_IDS.get(name, 0)
    return lut


def as_loaded(
    model: nn.Module,
    model_config: ModelConfig,
    class_names: Sequence[str] | None,
    fusion: FusionConfig,
    device: torch.device,
    weight: float = 1.0,
    paste_shift: float | None = None,
    name: str = "",
    fp16: bool | None = None,
    fold_bn: bool = True,
) -> LoadedModel:
    """:func:`prepare_model` (in place; ``fp16``, ``fold_bn`` as there) and the LoadedModel the pipeline runs.

    ``class_names``: label i is ``class_names[i-1]`` (None = the competition's). ``paste_shift`` None =
    0 for aligned-ROIAlign models (``model_config.roi_aligned``: Detectron2 conversions), else
    ``fusion.paste_shift``. ``name`` is shown in logs.
    """
    prepare_model(model, fusion, device, fp16, fold_bn)
    heads: Any = model.roi_heads  # torchvision's RoIHeads, typed nn.Module
    num_classes = int(heads.box_predictor.cls_score.out_features)
    if paste_shift is None:
        paste_shift = 0.0 if model_config.roi_aligned else fusion.paste_shift
    return LoadedModel(model, float(weight), label_map_for(class_names, num_classes), name, float(paste_shift))


def load_ensemble(
    manifest: Manifest, device: torch.device, fp16: bool | None = None, fold_bn: bool = True
) -> list[LoadedModel]:
    """Load and prepare every model of the manifest (checksums are checked by load_manifest); ``fp16``
    and ``fold_bn`` as in :func:`prepare_model`; a model entry's ``input_scale`` replaces the scale it
    was trained at."""
    out = []
    for e in manifest.models:
        path = manifest.checkpoint_path(e)
        model, info = load_model(path, device)
        if e.input_scale is not None:
            set_input_scale(model, e.input_scale, str(path))
        out.append(
            as_loaded(
                model,
                info.model_config,
                info.class_names,
                manifest.fusion,
                device,
                e.weight,
                e.paste_shift,
                str(path),
                fp16,
                fold_bn,
            )
        )
    return out


@torch.inference_mode()
def predict_views(
    models: Sequence[LoadedModel], image: np.ndarray, views: Sequence[str], device: torch.device, batch: int = 4
) -> list[RawView]:
    """Run every model on every view of ``image`` (H, W) uint8; views batched ``batch`` at a time."""
    height, width = image.shape
    base = image_tensor(image, device)
    out = []
    for mi, lm in enumerate(models):
        for s in range(0, len(views), batch):
            chunk = list(views[s : s + batch])
            preds = lm.model([flip_image(base, v) for v in chunk])
            for v, p in zip(chunk, preds):
                labels = torch.from_numpy(lm.label_map[p["labels"].cpu().numpy().clip(0, len(lm.label_map) - 1)])
                out.append(
                    RawView(
                        boxes=unflip_boxes(p["boxes"].float().cpu(), v, height, width),
                        scores=p["scores"].float().cpu(),
                        labels=labels,
                        masks=unflip_masks(p["masks"][:, 0].float().cpu(), v),
                        model=mi,
                        view=v,
                    )
                )
    return out


def raw_to_detections(
    raw: Sequence[RawView],
    models: Sequence[LoadedModel],
    height: int,
    width: int,
    min_score: float = 0.0,
) -> Detections:
    """Paste the masks of every raw view with score >= ``min_score`` onto crops -> one Detections.

    Each model's masks are pasted with its own ``paste_shift``. ``source`` numbers the (model, view)
    pairs in ``raw`` order; ``weight`` is the model's weight.
    """
    parts = []
    for si, r in enumerate(raw):
        keep = (r.scores >= min_score) & (r.labels > 0)
        if not bool(keep.any()):
            continue
        boxes, masks = r.boxes[keep], r.masks[keep]
        n = int(keep.sum())
        fh, fv = VIEW_FLIPS[r.view]
        shift = models[r.model].paste_shift
        view_shift = np.array([[-shift if fh else shift, -shift if fv else shift]])
        parts.append(
            Detections(
                boxes.numpy().astype(np.float32),
                r.scores[keep].numpy().astype(np.float32),
                r.labels[keep].numpy().astype(np.int64),
                paste_soft(masks, boxes, height, width, shift=view_shift),
                np.full(n, si, dtype=np.int64),
                np.full(n, models[r.model].weight, dtype=np.float32),
            )
        )
    return Detections.concat(parts)


__all__ = [
    "VIEW_FLIPS",
    "fold_batchnorm",
    "prepare_model",
    "load_ensemble",
    "as_loaded",
    "predict_views",
    "paste_soft",
    "raw_to_detections",
    "RawView",
    "LoadedModel",
]
