"""One image through the ensemble: the per-image path every caller shares.

    (H, W) uint8 image
      -> models x TTA views            :func:`forward_image`      (cellseg.inference.forward)
      -> cell-type vote                :func:`vote_image_type`    (cellseg.inference.postprocess)
      -> relabel + paste soft crops    :func:`image_detections`   (cellseg.inference.forward)
      -> fusion                        :func:`~cellseg.inference.fusion.fuse`
      -> post-processing               :func:`~cellseg.inference.postprocess.postprocess`
      -> non-overlapping crops + scores (:class:`ImageResult`)

:func:`predict_image` is the whole path; it is :func:`forward_image` followed by :func:`finish_image`.
Who calls what:

* ``cellseg predict`` / the Kaggle kernel / ``cellseg dry-run``: :func:`cellseg.inference.runner.predict_folder`
  calls :func:`forward_image` and :func:`finish_image` (on CUDA the CPU half of image k runs in a
  worker thread while the GPU runs image k + 1);
* training validation: :func:`cellseg.training.engine.evaluate` calls :func:`predict_image` on the
  model held in memory (:func:`in_memory_ensemble`);
* ``cellseg pseudo-label``: :func:`predict_image` with the file name's cell type and stricter thresholds;
* ``cellseg predict-raw``: :func:`forward_image` + :func:`image_detections` (the pre-fusion detections
  are cached), then ``cellseg tune`` runs fusion and post-processing over a grid of thresholds.

Every threshold comes from a :class:`~cellseg.config.manifest.Manifest` (its ``models`` list is not
read here: the models come as :class:`~cellseg.inference.forward.LoadedModel`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cellseg import CELL_TYPES, CLASS_IDS
from cellseg.config.experiment import ModelConfig
from cellseg.config.manifest import ClassThresholds, Manifest
from cellseg.data.masks import CropMask
from cellseg.inference.forward import (
    LoadedModel,
    RawView,
    as_loaded,
    predict_views,
    raw_to_detections,
    raw_vote_inputs,
    relabel,
)
from cellseg.inference.fusion import Detections, fuse
from cellseg.inference.postprocess import postprocess, vote_cell_type

#: adjusts a cell type's thresholds before they are applied (pseudo-labels use stricter ones)
Strictness = Callable[[ClassThresholds], ClassThresholds]


@dataclass
class ImageResult:
    """The pipeline's answer for one image.

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


#: torch.OutOfMemoryError appeared in torch 2.5; older torch (Kaggle's image may lag) has only the CUDA one
OutOfMemoryError: type[Exception] = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def _forward(
    image: np.ndarray,
    loaded: Sequence[LoadedModel],
    views: Sequence[str],
    device: torch.device,
    known: dict[tuple[int, str], RawView],
    batch: int,
) -> list[RawView]:
    """Every model x view of ``image`` in :func:`predict_views`' order, taking the ``known``
    (model position, view) results as they are and running only the others."""
    if not known:
        return predict_views(loaded, image, views, device, batch=batch)
    raw: list[RawView] = []
    for mi, lm in enumerate(loaded):
        missing = [v for v in views if (mi, v) not in known]
        ran = {r.view: r for r in predict_views([lm], image, missing, device, batch=batch)} if missing else {}
        for v in views:
            r = known.get((mi, v)) or ran[v]
            raw.append(RawView(r.boxes, r.scores, r.labels, r.masks, mi, v))
    return raw


def forward_image(
    image: np.ndarray,
    loaded: Sequence[LoadedModel],
    views: Sequence[str],
    device: torch.device,
    known: dict[tuple[int, str], RawView] | None = None,
) -> tuple[list[RawView], float]:
    """Every model on every view of one (H, W) uint8 image -> (raw views in model-major order, seconds).

    ``known`` maps (position in ``loaded``, view) to a RawView already computed for this image (the
    time budget's calibration forward), which is used instead of running it again. A CUDA
    out-of-memory error is retried once with one view per forward, after the ``except`` block is
    left: while the exception is alive its traceback holds the failed forward's tensors.
    """
    t0 = time.perf_counter()
    known = dict(known or {})
    raw = None
    try:
        raw = _forward(image, loaded, views, device, known, batch=4)
    except OutOfMemoryError:
        pass  # retried below, once the exception (and the memory its frames hold) is released
    if raw is None:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raw = _forward(image, loaded, views, device, known, batch=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return raw, time.perf_counter() - t0


def vote_image_type(raw: Sequence[RawView], loaded: Sequence[LoadedModel], manifest: Manifest) -> str:
    """The image's cell type from all its raw model x view detections (the manifest's vote threshold)."""
    return vote_cell_type(*raw_vote_inputs(raw, loaded), min_score=manifest.fusion.vote_min_score)


def image_detections(
    image_shape: tuple[int, int],
    raw: Sequence[RawView],
    loaded: Sequence[LoadedModel],
    views: Sequence[str],
    manifest: Manifest,
    cell_type: str | None = None,
    *,
    min_score: float,
) -> tuple[Detections, str, float]:
    """Pre-fusion detections of one image from its raw views (CPU only).

    Args:
        image_shape: (height, width).
        cell_type: the image's type when known (e.g. from an unlabeled image's file name); else the
            score-weighted vote. Every detection is relabelled to it, so its thresholds apply.
        min_score: masks scoring under it are not pasted.

    Returns:
        (Detections with soft masks on their crops, cell type, total weight of all model x view runs).
    """
    if cell_type is None:
        cell_type = vote_image_type(raw, loaded, manifest)
    raw = relabel(raw, CLASS_IDS[cell_type])
    dets = raw_to_detections(raw, loaded, *image_shape, min_score=min_score)
    return dets, cell_type, float(sum(m.weight for m in loaded) * len(views))


def finish_image(
    image_shape: tuple[int, int],
    raw: Sequence[RawView],
    loaded: Sequence[LoadedModel],
    views: Sequence[str],
    manifest: Manifest,
    cell_type: str | None = None,
    strictness: Strictness | None = None,
) -> ImageResult:
    """Cell-type vote, paste, fusion and post-processing of one image's raw views (CPU only).

    Args:
        image_shape: (height, width).
        raw: :func:`forward_image`'s views of the image.
        views: the views that ran (for the ``mean`` score mode's total weight).
        cell_type: skips the vote.
        strictness: adjusts the type's thresholds (pseudo-labels use stricter ones).
    """
    height, width = image_shape
    t1 = time.perf_counter()
    if cell_type is None:
        cell_type = vote_image_type(raw, loaded, manifest)
    th = manifest.thresholds(cell_type)
    if strictness is not None:
        th = strictness(th)
    fu = manifest.fusion
    # in ``max`` score mode a detection under the score threshold cannot change which ones above it
    # survive greedy NMS, so it is not pasted; ``mean`` scores a keeper from its whole cluster, so all are
    dets, cell_type, total = image_detections(
        image_shape, raw, loaded, views, manifest, cell_type, min_score=th.score if fu.score_mode == "max" else 0.0
    )
    fused = fuse(dets, th, fu, height, width, total_weight=total)
    crops, scores = postprocess(fused, th, manifest.postprocess, height, width)
    return ImageResult(crops, scores, cell_type, time.perf_counter() - t1)


def predict_image(
    image: np.ndarray,
    loaded: Sequence[LoadedModel],
    views: Sequence[str],
    manifest: Manifest,
    device: torch.device,
    cell_type: str | None = None,
    strictness: Strictness | None = None,
) -> ImageResult:
    """One (H, W) uint8 image through models x views, vote, fusion and post-processing.

    Exactly :func:`forward_image` then :func:`finish_image` (see there for ``cell_type`` and ``strictness``).
    """
    raw, _ = forward_image(image, loaded, views, device)
    return finish_image(image.shape, raw, loaded, views, manifest, cell_type, strictness)


def in_memory_ensemble(
    model: nn.Module, model_config: ModelConfig, manifest: Manifest, device: torch.device, class_agnostic: bool = False
) -> list[LoadedModel]:
    """A one-model ensemble of a model held in memory (e.g. the one being trained), for :func:`predict_image`.

    The pipeline changes the model it runs (eval mode, its own score / NMS limits, masks kept 28 x 28,
    fp16 wrappers on CUDA), so it runs a deep copy: ``model``, its mode and its state_dict keys are
    left as they were. Label names are ``model_config.class_names`` (a name that is not a cell type is
    dropped, as for a checkpoint); the paste shift follows the manifest as for a checkpoint
    (:func:`cellseg.inference.forward.as_loaded`). ``class_agnostic``: every foreground label counts as
    one cell type instead (validation on images whose classes are not the competition's, e.g. LIVECell
    cell lines, where every instance is scored).
    """
    loaded = as_loaded(copy.deepcopy(model), model_config, model_config.class_names, manifest.fusion, device)
    if class_agnostic:
        loaded.label_map = np.where(np.arange(len(loaded.label_map)) > 0, CLASS_IDS[CELL_TYPES[0]], 0)
    return [loaded]
