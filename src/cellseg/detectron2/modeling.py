"""Detectron2-faithful building blocks for a torchvision Mask R-CNN.

A Detectron2 Mask R-CNN R-50/101-FPN and torchvision's ``maskrcnn_resnet50_fpn`` have the same
layers, but inference differs in details that move boxes and masks. Each block here reproduces
Detectron2 (v0.6) where torchvision differs; :func:`cellseg.model.build.build_model` builds a model
from them according to three :class:`cellseg.config.experiment.ModelConfig` fields (all off = plain
torchvision):

- ``stride_in_1x1``: the stride of each stage's first bottleneck sits on the 1x1 conv (MSRA ResNet,
  Detectron2 ``RESNETS.STRIDE_IN_1X1: True``), not the 3x3 conv (torchvision, ResNet v1.5).
- ``roi_aligned``: ROIAlign with half-pixel alignment (Detectron2 ``ROIAlignV2``).
- ``detectron2_inference``: Detectron2's test-time behaviour everywhere else:

  * anchors: base anchors not rounded, cell anchors ordered size-major, strides fixed per level
    (torchvision derives them as ``padded_size // feature_size``: 57 instead of 64 for p6 on a
    288-row input);
  * RPN: top-k per level on logits, clip, keep boxes with width and height > 0, NMS per level on
    logits, keep the best ``post_nms_top_n`` per image;
  * poolers: FPN level ``floor(4 + log2(sqrt(area) / 224 + 1e-8))`` with fixed level scales, the
    configured sampling ratio and alignment;
  * box post-processing without torchvision's ``remove_small_boxes(1e-2)``;
  * input resize: short side to ``min_size`` with round-half-up sizes and PIL-like (antialiased)
    bilinear resampling, no resize at all when ``min_size`` is 0;
  * output: boxes scaled back, clipped, empty ones dropped; masks pasted with Detectron2's
    ``grid_sample`` paste (soft probabilities: thresholding at 0.5 gives Detectron2's masks).

Normalisation and background position need no block: Detectron2's 0-255 pixel mean/std fold into
``image_mean``/``image_std`` (divided by 255), and :mod:`cellseg.detectron2.convert` moves background from
last to first when renaming the weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align

from cellseg.model.parts import RPN, MaskRoIHeads, RCNNTransform

__all__ = [
    "move_stride_to_1x1",
    "D2AnchorGenerator",
    "Float32BoxCoder",
    "D2ROIPooler",
    "D2RPN",
    "D2RoIHeads",
    "D2Transform",
    "d2_resized_shape",
    "paste_masks_d2",
    "level_strides",
]


def level_strides(returned_layers: list[int]) -> list[int]:
    """Strides of the FPN outputs: ResNet layer ``l`` (1-4) has stride ``2 ** (l + 1)``; the extra
    max-pool level doubles the last one. [1, 2, 3, 4] -> [4, 8, 16, 32, 64]."""
    strides = [2 ** (layer + 1) for layer in returned_layers]
    return strides + [strides[-1] * 2]


# --------------------------------------------------------------------------------------------
# backbone


def move_stride_to_1x1(body: nn.Module) -> int:
    """Move the stride of every strided torchvision ``Bottleneck`` from its 3x3 conv (``conv2``) to
    its 1x1 conv (``conv1``), in place: Detectron2's ``STRIDE_IN_1X1: True`` (MSRA weights).
    Returns how many blocks changed (3 for a ResNet with layers 2-4)."""
    changed = 0
    for module in body.modules():
        conv1, conv2 = getattr(module, "conv1", None), getattr(module, "conv2", None)
        if not (isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d) and hasattr(module, "conv3")):
            continue
        if conv2.stride != (1, 1):
            conv1.stride, conv2.stride = conv2.stride, (1, 1)
            changed += 1
    return changed


# --------------------------------------------------------------------------------------------
# anchors


class D2AnchorGenerator(AnchorGenerator):
    """Detectron2's ``DefaultAnchorGenerator`` (offset 0) behind torchvision's interface.

    ``sizes[i]`` and ``aspect_ratios[i]`` belong to FPN level ``i`` with stride ``strides[i]``.
    Cell anchors are ``(-w/2, -h/2, w/2, h/2)`` unrounded, ordered size-major (Detectron2's
    ``for size: for ratio``), with ``w = sqrt(size^2 / ratio)`` and ``h = ratio * w``.
    Output per image: (sum_l H_l * W_l * A_l, 4) anchors, location-major then cell anchor.
    """

    def __init__(self, sizes, aspect_ratios, strides: list[int]):
        self.strides = [int(s) for s in strides]
        super().__init__(sizes, aspect_ratios)
        if len(self.strides) != len(self.sizes):
            raise ValueError(f"{len(self.strides)} strides for {len(self.sizes)} anchor levels")

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")) -> Tensor:  # noqa: B008 (torchvision's signature)
        anchors = []
        for size in scales:
            area = float(size) ** 2
            for ratio in aspect_ratios:
                w = math.sqrt(area / float(ratio))
                h = float(ratio) * w
                anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(anchors, dtype=dtype, device=device)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        device = feature_maps[0].device
        strides = [
            [torch.tensor(s, dtype=torch.int64, device=device), torch.tensor(s, dtype=torch.int64, device=device)]
            for s in self.strides
        ]
        # float32 whatever the features' dtype (half under AMP training), as Detectron2: these anchors
        # are not whole pixels, and half precision would move them by up to 1 px in a 2x frame
        self.set_cell_anchors(torch.float32, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in range(len(image_list.image_sizes))]


# --------------------------------------------------------------------------------------------
# RoI pooling


class D2ROIPooler(nn.Module):
    """Detectron2's ``ROIPooler`` with ROIAlign (``aligned=True`` is ROIAlignV2).

    Same call as torchvision's ``MultiScaleRoIAlign``: ``forward(features: dict[name, (N, C, H, W)],
    boxes: list of (R_i, 4) xyxy in input pixels, image_shapes) -> (sum R_i, C, S, S)``.
    ``featmap_names[i]`` has stride ``strides[i]`` (one of 4, 8, 16, 32...). A box of size
    ``s = sqrt(area)`` goes to level ``floor(canonical_level + log2(s / canonical_box_size + 1e-8))``
    clamped to the available levels.
    """

    def __init__(
        self,
        featmap_names: list[str],
        strides: list[int],
        output_size: int,
        sampling_ratio: int,
        aligned: bool,
        canonical_box_size: int = 224,
        canonical_level: int = 4,
    ):
        super().__init__()
        if len(featmap_names) != len(strides):
            raise ValueError("featmap_names and strides differ in length")
        self.featmap_names = list(featmap_names)
        self.scales = [1.0 / s for s in strides]
        levels = [int(round(math.log2(s))) for s in strides]
        if levels != list(range(levels[0], levels[0] + len(levels))):
            raise ValueError(f"pooler strides {strides} are not consecutive powers of 2")
        self.min_level, self.max_level = levels[0], levels[-1]
        self.output_size = (int(output_size), int(output_size))
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.canonical_box_size = float(canonical_box_size)
        self.canonical_level = float(canonical_level)

    def assign_levels(self, boxes: Tensor) -> Tensor:
        """(R, 4) boxes -> (R,) int64 index into ``featmap_names``."""
        sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        level = torch.floor(self.canonical_level + torch.log2(sizes / self.canonical_box_size + 1e-8))
        level = torch.clamp(level, min=self.min_level, max=self.max_level)
        return level.to(torch.int64) - self.min_level

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes=None) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], dim=0)
        num_channels = features[0].shape[1]
        dtype, device = features[0].dtype, features[0].device
        out = torch.zeros((rois.shape[0], num_channels) + self.output_size, dtype=dtype, device=device)
        if rois.shape[0] == 0:
            return out
        if len(features) == 1:
            levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=device)
        else:
            levels = self.assign_levels(rois[:, 1:])
        for i, (feature, scale) in enumerate(zip(features, self.scales)):
            inds = torch.nonzero(levels == i, as_tuple=True)[0]
            if inds.numel() == 0:
                continue
            pooled = roi_align(
                feature,
                rois[inds].to(dtype),
                self.output_size,
                spatial_scale=scale,
                sampling_ratio=self.sampling_ratio,
                aligned=self.aligned,
            )
            out.index_put_((inds,), pooled.to(dtype))
        return out

    def extra_repr(self) -> str:
        return (
            f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


# --------------------------------------------------------------------------------------------
# RPN and box post-processing


class Float32BoxCoder(BoxCoder):
    """torchvision's ``BoxCoder`` decoding in float32, as Detectron2's ``Box2BoxTransform.apply_deltas``
    does: torchvision casts the reference boxes to the deltas' dtype, half under AMP training.

    decode(rel_codes (R, 4k) any float dtype, boxes: list of (R_i, 4)) -> (R, k, 4) float32.
    """

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        return super().decode(rel_codes.float(), [b.float() for b in boxes])


class D2RPN(RPN):
    """torchvision's RPN with Detectron2's ``find_top_rpn_proposals`` at test time: per-level top-k
    on logits, drop non-finite, clip, keep width and height > ``min_size``, NMS per level on logits,
    best ``post_nms_top_n`` per image. Returned scores are sigmoid probabilities (as torchvision)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_size = 0.0  # Detectron2 keeps every box with width and height > 0
        self.box_coder = Float32BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat(
            [torch.full((n,), i, dtype=torch.int64, device=device) for i, n in enumerate(num_anchors_per_level)]
        )
        levels = levels.reshape(1, -1).expand_as(objectness)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=device)[:, None]
        objectness = objectness[batch_idx, top_n_idx]
        levels = levels[batch_idx, top_n_idx]
        proposals = proposals[batch_idx, top_n_idx]

        final_boxes, final_scores = [], []
        for boxes, logits, lvl, img_shape in zip(proposals, objectness, levels, image_shapes):
            valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(logits)
            boxes, logits, lvl = boxes[valid], logits[valid], lvl[valid]
            boxes = box_ops.clip_boxes_to_image(boxes, img_shape)
            w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            keep = (w > self.min_size) & (h > self.min_size)
            boxes, logits, lvl = boxes[keep], logits[keep], lvl[keep]
            keep = box_ops.batched_nms(boxes, logits, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(torch.sigmoid(logits[keep]))
        return final_boxes, final_scores


class D2RoIHeads(MaskRoIHeads):
    """torchvision's RoIHeads with Detectron2's ``fast_rcnn_inference``: like torchvision but
    non-finite rows are dropped and tiny boxes are kept (no ``remove_small_boxes(1e-2)``)."""

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        device = class_logits.device
        num_classes = class_logits.shape[-1]
        boxes_per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)
        pred_scores = F.softmax(class_logits, -1)

        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, image_shape in zip(
            pred_boxes.split(boxes_per_image, 0), pred_scores.split(boxes_per_image, 0), image_shapes
        ):
            valid = torch.isfinite(boxes).all(dim=2).all(dim=1) & torch.isfinite(scores).all(dim=1)
            boxes, scores = boxes[valid], scores[valid]
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            labels = torch.arange(num_classes, device=device).view(1, -1).expand_as(scores)
            boxes = boxes[:, 1:].reshape(-1, 4)
            scores = scores[:, 1:].reshape(-1)
            labels = labels[:, 1:].reshape(-1)
            inds = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels


# --------------------------------------------------------------------------------------------
# input resize and output pasting


def d2_resized_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """Detectron2's ``ResizeShortestEdge.get_output_shape``: short side -> ``short``, long side <=
    ``max_size``, sizes rounded half up. ``short`` 0 means no resize."""
    if short <= 0:
        return h, w
    scale = short / min(h, w)
    if h < w:
        newh, neww = float(short), scale * w
    else:
        newh, neww = scale * h, float(short)
    if max(newh, neww) > max_size:
        scale = max_size / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def paste_masks_d2(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int]) -> Tensor:
    """Detectron2's ``paste_masks_in_image`` (CPU path: one mask at a time, limited to the box's
    integer extent +- 1 px), without the threshold.

    masks (N, 1, M, M) probabilities, boxes (N, 4) xyxy in the output image -> (N, 1, H, W) float.
    """
    h, w = int(image_shape[0]), int(image_shape[1])
    out = masks.new_zeros((masks.shape[0], 1, h, w))
    for i in range(masks.shape[0]):
        box = boxes[i : i + 1]
        x0_int = int(torch.clamp(box[0, 0].floor() - 1, min=0))
        y0_int = int(torch.clamp(box[0, 1].floor() - 1, min=0))
        x1_int = int(torch.clamp(box[0, 2].ceil() + 1, max=w))
        y1_int = int(torch.clamp(box[0, 3].ceil() + 1, max=h))
        if x1_int <= x0_int or y1_int <= y0_int:
            continue
        x0, y0, x1, y1 = box[:, 0:1], box[:, 1:2], box[:, 2:3], box[:, 3:4]
        img_y = torch.arange(y0_int, y1_int, device=masks.device, dtype=torch.float32) + 0.5
        img_x = torch.arange(x0_int, x1_int, device=masks.device, dtype=torch.float32) + 0.5
        img_y = (img_y - y0) / (y1 - y0) * 2 - 1
        img_x = (img_x - x0) / (x1 - x0) * 2 - 1
        gx = img_x[:, None, :].expand(1, img_y.size(1), img_x.size(1))
        gy = img_y[:, :, None].expand(1, img_y.size(1), img_x.size(1))
        grid = torch.stack([gx, gy], dim=3)
        pasted = F.grid_sample(masks[i : i + 1].float(), grid.to(torch.float32), align_corners=False)
        out[i, 0, y0_int:y1_int, x0_int:x1_int] = pasted[0, 0].to(out.dtype)
    return out


class D2Transform(RCNNTransform):
    """torchvision's transform with Detectron2's test-time resize (:func:`d2_resized_shape`,
    antialiased bilinear like PIL, none when ``min_size`` is 0) and post-processing (boxes scaled
    back, clipped, empty boxes dropped, masks pasted by :func:`paste_masks_d2`). Training resize is
    torchvision's. Normalisation and padding to ``size_divisible`` are torchvision's (identical)."""

    def resize(self, image, target=None):
        if self.training:
            return super().resize(image, target)
        h, w = image.shape[-2:]
        nh, nw = d2_resized_shape(int(h), int(w), int(self.min_size[-1]), int(self.max_size))
        if (nh, nw) != (h, w):
            image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
            if target is not None and "boxes" in target:
                target["boxes"] = resize_boxes(target["boxes"], (h, w), (nh, nw))
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training or not self.paste_masks:
            return super().postprocess(result, image_shapes, original_image_sizes)
        for i, (pred, im_s, o_im_s) in enumerate(zip(result, image_shapes, original_image_sizes)):
            boxes = resize_boxes(pred["boxes"], im_s, o_im_s)
            boxes = box_ops.clip_boxes_to_image(boxes, o_im_s)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            pred = {k: (v[keep] if isinstance(v, Tensor) and v.shape[:1] == keep.shape else v) for k, v in pred.items()}
            pred["boxes"] = boxes[keep]
            if "masks" in pred:
                pred["masks"] = paste_masks_d2(pred["masks"], pred["boxes"], o_im_s)
            result[i] = pred
        return result
