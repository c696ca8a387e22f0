"""Detectron2 Mask R-CNN checkpoints as our models, without importing Detectron2.

Three pure steps, used by ``cellseg convert-detectron2`` (the first two live in
:mod:`cellseg.detectron2.config`, which also explains the pixel normalisation):

- :func:`read_d2_config` parses a fully merged Detectron2 config (``cfg.dump()`` output) as plain YAML.
- :func:`model_fields` checks that the config describes the supported family (standard Mask R-CNN
  R-50/101-FPN) and maps it to :class:`cellseg.config.experiment.ModelConfig` fields; anything else
  raises a one-line :class:`CellsegError` naming the key and its value.
- :func:`convert_state_dict` renames and reshapes Detectron2 weights to torchvision's names:
  background moves from the last classifier row to the first, torchvision's background box/mask
  outputs get zero rows, class-agnostic heads are repeated per class, and BGR models get their
  first conv's input channels reversed so the model takes RGB like ours.

:func:`convert_checkpoint` runs the three and writes our checkpoint and a one-model manifest.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from cellseg.config.experiment import ModelConfig
from cellseg.config.manifest import Manifest, ModelEntry, default_classes, sha256_file, write_manifest
from cellseg.detectron2.config import get_value, head_layout, model_fields, read_d2_config
from cellseg.errors import CellsegError
from cellseg.model.build import build_model
from cellseg.model.checkpoint import save_checkpoint
from cellseg.model.provenance import DETECTRON2, from_checkpoint
from cellseg.paths import git_commit

#: Detectron2 buffers that hold no weights (the normalisation comes from the config).
IGNORED_D2_KEYS = {"pixel_mean", "pixel_std"}

#: Public names, including the config steps re-exported from :mod:`cellseg.detectron2.config`.
__all__ = [
    "IGNORED_D2_KEYS",
    "build_converted",
    "convert_checkpoint",
    "convert_state_dict",
    "head_layout",
    "load_d2_weights",
    "model_fields",
    "read_d2_config",
    "torchvision_name",
]


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
    cfg_dict = read_d2_config(config)
    model_cfg = ModelConfig(**model_fields(cfg_dict, class_names))
    d2_sd = load_d2_weights(weights)
    model = build_model(model_cfg)
    state = convert_state_dict(d2_sd, head_layout(cfg_dict), model.state_dict())
    model.load_state_dict(state)
    provenance = {
        "source": "detectron2",
        "origin": DETECTRON2,
        "detectron2_weights": Path(weights).name,
        "detectron2_weights_sha256": sha256_file(weights),
        "detectron2_config": Path(config).name,
        "detectron2_config_sha256": sha256_file(config),
        "input_format": get_value(cfg_dict, "INPUT.FORMAT"),
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
