"""Synthetic competition dataset in the exact Kaggle folder layout.

There is no competition data on the development machines, so every feature is tested, demonstrated
and benchmarked on this generator's output::

    <out>/train/<id>.png                     606 by default, 520 x 704 8-bit grey
    <out>/train.csv                          id, annotation, width, height, cell_type, plate_time,
                                             sample_date, sample_id, elapsed_timedelta (one row per cell)
    <out>/test/<id>.png                      3 by default, no annotations (as on Kaggle)
    <out>/train_semi_supervised/<sample_id>_<DDdHHhMMm>.png   200 by default, unlabeled
    <out>/sample_submission.csv              id,predicted (one row per test id, predicted empty)
    <out>/cellseg-synth.json                 marker: generator, seed, counts (models trained on this
                                             folder are recorded as synthetic, cellseg.model.provenance)

Ids are 12 lower-case hex digits. Images of one ``sample_id`` form a time series (same vessel, growing
``elapsed_timedelta``) so grouped folds are meaningful. Annotations are row-major RLE
(:func:`cellseg.data.rle.encode_crop`) and never overlap within an image (touching is fine).

How the cells are made (per image, a single cell type; statistics from the real train set):

================  =======  ===========================  ============  ===========================
type              share    instances / image, mean      mean area     shape
                           [min, max]                   (px)
================  =======  ===========================  ============  ===========================
cort              320      34 [4, 108]                  ~240          small, round
shsy5y            155      337 [49, 790]                ~225          elongated, bent, neurite
                                                                      tails, clustered, touching
astro             131      80 [5, 594]                  ~906          large, irregular, tapering
                                                                      branches
================  =======  ===========================  ============  ===========================

Each cell is a star-shaped polar outline ``rho <= r(theta)`` (ellipse x low Fourier wobble + narrow
Gaussian bumps for neurites/branches, then bent and swirled) rasterised on its own small crop and
scaled to a log-normal target area. Cells are painted into a label image in order; a placement is
retried elsewhere when too much of it is already taken, earlier cells win the shared pixels, each
cell keeps its largest connected piece and pieces below the type's minimum area (30/37/33 px) are
dropped. The label image therefore has no overlaps, and the annotations are read off it.

Broken astro annotations: like the real ones, 35 % of astro annotations (``BROKEN_ASTRO_P`` of the
cells >= 120 px, which is nearly all of them; measured 35.4 % over 40 images, reported per run in
``summary['per_type']['astro']['broken_share']``) are written either as a 1-2 px outline only or as
that outline with the interior filled by horizontal lines every 2-4 rows, while the image shows the
whole cell. ``scipy.ndimage.binary_fill_holes`` per instance lifts their IoU with the drawn cell from
0.41 on average (10th-90th percentile 0.16-0.65) to 1.00 (the outlines are closed), so hole filling
measurably helps; tests/test_synth.py checks it. cort and shsy5y annotations are never broken.

The look (phase-contrast brightfield): a grey background around 128 with uneven illumination (a
smooth random low-frequency field plus vignetting, roughly +-15 grey levels across the frame) and
camera noise; every cell has a bright halo just outside its edge, a darker inner rim, a body darkened
by a per-cell amount and a granular texture; touching cells are separated by a faint bright seam;
small unannotated debris specks carry halos too. Contrast is modest (cells differ from the
background by ~10-30 grey levels, the same order as the illumination drift), so a global threshold
does not segment them: Otsu's threshold (either polarity) vs the union of the cells gives IoU
0.02-0.09 on cort, 0.14-0.45 on shsy5y and 0.12-0.59 on astro images (8 each); the tests require
< 0.75.

Everything is vectorised numpy/scipy.ndimage on small crops; the default full dataset (809 images,
~73.6k cells) costs ~85 s of CPU, i.e. ~43 s with 2 workers on 2 idle cores, ~40 % of it zlib in
the PNG writer (benchmarks/bench_synth.py, figures in benchmarks/README.md). Output is byte-identical for a seed:
every image draws from its own ``numpy.random.SeedSequence`` child, whatever the worker count.
"""

from __future__ import annotations

import datetime as _dt
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from cellseg import CELL_TYPES, IMAGE_SHAPE
from cellseg.data.masks import CropMask
from cellseg.data.rle import encode_crop
from cellseg.data.truth import TRAIN_COLUMNS, cell_type_from_filename  # noqa: F401  (re-exported: semi file names carry the type)
from cellseg.errors import CellsegError
from cellseg.io import write_gray
from cellseg.model.provenance import write_synth_marker

#: Image share of each cell type in the real train set (320 : 155 : 131 of 606 images).
TYPE_SHARE: dict[str, int] = {"cort": 320, "shsy5y": 155, "astro": 131}

#: Share of eligible astro cells whose annotation is broken (outline only or horizontal lines).
BROKEN_ASTRO_P = 0.35
#: Astro cells smaller than this are never broken (too little interior to hollow out).
BROKEN_MIN_AREA = 120

_N_ANGLES = 256
_THETA = np.linspace(-np.pi, np.pi, _N_ANGLES, endpoint=False)


@dataclass(frozen=True)
class TypeSpec:
    """Generation parameters of one cell type (counts and areas are log-normal, then clipped)."""

    count_median: float
    count_sigma: float
    count_min: int
    count_max: int
    area_median: float
    area_sigma: float
    min_area: int  # annotations left smaller than this are dropped (real minimum area)
    max_overlap: float  # a placement is retried when more than this share of it is taken
    cluster_p: float  # share of cells placed around cluster centres (rest uniform)
    cluster_size: int  # about this many cells per cluster
    cluster_sd: tuple[float, float]  # spread of a cluster (px), drawn per image
    depth: tuple[float, float]  # per-cell body darkening (grey levels)
    halo: tuple[float, float]  # bright halo amplitude (grey levels), drawn per image
    rim: float  # darker inner rim amplitude
    texture: float  # granular texture amplitude inside cells
    debris: tuple[int, int]  # unannotated debris specks per image


SPECS: dict[str, TypeSpec] = {
    "cort": TypeSpec(
        count_median=29.5,
        count_sigma=0.55,
        count_min=4,
        count_max=108,
        area_median=222.0,
        area_sigma=0.42,
        min_area=33,
        max_overlap=0.05,
        cluster_p=0.3,
        cluster_size=8,
        cluster_sd=(25.0, 60.0),
        depth=(6.0, 22.0),
        halo=(14.0, 24.0),
        rim=8.0,
        texture=5.0,
        debris=(10, 60),
    ),
    "shsy5y": TypeSpec(
        count_median=380.0,
        count_sigma=0.42,
        count_min=49,
        count_max=790,
        area_median=235.0,
        area_sigma=0.45,
        min_area=30,
        max_overlap=0.2,
        cluster_p=0.85,
        cluster_size=40,
        cluster_sd=(20.0, 50.0),
        depth=(-6.0, 16.0),
        halo=(10.0, 20.0),
        rim=6.0,
        texture=6.0,
        debris=(5, 30),
    ),
    "astro": TypeSpec(
        count_median=66.0,
        count_sigma=0.8,
        count_min=5,
        count_max=594,
        area_median=1320.0,
        area_sigma=0.55,
        min_area=37,
        max_overlap=0.12,
        cluster_p=0.4,
        cluster_size=20,
        cluster_sd=(40.0, 100.0),
        depth=(2.0, 12.0),
        halo=(6.0, 14.0),
        rim=5.0,
        texture=7.0,
        debris=(5, 40),
    ),
}

#: At most this share of the frame is covered by cells on average (caps areas of crowded images).
_MAX_FILL = 0.55
_TRIES = 4


@dataclass
class SynthImage:
    """One generated image with its ground truth.

    ``image`` (H, W) uint8; ``cells`` the drawn cells as the image shows them (non-overlapping
    CropMasks); ``annotations`` what train.csv records (equal to ``cells`` except the broken astro
    ones); ``broken`` (N,) bool marks them.
    """

    image: np.ndarray
    cell_type: str
    cells: list[CropMask]
    annotations: list[CropMask]
    broken: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


# ----------------------------------------------------------------------------------------------
# cell shapes


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def _bumps(centres: np.ndarray, length: np.ndarray, width: np.ndarray) -> np.ndarray:
    """(n, _N_ANGLES) sum of Gaussian bumps in angle; all inputs (n, k)."""
    d = _wrap(_THETA[None, None, :] - centres[:, :, None]) / width[:, :, None]
    return (length[:, :, None] * np.exp(-0.5 * d * d)).sum(1)


def _profiles(rng: np.random.Generator, cell_type: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-scale polar outlines ``r(theta)`` (n, _N_ANGLES) plus bend and swirl factors (n,)."""
    t = _THETA[None, :]
    aspect_range, wobble, kmax = {"cort": ((1.0, 1.5), 0.05, 5), "shsy5y": ((1.8, 4.5), 0.05, 4)}.get(
        cell_type, ((1.0, 1.7), 0.12, 6)
    )
    a = np.sqrt(rng.uniform(*aspect_range, (n, 1)))  # semi-axes a, 1/a along theta = 0 and pi/2
    r = 1.0 / np.sqrt((np.cos(t) / a) ** 2 + (np.sin(t) * a) ** 2)
    k = np.arange(2, kmax + 1)
    amp = rng.normal(0.0, wobble, (n, k.size)) / np.sqrt(k - 1)
    phase = rng.uniform(0, 2 * np.pi, (n, k.size))
    r = r * (1.0 + (amp[:, :, None] * np.cos(k[None, :, None] * t[None] + phase[:, :, None])).sum(1))
    r = np.maximum(r, 0.25)
    bend = np.zeros(n)
    swirl = np.zeros(n)
    if cell_type == "shsy5y":  # neurite tails along the long axis, bent bodies
        present = rng.random((n, 2)) < 0.55
        length = rng.uniform(0.4, 1.6, (n, 2)) * a * present
        r = r + _bumps(np.broadcast_to([0.0, np.pi], (n, 2)), length, rng.uniform(0.035, 0.09, (n, 2)))
        bend = rng.uniform(-0.35, 0.35, n)
    elif cell_type == "astro":  # 2-7 tapering processes, swirled
        nb = rng.integers(2, 8, (n, 1))
        length = rng.uniform(0.5, 2.2, (n, 7)) * (np.arange(7)[None, :] < nb)
        r = r + _bumps(rng.uniform(-np.pi, np.pi, (n, 7)), length, rng.uniform(0.08, 0.22, (n, 7)))
        bend, swirl = rng.uniform(-0.2, 0.2, n), rng.uniform(-1.0, 1.0, n)
    return r, bend, swirl


_ANGLE_Q = 4  # angle table resolution: 1/4 px
_angle_table: np.ndarray = np.zeros((1, 1), dtype=np.int32)


def _angles(extent: int) -> np.ndarray:
    """Table of angle bins: ``T[round(4 v) + 4 M, round(4 u) + 4 M]`` = bin of ``atan2(v, u)`` in
    ``0.._N_ANGLES-1`` for |u|, |v| <= M >= ``extent`` (cached; np.arctan2 is the slow part otherwise)."""
    global _angle_table
    m = (_angle_table.shape[0] - 1) // (2 * _ANGLE_Q)
    if m < extent:
        m = max(extent, 2 * m, 64)
        g = np.arange(-m * _ANGLE_Q, m * _ANGLE_Q + 1, dtype=np.float32) / _ANGLE_Q
        th = np.arctan2(g[:, None], g[None, :])
        _angle_table = ((th + np.pi) * (_N_ANGLES / (2 * np.pi))).astype(np.int32) % _N_ANGLES
    return _angle_table


def cell_shapes(rng: np.random.Generator, cell_type: str, areas: np.ndarray) -> list[CropMask]:
    """Cells of about ``areas`` (n,) px, each a CropMask whose (top, left) are relative to the cell's
    centre pixel.

    Inside test ``rho <= r(theta)`` in the cell's rotated, bent and swirled frame, evaluated for
    many cells at once on crops of equal size (the outline's bounding box rounded up to 4 px).
    """
    areas = np.asarray(areas, dtype=np.float64)
    n = areas.size
    r, bend, swirl = _profiles(rng, cell_type, n)
    r = r * np.sqrt(areas / (0.5 * (r * r).sum(1) * (2 * np.pi / _N_ANGLES)))[:, None]
    rmax = r.max(1)
    offset = rng.random((n, 2))
    ang = rng.uniform(0, 2 * np.pi, n)
    ca, sa = np.cos(ang)[:, None], np.sin(ang)[:, None]
    bend_k, swirl_k = (bend / rmax)[:, None], (swirl / rmax)[:, None]
    # outline in the image frame -> bounding boxes relative to the centre pixel
    phi = _THETA[None, :] - swirl_k * r
    u, v = r * np.cos(phi), r * np.sin(phi) + bend_k * (r * np.cos(phi)) ** 2
    oy, ox = u * sa + v * ca + offset[:, :1], u * ca - v * sa + offset[:, 1:]
    y0, x0 = np.floor(oy.min(1)).astype(np.int64) - 1, np.floor(ox.min(1)).astype(np.int64) - 1
    hh = (np.ceil(oy.max(1)).astype(np.int64) + 2 - y0 + 3) // 4 * 4
    ww = (np.ceil(ox.max(1)).astype(np.int64) + 2 - x0 + 3) // 4 * 4
    extent = int(np.ceil(np.abs(np.concatenate([oy, ox], 1)).max() * 1.5)) + 8
    table = _angles(extent)
    tm = (table.shape[0] - 1) // 2
    tflat = table.ravel()
    f32 = lambda x: x.astype(np.float32)[:, :, None]  # noqa: E731  (k, 1) -> (k, 1, 1)
    r2 = (r * r).astype(np.float32)
    out: list[CropMask | None] = [None] * n
    key = hh * 100000 + ww
    for k in np.unique(key):
        sel = np.flatnonzero(key == k)
        h, w = int(hh[sel[0]]), int(ww[sel[0]])
        yy = np.arange(h, dtype=np.float32)[None, :, None] + f32((y0[sel] - offset[sel, 0])[:, None])
        xx = np.arange(w, dtype=np.float32)[None, None, :] + f32((x0[sel] - offset[sel, 1])[:, None])
        c, s_ = f32(ca[sel]), f32(sa[sel])
        uu = xx * c + yy * s_
        vv = yy * c - xx * s_
        vv -= f32(bend_k[sel]) * uu * uu
        rho2 = uu * uu + vv * vv
        # round before offsetting: the bins must not depend on the (cached, growing) table's size
        iu = np.rint(uu * np.float32(_ANGLE_Q)).astype(np.int32)
        iv = np.rint(vv * np.float32(_ANGLE_Q)).astype(np.int32)
        iv += np.int32(tm)
        iv *= np.int32(table.shape[1])
        iv += iu
        idx = np.take(tflat, iv + np.int32(tm))
        if cell_type == "astro":
            turn = f32(swirl_k[sel] * (_N_ANGLES / (2 * np.pi))) * np.sqrt(rho2)
            idx = (idx + turn.astype(np.int32)) % _N_ANGLES
        idx += (np.arange(sel.size, dtype=np.int32) * _N_ANGLES)[:, None, None]
        masks = rho2 <= np.take(r2[sel].ravel(), idx)
        for j, m in zip(sel.tolist(), masks):
            out[j] = CropMask(int(y0[j]), int(x0[j]), m)
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# one image


def _centres(rng: np.random.Generator, spec: TypeSpec, n: int, height: int, width: int) -> np.ndarray:
    """(n, 2) int (row, col) candidate centres: a mix of clusters and uniform placement."""
    pts = rng.uniform((0, 0), (height, width), (n, 2))
    k = max(1, round(n / (spec.cluster_size * _TRIES)))
    clustered = rng.random(n) < spec.cluster_p
    centres = rng.uniform((0, 0), (height, width), (k, 2))
    sd = rng.uniform(*spec.cluster_sd)
    near = centres[rng.integers(0, k, n)] + rng.normal(0, sd, (n, 2))
    pts[clustered] = near[clustered]
    pts = np.clip(pts, 0, (height - 1, width - 1))
    return pts.astype(np.int64)


def _place_cells(rng: np.random.Generator, cell_type: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Paint cells into a (height, width) int32 label image (0 = background, ids 1..N).

    Returns ``(labels, partial)``: ``partial`` (N + 1,) bool marks cells painted around earlier
    ones (only those can have been split into pieces).
    """
    spec = SPECS[cell_type]
    n = int(
        np.clip(round(rng.lognormal(math.log(spec.count_median), spec.count_sigma)), spec.count_min, spec.count_max)
    )
    mean_area = spec.area_median * math.exp(spec.area_sigma**2 / 2)
    scale = min(1.0, _MAX_FILL * height * width / (n * mean_area))
    areas = scale * rng.lognormal(math.log(spec.area_median), spec.area_sigma, n)
    areas = np.maximum(areas, spec.min_area * 1.3)
    shapes = cell_shapes(rng, cell_type, areas)
    centres = _centres(rng, spec, n * _TRIES, height, width).reshape(n, _TRIES, 2).tolist()
    labels = np.zeros((height, width), dtype=np.int32)
    partial = np.zeros(n + 1, dtype=bool)
    next_id = 1
    for crop, tries in zip(shapes, centres):
        h, w = crop.mask.shape
        for cy, cx in tries:
            top, left = cy + crop.top, cx + crop.left
            y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + h, height), min(left + w, width)
            m = crop.mask[y0 - top : y1 - top, x0 - left : x1 - left]
            area = int(np.count_nonzero(m))
            if area < spec.min_area:
                continue
            view = labels[y0:y1, x0:x1]
            m_free = m & (view == 0)
            taken = area - int(np.count_nonzero(m_free))
            if taken > spec.max_overlap * area:
                continue
            view[m_free] = next_id
            partial[next_id] = taken > 0
            next_id += 1
            break
    return labels, partial[:next_id]


_CROSS = ndimage.generate_binary_structure(2, 1)


def _read_cells(labels: np.ndarray, partial: np.ndarray, min_area: int) -> list[CropMask]:
    """Largest connected piece of every label >= ``min_area``; ``labels`` is rewritten to match
    (dropped pixels -> 0, ids renumbered 1..N in order). ``partial`` as from :func:`_place_cells`."""
    cells: list[CropMask] = []
    new_ids = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        m = labels[sl] == i
        if partial[i]:
            pieces, n = ndimage.label(m, _CROSS)
            if n > 1:
                keep = pieces == (np.argmax(np.bincount(pieces.ravel())[1:]) + 1)
                labels[sl][m & ~keep] = 0
                m = keep
        if np.count_nonzero(m) < min_area:
            labels[sl][m] = 0
            continue
        cells.append(
            CropMask(sl[0].start, sl[1].start, m).tight() if partial[i] else CropMask(sl[0].start, sl[1].start, m)
        )
        new_ids[i] = len(cells)
    labels[...] = new_ids[labels]
    return cells


def _break(rng: np.random.Generator, cell: CropMask) -> CropMask | None:
    """A broken annotation of ``cell`` like the real astro ones, or None when it has no interior:
    a 1-2 px outline, or that outline with the interior filled by horizontal lines every 2-4 rows."""
    m = cell.mask
    inner = ndimage.binary_erosion(m, iterations=int(rng.integers(1, 3)), border_value=0)
    if np.count_nonzero(inner) < 8:
        return None
    broken = m & ~inner
    if rng.random() < 0.5:
        step = int(rng.integers(2, 5))
        rows = (np.arange(m.shape[0]) % step == rng.integers(0, step))[:, None]
        broken = broken | (inner & rows)
    return CropMask(cell.top, cell.left, broken)


def _illumination(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(height, width) float32 background: ~128 with a smooth random field and vignetting.

    The field is a sum of three separable low-frequency cosine products (<= 1.5 periods across)."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    f = rng.uniform(0.2, 1.5, (3, 2)) * 2 * np.pi
    ph = rng.uniform(0, 2 * np.pi, (3, 2))
    amp = rng.normal(0, 1, 3)
    field_ = sum(np.float32(amp[i]) * np.cos(f[i, 0] * y + ph[i, 0]) * np.cos(f[i, 1] * x + ph[i, 1]) for i in range(3))
    yy = (y * 2 - 1) - np.float32(rng.uniform(-0.4, 0.4))
    xx = (x * 2 - 1) - np.float32(rng.uniform(-0.4, 0.4))
    base = np.float32(rng.uniform(118, 138))
    return (base + np.float32(rng.uniform(3.0, 6.0)) * field_) - (xx * xx + yy * yy) * np.float32(rng.uniform(3.0, 9.0))


_DISC1 = np.argwhere(ndimage.generate_binary_structure(2, 1)) - 1
_DISC2 = np.argwhere(ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), 2)) - 2


def _render(rng: np.random.Generator, labels: np.ndarray, cell_type: str) -> np.ndarray:
    """(H, W) uint8 phase-contrast-like image of the cells in ``labels`` (see the module docstring)."""
    spec = SPECS[cell_type]
    height, width = labels.shape
    fg = labels > 0
    # unannotated debris: small specks away from cells
    nd = int(rng.integers(*spec.debris))
    pts = np.column_stack([rng.integers(2, height - 2, nd), rng.integers(2, width - 2, nd)])
    pts = pts[~fg[pts[:, 0], pts[:, 1]]]
    disc = _DISC2 if rng.random() < 0.5 else _DISC1
    sp = (pts[:, None, :] + disc[None]).reshape(-1, 2)
    sp = sp[~fg[sp[:, 0], sp[:, 1]]]
    vis = fg.astype(np.float32)
    vis[sp[:, 0], sp[:, 1]] = 1.0
    soft = ndimage.gaussian_filter(vis, 2.0, truncate=2.5)
    edge = soft * (1.0 - vis)  # halo: ~0.5 just outside every object, fading over ~3 px
    edge -= np.float32(spec.rim / rng.uniform(*spec.halo)) * vis * (1.0 - soft)  # darker inner rim
    depth = rng.uniform(*spec.depth, int(labels.max()) + 1).astype(np.float32)
    depth[0] = 0.0
    body = depth[labels]
    body[sp[:, 0], sp[:, 1]] = np.float32(rng.uniform(*spec.depth))
    # granular texture: uniform noise on a half-resolution grid, upsampled (std 1)
    tex = rng.random(((height + 1) // 2, (width + 1) // 2), dtype=np.float32)
    tex = tex.repeat(2, 0).repeat(2, 1)[:height, :width] - np.float32(0.5)
    seam = np.zeros((height, width), dtype=bool)  # faint bright line where two cells touch
    d = (labels[:, 1:] != labels[:, :-1]) & fg[:, 1:] & fg[:, :-1]
    seam[:, 1:] |= d
    d = (labels[1:] != labels[:-1]) & fg[1:] & fg[:-1]
    seam[1:] |= d
    signal = np.float32(3.0 * rng.uniform(*spec.halo)) * edge
    signal -= body
    signal += np.float32(spec.texture * 3.46) * tex * vis
    signal += np.float32(4.0) * seam
    illum = _illumination(rng, height, width)
    img = illum + signal * (illum * np.float32(1 / 128))
    img = ndimage.gaussian_filter(img, 0.7, truncate=2.5)  # optics: soft edges
    # camera noise: triangular (sum of two uniforms), std 3.5-4.5 grey levels
    noise = rng.random((height, width), dtype=np.float32)
    noise += rng.random((height, width), dtype=np.float32)
    img += (noise - np.float32(1.0)) * np.float32(2.45 * rng.uniform(3.5, 4.5))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def make_image(
    rng: np.random.Generator, cell_type: str, height: int = IMAGE_SHAPE[0], width: int = IMAGE_SHAPE[1]
) -> SynthImage:
    """Generate one image of ``cell_type`` with its cells and (possibly broken) annotations."""
    if cell_type not in SPECS:
        raise CellsegError(f"unknown cell type {cell_type!r}; expected one of {', '.join(CELL_TYPES)}")
    labels, partial = _place_cells(rng, cell_type, height, width)
    cells = _read_cells(labels, partial, SPECS[cell_type].min_area)
    annotations = list(cells)
    broken = np.zeros(len(cells), dtype=bool)
    if cell_type == "astro":
        for i in np.flatnonzero(rng.random(len(cells)) < BROKEN_ASTRO_P):
            if cells[i].area >= BROKEN_MIN_AREA:
                b = _break(rng, cells[i])
                if b is not None:
                    annotations[i], broken[i] = b, True
    image = _render(rng, labels, cell_type)
    return SynthImage(image, cell_type, cells, annotations, broken)


# ----------------------------------------------------------------------------------------------
# file names and metadata

_SAMPLE_PREFIX = {
    "shsy5y": ("shsy5y[diff]",),
    "astro": ("astro[hippo]",),
    "cort": ("cort[pre-treat]", "cort[oka-low]", "cort[oka-high]", "cort[debris]"),
}


def split_counts(n: int) -> dict[str, int]:
    """Images per cell type for ``n`` images, by the real 320 : 155 : 131 share (largest remainder),
    at least one of each type when ``n >= 3``."""
    total = sum(TYPE_SHARE.values())
    exact = {t: n * s / total for t, s in TYPE_SHARE.items()}
    counts = {t: int(v) for t, v in exact.items()}
    for t in sorted(exact, key=lambda t: counts[t] - exact[t])[: n - sum(counts.values())]:
        counts[t] += 1
    if n >= 3:
        for t in counts:
            if counts[t] == 0:
                donor = max(counts, key=counts.get)
                counts[donor] -= 1
                counts[t] = 1
    return counts


@dataclass(frozen=True)
class _Meta:
    cell_type: str
    sample_id: str
    sample_date: str
    plate_time: str
    elapsed: _dt.timedelta


def _samples(
    rng: np.random.Generator, types: list[str], vessels: Iterator[int], max_group: int | None = None
) -> list[_Meta]:
    """Group images (given their cell types, in order) into time series of one sample each."""
    out: list[_Meta | None] = [None] * len(types)
    for t in CELL_TYPES:
        idx = [i for i, ty in enumerate(types) if ty == t]
        cap = max_group or max(1, math.ceil(len(idx) / 3))
        pos = 0
        while pos < len(idx):
            size = int(min(cap, 1 + rng.poisson(3.0), len(idx) - pos))
            prefix = _SAMPLE_PREFIX[t][int(rng.integers(len(_SAMPLE_PREFIX[t])))]
            well = f"{'ABCDEFGH'[rng.integers(8)]}{rng.integers(1, 13)}-{rng.integers(1, 5)}"
            sample_id = f"{prefix}_{well}_Vessel-{next(vessels)}_Ph_{rng.integers(1, 5)}"
            day = _dt.date(2019, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 730)))
            start = _dt.timedelta(hours=int(rng.integers(8, 18)), minutes=30 * int(rng.integers(0, 2)))
            step = _dt.timedelta(hours=int(rng.choice([2, 4, 6, 8, 12])))
            for k in range(size):
                elapsed = k * step
                clock = (start + elapsed).seconds
                plate = f"{clock // 3600:02d}h{clock % 3600 // 60:02d}m{clock % 60:02d}s"
                out[idx[pos + k]] = _Meta(t, sample_id, day.isoformat(), plate, elapsed)
            pos += size
    return out  # type: ignore[return-value]


def _format_elapsed(td: _dt.timedelta) -> str:
    """pandas' Timedelta text, as in the real CSV: ``0 days 04:00:00``."""
    s = td.seconds
    return f"{td.days} days {s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _semi_name(meta: _Meta) -> str:
    s = meta.elapsed.seconds
    return f"{meta.sample_id}_{meta.elapsed.days:02d}d{s // 3600:02d}h{s % 3600 // 60:02d}m.png"


def _hex_ids(rng: np.random.Generator, n: int) -> list[str]:
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        for v in rng.integers(0, 2**48, n - len(ids), dtype=np.int64):
            s = f"{int(v):012x}"
            if s not in seen:
                seen.add(s)
                ids.append(s)
    return ids


# ----------------------------------------------------------------------------------------------
# the dataset


def _job(task: tuple[np.random.SeedSequence, str, str, bool]) -> tuple[list[str], list[int], int]:
    """Worker: render one image, write its PNG; return (RLEs, annotation areas, broken count)."""
    seed_seq, cell_type, path, annotate = task
    height, width = IMAGE_SHAPE
    si = make_image(np.random.default_rng(seed_seq), cell_type, height, width)
    write_gray(path, si.image)
    if not annotate:
        return [], [], 0
    rles = [encode_crop(a, height, width) for a in si.annotations]
    return rles, [a.area for a in si.annotations], int(si.broken.sum())


def _check_out(out: Path, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise CellsegError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not force:
            raise CellsegError(f"{out} is not empty; choose another --out or pass --force to replace it")


def generate(
    out: str | Path,
    train_images: int = 606,
    test_images: int = 3,
    semi_images: int = 200,
    seed: int = 0,
    progress: bool = True,
    *,
    force: bool = False,
    workers: int | None = None,
) -> dict:
    """Write a synthetic dataset in the competition layout to ``out`` and return a summary.

    The folder is built beside ``out`` and renamed into place at the end, so ``out`` is either
    complete or untouched. A non-empty existing ``out`` raises CellsegError unless ``force``
    (then it is replaced). ``workers`` processes render the images (None: one per core; runs of
    fewer than 4 images per worker stay in this process); files are byte-identical for a seed whatever the
    worker count.

    Summary: ``out``, ``seed``, ``train_images``, ``test_images``, ``semi_images``, ``instances``,
    ``seconds`` and ``per_type[type] = {images, instances, mean_instances, min_instances,
    max_instances, mean_area, broken, broken_share}`` over the train annotations.
    """
    t0 = time.perf_counter()
    for name, v in (("train_images", train_images), ("test_images", test_images), ("semi_images", semi_images)):
        if int(v) < 0:
            raise CellsegError(f"{name} must be >= 0, got {v}")
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise CellsegError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    _check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)

    seqs = np.random.SeedSequence(seed).spawn(1 + train_images + test_images + semi_images)
    rng = np.random.default_rng(seqs[0])
    vessels = iter(rng.permutation(np.arange(100, 100 + 2 * (train_images + test_images + semi_images) + 100)).tolist())

    def typed(n: int) -> list[str]:
        types = [t for t, c in split_counts(n).items() for _ in range(c)]
        return [types[i] for i in rng.permutation(len(types))]

    train_types, semi_types = typed(train_images), typed(semi_images)
    test_types = [CELL_TYPES[i % 3] for i in rng.permutation(test_images)]
    train_meta = _samples(rng, train_types, vessels)
    semi_meta = _samples(rng, semi_types, vessels, max_group=8)
    ids = _hex_ids(rng, train_images + test_images)
    train_ids, test_ids = ids[:train_images], ids[train_images:]

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        for sub in ("train", "test", "train_semi_supervised"):
            (tmp / sub).mkdir()
        tasks = [(seqs[1 + i], t, str(tmp / "train" / f"{train_ids[i]}.png"), True) for i, t in enumerate(train_types)]
        k = 1 + train_images
        tasks += [(seqs[k + i], t, str(tmp / "test" / f"{test_ids[i]}.png"), False) for i, t in enumerate(test_types)]
        k += test_images
        tasks += [
            (seqs[k + i], m.cell_type, str(tmp / "train_semi_supervised" / _semi_name(m)), False)
            for i, m in enumerate(semi_meta)
        ]
        bar = dict(total=len(tasks), desc="synth", unit="img", disable=None if progress else True)
        if workers > 1 and len(tasks) >= 4 * workers:
            # fork is cheap; but never fork a process that has torch (and its thread pools) loaded
            start = "fork" if os.name == "posix" and "torch" not in sys.modules else "spawn"
            ctx = multiprocessing.get_context(start)
            with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx) as pool:
                results = list(tqdm(pool.map(_job, tasks, chunksize=4), **bar))
        else:
            results = [_job(t) for t in tqdm(tasks, **bar)]

        rows: dict[str, list] = {c: [] for c in TRAIN_COLUMNS}
        per_type: dict[str, dict] = {}
        height, width = IMAGE_SHAPE
        for i, (rles, areas, nbroken) in enumerate(results[:train_images]):
            m = train_meta[i]
            n = len(rles)
            rows["id"] += [train_ids[i]] * n
            rows["annotation"] += rles
            rows["width"] += [width] * n
            rows["height"] += [height] * n
            rows["cell_type"] += [m.cell_type] * n
            rows["plate_time"] += [m.plate_time] * n
            rows["sample_date"] += [m.sample_date] * n
            rows["sample_id"] += [m.sample_id] * n
            rows["elapsed_timedelta"] += [_format_elapsed(m.elapsed)] * n
            s = per_type.setdefault(m.cell_type, {"counts": [], "areas": [], "broken": 0})
            s["counts"].append(n)
            s["areas"] += areas
            s["broken"] += nbroken
        pd.DataFrame(rows, columns=list(TRAIN_COLUMNS)).to_csv(tmp / "train.csv", index=False)
        pd.DataFrame({"id": test_ids, "predicted": [""] * len(test_ids)}).to_csv(
            tmp / "sample_submission.csv", index=False
        )
        # marks the folder as synthetic: training on it is recorded so (cellseg.model.provenance)
        write_synth_marker(
            tmp,
            {
                "seed": seed,
                "train_images": train_images,
                "test_images": test_images,
                "semi_images": semi_images,
                "instances": len(rows["id"]),
            },
        )

        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    stats = {}
    for t in CELL_TYPES:
        s = per_type.get(t)
        if not s:
            continue
        counts, areas = np.array(s["counts"]), np.array(s["areas"])
        stats[t] = {
            "images": int(counts.size),
            "instances": int(counts.sum()),
            "mean_instances": round(float(counts.mean()), 1),
            "min_instances": int(counts.min()),
            "max_instances": int(counts.max()),
            "mean_area": round(float(areas.mean()), 1) if areas.size else 0.0,
            "broken": int(s["broken"]),
            "broken_share": round(s["broken"] / max(1, int(counts.sum())), 3),
        }
    return {
        "out": str(out),
        "seed": seed,
        "train_images": train_images,
        "test_images": test_images,
        "semi_images": semi_images,
        "instances": int(sum(len(r[0]) for r in results[:train_images])),
        "per_type": stats,
        "seconds": round(time.perf_counter() - t0, 2),
    }
