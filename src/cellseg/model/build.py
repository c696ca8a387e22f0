"""Mask R-CNN builder: a plain torchvision ``MaskRCNN`` assembled from small parts, one per job,
so that options (Detectron2-compatible backbones, RoIAlign variants, anchors) slot in.

Nothing here downloads: every network starts from random weights; pretrained weights come from a
file through :func:`cellseg.model.checkpoint.load_init`.

    model = build_model(ModelConfig(backbone="resnet18", norm="bn", fpn_channels=128))
    model.eval(); out = model([image])   # image (3, H, W) float32 in [0, 1]

Every part's class is chosen here, once: torchvision's or Detectron2's (:data:`PART_CLASSES`, keyed
by ``ModelConfig.detectron2_inference``), and the lean training targets of
:mod:`cellseg.model.targets` only for a model built for training (``training_targets``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from cellseg.config.experiment import ModelConfig
from cellseg.detectron2 import modeling as d2
from cellseg.errors import CellsegError
from cellseg.model.parts import RPN, AnchorMatching, MaskRoIHeads, RCNNTransform, TrainingForward

#: ResNet stage names from the top, as torchvision counts trainable layers.
_STAGES = ["layer4", "layer3", "layer2", "layer1", "conv1"]
#: Parameters re-initialised when loading weights trained for other classes.
CLASS_SPECIFIC_PREFIXES = (
    "roi_heads.box_predictor.cls_score.",
    "roi_heads.box_predictor.bbox_pred.",
    "roi_heads.mask_predictor.mask_fcn_logits.",
)


class FrozenBatchNorm2d(TorchvisionFrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` (same buffers and state-dict keys) computing in its input's
    dtype, as Detectron2's does: scale and bias are formed in float32 and cast to ``x.dtype``.

    torchvision's keeps them float32, so under autocast a half-precision input comes out float32 and
    every frozen-BN/ReLU activation is saved for backward in float32 (plus a half copy for the next
    conv). In float32 the arithmetic is torchvision's, bit for bit.

    x (N, C, H, W) any float dtype -> same shape and dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + bias.reshape(1, -1, 1, 1).to(x.dtype)


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """Backbone norm factory: ``frozen_bn`` | ``bn`` | ``gn`` (32 groups)."""
    if kind == "frozen_bn":
        return FrozenBatchNorm2d
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn":
        return lambda c: nn.GroupNorm(32, c)
    raise CellsegError(f"model.norm: unknown norm {kind!r} (frozen_bn, bn, gn)")


def build_resnet(cfg: ModelConfig) -> tv_resnet.ResNet:
    """Randomly initialised torchvision ResNet ``cfg.backbone`` (never downloads)."""
    builder = getattr(tv_resnet, cfg.backbone, None)
    if builder is None or not cfg.backbone.startswith(("resnet", "resnext", "wide_resnet")):
        raise CellsegError(f"model.backbone: unknown ResNet {cfg.backbone!r} (e.g. resnet18, resnet50, resnet101)")
    if cfg.backbone_blocks:
        if len(cfg.backbone_blocks) != 4 or min(cfg.backbone_blocks) < 1:
            raise CellsegError(f"model.backbone_blocks needs 4 positive block counts, got {cfg.backbone_blocks}")
        if cfg.backbone not in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
            raise CellsegError(f"model.backbone_blocks works with plain ResNets (resnet18-152), not {cfg.backbone!r}")
        block = tv_resnet.BasicBlock if cfg.backbone in ("resnet18", "resnet34") else tv_resnet.Bottleneck
        return tv_resnet.ResNet(block, list(cfg.backbone_blocks), norm_layer=norm_layer(cfg.norm))
    return builder(weights=None, norm_layer=norm_layer(cfg.norm))


def freeze_stages(body: nn.Module, trainable_layers: int) -> None:
    """Freeze all but the top ``trainable_layers`` (0-5) stages, as torchvision does."""
    if not 0 <= trainable_layers <= 5:
        raise CellsegError(f"model.trainable_backbone_layers must be 0-5, got {trainable_layers}")
    trainable = _STAGES[:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, p in body.named_parameters():
        if all(not name.startswith(s) for s in trainable):
            p.requires_grad_(False)


def build_backbone(cfg: ModelConfig) -> BackboneWithFPN:
    """ResNet + FPN with ``cfg.fpn_channels`` channels on ``cfg.returned_layers`` plus a max-pool level
    (``stride_in_1x1``: strides on the 1x1 convs, as Detectron2's MSRA ResNets).

    Output: OrderedDict of feature maps '0', '1', ..., 'pool' (strides 4, 8, 16, 32, 64 for [1,2,3,4]).
    """
    body = build_resnet(cfg)
    if cfg.stride_in_1x1:
        d2.move_stride_to_1x1(body)
    freeze_stages(body, cfg.trainable_backbone_layers)
    layers = list(cfg.returned_layers)
    if not layers or any(l not in (1, 2, 3, 4) for l in layers) or layers != sorted(set(layers)):
        raise CellsegError(f"model.returned_layers must be increasing values in 1-4, got {layers}")
    return_layers = {f"layer{l}": str(i) for i, l in enumerate(layers)}
    stage1 = body.inplanes // 8  # channels after layer4 / 8 = channels after layer1
    in_channels = [stage1 * 2 ** (l - 1) for l in layers]
    fpn_norm = nn.BatchNorm2d if cfg.heads == "v2" else None
    return BackboneWithFPN(
        body, return_layers, in_channels, cfg.fpn_channels, extra_blocks=LastLevelMaxPool(), norm_layer=fpn_norm
    )


def build_anchor_generator(cfg: ModelConfig) -> AnchorGenerator:
    """torchvision's anchors, or Detectron2's (unrounded, fixed strides) with ``detectron2_inference``."""
    if cfg.detectron2_inference:
        ratios = [list(cfg.aspect_ratios)] * len(cfg.anchor_sizes)
        return d2.D2AnchorGenerator(
            tuple(tuple(s) for s in cfg.anchor_sizes),
            tuple(tuple(r) for r in ratios),
            d2.level_strides(list(cfg.returned_layers)),
        )
    sizes = tuple(tuple(int(s) for s in level) for level in cfg.anchor_sizes)
    ratios_tv = (tuple(float(r) for r in cfg.aspect_ratios),) * len(sizes)
    return AnchorGenerator(sizes, ratios_tv)


def build_rpn_head(cfg: ModelConfig, num_anchors: int) -> RPNHead:
    return RPNHead(cfg.fpn_channels, num_anchors, conv_depth=2 if cfg.heads == "v2" else 1)


def build_roi_pool(cfg: ModelConfig, output_size: int) -> nn.Module:
    """torchvision's ``MultiScaleRoIAlign``, or Detectron2's pooler with ``detectron2_inference`` or
    ``roi_aligned`` (ROIAlignV2). Same call: (features, boxes, image_shapes) -> (R, C, S, S)."""
    names = [str(i) for i in range(len(cfg.returned_layers))]
    if cfg.detectron2_inference or cfg.roi_aligned:
        strides = d2.level_strides(list(cfg.returned_layers))[: len(names)]
        return d2.D2ROIPooler(names, strides, int(output_size), cfg.roi_sampling_ratio, cfg.roi_aligned)
    return MultiScaleRoIAlign(names, output_size=output_size, sampling_ratio=cfg.roi_sampling_ratio)


def build_box_head(cfg: ModelConfig) -> tuple[nn.Module, FastRCNNPredictor]:
    """v1: two FC layers (1024); v2: 4 conv + 1 FC with BatchNorm. Returns (head, predictor)."""
    c = cfg.fpn_channels
    if cfg.heads == "v2":
        head = FastRCNNConvFCHead((c, 7, 7), [c, c, c, c], [cfg.box_head_dim], norm_layer=nn.BatchNorm2d)
    else:
        head = TwoMLPHead(c * 7 * 7, cfg.box_head_dim)
    return head, FastRCNNPredictor(cfg.box_head_dim, cfg.num_classes)


def build_mask_head(cfg: ModelConfig) -> tuple[nn.Module, MaskRCNNPredictor]:
    """``mask_head_convs`` 3x3 convs (v2: with BatchNorm) + a deconv predictor. Returns (head, predictor)."""
    c = cfg.fpn_channels
    head = MaskRCNNHeads(c, [c] * cfg.mask_head_convs, 1, norm_layer=nn.BatchNorm2d if cfg.heads == "v2" else None)
    return head, MaskRCNNPredictor(c, c, cfg.num_classes)


class ScaledRCNNTransform(RCNNTransform):
    """torchvision's transform with a fixed resize factor instead of a target short side.

    Every image (train and test) is scaled by ``scale`` (bilinear) and target boxes with it, so the
    data pipeline's multi-scale jitter and crops survive (Detectron2 style) while a 520 x 704 test
    image is still upscaled, e.g. 2x. Ground-truth masks are NOT resized: they stay uint8 at the
    pipeline's resolution and :func:`cellseg.model.targets.project_masks` builds the mask targets
    from them (a float full-frame copy of ~900 masks at 2x would be GBs). Normalisation, batching
    and ``postprocess`` are torchvision's.
    """

    def __init__(self, scale: float, image_mean: list[float], image_std: list[float], size_divisible: int = 32) -> None:
        super().__init__(
            min_size=1, max_size=1, image_mean=image_mean, image_std=image_std, size_divisible=size_divisible
        )
        self.scale = float(scale)

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(3, h, w) image -> (3, round(h * scale), round(w * scale)); ``target["boxes"]`` scaled alike."""
        if self.scale == 1.0:
            return image, target
        h, w = image.shape[-2:]
        size = (max(1, round(h * self.scale)), max(1, round(w * self.scale)))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), size)
        return image, target

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(scale={self.scale}, mean={self.image_mean}, std={self.image_std})"


def set_input_scale(model: nn.Module, scale: float, where: str) -> None:
    """Make a fixed-scale model (``model.input_scale`` > 0) resize its inputs by ``scale`` from now on
    (inference at another scale than training; the manifest's ``input_scale``).

    Args:
        model: a model of :func:`build_model`.
        scale: the new factor (> 0).
        where: names the model in the error (e.g. its checkpoint path).

    Raises:
        CellsegError: the model resizes to a min/max size (``input_scale: 0``), so it has no factor to set.
    """
    transform = model.transform
    if not isinstance(transform, ScaledRCNNTransform):
        raise CellsegError(
            f"{where}: input_scale {scale} needs a model trained at a fixed input scale (model.input_scale > 0); "
            "this one resizes to model.min_size / max_size"
        )
    transform.scale = float(scale)


#: RPN, RoI-heads and (short-side resize) transform classes, by ``ModelConfig.detectron2_inference``
PART_CLASSES: dict[bool, tuple[type[RPN], type[MaskRoIHeads], type[RCNNTransform]]] = {
    False: (RPN, MaskRoIHeads, RCNNTransform),
    True: (d2.D2RPN, d2.D2RoIHeads, d2.D2Transform),
}


def image_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """The model's input for one image: (H, W) uint8 grey -> (3, H, W) float32 in [0, 1] on
    ``device`` (grey repeated; the transform normalises it)."""
    t = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(device)
    return (t.float() / 255.0).unsqueeze(0).expand(3, -1, -1)


def build_transform(cfg: ModelConfig, keep_source_masks: bool = False) -> RCNNTransform:
    """Normalise + resize: ``input_scale`` > 0 scales by that factor (never resizes masks), else
    torchvision's (or Detectron2's test-time) min/max size; ``keep_source_masks``: that resize leaves
    the training masks alone."""
    if cfg.input_scale > 0:
        return ScaledRCNNTransform(cfg.input_scale, list(cfg.image_mean), list(cfg.image_std))
    transform_cls = PART_CLASSES[cfg.detectron2_inference][2]
    return transform_cls(
        cfg.min_size, cfg.max_size, list(cfg.image_mean), list(cfg.image_std), keep_source_masks=keep_source_masks
    )


def build_rpn(cfg: ModelConfig, anchor_matching: AnchorMatching | None = None) -> RPN:
    """The RPN (anchors, head, proposal filter) with ``anchor_matching`` for training (None: torchvision's)."""
    anchors = build_anchor_generator(cfg)
    return PART_CLASSES[cfg.detectron2_inference][0](
        anchors,
        build_rpn_head(cfg, anchors.num_anchors_per_location()[0]),
        cfg.rpn_fg_iou_thresh,
        cfg.rpn_bg_iou_thresh,
        cfg.rpn_batch_size_per_image,
        0.5,
        {"training": cfg.rpn_pre_nms_top_n_train, "testing": cfg.rpn_pre_nms_top_n_test},
        {"training": cfg.rpn_post_nms_top_n_train, "testing": cfg.rpn_post_nms_top_n_test},
        cfg.rpn_nms_thresh,
        anchor_matching=anchor_matching,
    )


def build_roi_heads(cfg: ModelConfig, training_forward: TrainingForward | None = None) -> MaskRoIHeads:
    """Box and mask branches with their poolers; ``training_forward`` for training (None: torchvision's)."""
    box_head, box_predictor = build_box_head(cfg)
    mask_head, mask_predictor = build_mask_head(cfg)
    return PART_CLASSES[cfg.detectron2_inference][1](
        build_roi_pool(cfg, 7),
        box_head,
        box_predictor,
        cfg.box_fg_iou_thresh,
        cfg.box_bg_iou_thresh,
        cfg.box_batch_size_per_image,
        cfg.box_positive_fraction,
        None,
        cfg.box_score_thresh,
        cfg.box_nms_thresh,
        cfg.box_detections_per_img,
        mask_roi_pool=build_roi_pool(cfg, cfg.mask_roi_size),
        mask_head=mask_head,
        mask_predictor=mask_predictor,
        training_forward=training_forward,
    )


def _training_parts(cfg: ModelConfig) -> tuple[AnchorMatching, TrainingForward]:
    """The lean training targets (:mod:`cellseg.model.targets`, imported here only: a model built
    for inference never loads the training-loss code), with ``cfg.mask_loss``'s Dice term."""
    from cellseg.model import targets

    if cfg.mask_loss == "bce+dice":
        return targets.chunked_anchor_matching, functools.partial(targets.source_mask_forward, dice=True)
    return targets.chunked_anchor_matching, targets.source_mask_forward


def build_model(cfg: ModelConfig, training_targets: bool = True) -> MaskRCNN:
    """A randomly initialised torchvision :class:`MaskRCNN` as ``cfg`` describes (train mode).

    ``training_targets``: build the RPN, RoI heads and transform with the lean training targets of
    :mod:`cellseg.model.targets` (False: torchvision's; inference is the same either way, and
    :func:`cellseg.model.checkpoint.load_model` builds with False).
    """
    anchor_matching, training_forward = _training_parts(cfg) if training_targets else (None, None)
    # random initialisation in torchvision's order (backbone, RoI heads, RPN head): a seed gives the same weights
    backbone = build_backbone(cfg)
    roi_heads = build_roi_heads(cfg, training_forward)
    rpn = build_rpn(cfg, anchor_matching)
    model = MaskRCNN.__new__(MaskRCNN)
    # MaskRCNN's own constructor builds torchvision's parts from keyword options and then ends in
    # GeneralizedRCNN's, which only registers the four finished parts: built here instead
    GeneralizedRCNN.__init__(model, backbone, rpn, roi_heads, build_transform(cfg, keep_source_masks=training_targets))
    return model


def class_specific(key: str) -> bool:
    """True for parameters whose shape depends on the number of classes."""
    return key.startswith(CLASS_SPECIFIC_PREFIXES)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (or the model itself)."""
    return (
        model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model
    )


__all__ = [
    "build_model",
    "build_backbone",
    "build_resnet",
    "build_anchor_generator",
    "build_transform",
    "build_rpn",
    "build_roi_heads",
    "PART_CLASSES",
    "ScaledRCNNTransform",
    "build_rpn_head",
    "build_roi_pool",
    "build_box_head",
    "build_mask_head",
    "norm_layer",
    "FrozenBatchNorm2d",
    "freeze_stages",
    "class_specific",
    "count_parameters",
    "unwrap",
    "CLASS_SPECIFIC_PREFIXES",
]
