"""Every picture cellseg draws, in one place (as cellpose's ``plot.py``); nothing else imports matplotlib.

=========================  ======================================  =====================================
picture                    drawn by                                 used by
=========================  ======================================  =====================================
dry-run overlays           :func:`overlay`, :func:`save_overlay`    ``cellseg dry-run`` (overlays/*.png)
score per cell type        :func:`score_by_class`                   ``cellseg dry-run`` (score_by_class.png)
training curves            :func:`training_curves`                  ``cellseg train`` (curves.png)
augmented samples          :func:`render`, :func:`aug_grid`         ``cellseg show-aug``
threshold sweeps           :func:`tune_curves`                      ``cellseg tune`` (plots/tune_<type>.png)
=========================  ======================================  =====================================

Figures are :class:`matplotlib.figure.Figure` objects built without ``pyplot``: no backend is chosen,
no window can open and no global figure registry holds them, so nothing needs closing. Every PNG is
written atomically (:func:`cellseg.io.atomic_path`). The ``*_figure`` functions return the figure
unsaved (tests inspect its artists); the others write the PNG.

Colours of the overlays (also in their legend): truth (train.csv) contours green ``TRUTH_RGB``,
predicted contours magenta ``PRED_RGB``; a cell without a partner at IoU > 0.5 (the metric's loosest
threshold) is hatched in its colour, truth with ``\\`` lines (a missed cell) and predictions with ``/``
lines (a false positive).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image
from scipy import ndimage

from cellseg.evaluation.metric import matched_pairs
from cellseg.io import atomic_path

#: Overlay colours (RGB uint8): ground-truth and predicted contours / hatching.
TRUTH_RGB = (0, 230, 0)
PRED_RGB = (255, 0, 255)
#: Hatch line spacing in pixels and the IoU above which a cell counts as matched (the metric's loosest).
HATCH_PERIOD = 6
MATCH_IOU = 0.5
#: Title of the hold-out panel of curves.png when the run has no hold-out (``--fold all``).
NO_HOLDOUT = "no hold-out"


def figure_rgb(fig: Figure, dpi: float = 100) -> np.ndarray:
    """Render ``fig`` with Agg at ``dpi``: (H, W, 3) uint8 (white background, no alpha)."""
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Figure, path: str | Path, dpi: float = 100) -> Path:
    """Write ``fig`` as an RGB PNG at ``path`` atomically (parents created). Returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(figure_rgb(fig, dpi), "RGB").save(tmp, format="PNG")
    return path


def _rgb01(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    return (rgb[0] / 255, rgb[1] / 255, rgb[2] / 255)


# ----------------------------------------------------------------------------------------------
# dry-run overlays


def contour(labels: np.ndarray) -> np.ndarray:
    """Boundary pixels of a label image.

    Args:
        labels: (H, W) int label image, 0 = background.
    Returns:
        (H, W) bool: True on an object pixel with a 4-neighbour of another label.
    """
    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edge & (labels > 0)


def unmatched(
    truth_labels: np.ndarray, pred_labels: np.ndarray, iou: float = MATCH_IOU
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of the objects that have no partner with IoU > ``iou`` in the other label image.

    Args:
        truth_labels, pred_labels: (H, W) int label images (0 = background, objects 1..n).
        iou: match threshold (strict, as in the metric).
    Returns:
        ``(missed, false_pos)``: (H, W) bool masks of the unmatched truth and predicted objects.
    """
    n_gt, n_pred = int(truth_labels.max(initial=0)), int(pred_labels.max(initial=0))
    g, p, ious = matched_pairs(truth_labels, pred_labels, n_gt, n_pred)
    keep = ious > iou
    gt_ok = np.zeros(n_gt + 1, bool)
    pred_ok = np.zeros(n_pred + 1, bool)
    gt_ok[np.asarray(g)[keep]] = True
    pred_ok[np.asarray(p)[keep]] = True
    gt_ok[0] = pred_ok[0] = True  # background is never hatched
    return ~gt_ok[truth_labels], ~pred_ok[pred_labels]


def overlay(image: np.ndarray, truth_labels: np.ndarray, pred_labels: np.ndarray, hatch: bool = True) -> np.ndarray:
    """The grey image with truth and prediction drawn on it, pixel for pixel.

    Args:
        image: (H, W) uint8 grey image.
        truth_labels, pred_labels: (H, W) int label images.
        hatch: hatch the objects without a partner at IoU > 0.5: missed truth cells with ``\\`` lines
            (green), false-positive predictions with ``/`` lines (magenta), every ``HATCH_PERIOD`` px.
    Returns:
        (H, W, 3) uint8: contours of truth green (``TRUTH_RGB``) and of predictions magenta
        (``PRED_RGB``, drawn last, so on top), hatching under the contours; other pixels grey.
    """
    rgb = np.repeat(np.asarray(image, dtype=np.uint8)[..., None], 3, axis=2)
    if hatch:
        missed, false_pos = unmatched(truth_labels, pred_labels)
        r, c = np.indices(truth_labels.shape)
        rgb[missed & ((r - c) % HATCH_PERIOD == 0)] = TRUTH_RGB  # "\" lines
        rgb[false_pos & ((r + c) % HATCH_PERIOD == 0)] = PRED_RGB  # "/" lines
    rgb[contour(truth_labels)] = TRUTH_RGB
    rgb[contour(pred_labels)] = PRED_RGB
    return rgb


def overlay_legend() -> list[Patch]:
    """Legend handles of :func:`overlay`: the two contour colours and the two hatchings."""
    green, magenta = _rgb01(TRUTH_RGB), _rgb01(PRED_RGB)
    return [
        Patch(facecolor="none", edgecolor=green, linewidth=2, label="truth (train.csv) contour"),
        Patch(facecolor="none", edgecolor=magenta, linewidth=2, label="prediction contour"),
        Patch(
            facecolor="none",
            edgecolor=green,
            hatch="\\\\\\",
            label=f"hatched \\: missed cell (no prediction IoU > {MATCH_IOU})",
        ),
        Patch(
            facecolor="none",
            edgecolor=magenta,
            hatch="///",
            label=f"hatched /: false positive (no truth IoU > {MATCH_IOU})",
        ),
    ]


#: Height in pixels of the legend strip under a dry-run overlay, and the least figure width that fits it.
LEGEND_PX = 64
LEGEND_MIN_WIDTH = 704


def overlay_figure(
    image: np.ndarray, truth_labels: np.ndarray, pred_labels: np.ndarray, title: str = "", dpi: float = 100
) -> Figure:
    """A figure with :func:`overlay` at native resolution (one image pixel = one PNG pixel at ``dpi``,
    top left) above a legend strip ``LEGEND_PX`` high that says what the colours and hatchings mean.

    Args:
        image: (H, W) uint8; truth_labels, pred_labels: (H, W) int label images.
        title: one line (e.g. id and score) written at the left of the legend strip.
    Returns:
        The unsaved figure, (H + LEGEND_PX) x max(W, LEGEND_MIN_WIDTH) pixels at ``dpi``.
    """
    h, w = image.shape
    fw = max(w, LEGEND_MIN_WIDTH)  # a narrow image keeps its size; the legend still fits
    fig = Figure(figsize=(fw / dpi, (h + LEGEND_PX) / dpi), dpi=dpi)
    ax = fig.add_axes((0, LEGEND_PX / (h + LEGEND_PX), w / fw, h / (h + LEGEND_PX)))
    ax.imshow(overlay(image, truth_labels, pred_labels), interpolation="nearest")
    ax.set_axis_off()
    fig.legend(
        handles=overlay_legend(),
        loc="lower right",
        ncol=2,
        fontsize=7,
        frameon=False,
        handlelength=2.5,
        handleheight=1.4,
        borderaxespad=0.2,
    )
    if title:
        fig.text(0.01, 0.02, title, fontsize=8, ha="left", va="bottom")
    return fig


def save_overlay(
    path: str | Path, image: np.ndarray, truth_labels: np.ndarray, pred_labels: np.ndarray, title: str = ""
) -> Path:
    """Write :func:`overlay_figure` as a PNG at ``path`` (a 520 x 704 image: 584 x 704 pixels)."""
    return save_figure(overlay_figure(image, truth_labels, pred_labels, title), path)


def score_by_class(per_class: Mapping[str, float], counts: Mapping[str, int], path: str | Path) -> Path:
    """Bar chart of the dry-run score per cell type, each bar labelled with its score and image count.

    Args:
        per_class: cell type -> mean competition score; counts: cell type -> number of images.
        path: the PNG to write (500 x 320 px).
    """
    names = list(per_class)
    fig = Figure(figsize=(5, 3.2), dpi=100)
    ax = fig.subplots()
    bars = ax.bar(names, [per_class[n] for n in names], color=["#4c72b0", "#dd8452", "#55a868"][: len(names)])
    for b, n in zip(bars, names):
        ax.text(
            b.get_x() + b.get_width() / 2,
            b.get_height(),
            f"{per_class[n]:.3f}\n({counts.get(n, 0)} img)",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylim(0, max([0.5, *per_class.values()]) * 1.25)
    ax.set_ylabel("competition score")
    ax.set_title("dry run: score by cell type")
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# training curves


def curves_figure(history: Sequence[Mapping[str, Any]] | pd.DataFrame) -> Figure:
    """Training losses (left, log scale) and hold-out competition scores (right) per epoch.

    Args:
        history: one row per epoch with ``epoch``, ``loss*`` and ``val_*`` columns (as
            :func:`cellseg.training.loop.write_metrics` receives it); ``val_*`` may be absent or empty.
    Returns:
        The unsaved figure. Without any hold-out score the right panel says ``NO_HOLDOUT`` instead
        of staying empty, and no legend is drawn over an empty axes.
    """
    df = pd.DataFrame(history)
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for col in [c for c in df.columns if c.startswith("loss")]:
        ax1.plot(df["epoch"], df[col], marker=".", label=col)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss")
    if ax1.get_legend_handles_labels()[0]:
        ax1.set_yscale("log")
        ax1.legend(fontsize=7)
    for col in [c for c in df.columns if c.startswith("val_")]:
        sub = df[["epoch", col]].dropna()
        if len(sub):
            ax2.plot(sub["epoch"], sub[col], marker="o", label=col.removeprefix("val_"))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("competition score (hold-out)")
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=7)
    else:
        ax2.set_xticks([])
        ax2.set_yticks([])
        ax2.text(0.5, 0.55, NO_HOLDOUT, ha="center", va="center", fontsize=14, color="0.35", transform=ax2.transAxes)
        ax2.text(
            0.5,
            0.42,
            "trained on every image (--fold all): nothing to validate on",
            ha="center",
            va="center",
            fontsize=8,
            color="0.35",
            transform=ax2.transAxes,
        )
    fig.tight_layout()
    return fig


def training_curves(history: Sequence[Mapping[str, Any]] | pd.DataFrame, path: str | Path) -> Path:
    """Write :func:`curves_figure` as ``curves.png`` (990 x 360 px) at ``path``."""
    return save_figure(curves_figure(history), path, dpi=90)


# ----------------------------------------------------------------------------------------------
# show-aug


def outline(masks: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contour pixels (mask xor eroded mask) of a mask stack, computed on each instance's box.

    Args:
        masks: (N, H, W) bool/uint8; boxes: (N, 4) xyxy containing each mask.
    Returns:
        ``coords`` (K, 2) int64 (row, col) and ``owner`` (K,) int64: the instance of each pixel.
    """
    coords, owner = [], []
    h, w = masks.shape[-2:]
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=np.int64).reshape(-1, 4)):
        y0, x0 = max(y0 - 1, 0), max(x0 - 1, 0)
        y1, x1 = min(y1 + 1, h), min(x1 + 1, w)
        sub = masks[i, y0:y1, x0:x1].astype(bool)
        edge = sub & ~ndimage.binary_erosion(sub, border_value=0)
        r, c = np.nonzero(edge)
        coords.append(np.column_stack([r + y0, c + x0]))
        owner.append(np.full(r.size, i))
    if not coords:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(coords), np.concatenate(owner)


def render(image: np.ndarray, masks: np.ndarray, boxes: np.ndarray, draw_boxes: bool = False) -> np.ndarray:
    """One augmented sample as the model sees it, with one coloured contour per instance.

    Args:
        image: (C, H, W) float in [0, 1] (channel 0 is drawn); masks: (N, H, W); boxes: (N, 4) xyxy.
        draw_boxes: also draw each box in its instance's colour.
    Returns:
        (H, W, 3) uint8.
    """
    grey = (np.clip(image[0], 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    n = len(masks)
    if n == 0:
        return rgb
    colors = (matplotlib.colormaps["hsv"](np.random.default_rng(0).permutation(n) / max(n, 1))[:, :3] * 255).astype(
        np.uint8
    )
    coords, owner = outline(masks, boxes)
    rgb[coords[:, 0], coords[:, 1]] = colors[owner]
    if draw_boxes:
        h, w = grey.shape
        for (x0, y0, x1, y1), col in zip(np.asarray(boxes, dtype=np.int64), colors):
            x1, y1 = min(x1, w) - 1, min(y1, h) - 1
            rgb[y0, x0 : x1 + 1] = rgb[y1, x0 : x1 + 1] = col
            rgb[y0 : y1 + 1, x0] = rgb[y0 : y1 + 1, x1] = col
    return rgb


@dataclass
class AugPanel:
    """One sample of the show-aug grid: ``rgb`` (H, W, 3) uint8 from :func:`render` and its caption."""

    rgb: np.ndarray
    caption: str


def aug_grid(panels: Sequence[AugPanel], path: str | Path, title: str, cols: int = 0) -> tuple[Path, int, int]:
    """Write the show-aug grid: ``panels`` in ``rows x cols`` axes under a suptitle.

    Args:
        panels: the drawn samples, in reading order.
        path: the PNG to write (110 dpi, about 460 x 370 px per panel).
        title: the figure's title (the data folder, the augmentation config, the seed).
        cols: grid columns (0: about sqrt(len(panels))).
    Returns:
        ``(path, rows, cols)``.
    """
    n = max(len(panels), 1)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows + 0.3))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, p in zip(axes, panels):
        ax.imshow(p.rgb, interpolation="nearest")
        ax.set_title(p.caption, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110), rows, cols


# ----------------------------------------------------------------------------------------------
# tune


def tune_curves(classes: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """One PNG per cell type: the score against each threshold, the others held at the chosen values.

    Args:
        classes: cell type -> a :class:`cellseg.tuning.tune.ClassResult`-like object with ``curves`` (name ->
            (xs, ys) sequences), ``tuned`` / ``default`` thresholds (attributes named like the curves),
            ``images``, ``tuned_score``, ``default_score``.
        out_dir: folder of the PNGs (created), one ``tune_<type>.png`` (1260 x 288 px) per type.
    Returns:
        The written paths, in ``classes`` order.
    """
    out_dir = Path(out_dir)
    paths = []
    for ct, r in classes.items():
        fig = Figure(figsize=(14, 3.2))
        axes = fig.subplots(1, 4)
        for ax, (name, (xs, ys)) in zip(axes, r.curves.items()):
            ax.plot(xs, ys, marker="o", ms=3)
            ax.axvline(getattr(r.tuned, name), color="tab:green", ls="--", label="tuned")
            ax.axvline(getattr(r.default, name), color="tab:red", ls=":", label="default")
            ax.set_xlabel(name)
            ax.set_ylabel("score")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{ct}: {r.images} images, tuned {r.tuned_score:.4f} (default {r.default_score:.4f})")
        fig.tight_layout()
        paths.append(save_figure(fig, out_dir / f"tune_{ct}.png", dpi=90))
    return paths
