"""The RPN, RoI heads and transform a cellseg Mask R-CNN is built from: torchvision's, each with the
slots that :func:`cellseg.model.build.build_model` fills when it builds the model.

- :class:`RPN` and :class:`MaskRoIHeads` take their training targets as constructor arguments
  (``anchor_matching``, ``training_forward``; None = torchvision's): the lean targets of
  :mod:`cellseg.model.targets` for a model built for training, nothing for one built for inference,
  which therefore never imports the training-loss code.
- :class:`RCNNTransform` takes ``keep_source_masks`` (training: resize images and boxes only, the mask
  targets are projected from the source masks) and has ``paste_masks`` (inference: False returns each
  detection's (1, M, M) mask probabilities with boxes in the original image frame, pasted later
  onto crops, instead of full-image masks).

Detectron2's test-time variants (:mod:`cellseg.detectron2.modeling`) subclass these three, so a
model's classes are fixed when it is built and never change afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

#: ``(rpn, anchors per image, targets) -> (labels per image, matched ground-truth boxes per image)``
AnchorMatching = Callable[[Any, list[Tensor], list[dict[str, Tensor]]], tuple[list[Tensor], list[Tensor]]]
#: ``(roi_heads, features, proposals, image_shapes, targets) -> ([], losses)``: a training forward
TrainingForward = Callable[
    [Any, dict[str, Tensor], list[Tensor], list[tuple[int, int]], list[dict[str, Tensor]]],
    tuple[list[dict[str, Tensor]], dict[str, Tensor]],
]


class RPN(RegionProposalNetwork):
    """torchvision's ``RegionProposalNetwork`` whose training anchor matching is ``anchor_matching``
    (None: torchvision's full (G, A) IoU matrix). Positional arguments as torchvision's."""

    def __init__(self, *args: Any, anchor_matching: AnchorMatching | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.anchor_matching = anchor_matching

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        if self.anchor_matching is None:
            return super().assign_targets_to_anchors(anchors, targets)
        return self.anchor_matching(self, anchors, targets)


class MaskRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` whose training forward (with masks and targets) is
    ``training_forward`` (None: torchvision's). Inference is always the class's own."""

    def __init__(self, *args: Any, training_forward: TrainingForward | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.training_forward = training_forward

    def forward(self, features, proposals, image_shapes, targets=None):
        lean = self.training_forward is not None and self.training and targets is not None
        if lean and self.has_mask() and not self.has_keypoint():
            return self.training_forward(self, features, proposals, image_shapes, targets)
        return super().forward(features, proposals, image_shapes, targets)


class RCNNTransform(GeneralizedRCNNTransform):
    """torchvision's ``GeneralizedRCNNTransform`` (normalise, resize, batch; rescale outputs) with two
    switches: ``keep_source_masks`` (training: ``target["masks"]`` passes through unresized) and
    ``paste_masks`` (inference: False keeps the (N, 1, M, M) mask probabilities and only rescales
    the boxes to the original image)."""

    def __init__(self, *args: Any, keep_source_masks: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep_source_masks = keep_source_masks
        self.paste_masks = True

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        if not (self.keep_source_masks and self.training and target is not None and "masks" in target):
            return super().resize(image, target)
        masks = target.pop("masks")
        image, resized = super().resize(image, target)
        assert resized is not None
        resized["masks"] = masks
        return image, resized

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        if self.training or self.paste_masks:
            return super().postprocess(result, image_shapes, original_image_sizes)
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], im_s, o_im_s)
        return result


__all__ = ["AnchorMatching", "TrainingForward", "RPN", "MaskRoIHeads", "RCNNTransform"]
