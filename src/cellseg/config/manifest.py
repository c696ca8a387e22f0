"""The weights manifest: one YAML file per shipped ensemble (``weights/<name>/manifest.yaml``).

It lists the checkpoints (file, sha256, ensemble weight, provenance), the TTA views, the fusion settings and the
per-cell-type post-processing thresholds. Every threshold reaches post-processing only through the
:class:`Manifest` object loaded here. Checksums are verified on load, before any image is touched::

    m = load_manifest("weights/demo/manifest.yaml")          # CellsegError naming a bad file
    m.checkpoint_path(m.models[0])                           # absolute path of the first model
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from cellseg import CELL_TYPES
from cellseg.config.loader import bounds, check_ranges, load_yaml, to_dict
from cellseg.config.provenance import Provenance
from cellseg.errors import CellsegError
from cellseg.io import atomic_write_text, sha256_file  # bundle, training and convert import sha256_file from here

View = Literal["identity", "hflip", "vflip", "hvflip"]
VIEWS: tuple[str, ...] = ("identity", "hflip", "vflip", "hvflip")


@dataclass
class ModelEntry:
    """One checkpoint of the ensemble; ``checkpoint`` is relative to the manifest's folder."""

    checkpoint: str
    sha256: str = ""
    weight: float = field(default=1.0, metadata=bounds(0, lo_open=True))
    #: mask paste shift of this model in pixels; None = 0 for models with aligned ROIAlign
    #: (Detectron2 conversions: box-aligned mask targets), else ``fusion.paste_shift``.
    paste_shift: float | None = None
    #: inference input scale of this model: its images are resized by this factor before the forward
    #: and its boxes and masks mapped back to the full image; None = the scale it was trained at
    #: (``model.input_scale`` of its checkpoint). Only for fixed-scale models (``input_scale`` > 0).
    #: Set with ``cellseg export --input-scale``.
    input_scale: float | None = field(default=None, metadata=bounds(0, 8, lo_open=True))
    #: what the model was trained on (:mod:`cellseg.model.provenance`); None = provenance unknown
    #: (manifests written before it was recorded).
    provenance: Provenance | None = None


@dataclass
class FusionConfig:
    """How detections of all views and models are merged (see :mod:`cellseg.inference.fusion`).

    ``iou_type``: NMS on mask IoU (sparse, on crops) or box IoU. ``average_masks``: the keeper's soft
    mask becomes the score x model-weight average of its suppressed duplicates. ``score_mode``: the
    fused score is the keeper's (``max``) or the weighted sum of the cluster's scores divided by the
    total weight of all views x models (``mean``; penalises detections few views agree on).
    ``model_score_thresh`` / ``model_nms_thresh`` loosen the models' own filtering at inference;
    ``detections_per_view`` caps each model x view. ``paste_shift``: pixels (down-right) by which
    28 x 28 masks are placed relative to their boxes (see :func:`cellseg.inference.forward.paste_soft`).
    ``vote_min_score``: only detections scoring at least this vote for the image's cell type (all
    of them when none does; see :func:`cellseg.inference.postprocess.vote_cell_type`).
    """

    iou_type: Literal["mask", "box"] = "mask"
    average_masks: bool = True
    score_mode: Literal["max", "mean"] = "max"
    detections_per_view: int = field(default=1000, metadata=bounds(1))
    model_score_thresh: float = field(default=0.05, metadata=bounds(0, 1))
    model_nms_thresh: float = field(default=0.9, metadata=bounds(0, 1, lo_open=True))
    paste_shift: float = 0.25
    vote_min_score: float = field(default=0.5, metadata=bounds(0, 1))


@dataclass
class ClassThresholds:
    """Post-processing thresholds of one cell type (applied to every instance of an image of it)."""

    score: float = field(default=0.5, metadata=bounds(0, 1))
    mask_threshold: float = field(default=0.5, metadata=bounds(0, 1))
    nms_iou: float = field(default=0.3, metadata=bounds(0, 1, lo_open=True))
    min_pixels: int = field(default=0, metadata=bounds(0))


@dataclass
class PostprocessConfig:
    """``fill_holes``: fill interior holes of binary masks. ``max_lost_fraction``: in overlap removal
    an instance that lost more than this fraction of its pixels to higher-scoring ones is dropped."""

    fill_holes: bool = True
    max_lost_fraction: float = field(default=0.5, metadata=bounds(0, 1))


@dataclass
class Manifest:
    name: str = ""
    models: list[ModelEntry] = field(default_factory=list)
    tta: list[View] = field(default_factory=lambda: ["identity"])
    fusion: FusionConfig = field(default_factory=FusionConfig)
    classes: dict[str, ClassThresholds] = field(default_factory=dict)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    #: folder the checkpoint paths are relative to; set by :func:`load_manifest`, never written.
    base_dir: str = ""

    def checkpoint_path(self, entry: ModelEntry) -> Path:
        return Path(self.base_dir or ".") / entry.checkpoint

    def thresholds(self, cell_type: str) -> ClassThresholds:
        return self.classes[cell_type]


def check_manifest(m: Manifest, where: str = "manifest") -> None:
    """Raise CellsegError (one line) for an unusable manifest: no models, bad views, missing classes, a
    threshold out of its range or not finite (score, mask_threshold in [0, 1], nms_iou in (0, 1],
    min_pixels >= 0, model weights > 0; the ranges are the fields' :func:`~cellseg.config.loader.bounds`)."""
    if not m.models:
        raise CellsegError(f"{where}: no models listed (an empty ensemble cannot predict)")
    if not m.tta:
        raise CellsegError(f"{where}: tta lists no views (use [identity] for none)")
    if len(set(m.tta)) != len(m.tta):
        raise CellsegError(f"{where}: tta lists a view twice: {m.tta}")
    missing = [c for c in CELL_TYPES if c not in m.classes]
    if missing:
        raise CellsegError(f"{where}: classes lacks thresholds for {', '.join(missing)}")
    unknown = sorted(set(m.classes) - set(CELL_TYPES))
    if unknown:
        raise CellsegError(f"{where}: classes has unknown cell type(s) {', '.join(unknown)}")
    try:
        check_ranges(m)
    except CellsegError as e:
        raise CellsegError(f"{where}: {e}") from None


def verify_checksums(m: Manifest) -> None:
    """Every checkpoint exists and matches its sha256; the first failure raises naming the file."""
    for e in m.models:
        p = m.checkpoint_path(e)
        if not p.is_file():
            raise CellsegError(f"{p}: checkpoint listed in the manifest not found")
        if not e.sha256:
            raise CellsegError(f"{p}: the manifest gives no sha256 for this checkpoint")
        digest = sha256_file(p)
        if digest != e.sha256.lower():
            raise CellsegError(f"{p}: sha256 mismatch (manifest {e.sha256[:12]}..., file {digest[:12]}...)")


def load_manifest(path: str | Path, verify: bool = True, overrides: list[str] | None = None) -> Manifest:
    """Load and check ``path``; with ``verify`` also check every checkpoint's sha256."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.yaml"
    m = load_yaml(Manifest, path, overrides, what="an ensemble manifest (YAML, weights/<name>/manifest.yaml)")
    m.base_dir = str(path.resolve().parent)
    check_manifest(m, str(path))
    if verify:
        verify_checksums(m)
    return m


def write_manifest(m: Manifest, path: str | Path, fill_checksums: bool = True) -> Path:
    """Write ``m`` as YAML atomically; with ``fill_checksums`` compute each model's sha256 first
    (checkpoint paths resolved against ``path``'s folder)."""
    path = Path(path)
    m = dataclasses.replace(m, base_dir=str(path.resolve().parent))
    if fill_checksums:
        m.models = [dataclasses.replace(e, sha256=sha256_file(m.checkpoint_path(e))) for e in m.models]
    check_manifest(m, str(path))
    data = to_dict(m)
    data.pop("base_dir")
    for entry in data["models"]:  # unset: left out, so such a manifest reads as it did before the key
        if entry.get("input_scale") is None:
            entry.pop("input_scale", None)
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def default_classes() -> dict[str, ClassThresholds]:
    """The public-notebook thresholds (FACTS.md): score .15/.35/.55, min pixels 75/150/75."""
    return {
        "shsy5y": ClassThresholds(score=0.15, mask_threshold=0.5, nms_iou=0.3, min_pixels=75),
        "astro": ClassThresholds(score=0.35, mask_threshold=0.5, nms_iou=0.3, min_pixels=150),
        "cort": ClassThresholds(score=0.55, mask_threshold=0.5, nms_iou=0.3, min_pixels=75),
    }
