"""Self-describing checkpoints and initial weights.

A checkpoint is one ``torch.save`` file (a plain dict, loadable with ``weights_only=True``)::

    {"format": "cellseg-checkpoint", "version": 1,
     "model": state_dict (float32, or float16 when saved with half=True),
     "half": bool, "model_config": ModelConfig as a dict, "class_names": [...],
     "provenance": {"fold", "epoch", "score", "git_commit", ..., "origin", "data_sources" (per training
                    source: path, sha256, images, synthetic), "init_sha256"},
     "experiment": full ExperimentConfig dict or None,
     "train_state": optimiser/scheduler/RNG state for --resume (last.pth only)}

``data_sources`` / ``init_sha256`` (what the weights were trained on) are written by ``cellseg train``
and read by :func:`cellseg.model.provenance.from_checkpoint`; older checkpoints lack them (provenance
unknown). :func:`load_model` rebuilds the network from the file alone. :func:`load_init` loads starting
weights for training from a torchvision COCO Mask R-CNN state dict, an ImageNet ResNet state dict, or
one of our checkpoints.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellseg.config.experiment import ExperimentConfig, ModelConfig
from cellseg.config.loader import from_dict, to_dict
from cellseg.errors import CellsegError
from cellseg.io import atomic_path
from cellseg.model.build import build_model, class_specific, unwrap

FORMAT = "cellseg-checkpoint"
VERSION = 1


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself (everything but the weights)."""

    path: Path
    model_config: ModelConfig
    class_names: list[str]
    provenance: dict = field(default_factory=dict)
    half: bool = False
    experiment: dict | None = None


def _unreadable_reason(path: Path, e: Exception) -> str:
    """Our words for why ``torch.load`` refused ``path`` (PyTorch's own text suggests turning
    ``weights_only`` off, which is never the fix here)."""
    with open(path, "rb") as f:
        head = f.read(8)
    text = str(e)
    if not head:
        return "empty file (0 bytes)"
    if "Unsupported global" in text or "GLOBAL" in text:
        return (
            "it holds pickled Python objects, not just tensors (e.g. a whole saved nn.Module); "
            "save model.state_dict() instead"
        )
    if head.startswith(b"PK\x03\x04") or "zip archive" in text or isinstance(e, EOFError):
        return "truncated or corrupt (an incomplete torch.save archive: copy or download it again)"
    return "not a file written by torch.save"


def _read(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CellsegError(f"checkpoint {path} not found")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a file
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickler errors come in many types
        raise CellsegError(f"{path}: not a readable PyTorch checkpoint: {_unreadable_reason(path, e)}") from None


def _is_ours(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    cfg: ExperimentConfig | ModelConfig,
    class_names: list[str] | tuple[str, ...],
    provenance: dict,
    half: bool = False,
    train_state: dict | None = None,
) -> Path:
    """Write a self-describing checkpoint atomically (a killed write leaves the old file intact).

    Args:
        model: a MaskRCNN (or a DDP wrapper around one).
        cfg: the experiment config (stored whole) or just its model section.
        half: store floating-point weights as float16 (about half the size).
        train_state: resume state (optimiser, scheduler, RNG...) kept only in ``last.pth``.
    """
    model_cfg = cfg.model if isinstance(cfg, ExperimentConfig) else cfg
    if not isinstance(model_cfg, ModelConfig):
        raise TypeError(f"cfg must be ExperimentConfig or ModelConfig, got {type(cfg).__name__}")
    state = unwrap(model).state_dict()
    state = {
        k: (v.detach().half() if half and v.is_floating_point() else v.detach()).cpu().clone() for k, v in state.items()
    }
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": state,
        "half": bool(half),
        "model_config": to_dict(model_cfg),
        "class_names": list(class_names),
        "provenance": dict(provenance),
        "experiment": to_dict(cfg) if isinstance(cfg, ExperimentConfig) else None,
    }
    if train_state is not None:
        payload["train_state"] = train_state
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _info(path: Path, ckpt: dict) -> CheckpointInfo:
    if ckpt.get("version", 0) > VERSION:
        raise CellsegError(f"{path}: checkpoint version {ckpt.get('version')} is newer than this cellseg ({VERSION})")
    try:
        model_cfg = from_dict(ModelConfig, ckpt["model_config"], "model_config")
    except KeyError:
        raise CellsegError(f"{path}: checkpoint has no model_config") from None
    return CheckpointInfo(
        path=path,
        model_config=model_cfg,
        class_names=list(ckpt.get("class_names", model_cfg.class_names)),
        provenance=dict(ckpt.get("provenance", {})),
        half=bool(ckpt.get("half", False)),
        experiment=ckpt.get("experiment"),
    )


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict of one of our checkpoints (CellsegError for anything else)."""
    ckpt = _read(path)
    if not _is_ours(ckpt):
        raise CellsegError(f"{path}: not a cellseg checkpoint (expected a file written by `cellseg train`)")
    return ckpt


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Config, class names and provenance of a checkpoint, without building the model."""
    return _info(Path(path), read_checkpoint(path))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointInfo]:
    """Rebuild the model from the checkpoint alone; float32 weights, eval mode, on ``device``."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    info = _info(path, ckpt)
    model = build_model(info.model_config, training_targets=False)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    missing, unexpected, mismatched = _compare(model.state_dict(), state)
    if missing or unexpected or mismatched:
        raise CellsegError(
            f"{path}: weights do not match the stored model_config ({_describe(missing, unexpected, mismatched)})"
        )
    model.load_state_dict(state)
    return model.to(device).eval(), info


# ----------------------------------------------------------------------------- initial weights


def _compare(
    expected: dict, given: dict, ignore: tuple[str, ...] = ("num_batches_tracked",)
) -> tuple[list, list, list]:
    """(missing, unexpected, shape-mismatched) keys of ``given`` against ``expected``."""
    skip = lambda k: k.endswith(ignore)  # noqa: E731 - BN counters differ between BatchNorm2d and FrozenBN
    missing = [k for k in expected if k not in given and not skip(k)]
    unexpected = [k for k in given if k not in expected and not skip(k)]
    mismatched = [
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in given and hasattr(given[k], "shape") and given[k].shape != expected[k].shape
    ]
    return missing, unexpected, mismatched


def _describe(missing: list, unexpected: list, mismatched: list, n: int = 3) -> str:
    parts = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape mismatch (file vs model)", mismatched),
    ):
        if keys:
            more = f" and {len(keys) - n} more" if len(keys) > n else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:n])}{more}")
    return "; ".join(parts)


def _unwrap_state(obj: Any) -> dict:
    """The state dict inside common wrappers ({"model": sd}, {"state_dict": sd})."""
    if _is_ours(obj):
        return obj["model"]
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {k.removeprefix("module."): v for k, v in obj.items()}
    raise CellsegError("expected a state dict (name -> tensor), optionally under 'model' or 'state_dict'")


def load_init(model: nn.Module, path: str | Path, class_names: Sequence[str] | None = None) -> str:
    """Load starting weights into ``model`` (a MaskRCNN built by :func:`build_model`).

    Accepted files:
      * one of our checkpoints, or a torchvision Mask R-CNN state dict (e.g. COCO,
        ``maskrcnn_resnet50_fpn``/``_v2`` with 91 classes): everything is loaded except class-specific
        layers whose shape differs (box cls/bbox predictor, mask logits), which keep their fresh init;
        a differing RPN head (other anchor count) is re-initialised too.
      * an ImageNet ResNet state dict (torchvision ``resnet50().state_dict()``): loaded into the
        backbone body (``fc`` ignored); FPN and heads keep their fresh init.

    Args:
        class_names: the model's classes (``model.class_names``). With one of our checkpoints whose
            classes differ (e.g. LIVECell pretraining ``[shsy5y, cell]`` -> ``[shsy5y, astro, cort]``),
            the class-specific layers are matched by name: background and the classes both have keep
            their trained rows, the others keep their fresh init, whatever the shapes. None: by shape only.

    Returns a one-line summary (naming re-initialised layers and classes). Raises CellsegError naming
    missing/unexpected/mismatched keys.
    """
    path = Path(path)
    try:
        raw = _read(path)
        src_names = _info(path, raw).class_names if _is_ours(raw) else None
        state = _unwrap_state(raw)
    except CellsegError as e:
        if str(e).startswith("checkpoint"):
            raise
        if str(e).startswith(str(path)):
            raise CellsegError(f"--init {e}") from None
        raise CellsegError(f"--init {path}: {e}") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model = unwrap(model)
    if any(k.startswith("backbone.body.") for k in state):
        names = (src_names, list(class_names)) if src_names is not None and class_names is not None else None
        return _load_detector(model, state, path, names)
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        return _load_backbone(model, state, path)
    raise CellsegError(
        f"--init {path}: unrecognised weights (expected a cellseg checkpoint, a torchvision Mask R-CNN "
        f"state dict with 'backbone.body.*' keys, or an ImageNet ResNet state dict with 'conv1.weight'); "
        f"first keys: {', '.join(list(state)[:3])}"
    )


def _class_rows(src: torch.Tensor, fresh: torch.Tensor, src_names: list[str], dst_names: list[str]):
    """``fresh`` (a class-specific tensor, dim 0 = classes incl. background x k) with the rows of the
    classes ``src`` has too copied over, or None when the layouts do not correspond."""
    n_src, n_dst = len(src_names) + 1, len(dst_names) + 1
    k = src.shape[0] // n_src
    if src.shape[0] != k * n_src or fresh.shape[0] != k * n_dst or src.shape[1:] != fresh.shape[1:]:
        return None
    out = fresh.clone()
    pairs = [(0, 0)] + [(src_names.index(n) + 1, j + 1) for j, n in enumerate(dst_names) if n in src_names]
    for i, j in pairs:
        out[j * k : (j + 1) * k] = src[i * k : (i + 1) * k]
    return out


def _load_detector(model: nn.Module, state: dict, path: Path, names: tuple[list[str], list[str]] | None = None) -> str:
    own = model.state_dict()
    missing, unexpected, mismatched = _compare(own, state)

    def reinit_ok(k: str) -> bool:
        return class_specific(k) or k.startswith(("rpn.head.cls_logits.", "rpn.head.bbox_pred."))

    bad_mismatch = [m for m in mismatched if not reinit_ok(m.split(" ")[0])]
    bad_missing = [k for k in missing if not class_specific(k)]
    if bad_missing or unexpected or bad_mismatch:
        raise CellsegError(
            f"--init {path}: Mask R-CNN weights do not fit this model config "
            f"({_describe(bad_missing, unexpected, bad_mismatch)}); check model.heads (v1/v2), backbone, fpn_channels"
        )
    skipped = {m.split(" ")[0] for m in mismatched}
    partial = {}
    if names is not None and names[0] != names[1]:  # classes differ: match class-specific rows by name
        for k in own:
            if class_specific(k) and k in state:
                skipped.add(k)
                rows = _class_rows(state[k], own[k], *names)
                if rows is not None:
                    partial[k] = rows
    load = {k: v for k, v in state.items() if k not in skipped and k in own}
    model.load_state_dict({**load, **partial}, strict=False)
    heads = sorted({k.rsplit(".", 1)[0] for k in (skipped | set(missing)) - set(partial)})
    note = f"; re-initialised {', '.join(heads)}" if heads else ""
    if partial:
        src, dst = names  # type: ignore[misc]
        kept = [n for n in dst if n in src]
        fresh = [n for n in dst if n not in src]
        layers = sorted({k.rsplit(".", 1)[0] for k in partial})
        note += (
            f"; its classes ({', '.join(src)}) differ: kept {', '.join(kept) or 'background only'}, "
            f"re-initialised {', '.join(fresh) or 'none'} in {', '.join(layers)}"
        )
    what = "cellseg checkpoint" if names is not None else "Mask R-CNN weights"
    return f"loaded {len(load) + len(partial)} tensors from {what} {path.name}{note}"


def _load_backbone(model: nn.Module, state: dict, path: Path) -> str:
    backbone: Any = model.backbone  # torchvision's BackboneWithFPN, typed nn.Module
    body: nn.Module = backbone.body
    own = body.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # IntermediateLayerGetter drops stages after the last returned one: ignore their weights.
    kept_stages = {k.split(".")[0] for k in own}
    state = {k: v for k, v in state.items() if k.split(".")[0] in kept_stages}
    missing, unexpected, mismatched = _compare(own, state)
    if missing or unexpected or mismatched:
        raise CellsegError(
            f"--init {path}: ImageNet ResNet weights do not fit model.backbone "
            f"({_describe(missing, unexpected, mismatched)})"
        )
    body.load_state_dict(state, strict=False)
    return f"loaded {len(state)} backbone tensors from ImageNet weights {path.name}; FPN and heads freshly initialised"


__all__ = [
    "CheckpointInfo",
    "save_checkpoint",
    "load_model",
    "read_checkpoint",
    "read_checkpoint_info",
    "load_init",
]
