"""Detectron2 configs read without Detectron2: parse, check the supported family, map to our fields.

- :func:`read_d2_config` parses a fully merged Detectron2 config (``cfg.dump()`` output) as plain YAML.
- :func:`model_fields` checks that the config describes the supported family (standard Mask R-CNN
  R-50/101-FPN, see :func:`check_supported`) and maps it to :class:`cellseg.config.experiment.ModelConfig`
  fields; anything else raises a one-line :class:`CellsegError` naming the key and its value.
- :func:`head_layout` says what the weight renaming (:mod:`cellseg.detectron2.convert`) needs beyond
  the names: class count, class-agnostic heads, BGR input.

Detectron2 feeds 0-255 pixels normalised by ``PIXEL_MEAN``/``PIXEL_STD``; ours are [0, 1], so
``image_mean = PIXEL_MEAN / 255`` and ``image_std = PIXEL_STD / 255`` give the same network input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellseg.config.loader import read_yaml
from cellseg.errors import CellsegError

# ----------------------------------------------------------------------------------------------
# config


def read_d2_config(path: str | Path) -> dict:
    """Load a Detectron2 ``config.yaml`` (``cfg.dump()``) as a nested dict; no Detectron2 needed.
    CellsegError when it is missing, not YAML, not a mapping, has no MODEL section or has ``_BASE_``."""
    data = read_yaml(path, "a Detectron2 config.yaml")
    if "MODEL" not in data:
        raise CellsegError(f"{path}: not a Detectron2 config (no MODEL section)")
    if "_BASE_" in data:
        raise CellsegError(
            f"{path}: has _BASE_ (a partial config); give the fully merged config a training run "
            "writes (cfg.dump(), output/config.yaml)"
        )
    return data


def get_value(cfg: dict, key: str) -> Any:
    """The value at dotted ``key`` (e.g. "MODEL.RESNETS.DEPTH") of a merged config; CellsegError if absent."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise CellsegError(f"Detectron2 config lacks {key} (give the fully merged config written by cfg.dump())")
        node = node[part]
    return node


def _unsupported(key: str, value: Any, supported: str) -> CellsegError:
    return CellsegError(f"unsupported Detectron2 config: {key} = {value!r} (supported: {supported})")


#: (key, allowed values, description of what is supported) for every fixed setting.
_FIXED: list[tuple[str, tuple, str]] = [
    ("MODEL.META_ARCHITECTURE", ("GeneralizedRCNN",), "GeneralizedRCNN"),
    ("MODEL.MASK_ON", (True,), "True (Mask R-CNN)"),
    ("MODEL.KEYPOINT_ON", (False,), "False"),
    ("MODEL.LOAD_PROPOSALS", (False,), "False"),
    ("MODEL.BACKBONE.NAME", ("build_resnet_fpn_backbone",), "build_resnet_fpn_backbone"),
    ("MODEL.RESNETS.DEPTH", (50, 101), "50, 101"),
    ("MODEL.RESNETS.NORM", ("FrozenBN",), "FrozenBN"),
    ("MODEL.RESNETS.NUM_GROUPS", (1,), "1 (no ResNeXt)"),
    ("MODEL.RESNETS.WIDTH_PER_GROUP", (64,), "64"),
    ("MODEL.RESNETS.STEM_OUT_CHANNELS", (64,), "64"),
    ("MODEL.RESNETS.RES2_OUT_CHANNELS", (256,), "256"),
    ("MODEL.RESNETS.RES5_DILATION", (1,), "1"),
    ("MODEL.RESNETS.OUT_FEATURES", (["res2", "res3", "res4", "res5"],), "[res2, res3, res4, res5]"),
    ("MODEL.FPN.IN_FEATURES", (["res2", "res3", "res4", "res5"],), "[res2, res3, res4, res5]"),
    ("MODEL.FPN.NORM", ("",), "'' (no norm)"),
    ("MODEL.FPN.FUSE_TYPE", ("sum",), "sum"),
    ("MODEL.ANCHOR_GENERATOR.NAME", ("DefaultAnchorGenerator",), "DefaultAnchorGenerator"),
    ("MODEL.ANCHOR_GENERATOR.OFFSET", (0, 0.0), "0.0"),
    ("MODEL.PROPOSAL_GENERATOR.NAME", ("RPN",), "RPN"),
    ("MODEL.PROPOSAL_GENERATOR.MIN_SIZE", (0, 0.0), "0"),
    ("MODEL.RPN.HEAD_NAME", ("StandardRPNHead",), "StandardRPNHead"),
    ("MODEL.RPN.IN_FEATURES", (["p2", "p3", "p4", "p5", "p6"],), "[p2, p3, p4, p5, p6]"),
    ("MODEL.RPN.BBOX_REG_WEIGHTS", ([1.0, 1.0, 1.0, 1.0],), "[1, 1, 1, 1]"),
    ("MODEL.ROI_HEADS.NAME", ("StandardROIHeads",), "StandardROIHeads (no cascade)"),
    ("MODEL.ROI_HEADS.IN_FEATURES", (["p2", "p3", "p4", "p5"],), "[p2, p3, p4, p5]"),
    ("MODEL.ROI_BOX_HEAD.NAME", ("FastRCNNConvFCHead",), "FastRCNNConvFCHead"),
    ("MODEL.ROI_BOX_HEAD.NUM_CONV", (0,), "0"),
    ("MODEL.ROI_BOX_HEAD.NUM_FC", (2,), "2"),
    ("MODEL.ROI_BOX_HEAD.NORM", ("",), "''"),
    ("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", (7,), "7"),
    ("MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", ([10.0, 10.0, 5.0, 5.0],), "[10, 10, 5, 5]"),
    ("MODEL.ROI_MASK_HEAD.NAME", ("MaskRCNNConvUpsampleHead",), "MaskRCNNConvUpsampleHead"),
    ("MODEL.ROI_MASK_HEAD.NORM", ("",), "''"),
    ("INPUT.FORMAT", ("BGR", "RGB"), "BGR, RGB"),
]

#: optional keys (absent in older Detectron2 versions) and the value that is supported.
_OPTIONAL: list[tuple[str, Any, str]] = [
    ("MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", False, "False (softmax classifier)"),
    ("MODEL.RPN.CONV_DIMS", [-1], "[-1] (one conv)"),
    ("MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, False, False, False], "all False (no deformable convs)"),
]

_POOLERS = {"ROIAlignV2": True, "ROIAlign": False}


def _same(a: Any, b: Any) -> bool:
    """YAML value equality where True != 1 and [1, 2] != (1, 2) matter only for bools."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (
            isinstance(a, (list, tuple))
            and isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b))
        )
    return a == b


def _num(key: str, value: Any, kind: type = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _unsupported(key, value, "a number")
    return kind(value)


def _check_listed(cfg: dict) -> None:
    """Every fixed setting (:data:`_FIXED`) and every optional one that is present (:data:`_OPTIONAL`)."""
    for key, allowed, supported in _FIXED:
        value = get_value(cfg, key)
        if not any(_same(value, a) for a in allowed):
            raise _unsupported(key, value, supported)
    for key, good, supported in _OPTIONAL:
        try:
            value = get_value(cfg, key)
        except CellsegError:
            continue
        if not _same(value, good):
            raise _unsupported(key, value, supported)


def _check_poolers(cfg: dict) -> None:
    """Box and mask poolers: ROIAlign(V2), one type and one sampling ratio for both."""
    for head in ("ROI_BOX_HEAD", "ROI_MASK_HEAD"):
        key = f"MODEL.{head}.POOLER_TYPE"
        if get_value(cfg, key) not in _POOLERS:
            raise _unsupported(key, get_value(cfg, key), "ROIAlignV2, ROIAlign")
    box_type, mask_type = (
        get_value(cfg, "MODEL.ROI_BOX_HEAD.POOLER_TYPE"),
        get_value(cfg, "MODEL.ROI_MASK_HEAD.POOLER_TYPE"),
    )
    if box_type != mask_type:
        raise _unsupported("MODEL.ROI_MASK_HEAD.POOLER_TYPE", mask_type, f"the box head's {box_type}")
    box_sr = get_value(cfg, "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO")
    mask_sr = get_value(cfg, "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO")
    if mask_sr != box_sr:
        raise _unsupported("MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", mask_sr, f"the box head's {box_sr}")


def _check_pixel_stats(cfg: dict) -> None:
    """``PIXEL_MEAN`` and ``PIXEL_STD``: three numbers each."""
    for key in ("MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD"):
        value = get_value(cfg, key)
        if not isinstance(value, list) or len(value) != 3:
            raise _unsupported(key, value, "3 values")
        for v in value:
            _num(key, v)


def _check_anchor_layout(cfg: dict) -> list:
    """The same aspect ratios on every level, and one list of sizes or one per level; returns the sizes."""
    ratios = get_value(cfg, "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS")
    if not isinstance(ratios, list) or not ratios or any(not isinstance(r, list) or r != ratios[0] for r in ratios):
        raise _unsupported("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", ratios, "the same ratios on every level")
    sizes = get_value(cfg, "MODEL.ANCHOR_GENERATOR.SIZES")
    if not isinstance(sizes, list) or len(sizes) not in (1, 5) or any(not isinstance(s, list) or not s for s in sizes):
        raise _unsupported("MODEL.ANCHOR_GENERATOR.SIZES", sizes, "one list of sizes, or one per level p2-p6")
    return sizes


def _check_head_switches(cfg: dict) -> None:
    """The class count and the boolean switches the weight renaming reads."""
    num_classes = get_value(cfg, "MODEL.ROI_HEADS.NUM_CLASSES")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise _unsupported("MODEL.ROI_HEADS.NUM_CLASSES", num_classes, "an int >= 1")
    for key in (
        "MODEL.RESNETS.STRIDE_IN_1X1",
        "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG",
        "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK",
    ):
        if not isinstance(get_value(cfg, key), bool):
            raise _unsupported(key, get_value(cfg, key), "true, false")


def _check_anchor_sizes(sizes: list) -> None:
    """Every anchor size a positive whole number of pixels."""
    for level in sizes:
        for s in level:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not float(s).is_integer() or s <= 0:
                raise _unsupported("MODEL.ANCHOR_GENERATOR.SIZES", sizes, "positive whole-pixel sizes")


def _check_head_sizes(cfg: dict) -> None:
    """Head widths and depths, the mask head as wide as the FPN, one test size."""
    for key in ("MODEL.ROI_BOX_HEAD.FC_DIM", "MODEL.ROI_MASK_HEAD.NUM_CONV"):
        value = get_value(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _unsupported(key, value, "an int >= 1")
    conv_dim, fpn_dim = get_value(cfg, "MODEL.ROI_MASK_HEAD.CONV_DIM"), get_value(cfg, "MODEL.FPN.OUT_CHANNELS")
    if conv_dim != fpn_dim:
        raise _unsupported("MODEL.ROI_MASK_HEAD.CONV_DIM", conv_dim, f"MODEL.FPN.OUT_CHANNELS ({fpn_dim})")
    min_test = get_value(cfg, "INPUT.MIN_SIZE_TEST")
    if isinstance(min_test, list):
        raise _unsupported("INPUT.MIN_SIZE_TEST", min_test, "one size")


def check_supported(cfg: dict) -> None:
    """Raise a one-line CellsegError naming the first unsupported key and its value (checked in this
    order: fixed and optional settings, poolers, pixel statistics, anchor layout, class count and
    switches, anchor sizes, head sizes)."""
    _check_listed(cfg)
    _check_poolers(cfg)
    _check_pixel_stats(cfg)
    sizes = _check_anchor_layout(cfg)
    _check_head_switches(cfg)
    _check_anchor_sizes(sizes)
    _check_head_sizes(cfg)


def model_fields(cfg: dict, class_names: list[str]) -> dict:
    """ModelConfig fields (name -> value) reproducing the Detectron2 model ``cfg`` describes.

    ``class_names[i]`` is the name of Detectron2 class ``i`` (our label ``i + 1``).
    """
    check_supported(cfg)
    num_classes = get_value(cfg, "MODEL.ROI_HEADS.NUM_CLASSES")
    if len(class_names) != num_classes:
        raise CellsegError(
            f"{len(class_names)} class names given ({','.join(class_names)}) but the Detectron2 model has "
            f"MODEL.ROI_HEADS.NUM_CLASSES = {num_classes}"
        )
    rgb = get_value(cfg, "INPUT.FORMAT") == "RGB"
    mean = [float(v) / 255.0 for v in get_value(cfg, "MODEL.PIXEL_MEAN")]
    std = [float(v) / 255.0 for v in get_value(cfg, "MODEL.PIXEL_STD")]
    if not rgb:  # our model takes RGB: the converter also reverses the first conv's input channels
        mean, std = mean[::-1], std[::-1]
    sizes = get_value(cfg, "MODEL.ANCHOR_GENERATOR.SIZES")
    if len(sizes) == 1:
        sizes = sizes * 5
    rpn_iou = get_value(cfg, "MODEL.RPN.IOU_THRESHOLDS")
    roi_iou = get_value(cfg, "MODEL.ROI_HEADS.IOU_THRESHOLDS")
    depth = get_value(cfg, "MODEL.RESNETS.DEPTH")
    return {
        "name": f"detectron2_maskrcnn_r{depth}_fpn",
        "heads": "v1",
        "backbone": f"resnet{depth}",
        "norm": "frozen_bn",
        "returned_layers": [1, 2, 3, 4],
        "fpn_channels": int(get_value(cfg, "MODEL.FPN.OUT_CHANNELS")),
        "num_classes": num_classes + 1,
        "class_names": list(class_names),
        "min_size": int(get_value(cfg, "INPUT.MIN_SIZE_TEST")),
        "max_size": int(get_value(cfg, "INPUT.MAX_SIZE_TEST")),
        "image_mean": mean,
        "image_std": std,
        "anchor_sizes": [[int(s) for s in level] for level in sizes],
        "aspect_ratios": [float(r) for r in get_value(cfg, "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS")[0]],
        "rpn_pre_nms_top_n_train": int(get_value(cfg, "MODEL.RPN.PRE_NMS_TOPK_TRAIN")),
        "rpn_post_nms_top_n_train": int(get_value(cfg, "MODEL.RPN.POST_NMS_TOPK_TRAIN")),
        "rpn_pre_nms_top_n_test": int(get_value(cfg, "MODEL.RPN.PRE_NMS_TOPK_TEST")),
        "rpn_post_nms_top_n_test": int(get_value(cfg, "MODEL.RPN.POST_NMS_TOPK_TEST")),
        "rpn_nms_thresh": float(get_value(cfg, "MODEL.RPN.NMS_THRESH")),
        "rpn_batch_size_per_image": int(get_value(cfg, "MODEL.RPN.BATCH_SIZE_PER_IMAGE")),
        "rpn_fg_iou_thresh": float(rpn_iou[-1]),
        "rpn_bg_iou_thresh": float(rpn_iou[0]),
        "box_batch_size_per_image": int(get_value(cfg, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE")),
        "box_positive_fraction": float(get_value(cfg, "MODEL.ROI_HEADS.POSITIVE_FRACTION")),
        "box_fg_iou_thresh": float(roi_iou[-1]),
        "box_bg_iou_thresh": float(roi_iou[0]),
        "box_score_thresh": float(get_value(cfg, "MODEL.ROI_HEADS.SCORE_THRESH_TEST")),
        "box_nms_thresh": float(get_value(cfg, "MODEL.ROI_HEADS.NMS_THRESH_TEST")),
        "box_detections_per_img": int(get_value(cfg, "TEST.DETECTIONS_PER_IMAGE")),
        "roi_sampling_ratio": int(get_value(cfg, "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO")),
        "mask_roi_size": int(get_value(cfg, "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION")),
        "box_head_dim": int(get_value(cfg, "MODEL.ROI_BOX_HEAD.FC_DIM")),
        "mask_head_convs": int(get_value(cfg, "MODEL.ROI_MASK_HEAD.NUM_CONV")),
        "stride_in_1x1": bool(get_value(cfg, "MODEL.RESNETS.STRIDE_IN_1X1")),
        "roi_aligned": _POOLERS[get_value(cfg, "MODEL.ROI_BOX_HEAD.POOLER_TYPE")],
        "detectron2_inference": True,
    }


def head_layout(cfg: dict) -> dict:
    """What the weight renaming needs to know beyond the names: class count, agnostic heads, BGR."""
    return {
        "num_classes": int(get_value(cfg, "MODEL.ROI_HEADS.NUM_CLASSES")),
        "cls_agnostic_box": bool(get_value(cfg, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG")),
        "cls_agnostic_mask": bool(get_value(cfg, "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK")),
        "bgr": get_value(cfg, "INPUT.FORMAT") == "BGR",
    }
