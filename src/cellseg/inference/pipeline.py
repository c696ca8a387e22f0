"""One image through the ensemble: the per-image path every caller shares (the folder runner and so the
kernel, dry-run, predict-raw/tune, pseudo-labels).

    (H, W) uint8 image -> models x TTA views (:func:`forward_image`) -> cell-type vote
    (:func:`vote_image_type`) -> relabel + paste (:func:`image_detections`) -> fusion + post-processing
    (:func:`finish_image`) -> non-overlapping crops with scores (:class:`ImageResult`).

The forward runs where the models are (GPU); everything after it is CPU-only, so the folder runner can
run image k's CPU stages in a worker thread while the GPU runs image k + 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cellseg import CLASS_IDS
from cellseg.data.masks import CropMask
from cellseg.inference.forward import LoadedModel, RawView, predict_views, raw_to_detections, raw_vote_inputs, relabel
from cellseg.inference.fusion import Detections, fuse
from cellseg.inference.postprocess import postprocess, vote_cell_type
from cellseg.model.manifest import ClassThresholds, Manifest


@dataclass
class ImageResult:
    crops: list[CropMask]
    scores: np.ndarray
    cell_type: str
    forward_s: float
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
    """Models x views of one (H, W) uint8 image -> (raw views, seconds).

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
    """The image's cell type from all its raw model x view detections (manifest's vote threshold)."""
    return vote_cell_type(*raw_vote_inputs(raw, loaded), min_score=manifest.fusion.vote_min_score)


def image_detections(
    image_shape: tuple[int, int],
    raw: Sequence[RawView],
    loaded: Sequence[LoadedModel],
    views: Sequence[str],
    manifest: Manifest,
    cell_type: str | None = None,
    min_score: float | None = None,
) -> tuple[Detections, str, float]:
    """Pre-fusion detections of one image from its raw views (CPU only).

    The cell type is ``cell_type`` when given (e.g. from an unlabeled image's file name), else the
    score-weighted vote; every detection is relabelled to it, so its thresholds apply. Masks scoring
    under ``min_score`` are not pasted; by default that is the type's score threshold in ``max``
    score mode (lower scores cannot change which detections above it survive greedy NMS) and 0
    otherwise. Returns (Detections, cell type, total weight of all model x view runs).
    """
    if cell_type is None:
        cell_type = vote_image_type(raw, loaded, manifest)
    if min_score is None:
        min_score = manifest.thresholds(cell_type).score if manifest.fusion.score_mode == "max" else 0.0
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
    strictness: Callable[[ClassThresholds], ClassThresholds] | None = None,
) -> ImageResult:
    """Cell-type vote, fusion and post-processing of one image's raw views (CPU only).

    ``cell_type`` skips the vote; ``strictness(thresholds) -> thresholds`` adjusts the type's
    thresholds (pseudo-labels use stricter ones).
    """
    height, width = image_shape
    t1 = time.perf_counter()
    if cell_type is None:
        cell_type = vote_image_type(raw, loaded, manifest)
    th = manifest.thresholds(cell_type)
    if strictness is not None:
        th = strictness(th)
    fu = manifest.fusion
    dets, cell_type, total = image_detections(
        image_shape, raw, loaded, views, manifest, cell_type, th.score if fu.score_mode == "max" else 0.0
    )
    fused = fuse(
        dets,
        height,
        width,
        th.nms_iou,
        fu.iou_type,
        th.mask_threshold,
        fu.average_masks,
        fu.score_mode,
        total_weight=total,
    )
    crops, scores = postprocess(fused, th, manifest.postprocess, height, width)
    return ImageResult(crops, scores, cell_type, 0.0, time.perf_counter() - t1)


def predict_image(
    image: np.ndarray, loaded: Sequence[LoadedModel], views: Sequence[str], manifest: Manifest, device: torch.device
) -> ImageResult:
    """One (H, W) uint8 image through models x views, vote, fusion and post-processing."""
    raw, forward_s = forward_image(image, loaded, views, device)
    res = finish_image(image.shape, raw, loaded, views, manifest)
    res.forward_s = forward_s
    return res
