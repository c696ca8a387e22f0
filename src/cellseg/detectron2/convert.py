"""Detectron2 Mask R-CNN checkpoints as our models, without importing Detectron2.

Three pure steps, used by ``cellseg convert-detectron2``:

- :func:`read_d2_config` parses a fully merged Detectron2 config (``cfg.dump()`` output) as plain YAML.
- :func:`model_fields` checks that the config describes the supported family (standard Mask R-CNN
  R-50/101-FPN, see :func:`check_supported`) and maps it to :class:`cellseg.model.experiment.ModelConfig`
  fields; anything else raises a one-line :class:`CellsegError` naming the key and its value.
- :func:`convert_state_dict` renames and reshapes Detectron2 weights to torchvision's names:
  background moves from the last classifier row to the first, torchvision's background box/mask
  outputs get zero rows, class-agnostic heads are repeated per class, and BGR models get their
  first conv's input channels reversed so the model takes RGB like ours.

Detectron2 feeds 0-255 pixels normalised by ``PIXEL_MEAN``/``PIXEL_STD``; ours are [0, 1], so
``image_mean = PIXEL_MEAN / 255`` and ``image_std = PIXEL_STD / 255`` give the same network input.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from cellseg.errors import CellsegError
from cellseg.io import read_text_file

#: Detectron2 buffers that hold no weights (the normalisation comes from the config).
IGNORED_D2_KEYS = {"pixel_mean", "pixel_std"}


# ----------------------------------------------------------------------------------------------
# config


def read_d2_config(path: str | Path) -> dict:
    """Load a Detectron2 ``config.yaml`` (``cfg.dump()``) as a nested dict; no Detectron2 needed."""
    path = Path(path)
    if not path.is_file():
        raise CellsegError(f"{path}: Detectron2 config not found")
    text = read_text_file(path, "a Detectron2 config.yaml")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CellsegError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or "MODEL" not in data:
        raise CellsegError(f"{path}: not a Detectron2 config (no MODEL section)")
    if "_BASE_" in data:
        raise CellsegError(
            f"{path}: has _BASE_ (a partial config); give the fully merged config a training run "
            "writes (cfg.dump(), output/config.yaml)"
        )
    return data


def _get(cfg: dict, key: str) -> Any:
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


def check_supported(cfg: dict) -> None:
    """Raise a one-line CellsegError naming the first unsupported key and its value."""
    for key, allowed, supported in _FIXED:
        value = _get(cfg, key)
        if not any(_same(value, a) for a in allowed):
            raise _unsupported(key, value, supported)
    for key, good, supported in _OPTIONAL:
        try:
            value = _get(cfg, key)
        except CellsegError:
            continue
        if not _same(value, good):
            raise _unsupported(key, value, supported)
    for head in ("ROI_BOX_HEAD", "ROI_MASK_HEAD"):
        key = f"MODEL.{head}.POOLER_TYPE"
        if _get(cfg, key) not in _POOLERS:
            raise _unsupported(key, _get(cfg, key), "ROIAlignV2, ROIAlign")
    box_type, mask_type = _get(cfg, "MODEL.ROI_BOX_HEAD.POOLER_TYPE"), _get(cfg, "MODEL.ROI_MASK_HEAD.POOLER_TYPE")
    if box_type != mask_type:
        raise _unsupported("MODEL.ROI_MASK_HEAD.POOLER_TYPE", mask_type, f"the box head's {box_type}")
    box_sr = _get(cfg, "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO")
    mask_sr = _get(cfg, "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO")
    if mask_sr != box_sr:
        raise _unsupported("MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", mask_sr, f"the box head's {box_sr}")
    for key in ("MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD"):
        value = _get(cfg, key)
        if not isinstance(value, list) or len(value) != 3:
            raise _unsupported(key, value, "3 values")
        for v in value:
            _num(key, v)
    ratios = _get(cfg, "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS")
    if not isinstance(ratios, list) or not ratios or any(not isinstance(r, list) or r != ratios[0] for r in ratios):
        raise _unsupported("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", ratios, "the same ratios on every level")
    sizes = _get(cfg, "MODEL.ANCHOR_GENERATOR.SIZES")
    if not isinstance(sizes, list) or len(sizes) not in (1, 5) or any(not isinstance(s, list) or not s for s in sizes):
        raise _unsupported("MODEL.ANCHOR_GENERATOR.SIZES", sizes, "one list of sizes, or one per level p2-p6")
    num_classes = _get(cfg, "MODEL.ROI_HEADS.NUM_CLASSES")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise _unsupported("MODEL.ROI_HEADS.NUM_CLASSES", num_classes, "an int >= 1")
    for key in (
        "MODEL.RESNETS.STRIDE_IN_1X1",
        "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG",
        "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK",
    ):
        if not isinstance(_get(cfg, key), bool):
            raise _unsupported(key, _get(cfg, key), "true, false")
    for level in sizes:
        for s in level:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not float(s).is_integer() or s <= 0:
                raise _unsupported("MODEL.ANCHOR_GENERATOR.SIZES", sizes, "positive whole-pixel sizes")
    for key in ("MODEL.ROI_BOX_HEAD.FC_DIM", "MODEL.ROI_MASK_HEAD.NUM_CONV"):
        value = _get(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _unsupported(key, value, "an int >= 1")
    conv_dim, fpn_dim = _get(cfg, "MODEL.ROI_MASK_HEAD.CONV_DIM"), _get(cfg, "MODEL.FPN.OUT_CHANNELS")
    if conv_dim != fpn_dim:
        raise _unsupported("MODEL.ROI_MASK_HEAD.CONV_DIM", conv_dim, f"MODEL.FPN.OUT_CHANNELS ({fpn_dim})")
    min_test = _get(cfg, "INPUT.MIN_SIZE_TEST")
    if isinstance(min_test, list):
        raise _unsupported("INPUT.MIN_SIZE_TEST", min_test, "one size")


def model_fields(cfg: dict, class_names: list[str]) -> dict:
    """ModelConfig fields (name -> value) reproducing the Detectron2 model ``cfg`` describes.

    ``class_names[i]`` is the name of Detectron2 class ``i`` (our label ``i + 1``).
    """
    check_supported(cfg)
    num_classes = _get(cfg, "MODEL.ROI_HEADS.NUM_CLASSES")
    if len(class_names) != num_classes:
        raise CellsegError(
            f"{len(class_names)} class names given ({','.join(class_names)}) but the Detectron2 model has "
            f"MODEL.ROI_HEADS.NUM_CLASSES = {num_classes}"
        )
    rgb = _get(cfg, "INPUT.FORMAT") == "RGB"
    mean = [float(v) / 255.0 for v in _get(cfg, "MODEL.PIXEL_MEAN")]
    std = [float(v) / 255.0 for v in _get(cfg, "MODEL.PIXEL_STD")]
    if not rgb:  # our model takes RGB: the converter also reverses the first conv's input channels
        mean, std = mean[::-1], std[::-1]
    sizes = _get(cfg, "MODEL.ANCHOR_GENERATOR.SIZES")
    if len(sizes) == 1:
        sizes = sizes * 5
    rpn_iou = _get(cfg, "MODEL.RPN.IOU_THRESHOLDS")
    roi_iou = _get(cfg, "MODEL.ROI_HEADS.IOU_THRESHOLDS")
    depth = _get(cfg, "MODEL.RESNETS.DEPTH")
    return {
        "name": f"detectron2_maskrcnn_r{depth}_fpn",
        "heads": "v1",
        "backbone": f"resnet{depth}",
        "norm": "frozen_bn",
        "returned_layers": [1, 2, 3, 4],
        "fpn_channels": int(_get(cfg, "MODEL.FPN.OUT_CHANNELS")),
        "num_classes": num_classes + 1,
        "class_names": list(class_names),
        "min_size": int(_get(cfg, "INPUT.MIN_SIZE_TEST")),
        "max_size": int(_get(cfg, "INPUT.MAX_SIZE_TEST")),
        "image_mean": mean,
        "image_std": std,
        "anchor_sizes": [[int(s) for s in level] for level in sizes],
        "aspect_ratios": [float(r) for r in _get(cfg, "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS")[0]],
        "rpn_pre_nms_top_n_train": int(_get(cfg, "MODEL.RPN.PRE_NMS_TOPK_TRAIN")),
        "rpn_post_nms_top_n_train": int(_get(cfg, "MODEL.RPN.POST_NMS_TOPK_TRAIN")),
        "rpn_pre_nms_top_n_test": int(_get(cfg, "MODEL.RPN.PRE_NMS_TOPK_TEST")),
        "rpn_post_nms_top_n_test": int(_get(cfg, "MODEL.RPN.POST_NMS_TOPK_TEST")),
        "rpn_nms_thresh": float(_get(cfg, "MODEL.RPN.NMS_THRESH")),
        "rpn_batch_size_per_image": int(_get(cfg, "MODEL.RPN.BATCH_SIZE_PER_IMAGE")),
        "rpn_fg_iou_thresh": float(rpn_iou[-1]),
        "rpn_bg_iou_thresh": float(rpn_iou[0]),
        "box_batch_size_per_image": int(_get(cfg, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE")),
        "box_positive_fraction": float(_get(cfg, "MODEL.ROI_HEADS.POSITIVE_FRACTION")),
        "box_fg_iou_thresh": float(roi_iou[-1]),
        "box_bg_iou_thresh": float(roi_iou[0]),
        "box_score_thresh": float(_get(cfg, "MODEL.ROI_HEADS.SCORE_THRESH_TEST")),
        "box_nms_thresh": float(_get(cfg, "MODEL.ROI_HEADS.NMS_THRESH_TEST")),
        "box_detections_per_img": int(_get(cfg, "TEST.DETECTIONS_PER_IMAGE")),
        "roi_sampling_ratio": int(_get(cfg, "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO")),
        "mask_roi_size": int(_get(cfg, "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION")),
        "box_head_dim": int(_get(cfg, "MODEL.ROI_BOX_HEAD.FC_DIM")),
        "mask_head_convs": int(_get(cfg, "MODEL.ROI_MASK_HEAD.NUM_CONV")),
        "stride_in_1x1": bool(_get(cfg, "MODEL.RESNETS.STRIDE_IN_1X1")),
        "roi_aligned": _POOLERS[_get(cfg, "MODEL.ROI_BOX_HEAD.POOLER_TYPE")],
        "detectron2_inference": True,
    }


def head_layout(cfg: dict) -> dict:
    """What the weight renaming needs to know beyond the names: class count, agnostic heads, BGR."""
    return {
        "num_classes": int(_get(cfg, "MODEL.ROI_HEADS.NUM_CLASSES")),
        "cls_agnostic_box": bool(_get(cfg, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG")),
        "cls_agnostic_mask": bool(_get(cfg, "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK")),
        "bgr": _get(cfg, "INPUT.FORMAT") == "BGR",
    }


# ----------------------------------------------------------------------------------------------
# weights


def _unpickle(path: Path) -> Any:
    """torch.load with tensors only first; then the two other layouts Detectron2 writes: a plain
    pickle of numpy arrays (model-zoo ``.pkl``) and a torch file holding non-tensor trainer state.
    Those two run the file's pickle code: convert only checkpoints you trust, as with any pickle."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign or corrupt files
        first = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception:
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        raise CellsegError(f"{path}: not a readable torch or pickle checkpoint ({first})") from None


def load_d2_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a Detectron2 checkpoint: ``{"model": state_dict, ...}`` (a training run's
    ``model_final.pth``, or a model-zoo ``.pkl`` with numpy arrays) or a bare state dict.
    Returns name -> float32 tensor."""
    path = Path(path)
    if not path.is_file():
        raise CellsegError(f"{path}: Detectron2 checkpoint not found")
    obj = _unpickle(path)
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise CellsegError(f"{path}: no state dict in the checkpoint (expected {{'model': state_dict}})")
    out = {}
    for k, v in sd.items():
        try:
            t = torch.as_tensor(v)
        except (TypeError, RuntimeError, ValueError):
            raise CellsegError(f"{path}: entry {k} of the state dict is {type(v).__name__}, not a tensor") from None
        if not t.is_floating_point():
            raise CellsegError(f"{path}: weight {k} is {t.dtype}, not floating point")
        out[k] = t.float()
    return out


_RES = re.compile(r"^backbone\.bottom_up\.res(\d)\.(\d+)\.(conv[123]|shortcut)(\.norm)?\.(\w+)$")
_FPN = re.compile(r"^backbone\.fpn_(lateral|output)(\d)\.(weight|bias)$")
_MASK_FCN = re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$")
_SIMPLE = {
    "backbone.bottom_up.stem.conv1.weight": "backbone.body.conv1.weight",
    "proposal_generator.rpn_head.conv.weight": "rpn.head.conv.0.0.weight",
    "proposal_generator.rpn_head.conv.bias": "rpn.head.conv.0.0.bias",
    "proposal_generator.rpn_head.objectness_logits.weight": "rpn.head.cls_logits.weight",
    "proposal_generator.rpn_head.objectness_logits.bias": "rpn.head.cls_logits.bias",
    "proposal_generator.rpn_head.anchor_deltas.weight": "rpn.head.bbox_pred.weight",
    "proposal_generator.rpn_head.anchor_deltas.bias": "rpn.head.bbox_pred.bias",
    "roi_heads.box_head.fc1.weight": "roi_heads.box_head.fc6.weight",
    "roi_heads.box_head.fc1.bias": "roi_heads.box_head.fc6.bias",
    "roi_heads.box_head.fc2.weight": "roi_heads.box_head.fc7.weight",
    "roi_heads.box_head.fc2.bias": "roi_heads.box_head.fc7.bias",
    "roi_heads.mask_head.deconv.weight": "roi_heads.mask_predictor.conv5_mask.weight",
    "roi_heads.mask_head.deconv.bias": "roi_heads.mask_predictor.conv5_mask.bias",
}


def torchvision_name(d2_name: str) -> str | None:
    """The torchvision Mask R-CNN key of a Detectron2 key whose tensor is copied as is; None for the
    predictor layers (reshaped by :func:`convert_state_dict`) and unknown keys."""
    if d2_name in _SIMPLE:
        return _SIMPLE[d2_name]
    if d2_name.startswith("backbone.bottom_up.stem.conv1.norm."):
        return "backbone.body.bn1." + d2_name.rsplit(".", 1)[1]
    m = _RES.match(d2_name)
    if m:
        stage, block, conv, norm, param = m.groups()
        layer = f"backbone.body.layer{int(stage) - 1}.{block}"
        if conv == "shortcut":
            return f"{layer}.downsample.{1 if norm else 0}.{param}"
        return f"{layer}.{'bn' + conv[-1] if norm else conv}.{param}"
    m = _FPN.match(d2_name)
    if m:
        kind, level, param = m.groups()
        blocks = "inner_blocks" if kind == "lateral" else "layer_blocks"
        return f"backbone.fpn.{blocks}.{int(level) - 2}.0.{param}"
    m = _MASK_FCN.match(d2_name)
    if m:
        return f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"
    return None


def _predictor_weights(sd: dict[str, torch.Tensor], layout: dict) -> dict[str, torch.Tensor]:
    """Box classifier/regressor and mask predictor in torchvision's layout (background first)."""
    k = layout["num_classes"]
    out = {}
    for param in ("weight", "bias"):
        cls = sd[f"roi_heads.box_predictor.cls_score.{param}"]
        if cls.shape[0] != k + 1:
            raise CellsegError(
                f"box_predictor.cls_score has {cls.shape[0]} outputs, expected NUM_CLASSES + 1 = {k + 1}"
            )
        out[f"roi_heads.box_predictor.cls_score.{param}"] = torch.cat([cls[k:], cls[:k]])
        reg = sd[f"roi_heads.box_predictor.bbox_pred.{param}"]
        if layout["cls_agnostic_box"]:
            if reg.shape[0] != 4:
                raise CellsegError(f"box_predictor.bbox_pred has {reg.shape[0]} outputs, expected 4 (class-agnostic)")
            out[f"roi_heads.box_predictor.bbox_pred.{param}"] = reg.repeat((k + 1,) + (1,) * (reg.dim() - 1))
        else:
            if reg.shape[0] != 4 * k:
                raise CellsegError(f"box_predictor.bbox_pred has {reg.shape[0]} outputs, expected 4 x {k}")
            out[f"roi_heads.box_predictor.bbox_pred.{param}"] = torch.cat([torch.zeros_like(reg[:4]), reg])
        mask = sd[f"roi_heads.mask_head.predictor.{param}"]
        expected = 1 if layout["cls_agnostic_mask"] else k
        if mask.shape[0] != expected:
            raise CellsegError(f"mask_head.predictor has {mask.shape[0]} outputs, expected {expected}")
        if layout["cls_agnostic_mask"]:
            mask = mask.repeat((k,) + (1,) * (mask.dim() - 1))
        out[f"roi_heads.mask_predictor.mask_fcn_logits.{param}"] = torch.cat([torch.zeros_like(mask[:1]), mask])
    return out


def convert_state_dict(
    d2: dict[str, torch.Tensor], layout: dict, target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Detectron2 weights -> a complete state dict for ``target`` (the torchvision model's own
    ``state_dict()``, which gives the expected keys and shapes; its ``num_batches_tracked`` buffers
    are kept). Raises CellsegError naming the first missing, unexpected or mis-shaped weight."""
    predictor_keys = {
        f"roi_heads.{p}.{param}"
        for p in ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_head.predictor")
        for param in ("weight", "bias")
    }
    out: dict[str, torch.Tensor] = {}
    for name, tensor in d2.items():
        if name in IGNORED_D2_KEYS or name in predictor_keys:
            continue
        tv = torchvision_name(name)
        if tv is None or tv not in target:
            raise CellsegError(f"Detectron2 weight {name} has no place in the supported Mask R-CNN")
        out[tv] = tensor
    missing = sorted(predictor_keys - set(d2))
    if missing:
        raise CellsegError(f"Detectron2 checkpoint lacks {missing[0]}")
    out.update(_predictor_weights(d2, layout))
    if layout["bgr"]:
        out["backbone.body.conv1.weight"] = out["backbone.body.conv1.weight"].flip(1)
    for name, ref in target.items():
        if name.endswith("num_batches_tracked"):
            out[name] = ref.clone()
            continue
        if name not in out:
            raise CellsegError(f"Detectron2 checkpoint lacks the weight for {name} (torchvision name)")
        if tuple(out[name].shape) != tuple(ref.shape):
            raise CellsegError(
                f"weight {name}: Detectron2 shape {tuple(out[name].shape)} != model shape {tuple(ref.shape)}"
            )
        out[name] = out[name].to(ref.dtype).contiguous()
    return out


# ----------------------------------------------------------------------------------------------
# the whole conversion


def build_converted(
    weights: str | Path, config: str | Path, class_names: list[str]
) -> tuple[torch.nn.Module, Any, dict]:
    """(model in eval mode with the converted weights, its ModelConfig, provenance dict)."""
    from cellseg.model.build import build_model
    from cellseg.model.experiment import ModelConfig
    from cellseg.model.manifest import sha256_file

    cfg_dict = read_d2_config(config)
    model_cfg = ModelConfig(**model_fields(cfg_dict, class_names))
    d2_sd = load_d2_weights(weights)
    model = build_model(model_cfg)
    state = convert_state_dict(d2_sd, head_layout(cfg_dict), model.state_dict())
    model.load_state_dict(state)
    provenance = {
        "source": "detectron2",
        "origin": "detectron2 import",  # cellseg.model.provenance.DETECTRON2
        "detectron2_weights": Path(weights).name,
        "detectron2_weights_sha256": sha256_file(weights),
        "detectron2_config": Path(config).name,
        "detectron2_config_sha256": sha256_file(config),
        "input_format": _get(cfg_dict, "INPUT.FORMAT"),
    }
    return model.eval(), model_cfg, provenance


def convert_checkpoint(
    weights: str | Path,
    config: str | Path,
    out_dir: str | Path,
    class_names: list[str],
    name: str | None = None,
    half: bool = False,
) -> Path:
    """Convert a Detectron2 checkpoint + merged config into ``out_dir/model.pth`` (our
    self-describing checkpoint) and ``out_dir/manifest.yaml`` (one model, identity view, the
    public-notebook per-class thresholds, unshifted mask pasting as Detectron2 does). Returns the
    manifest path."""
    from cellseg.model.checkpoint import git_commit, save_checkpoint
    from cellseg.model.manifest import Manifest, ModelEntry, default_classes, write_manifest
    from cellseg.model.provenance import from_checkpoint

    out_dir = Path(out_dir)
    model, model_cfg, provenance = build_converted(weights, config, class_names)
    provenance["git_commit"] = git_commit()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_dir / "model.pth", model, model_cfg, class_names, provenance, half=half)
    manifest = Manifest(
        name=name or out_dir.name,
        # Detectron2 trains on box-aligned mask targets and pastes them unshifted: written on the
        # model's entry (not the ensemble's fusion), so it stays right when mixed with our models
        models=[ModelEntry(checkpoint="model.pth", paste_shift=0.0, provenance=from_checkpoint(provenance))],
        tta=["identity"],
        classes=default_classes(),
    )
    return write_manifest(manifest, out_dir / "manifest.yaml")
