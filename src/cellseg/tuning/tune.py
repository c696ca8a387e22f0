"""Threshold tuning on cached predictions.

``cellseg predict-raw`` runs the ensemble once over hold-out train images and caches, per image, the
PRE-fusion detections of every model x TTA view (after the cell-type vote) in one compressed
``<id>.npz``: boxes, scores, labels, sources, model weights and the soft masks quantised to uint8 on
their crops. Caching before fusion lets the tuner search the NMS IoU too; caching soft masks lets it
search the mask binarisation threshold. Tuning never re-runs the models.

The cache (``<id>.npz`` + ``index.json``, one ensemble per folder) is :mod:`cellseg.tuning.raw_cache`;
deciding what to write back and reporting it is :mod:`cellseg.tuning.report`.

``cellseg tune`` evaluates, for every cached image, the competition score of every combination of
(NMS IoU, mask threshold, minimum pixels, score threshold) in a grid. The score threshold is free:
overlap removal is greedy in descending score order, so the instances that survive a score threshold
are exactly the survivors of the full run above it; one post-processing pass per (NMS, mask,
min-pixels) gives the score for all score thresholds at once. Per cell type the best combination is
chosen; to guard against overfitting, the same choice is repeated on K-1 of K sample-grouped folds
and scored on the held-out one (out-of-fold score).
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cellseg import CELL_TYPES, plot
from cellseg.config.loader import check_number, field_range
from cellseg.config.manifest import ClassThresholds, Manifest
from cellseg.data.folds import group_folds
from cellseg.data.masks import fill_holes, label_image
from cellseg.errors import CellsegError
from cellseg.evaluation.metric import THRESHOLDS, matched_pairs
from cellseg.inference.fusion import fuse, pairwise_iou
from cellseg.inference.postprocess import binarize, min_pixels_filter, remove_overlaps
from cellseg.tuning.raw_cache import CachedImage, cache_fingerprint, load_cached

# ----------------------------------------------------------------------------- scoring a grid


@dataclass
class TuneGrid:
    """Candidate values per threshold; the manifest's current values are always added."""

    nms_iou: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4, 0.5])
    mask_threshold: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6])
    min_pixels: list[int] = field(default_factory=lambda: [0, 25, 50, 75, 100, 150, 200])
    score: list[float] = field(default_factory=lambda: [round(float(s), 3) for s in np.arange(0.05, 0.951, 0.025)])

    def check(self) -> TuneGrid:
        """CellsegError (one line, e.g. ``--score: 1.5 is out of range (allowed: [0, 1])``) for an empty
        candidate list or a value outside its manifest field's range: a grid can only choose
        thresholds a manifest may hold."""
        for name in ("nms_iou", "mask_threshold", "min_pixels", "score"):
            flag = "--" + name.replace("_", "-")
            values = getattr(self, name)
            if not values:
                raise CellsegError(f"{flag}: no candidate value given")
            for v in values:
                check_number(v, flag, field_range(ClassThresholds, name))
        return self

    def with_values(self, th: ClassThresholds) -> TuneGrid:
        def add(vals, v):
            return sorted(set(vals) | {v})

        return TuneGrid(
            add(self.nms_iou, th.nms_iou),
            add(self.mask_threshold, th.mask_threshold),
            add(self.min_pixels, th.min_pixels),
            add(self.score, th.score),
        )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.nms_iou), len(self.mask_threshold), len(self.min_pixels), len(self.score))

    def values(self, index: tuple[int, ...]) -> ClassThresholds:
        a, b, c, d = index
        return ClassThresholds(
            score=float(self.score[d]),
            mask_threshold=float(self.mask_threshold[b]),
            nms_iou=float(self.nms_iou[a]),
            min_pixels=int(self.min_pixels[c]),
        )

    def index_of(self, th: ClassThresholds) -> tuple[int, int, int, int]:
        return (
            self.nms_iou.index(th.nms_iou),
            self.mask_threshold.index(th.mask_threshold),
            self.min_pixels.index(th.min_pixels),
            self.score.index(th.score),
        )


def scores_over_thresholds(scores: np.ndarray, ious: np.ndarray, n_gt: int, score_grid: np.ndarray) -> np.ndarray:
    """Image score for every score threshold, shape (S,).

    ``scores`` (K,) of the final disjoint instances; ``ious`` (K,) each one's IoU with its best
    ground-truth object (0 if none). An instance counts at threshold s when its score >= s.
    """
    inside = scores[None, :] >= score_grid[:, None]  # (S, K)
    n_pred = inside.sum(axis=1)
    tp = ((ious[None, None, :] > THRESHOLDS[:, None, None]) & inside[None]).sum(axis=2)  # (T, S)
    denom = n_gt + n_pred[None, :] - tp
    prec = np.divide(tp, denom, out=np.where(denom == 0, 1.0, 0.0), where=denom > 0)
    return prec.mean(axis=0)


def image_grid_scores(img: CachedImage, truth, grid: TuneGrid, manifest: Manifest) -> np.ndarray:
    """Competition score of one cached image for every grid combination, shape ``grid.shape``."""
    fu, pp = manifest.fusion, manifest.postprocess
    gt, _ = label_image(truth.instances, img.height, img.width)
    n_gt = len(truth.instances)
    score_grid = np.asarray(grid.score, dtype=np.float64)
    out = np.zeros(grid.shape)
    for b, mthr in enumerate(grid.mask_threshold):
        # the pairwise IoU depends on the mask threshold, not on the NMS threshold: computed once
        pair_iou = pairwise_iou(img.dets, img.height, img.width, fu.iou_type, mthr) if len(img.dets) else None
        for a, nms in enumerate(grid.nms_iou):
            th = ClassThresholds(nms_iou=nms, mask_threshold=mthr)  # fusion reads these two only
            fused = fuse(img.dets, th, fu, img.height, img.width, total_weight=img.total_weight, iou=pair_iou)
            crops = [binarize(m, mthr) for m in fused.masks]
            if pp.fill_holes:
                crops = [fill_holes(c) for c in crops]
            for c, min_px in enumerate(grid.min_pixels):
                keep = min_pixels_filter(crops, min_px)
                kept, idx = remove_overlaps(
                    [crops[i] for i in keep], fused.scores[keep], img.height, img.width, pp.max_lost_fraction, min_px
                )
                scores = fused.scores[keep][idx].astype(np.float64)
                pred, _ = label_image(kept, img.height, img.width)
                ious = np.zeros(len(kept))
                if kept:
                    _, pi, iou = matched_pairs(gt, pred, n_gt, len(kept))
                    np.maximum.at(ious, pi - 1, iou)
                out[a, b, c] = scores_over_thresholds(scores, ious, n_gt, score_grid)
    return out


# ----------------------------------------------------------------------------- choosing


@dataclass
class ClassResult:
    """One cell type's tuning (images grouped by their TRUE type).

    ``default_score`` / ``tuned_score``: mean image score with the manifest's / the chosen thresholds
    (in-sample); ``out_of_fold_score``: each image scored with thresholds chosen without its sample
    group's fold, None when the images come from one sample group (no out-of-fold figure exists).
    ``default_scores`` / ``oof_scores``: the per-image figures behind them (same image order).
    ``misvoted``: ids whose cell-type vote differs from their true type. ``groups``: sample groups.
    """

    cell_type: str
    images: int
    default: ClassThresholds
    tuned: ClassThresholds
    default_score: float
    tuned_score: float
    out_of_fold_score: float | None
    curves: dict[str, tuple[list[float], list[float]]]
    groups: int = 0
    default_scores: list[float] = field(default_factory=list)
    oof_scores: list[float] | None = None
    misvoted: list[str] = field(default_factory=list)


@dataclass
class TuneResult:
    """All classes; ``out_of_fold_score`` is None unless every class has one. ``vote_right``: images
    whose cell-type vote (what the kernel will apply) matched the true type."""

    classes: dict[str, ClassResult]
    default_score: float
    tuned_score: float
    out_of_fold_score: float | None
    images: int
    seconds: float
    vote_right: int = 0


def _at(tables: np.ndarray, index: tuple[int, ...]) -> np.ndarray:
    """(n_images,) scores at grid ``index`` of ``tables`` (n_images, *grid.shape)."""
    key: tuple[slice | int, ...] = (slice(None), *index)
    return tables[key]


def choose(tables: np.ndarray, prefer: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Grid index with the best mean score over images; ``tables`` (n_images, *grid.shape).

    ``prefer`` (the current thresholds) wins every tie: a value only moves when it scores higher.
    """
    mean = tables.mean(axis=0)
    if prefer is not None and mean[prefer] >= mean.max() - 1e-12:
        return tuple(int(i) for i in prefer)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mean)), mean.shape))


def _read_cache(cache_dir: str | Path, truth: dict, manifest: Manifest, progress: bool) -> dict[str, list[CachedImage]]:
    """The cached images that have ground truth, by their true cell type; CellsegError when none has
    or when some were predicted by another ensemble than ``manifest``."""
    files = [f for f in sorted(Path(cache_dir).glob("*.npz")) if f.stem in truth]
    if not files:
        raise CellsegError(f"{cache_dir}: no cached image with ground truth (run `cellseg predict-raw` first)")
    fingerprint = cache_fingerprint(manifest)
    per_class: dict[str, list[CachedImage]] = {}
    for f in tqdm(files, desc="read cache", unit="img", disable=None if progress else True):
        img = load_cached(f)
        per_class.setdefault(truth[img.id].cell_type, []).append(img)  # the true type, not the vote
    images = [img for v in per_class.values() for img in v]
    bad = [img for img in images if img.fingerprint != fingerprint]
    if bad:
        n_kinds = len({img.fingerprint for img in bad}) + (len(bad) < len(images))
        raise CellsegError(
            f"{cache_dir}: {len(bad)} of {len(images)} cached image(s) were predicted by another ensemble than "
            f"{manifest.name or 'this manifest'} (fingerprint {fingerprint[:12]}...)"
            + (" and the cache mixes several ensembles" if n_kinds > 1 else "")
            + "; run `cellseg predict-raw` with this manifest into a new --out"
        )
    return per_class


def _grid_tables(
    per_class: dict[str, list[CachedImage]],
    truth: dict,
    grids: dict[str, TuneGrid],
    manifest: Manifest,
    jobs: int,
    progress: bool,
) -> dict[str, list[np.ndarray]]:
    """Per cell type, one score table (grid shape) per image, in ``jobs`` processes."""
    jobs_list = [(img, ct) for ct, imgs in per_class.items() for img in imgs]
    tables: dict[str, list[np.ndarray]] = {ct: [] for ct in per_class}
    bar = tqdm(total=len(jobs_list), desc="tune", unit="img", disable=None if progress else True)
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as ex:
            futs = [
                (ct, ex.submit(image_grid_scores, img, truth[img.id], grids[ct], manifest)) for img, ct in jobs_list
            ]
            for ct, fu in futs:
                tables[ct].append(fu.result())
                bar.update()
    else:
        for img, ct in jobs_list:
            tables[ct].append(image_grid_scores(img, truth[img.id], grids[ct], manifest))
            bar.update()
    bar.close()
    return tables


def _class_result(
    ct: str, g: TuneGrid, tab: np.ndarray, default: ClassThresholds, imgs: list[CachedImage], truth: dict, folds: int
) -> tuple[ClassResult, list[float], np.ndarray | None]:
    """Tuned thresholds of one cell type from its (images, *grid shape) table, with the out-of-fold
    check: (result, per-image tuned scores, per-image out-of-fold scores or None when there is a
    single sample group)."""
    d_idx = g.index_of(default)
    best = choose(tab, prefer=d_idx)
    groups = [truth[img.id].meta.get("sample_id") or img.id for img in imgs]
    fold = group_folds(groups, folds)
    oof = np.zeros(len(tab))
    for k in np.unique(fold):
        held = fold == k
        idx = choose(tab[~held], prefer=d_idx) if (~held).any() else best
        oof[held] = _at(tab[held], idx)
    has_oof = len(np.unique(fold)) > 1  # one sample group: every image would be scored in-sample
    curves = {}
    for axis, name in enumerate(("nms_iou", "mask_threshold", "min_pixels", "score")):
        sl: list[int | slice] = list(best)
        sl[axis] = slice(None)
        curves[name] = (list(map(float, getattr(g, name))), tab.mean(axis=0)[tuple(sl)].tolist())
    result = ClassResult(
        ct,
        len(tab),
        default,
        g.values(best),
        float(_at(tab, d_idx).mean()),
        float(_at(tab, best).mean()),
        float(oof.mean()) if has_oof else None,
        curves,
        groups=len(set(groups)),
        default_scores=_at(tab, d_idx).tolist(),
        oof_scores=oof.tolist() if has_oof else None,
        misvoted=[img.id for img in imgs if img.cell_type != ct],
    )
    return result, _at(tab, best).tolist(), (oof if has_oof else None)


def tune(
    cache_dir: str | Path,
    truth: dict,
    manifest: Manifest,
    grid: TuneGrid | None = None,
    folds: int = 3,
    jobs: int = 1,
    progress: bool = True,
) -> TuneResult:
    """Tune per-class thresholds on every cached image that has ground truth in ``truth``.

    Images are grouped by their true cell type. Raises CellsegError when the cache holds predictions
    of another ensemble than ``manifest`` (see :func:`cache_fingerprint`) or when a grid value is
    outside its threshold's range (:meth:`TuneGrid.check`).
    """
    t0 = time.time()
    grid = (grid or TuneGrid()).check()
    per_class = _read_cache(cache_dir, truth, manifest, progress)
    grids = {ct: grid.with_values(manifest.thresholds(ct)) for ct in per_class}
    tables = _grid_tables(per_class, truth, grids, manifest, jobs, progress)
    results: dict[str, ClassResult] = {}
    all_default: list[float] = []
    all_tuned: list[float] = []
    all_oof: list[float] = []
    for ct in [c for c in CELL_TYPES if c in per_class]:
        tab = np.stack(tables[ct])
        res, tuned, oof = _class_result(ct, grids[ct], tab, manifest.thresholds(ct), per_class[ct], truth, folds)
        results[ct] = res
        all_default += res.default_scores
        all_tuned += tuned
        all_oof += oof.tolist() if oof is not None else [float("nan")] * len(tab)
    return TuneResult(
        results,
        float(np.mean(all_default)),
        float(np.mean(all_tuned)),
        None if np.isnan(all_oof).any() else float(np.mean(all_oof)),
        len(all_tuned),
        time.time() - t0,
        vote_right=sum(r.images - len(r.misvoted) for r in results.values()),
    )


def plot_curves(res: TuneResult, out_dir: str | Path) -> list[Path]:
    """One PNG per class, ``out_dir/tune_<type>.png``: score vs each threshold, the others held at the
    chosen values (drawn by :func:`cellseg.plot.tune_curves`). Returns the paths."""
    return plot.tune_curves(res.classes, out_dir)
