"""The ensemble of a weights manifest, and the one path an image takes through it.

    ensemble = Ensemble.load(manifest, device)   # every model loaded once
    result = ensemble.predict(image)             # (H, W) uint8 -> ImageResult

:meth:`Ensemble.predict` is the per-image path every caller shares, in this order:

    (H, W) uint8 image
      -> every model x TTA view         Ensemble.forward     (forward.predict_views)
      -> the image's cell type          Ensemble.vote        (vote_cell_type, below)
      -> relabel + paste soft crops     Ensemble.detections  (forward.raw_to_detections)
      -> fusion                         fusion.fuse
      -> post-processing                postprocess.postprocess
      -> ImageResult: non-overlapping crops, their scores, the cell type

``predict`` is :meth:`Ensemble.forward` (the part that runs on the device) followed by
:meth:`Ensemble.finish` (CPU only). Who calls what:

* ``cellseg predict`` / the Kaggle kernel / ``cellseg dry-run``: :func:`cellseg.inference.runner.predict_folder`
  calls ``forward`` and ``finish`` of :meth:`Ensemble.select` (the views and models the time budget
  allows); on CUDA ``finish`` of image k runs in a worker thread while the device runs image k + 1;
* training validation: :func:`cellseg.training.engine.evaluate` calls ``predict`` on
  :meth:`Ensemble.in_memory` (a copy of the model being trained);
* ``cellseg pseudo-label``: ``predict`` with the file name's cell type and stricter thresholds;
* ``cellseg predict-raw``: ``forward`` + ``detections`` (the pre-fusion detections are cached), then
  ``cellseg tune`` runs fusion and post-processing over a grid of thresholds.

Every threshold comes from the ensemble's :class:`~cellseg.config.manifest.Manifest`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cellseg import CELL_TYPES, CLASS_IDS
from cellseg.config.experiment import ModelConfig
from cellseg.config.manifest import ClassThresholds, Manifest
from cellseg.data.masks import CropMask
from cellseg.inference.device import apply_speed_options
from cellseg.inference.forward import LoadedModel, RawView, as_loaded, load_ensemble, predict_views, raw_to_detections
from cellseg.inference.fusion import Detections, fuse
from cellseg.inference.postprocess import postprocess

#: adjusts a cell type's thresholds before they are applied (pseudo-labels use stricter ones)
Strictness = Callable[[ClassThresholds], ClassThresholds]

#: torch.OutOfMemoryError appeared in torch 2.5; older torch (Kaggle's image may lag) has only the CUDA one
OutOfMemoryError: type[Exception] = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


@dataclass
class ImageResult:
    """The ensemble's answer for one image.

    Attributes:
        crops: K non-overlapping instances (tight :class:`~cellseg.data.masks.CropMask`), descending score.
        scores: (K,) float32 fused scores.
        cell_type: the image's cell type (voted, or given by the caller).
        rest_s: seconds of vote, paste, fusion and post-processing.
    """

    crops: list[CropMask]
    scores: np.ndarray
    cell_type: str
    rest_s: float


# ----------------------------------------------------------------------------- the cell-type vote


def vote_cell_type(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None, min_score: float = 0.0
) -> str:
    """The image's cell type: class id with the largest sum of score (x model weight) over detections
    scoring at least ``min_score`` (all detections when none does).

    Args:
        labels: (N,) class ids 1..3 (others do not vote).
        scores: (N,) detection scores.
        weights: (N,) model weights (None: 1 each).
        min_score: the many low-score fragments of an image (pieces of astro branches, say) are mostly
            labelled with the many-small-cells class and can outvote its confident detections.

    Returns:
        A cell type name; the first type when nothing votes.
    """
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    w = scores * (1.0 if weights is None else np.asarray(weights, dtype=np.float64))
    valid = (labels >= 1) & (labels <= len(CELL_TYPES))
    confident = valid & (scores >= min_score)
    if confident.any():
        valid = confident
    if not valid.any():
        return CELL_TYPES[0]
    votes = np.bincount(labels[valid] - 1, weights=w[valid], minlength=len(CELL_TYPES))
    return CELL_TYPES[int(np.argmax(votes))]


def vote_inputs(raw: Sequence[RawView], models: Sequence[LoadedModel]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, scores, weights), each (N,), over every detection of ``raw``, for :func:`vote_cell_type`."""
    if not raw:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)
    labels = np.concatenate([r.labels.numpy() for r in raw])
    scores = np.concatenate([r.scores.numpy() for r in raw])
    weights = np.concatenate([np.full(len(r.scores), models[r.model].weight, np.float32) for r in raw])
    return labels, scores, weights


def relabel(raw: Sequence[RawView], class_id: int) -> list[RawView]:
    """Every detection of an image gets the image's voted class (each image holds one cell type)."""
    return [RawView(r.boxes, r.scores, torch.full_like(r.labels, class_id), r.masks, r.model, r.view) for r in raw]


# ----------------------------------------------------------------------------- the ensemble


@dataclass
class Ensemble:
    """Loaded models, the TTA views they run on, and the manifest whose thresholds apply.

    Attributes:
        manifest: thresholds, fusion and post-processing settings (its ``models`` list is what
            :meth:`load` loaded; ``models`` below may be a subset, see :meth:`select`).
        models: the prepared models, in the order their :class:`RawView` ``model`` numbers them.
        device: where the models run.
        views: the TTA views run on every image (default: the manifest's).
    """

    manifest: Manifest
    models: list[LoadedModel]
    device: torch.device
    views: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.views:
            self.views = list(self.manifest.tta)

    @classmethod
    def load(cls, manifest: Manifest, device: torch.device, fp16: bool | None = None) -> Ensemble:
        """Load and prepare every model of ``manifest`` on ``device`` (checksums are checked when the
        manifest is loaded); ``fp16`` as in :func:`cellseg.inference.forward.prepare_model`. The inference
        speed options (:func:`cellseg.inference.device.apply_speed_options`: off unless the environment
        turns them on) are applied here, so every caller of the per-image path gets them."""
        loaded = load_ensemble(manifest, device, fp16=fp16)
        apply_speed_options([lm.model for lm in loaded], device)
        return cls(manifest, loaded, device)

    @classmethod
    def in_memory(
        cls,
        model: nn.Module,
        model_config: ModelConfig,
        manifest: Manifest,
        device: torch.device,
        class_agnostic: bool = False,
    ) -> Ensemble:
        """A one-model ensemble of a model held in memory (e.g. the one being trained).

        Inference changes the model it runs (eval mode, its own score / NMS limits, masks kept 28 x 28,
        fp16 wrappers on CUDA), so this runs a deep copy: ``model``, its mode and its state_dict keys
        are left as they were. Label names are ``model_config.class_names`` (a name that is not a cell
        type is dropped, as for a checkpoint); the paste shift follows the manifest as for a checkpoint.
        ``class_agnostic``: every foreground label counts as one cell type instead (validation on
        images whose classes are not the competition's, e.g. LIVECell cell lines).
        """
        loaded = as_loaded(copy.deepcopy(model), model_config, model_config.class_names, manifest.fusion, device)
        if class_agnostic:
            loaded.label_map = np.where(np.arange(len(loaded.label_map)) > 0, CLASS_IDS[CELL_TYPES[0]], 0)
        return cls(manifest, [loaded], device)

    def select(self, views: Sequence[str], models: Sequence[int]) -> Ensemble:
        """The same ensemble restricted to ``views`` and the models at positions ``models``."""
        return dataclasses.replace(self, models=[self.models[i] for i in models], views=list(views))

    # ---- one image

    def predict(
        self, image: np.ndarray, cell_type: str | None = None, strictness: Strictness | None = None
    ) -> ImageResult:
        """One (H, W) uint8 image to its final detections: exactly :meth:`forward` then :meth:`finish`
        (see there for ``cell_type`` and ``strictness``)."""
        return self.finish(image.shape, self.forward(image), cell_type, strictness)

    def forward(self, image: np.ndarray, known: dict[tuple[int, str], RawView] | None = None) -> list[RawView]:
        """Every model on every view of one (H, W) uint8 image -> RawViews in model-major order.

        ``known`` maps (model position, view) to a RawView already computed for this image (the time
        budget's calibration forward), used instead of running it again. A CUDA out-of-memory error
        is retried once with one view per forward, after the ``except`` block is left: while the
        exception is alive its traceback holds the failed forward's tensors.
        """
        known = dict(known or {})
        raw = None
        try:
            raw = self._forward(image, known, batch=4)
        except OutOfMemoryError:
            pass  # retried below, once the exception (and the memory its frames hold) is released
        if raw is None:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raw = self._forward(image, known, batch=1)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return raw

    def _forward(self, image: np.ndarray, known: dict[tuple[int, str], RawView], batch: int) -> list[RawView]:
        """:meth:`forward`'s RawViews, taking the ``known`` ones as they are and running only the others."""
        if not known:
            return predict_views(self.models, image, self.views, self.device, batch=batch)
        raw: list[RawView] = []
        for mi, lm in enumerate(self.models):
            missing = [v for v in self.views if (mi, v) not in known]
            ran = {r.view: r for r in predict_views([lm], image, missing, self.device, batch=batch)} if missing else {}
            for v in self.views:
                r = known.get((mi, v)) or ran[v]
                raw.append(RawView(r.boxes, r.scores, r.labels, r.masks, mi, v))
        return raw

    def vote(self, raw: Sequence[RawView]) -> str:
        """The image's cell type from all its raw detections (the manifest's vote threshold)."""
        return vote_cell_type(*vote_inputs(raw, self.models), min_score=self.manifest.fusion.vote_min_score)

    def detections(
        self, image_shape: tuple[int, int], raw: Sequence[RawView], cell_type: str | None = None, *, min_score: float
    ) -> tuple[Detections, str, float]:
        """Pre-fusion detections of one image from its raw views (CPU only).

        Args:
            image_shape: (height, width).
            raw: :meth:`forward`'s views of the image.
            cell_type: the image's type when known (e.g. from an unlabeled image's file name); else
                :meth:`vote`. Every detection is relabelled to it, so its thresholds apply.
            min_score: masks scoring under it are not pasted.

        Returns:
            (Detections with soft masks on their crops, cell type, total weight of all model x view runs).
        """
        if cell_type is None:
            cell_type = self.vote(raw)
        dets = raw_to_detections(relabel(raw, CLASS_IDS[cell_type]), self.models, *image_shape, min_score=min_score)
        return dets, cell_type, float(sum(m.weight for m in self.models) * len(self.views))

    def finish(
        self,
        image_shape: tuple[int, int],
        raw: Sequence[RawView],
        cell_type: str | None = None,
        strictness: Strictness | None = None,
    ) -> ImageResult:
        """Cell-type vote, paste, fusion and post-processing of one image's raw views (CPU only).

        Args:
            image_shape: (height, width).
            raw: :meth:`forward`'s views of the image.
            cell_type: skips the vote.
            strictness: adjusts the type's thresholds (pseudo-labels use stricter ones).
        """
        height, width = image_shape
        t1 = time.perf_counter()
        if cell_type is None:
            cell_type = self.vote(raw)
        th = self.manifest.thresholds(cell_type)
        if strictness is not None:
            th = strictness(th)
        fu = self.manifest.fusion
        # in ``max`` score mode a detection under the score threshold cannot change which ones above it
        # survive greedy NMS, so it is not pasted; ``mean`` scores a keeper from its whole cluster, so all are
        min_score = th.score if fu.score_mode == "max" else 0.0
        dets, cell_type, total = self.detections(image_shape, raw, cell_type, min_score=min_score)
        fused = fuse(dets, th, fu, height, width, total_weight=total)
        crops, scores = postprocess(fused, th, self.manifest.postprocess, height, width)
        return ImageResult(crops, scores, cell_type, time.perf_counter() - t1)
