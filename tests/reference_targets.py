"""The training-target path before ``cellseg.model.targets`` (main at 6d67266), kept as the reference that
tests/model/test_targets.py compares with and benchmarks/bench_train_memory.py measures against.

Plain module (no pytest): the benchmark imports it too, also on the GPU machine.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.transform import resize_boxes

from cellseg.model.build import ScaledRCNNTransform


class OldScaledRCNNTransform(ScaledRCNNTransform):
    """``ScaledRCNNTransform.resize`` as it was: the whole (N, H, W) mask stack upsampled in float32."""

    def resize(self, image, target=None):
        if self.scale == 1.0:
            return image, target
        h, w = image.shape[-2:]
        size = (max(1, round(h * self.scale)), max(1, round(w * self.scale)))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, target
        if "masks" in target and target["masks"].numel():
            m = target["masks"]
            target["masks"] = F.interpolate(m[:, None].float(), size=size, mode="nearest")[:, 0].to(m.dtype)
        target["boxes"] = resize_boxes(target["boxes"], (h, w), size)
        return image, target


def old_path(model: nn.Module) -> None:
    """Give a built model torchvision's training targets again, in place: the old resize above,
    ``project_masks_on_boxes`` over the whole stack and the full (G, A) anchor IoU matrix."""
    model.rpn.anchor_matching = None
    model.roi_heads.training_forward = None
    model.transform.keep_source_masks = False
    t = model.transform
    if isinstance(t, ScaledRCNNTransform):
        model.transform = OldScaledRCNNTransform(t.scale, t.image_mean, t.image_std, t.size_divisible).train(t.training)
