"""Mask R-CNN builder: a plain torchvision ``MaskRCNN`` assembled from small parts, one per job,
so that options (Detectron2-compatible backbones, RoIAlign variants, anchors) slot in.

Nothing here downloads: every network starts from random weights; pretrained weights come from a
file through :func:`cellseg.model.checkpoint.load_init`.

    model = build_model(ModelConfig(backbone="resnet18", norm="bn", fpn_channels=128))
    model.eval(); out = model([image])   # image (3, H, W) float32 in [0, 1]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from cellseg.config.experiment import ModelConfig
from cellseg.detectron2 import modeling as d2compat
from cellseg.errors import CellsegError
from cellseg.model import targets

#: ResNet stage names from the top, as torchvision counts trainable layers.
_STAGES = ["layer4", "layer3", "layer2", "layer1", "conv1"]
#: Parameters re-initialised when loading weights trained for other classes.
CLASS_SPECIFIC_PREFIXES = (
    "roi_heads.box_predictor.cls_score.",
    "roi_heads.box_predictor.bbox_pred.",
    "roi_heads.mask_predictor.mask_fcn_logits.",
)


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
    """ResNet + FPN with ``cfg.fpn_channels`` channels on ``cfg.returned_layers`` plus a max-pool level.

    Output: OrderedDict of feature maps '0', '1', ..., 'pool' (strides 4, 8, 16, 32, 64 for [1,2,3,4]).
    """
    body = build_resnet(cfg)
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
    sizes = tuple(tuple(int(s) for s in level) for level in cfg.anchor_sizes)
    ratios = (tuple(float(r) for r in cfg.aspect_ratios),) * len(sizes)
    return AnchorGenerator(sizes, ratios)


def build_rpn_head(cfg: ModelConfig, num_anchors: int) -> RPNHead:
    return RPNHead(cfg.fpn_channels, num_anchors, conv_depth=2 if cfg.heads == "v2" else 1)


def build_roi_pool(cfg: ModelConfig, output_size: int) -> MultiScaleRoIAlign:
    names = [str(i) for i in range(len(cfg.returned_layers))]
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


class ScaledRCNNTransform(GeneralizedRCNNTransform):
    """torchvision's transform with a fixed resize factor instead of a target short side.

    Every image (train and test) is scaled by ``scale`` (bilinear) and target boxes with it, so the
    data pipeline's multi-scale jitter and crops survive (Detectron2 style) while a 520 x 704 test
    image is still upscaled, e.g. 2x. Ground-truth masks are NOT resized: they stay uint8 at the
    pipeline's resolution and :func:`cellseg.model.targets.project_masks` builds the mask targets
    from them (a float full-frame copy of ~900 masks at 2x would be GBs). Normalisation, batching
    and ``postprocess`` are torchvision's.
    """

    #: tells :func:`cellseg.model.targets.install` that this transform leaves the masks alone
    keeps_source_masks = True

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


def build_transform(cfg: ModelConfig) -> GeneralizedRCNNTransform:
    """Normalise + resize: ``input_scale`` > 0 scales by that factor, else torchvision's min/max size."""
    if cfg.input_scale > 0:
        return ScaledRCNNTransform(cfg.input_scale, list(cfg.image_mean), list(cfg.image_std))
    return GeneralizedRCNNTransform(cfg.min_size, cfg.max_size, list(cfg.image_mean), list(cfg.image_std))


def build_model(cfg: ModelConfig) -> MaskRCNN:
    """A randomly initialised torchvision :class:`MaskRCNN` as ``cfg`` describes (train mode)."""
    backbone = build_backbone(cfg)
    anchors = build_anchor_generator(cfg)
    box_head, box_predictor = build_box_head(cfg)
    mask_head, mask_predictor = build_mask_head(cfg)
    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
        rpn_anchor_generator=anchors,
        rpn_head=build_rpn_head(cfg, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_nms_thresh=cfg.rpn_nms_thresh,
        rpn_fg_iou_thresh=cfg.rpn_fg_iou_thresh,
        rpn_bg_iou_thresh=cfg.rpn_bg_iou_thresh,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_roi_pool=build_roi_pool(cfg, 7),
        box_head=box_head,
        box_predictor=box_predictor,
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.box_detections_per_img,
        box_fg_iou_thresh=cfg.box_fg_iou_thresh,
        box_bg_iou_thresh=cfg.box_bg_iou_thresh,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_positive_fraction=cfg.box_positive_fraction,
        mask_roi_pool=build_roi_pool(cfg, cfg.mask_roi_size),
        mask_head=mask_head,
        mask_predictor=mask_predictor,
    )
    model.transform = build_transform(cfg)
    d2compat.apply_options(model, cfg)  # Detectron2-faithful options; all off by default
    targets.install(model)  # training targets without full-frame copies of the ground truth
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
    "ScaledRCNNTransform",
    "build_rpn_head",
    "build_roi_pool",
    "build_box_head",
    "build_mask_head",
    "norm_layer",
    "freeze_stages",
    "class_specific",
    "count_parameters",
    "unwrap",
    "CLASS_SPECIFIC_PREFIXES",
]
