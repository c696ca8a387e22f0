"""One synthetic image: cells placed without overlap, broken astro annotations, phase-contrast look.

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
measurably helps; tests/data/test_synth.py checks it. cort and shsy5y annotations are never broken.

The look (phase contrast): a grey background with uneven illumination (a smooth random
low-frequency field plus vignetting) and camera noise; every cell has a bright halo just outside its
edge, a darker inner rim, a body darkened by a per-cell amount and a granular texture; touching cells
are separated by a faint bright seam. Unannotated clutter: small debris specks with halos (bright,
refractile ones in half of the images, dark in the others) and, for shsy5y and astro, thin curved
neurite-like processes leaving the cells (``NEURITES``: 0.6 / 1.5 per cell, 15-70 / 25-110 px long),
also haloed. Each image then gets the competition's statistics: a mean drawn from 120-136 and a
standard deviation from 16-24 (``TARGET_MEAN``, ``TARGET_STD``; real images: mean ~128, std ~20).
The cells' contrast is raised at most 2x towards that deviation and the illumination's unevenness
makes up the rest, so sparse images get a stronger drift, not stark cells. Measured over 8 images per
type (seed 7): mean 129 / 127 / 126 and std 19.3 / 19.6 / 21.0 for cort / shsy5y / astro. A global
threshold does not segment them: Otsu's threshold (either polarity) vs the union of the cells gives
IoU 0.01-0.06 on cort, 0.16-0.38 on shsy5y and 0.12-0.45 on astro images; the tests require < 0.75.

Cell zoom (``make_image(zoom=Z)``, ``cellseg synth --cell-zoom Z``): the cells are placed on a canvas
``Z`` times smaller with ``Z**2`` times fewer cells, then enlarged by nearest neighbour, so they are
``Z`` times wider at the competition's crowding; halo, texture, processes, debris and noise are drawn
at full resolution (the same optics at a higher magnification). ``Z = 2`` gives Usiigaci-sized cells
(median 1,892 px). Zoom 1 is the default and byte-identical to the generator without the option.
Transfer to real pixels stays poor (benchmarks/README.md, bench_real.py): a model trained on zoom-2
images finds Usiigaci's cells but segments only their dark cores, since the synthetic body is
darkened evenly while a real cell is a dark nucleus in pale cytoplasm ringed by a bright halo.

The ``phase`` look (``make_image(look="phase")``, ``cellseg synth --look phase``) draws the cells with
what real phase contrast shows, measured on Usiigaci's images against their labels: a bright band
straddling every edge (+19 grey levels 1 px outside the annotation, +18 1 px inside, fading over ~6 px
each way, the deep interior -3 to -5), brighter on one side of the frame (phase shading) and dark on the
other where it is strong; a body near the background's grey (40 % of the cells clearly darker), a paler
nucleus with two dark nucleoli at the cell's deepest point, dark granules around it, rounded (mitotic)
cells bright inside with a thick band, dark debris clumps and specks on the background. Since the
transfer measure (above) stalled at a third of the real-data score with the pixels measured to match,
the phase look also changes the outlines and adds what a real frame holds besides its cells:
``PHASE_POLYGONS`` (70 %) of the shsy5y and astro cells are straight-edged polygons with 3-7 corners,
some pulled out into tails and half with concave sides (Usiigaci's fibroblasts, annotated by hand as
polygons; cort keeps its round outlines); the band is patchy along each edge (stretches of it faint);
unannotated flat textured clumps without a band and faint out-of-focus rings lie on the background
(``_phase_ghosts``); focus blur (0.4-1.5 px), camera noise (1.5-6) and the cells' fine texture (2-12)
vary from image to image. Its annotations reach ``PHASE_LABEL_PAD`` px (times ``sqrt(zoom)``: 2 px at
zoom 2) past the drawn cells into the background (:func:`grow_labels`): a model trained on annotations
that stop at the drawn edge segmented real cells about 2 px too tight (dilating its masks by 2 px took
the transfer measure from 0.088 to 0.102; trained on the margin, 0.103 / 0.109 over two seeds). Then the
competition's statistics as in the classic look: the contrast is raised (at most ``MAX_PHASE_GAIN`` =
3x) towards a standard deviation drawn from ``TARGET_STD``, the mean drawn from ``TARGET_MEAN`` (8
images per type, seeds 0-7: std 16-20, sparse cort images stop at the cap). A model trained on this
look transfers to real pixels more than 10x better than on the classic look (benchmarks/README.md);
``classic`` stays the default and draws exactly what it drew before, so the demo model, the tests and
the golden submission keep their data. The phase look draws the classic look's cort cells, and with
``PHASE_POLYGONS = 0`` every cell of the seed (annotated with the margin; with ``PHASE_LABEL_PAD = 0``
too, every annotation of the seed).

The ``optics`` look (``make_image(look="optics")``, ``cellseg synth --look optics``) has the phase
look's cells and annotations (polygons, margin, broken astro outlines) but images them instead of
drawing their appearance: each cell is a transparent specimen, an optical path of 0.05-0.25 rad at
its edge thickening to 0.25-1 rad inside (rounded cells 1.5-3 rad), with a nucleus, nucleoli,
granules, texture and thinner seams where cells touch; neurites, debris and specks are phase objects
too (:func:`_optics_phase`). Its field ``exp(i phase)`` passes a Zernike phase plate in the Fourier
domain (:func:`_zernike`: the direct light, a soft disc of low frequencies, retarded a quarter wave
and attenuated), and the intensity shows what phase contrast shows without any of it being drawn: the
bright halo around every object, dark thin cells, wide flat interiors fading back to the grey of the
background (shade-off), bright rounded cells. The phase look's unannotated clumps and rings, its
illumination, contrast, mean and noise (:func:`_camera`) follow. Held to the same measured edge
profile and statistics as the phase look (tests/data/test_synth.py), it transfers best of the looks
to real pixels (docs/TRAINING.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from cellseg import CELL_TYPES, IMAGE_SHAPE
from cellseg.data.masks import CropMask, instances
from cellseg.data.synth_shapes import cell_shapes
from cellseg.errors import CellsegError

#: Share of eligible astro cells whose annotation is broken (outline only or horizontal lines).
BROKEN_ASTRO_P = 0.35
#: Astro cells smaller than this are never broken (too little interior to hollow out).
BROKEN_MIN_AREA = 120


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

#: Largest ``make_image(zoom=...)``: at 8 a 520 x 704 frame is drawn on a 65 x 88 canvas.
MAX_ZOOM = 8.0
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


def _in_frame(
    top: int, left: int, shape: tuple[int, int], height: int, width: int
) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Where a crop of ``shape`` (h, w) placed at (top, left) lies in a (height, width) frame.

    Returns ``(frame, inside)``: the slices of the frame it covers and the matching slices of the
    crop (both empty when it lies wholly outside).
    """
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = max(min(top + shape[0], height), y0), max(min(left + shape[1], width), x0)
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))


def _place_cells(
    rng: np.random.Generator,
    cell_type: str,
    height: int,
    width: int,
    count_scale: float = 1.0,
    polygons: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint cells into a (height, width) int32 label image (0 = background, ids 1..N).

    ``count_scale`` multiplies the drawn number of cells (at least 1 is kept): a zoomed image
    draws on a smaller canvas and keeps the competition's crowding. ``polygons`` is
    :func:`cell_shapes`' share of polygon outlines.

    Returns ``(labels, partial)``: ``partial`` (N + 1,) bool marks cells painted around earlier
    ones (only those can have been split into pieces).
    """
    spec = SPECS[cell_type]
    n = int(
        np.clip(round(rng.lognormal(math.log(spec.count_median), spec.count_sigma)), spec.count_min, spec.count_max)
    )
    if count_scale != 1.0:
        n = max(1, round(n * count_scale))
    mean_area = spec.area_median * math.exp(spec.area_sigma**2 / 2)
    scale = min(1.0, _MAX_FILL * height * width / (n * mean_area))
    areas = scale * rng.lognormal(math.log(spec.area_median), spec.area_sigma, n)
    areas = np.maximum(areas, spec.min_area * 1.3)
    shapes = cell_shapes(rng, cell_type, areas, polygons)
    centres = _centres(rng, spec, n * _TRIES, height, width).reshape(n, _TRIES, 2).tolist()
    labels = np.zeros((height, width), dtype=np.int32)
    partial = np.zeros(n + 1, dtype=bool)
    next_id = 1
    for crop, tries in zip(shapes, centres):
        h, w = crop.mask.shape
        for cy, cx in tries:
            frame, inside = _in_frame(cy + crop.top, cx + crop.left, (h, w), height, width)
            m = crop.mask[inside]
            area = int(np.count_nonzero(m))
            if area < spec.min_area:
                continue
            view = labels[frame]
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
#: Unannotated neurite-like processes per cell (shsy5y, astro) and their length range (px).
NEURITES: dict[str, tuple[float, tuple[float, float]]] = {"shsy5y": (0.6, (15.0, 70.0)), "astro": (1.5, (25.0, 110.0))}
#: Per-image grey mean and standard deviation ranges (the competition images: mean ~128, std ~20).
TARGET_MEAN = (120.0, 136.0)
TARGET_STD = (16.0, 24.0)
#: The cells' contrast is raised at most this much to reach the drawn standard deviation.
MAX_GAIN = 2.0
_POINTS = 160  # samples along one process (enough for 1 px steps on the longest)


def _neurites(rng: np.random.Generator, labels: np.ndarray, cell_type: str, drawn: bool = True) -> np.ndarray:
    """(H, W) bool map of thin curved processes leaving the cells (never inside one, never annotated).

    Each is a quadratic Bezier curve from a random cell's box centre in a random direction, with a
    sideways-displaced control point, rasterised 1 px wide; shsy5y and astro only. ``drawn=False``
    (``make_image(neurites=False)``): an empty map, after the same draws from ``rng``, so everything
    else in the image stays as it is with them."""
    height, width = labels.shape
    out = np.zeros((height, width), dtype=bool)
    boxes = [sl for sl in ndimage.find_objects(labels) if sl is not None]
    if cell_type not in NEURITES or not boxes:
        return out
    per_cell, (lo, hi) = NEURITES[cell_type]
    n = int(min(400, rng.poisson(per_cell * len(boxes))))
    centre = np.array([((sl[0].start + sl[0].stop) / 2, (sl[1].start + sl[1].stop) / 2) for sl in boxes])
    p0 = centre[rng.integers(0, len(boxes), n)]
    ang = rng.uniform(0, 2 * np.pi, n)
    length = rng.uniform(lo, hi, n)
    step = np.column_stack([np.sin(ang), np.cos(ang)]) * length[:, None]
    p2 = p0 + step
    p1 = p0 + step / 2 + step[:, ::-1] * np.array([1, -1]) * rng.normal(0, 0.3, (n, 1))
    t = np.linspace(0, 1, _POINTS)[None, :, None]
    pts = (1 - t) ** 2 * p0[:, None] + 2 * t * (1 - t) * p1[:, None] + t * t * p2[:, None]
    yx = np.rint(pts.reshape(-1, 2)).astype(np.int64)
    ok = (yx[:, 0] >= 0) & (yx[:, 0] < height) & (yx[:, 1] >= 0) & (yx[:, 1] < width)
    out[yx[ok, 0], yx[ok, 1]] = drawn
    return out & (labels == 0)


def _debris(rng: np.random.Generator, spec: TypeSpec, fg: np.ndarray) -> np.ndarray:
    """(K, 2) pixel coordinates of small unannotated debris specks away from the cells."""
    height, width = fg.shape
    nd = int(rng.integers(*spec.debris))
    pts = np.column_stack([rng.integers(2, height - 2, nd), rng.integers(2, width - 2, nd)])
    pts = pts[~fg[pts[:, 0], pts[:, 1]]]
    disc = _DISC2 if rng.random() < 0.5 else _DISC1
    sp = (pts[:, None, :] + disc[None]).reshape(-1, 2)
    return sp[~fg[sp[:, 0], sp[:, 1]]]


def _seams(labels: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels where two different cells touch."""
    seam = np.zeros(labels.shape, dtype=bool)
    seam[:, 1:] |= (labels[:, 1:] != labels[:, :-1]) & fg[:, 1:] & fg[:, :-1]
    seam[1:] |= (labels[1:] != labels[:-1]) & fg[1:] & fg[:-1]
    return seam


def _render(rng: np.random.Generator, labels: np.ndarray, cell_type: str, neurites: bool = True) -> np.ndarray:
    """(H, W) uint8 phase-contrast-like image of the cells in ``labels`` (see the module docstring)."""
    spec = SPECS[cell_type]
    height, width = labels.shape
    fg = labels > 0
    sp = _debris(rng, spec, fg)
    neur = _neurites(rng, labels, cell_type, neurites)
    vis = fg.astype(np.float32)
    vis[sp[:, 0], sp[:, 1]] = 1.0
    vis = np.maximum(vis, np.float32(0.7) * neur)
    soft = ndimage.gaussian_filter(vis, 2.0, truncate=2.5)
    edge = soft * (1.0 - vis)  # halo: ~0.5 just outside every object, fading over ~3 px
    edge -= np.float32(spec.rim / rng.uniform(*spec.halo)) * vis * (1.0 - soft)  # darker inner rim
    depth = rng.uniform(*spec.depth, int(labels.max()) + 1).astype(np.float32)
    depth[0] = 0.0
    body = depth[labels]
    # half of the images carry bright (refractile) debris, the others dark specks
    sign = np.float32(-1.5 if rng.random() < 0.5 else 1.0)
    body[sp[:, 0], sp[:, 1]] = sign * np.float32(rng.uniform(*spec.depth))
    body += np.float32(rng.uniform(*spec.depth)) * neur
    # granular texture: uniform noise on a half-resolution grid, upsampled (std 1)
    tex = rng.random(((height + 1) // 2, (width + 1) // 2), dtype=np.float32)
    tex = tex.repeat(2, 0).repeat(2, 1)[:height, :width] - np.float32(0.5)
    signal = np.float32(3.0 * rng.uniform(*spec.halo)) * edge
    signal -= body
    signal += np.float32(spec.texture * 3.46) * tex * vis
    signal += np.float32(4.0) * _seams(labels, fg)
    illum = _illumination(rng, height, width)
    signal *= illum * np.float32(1 / 128)
    signal = ndimage.gaussian_filter(signal, 0.7, truncate=2.5)  # optics: soft edges
    noise_sd = rng.uniform(3.5, 4.5)
    # the competition's statistics: the cells' contrast is raised (at most MAX_GAIN x) towards the drawn
    # standard deviation, the illumination's unevenness makes up what sparse images still lack (so
    # cells never stand out of an even background), then the frame is shifted to the drawn mean
    target = rng.uniform(*TARGET_STD)
    room = max(target**2 - noise_sd**2, 1.0)
    dev = illum - np.float32(illum.mean())
    gain = min(MAX_GAIN, math.sqrt(max(room - float(dev.var()), 1.0) / max(float(signal.var()), 1e-6)))
    gain = max(gain, 1.0)
    left = room - gain * gain * float(signal.var())
    spread = np.float32(math.sqrt(max(left, float(dev.var())) / max(float(dev.var()), 1e-6)))
    img = dev * spread + np.float32(gain) * signal
    img += np.float32(rng.uniform(*TARGET_MEAN) - float(img.mean()))
    # camera noise: triangular (sum of two uniforms)
    noise = rng.random((height, width), dtype=np.float32)
    noise += rng.random((height, width), dtype=np.float32)
    img += (noise - np.float32(1.0)) * np.float32(2.45 * noise_sd)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


#: The phase look's contrast is raised at most this much towards the drawn standard deviation.
MAX_PHASE_GAIN = 3.0
#: Share of shsy5y and astro cells the phase look draws as straight-edged polygons with tails
#: (``cell_shapes(polygons=...)``): Usiigaci's fibroblasts and their hand-drawn outlines.
PHASE_POLYGONS = 0.7
#: The phase look's annotations reach this far past the drawn cell, times the optics scale
#: ``sqrt(zoom)`` (2 px at zoom 2, 1.4 px at zoom 1): hand-drawn labels take in the inner half of
#: the halo that a model trained on the drawn edge leaves out on real cells (module docstring).
PHASE_LABEL_PAD = 1.45
#: ``make_image(look=...)``: ``classic`` (the flat-blob look above, the default), ``phase`` or ``optics``.
LOOKS = ("classic", "phase", "optics")


def _cell_geometry(labels: np.ndarray, fg: np.ndarray, seams: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel inner distance and the distance to the own cell's centre, and per-cell depth.

    Args:
        labels: (H, W) int32 cells, 0 = background; ``fg`` (H, W) bool ``labels > 0``; ``seams``
            (H, W) bool :func:`_seams` of them.

    Returns:
        ``(edt, dcentre, rmax)``: ``edt`` (H, W) float32 distance to the nearest pixel outside the
        cell (touching cells are split by their seams), ``dcentre`` (H, W) float32 distance to the
        cell's deepest pixel (0 outside cells), ``rmax`` (N + 1,) the deepest distance of every cell.
    """
    n = int(labels.max())
    edt = ndimage.distance_transform_edt(fg & ~seams).astype(np.float32)
    idx = np.arange(1, n + 1)
    rmax = np.zeros(n + 1, dtype=np.float32)
    cy = np.zeros(n + 1, dtype=np.float32)
    cx = np.zeros(n + 1, dtype=np.float32)
    if n:
        rmax[1:] = ndimage.maximum(edt, labels, idx)
        pos = np.asarray(ndimage.maximum_position(edt, labels, idx), dtype=np.float32).reshape(n, 2)
        cy[1:], cx[1:] = pos[:, 0], pos[:, 1]
    yy, xx = np.indices(labels.shape, dtype=np.float32)
    dcentre = np.hypot(yy - cy[labels], xx - cx[labels]) * fg
    return edt, dcentre, rmax


def _dots(rng: np.random.Generator, where: np.ndarray, weight: np.ndarray, count: int) -> np.ndarray:
    """(H, W) float32 map of ``count`` single-pixel dots drawn among ``where`` pixels with
    probability proportional to ``weight`` (both (H, W))."""
    out = np.zeros(where.shape, dtype=np.float32)
    flat = np.flatnonzero(where)
    if count <= 0 or flat.size == 0:
        return out
    p = weight.ravel()[flat].astype(np.float64)
    p /= p.sum()
    pick = rng.choice(flat, size=count, p=p)
    np.add.at(out.ravel(), pick, np.float32(1.0))
    return out


def _granules(
    rng: np.random.Generator,
    labels: np.ndarray,
    nuc: np.ndarray,
    dcentre: np.ndarray,
    rn: np.ndarray,
    nuclei: int,
    px: float,
) -> np.ndarray:
    """(H, W) float32 dark-granule map of the phase and optics looks (peaks ~1-1.5): two nucleoli per
    nucleus near its centre, and granules in the cytoplasm, densest around the nucleus.

    Args:
        rng: the image's generator.
        labels: (H, W) int32 cells; ``nuc`` (H, W) bool their nuclei; ``dcentre`` (H, W) float32 the
            distance to the own cell's centre (:func:`_cell_geometry`); ``rn`` (N + 1,) the nucleus
            radius per cell; ``nuclei`` how many cells have one; ``px`` the optics scale.
    """
    fg = labels > 0
    near = np.exp(-dcentre / np.maximum(rn[labels] * 1.5, 1.0)) * fg
    nucleoli = _dots(rng, nuc & (dcentre < 0.6 * rn[labels]), np.ones_like(near), 2 * nuclei)
    count = int(float(fg.sum()) / (120 * px**2) * rng.uniform(0.3, 1.5))
    granules = _dots(rng, fg & ~nuc, near**3 + 0.02, count)
    return ndimage.gaussian_filter(nucleoli * 1.5 + granules, 0.9 * px) * np.float32(2 * np.pi * (0.9 * px) ** 2)


def _phase_band(rng: np.random.Generator, objects: np.ndarray, edt: np.ndarray, px: float) -> np.ndarray:
    """(H, W) float32 bright band across every edge of ``objects`` (cells and processes, bool (H, W)):
    a Gaussian in the signed distance to the edge (``edt``: the inner distance, (H, W)), centred
    0.5 px outside it, 1.6-2.6 ``px`` wide, shaded by a per-image direction (up to 2.6x brighter on one
    side, negative where the shading is strong on the other) and patchy along the edge (a smooth random
    field makes stretches of it faint, others strong, as on real cells)."""
    sd = ndimage.distance_transform_edt(~objects).astype(np.float32) - edt  # signed distance, outside > 0
    width = np.float32(rng.uniform(1.6, 2.6) * px)
    band = np.exp(-((sd - np.float32(0.5)) ** 2) / (2 * width * width))
    smooth = ndimage.gaussian_filter(objects.astype(np.float32), 2.0 * px)
    gy, gx = np.gradient(smooth)
    ang = rng.uniform(0, 2 * np.pi)
    side = -(gy * np.float32(math.sin(ang)) + gx * np.float32(math.cos(ang))) * np.float32(5.0 * px)
    patchy = ndimage.gaussian_filter(rng.standard_normal(objects.shape).astype(np.float32), 6.0 * px)
    patchy *= np.float32(0.7 / max(float(patchy.std()), 1e-6))
    patchy = np.clip(patchy + np.float32(1.0), 0.05, 2.2)  # faint and strong stretches of one edge
    return band * patchy * (np.float32(1.0) + np.float32(rng.uniform(0.8, 1.6)) * np.clip(side, -1, 1))


def _phase_cells(
    rng: np.random.Generator,
    labels: np.ndarray,
    band: np.ndarray,
    geometry: tuple[np.ndarray, np.ndarray, np.ndarray],
    px: float,
) -> np.ndarray:
    """(H, W) float32 signal of the cells themselves: the band's amplitude per cell, bodies near the
    background's grey (40 % clearly darker), rounded cells bright inside with a 3x band, a pale
    nucleus with two dark nucleoli at the deepest point and dark granules around it, fine texture
    (2-12, drawn per image).
    ``geometry`` is :func:`_cell_geometry`'s ``(edt, dcentre, rmax)``."""
    edt, dcentre, rmax = geometry
    fg = labels > 0
    n = int(labels.max())
    per = lambda lo, hi: rng.uniform(lo, hi, n + 1).astype(np.float32)  # noqa: E731
    h_amp, depth = per(12, 35), per(-2, 8)
    dark = rng.random(n + 1) < 0.4  # contracted cells: clearly darker than the background
    depth[dark] = rng.uniform(10, 35, int(dark.sum()))
    compact = np.bincount(labels.ravel(), minlength=n + 1) / np.maximum(np.pi * rmax * rmax, 1.0)
    rounded = (rng.random(n + 1) < 0.5) & (compact < 1.6)  # mitotic: round, bright inside, thick band
    depth[rounded] = -rng.uniform(30, 70, int(rounded.sum()))
    h_amp[rounded] *= 3.0
    h_amp[0] = np.float32(rng.uniform(12, 35))
    nearest = ndimage.grey_dilation(labels, size=(9, 9))  # the cell a band pixel outside belongs to
    signal = h_amp[np.where(fg, labels, nearest)] * band
    signal -= depth[labels] * fg * np.clip((edt - 2.0) / 4.0, 0, 1)
    envelope = per(10, 25)
    rn = np.maximum(rmax * per(0.45, 0.75), 2.0)
    has_nucleus = (rmax >= 3.0 * px) & ~rounded
    nuc = fg & has_nucleus[labels] & (dcentre < rn[labels])
    nuc_soft = ndimage.gaussian_filter(nuc.astype(np.float32), px)
    signal += per(4, 14)[labels] * nuc_soft * fg
    signal -= np.float32(0.5) * envelope[labels] * (nuc_soft * (1 - nuc_soft) * 4) * fg
    blobs = _granules(rng, labels, nuc, dcentre, rn, int(has_nucleus.sum()), px)
    signal -= np.float32(rng.uniform(45, 90)) * np.minimum(blobs, 1.5)
    tex = ndimage.gaussian_filter(rng.standard_normal(labels.shape).astype(np.float32), 0.8 * px)
    signal += np.float32(rng.uniform(2, 12) / max(float(tex.std()), 1e-6)) * tex * fg
    return signal


def _phase_clutter(rng: np.random.Generator, fg: np.ndarray, neur: np.ndarray, sp: np.ndarray, px: float) -> np.ndarray:
    """(H, W) float32 unannotated clutter: dark processes ``neur`` (bool (H, W)), debris clumps at
    ``sp`` ((K, 2) pixels; dark in 85 % of the images) and 100-600 small dark specks on the background."""
    signal = -np.float32(rng.uniform(10, 25)) * ndimage.gaussian_filter(neur.astype(np.float32), 0.6 * px) * 2
    sign = np.float32(-1.0 if rng.random() < 0.85 else 1.0)
    specks = np.zeros(fg.shape, dtype=np.float32)
    specks[sp[:, 0], sp[:, 1]] = 1.0
    signal += sign * np.float32(rng.uniform(20, 45)) * ndimage.gaussian_filter(specks, 0.8 * px) * 2
    small = _dots(rng, ~fg, np.ones(fg.shape, dtype=np.float32), int(rng.integers(100, 600)))
    signal -= np.float32(rng.uniform(20, 50)) * ndimage.gaussian_filter(small, 0.8) * 4
    return signal


def _phase_ghosts(rng: np.random.Generator, fg: np.ndarray, px: float) -> np.ndarray:
    """(H, W) float32 unannotated look-alikes on the background: 2-11 flat textured clumps (cell-sized,
    no band: spread-out debris) and up to 14 faint out-of-focus rings, both as real phase contrast shows
    next to its cells. A model must learn that texture without an edge is not a cell."""
    h, w = fg.shape
    out = np.zeros((h, w), dtype=np.float32)
    k = int(rng.integers(2, 12))
    shapes = cell_shapes(rng, "astro", rng.uniform(300, 3000, k) * px * px)
    tex = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 0.9 * px)
    tex *= np.float32(1.0 / max(float(tex.std()), 1e-6))
    for c in shapes:
        top, left = int(rng.integers(0, h)) + c.top, int(rng.integers(0, w)) + c.left
        frame, inside = _in_frame(top, left, c.mask.shape, h, w)
        m = ndimage.gaussian_filter(c.mask[inside].astype(np.float32), 1.5 * px)
        out[frame] += m * (np.float32(rng.uniform(5, 14)) * tex[frame] - np.float32(rng.uniform(-2, 8)))
    for _ in range(int(rng.integers(0, 15))):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(6, 30) * px
        y0, y1 = int(max(cy - r - 6, 0)), int(min(cy + r + 6, h))
        x0, x1 = int(max(cx - r - 6, 0)), int(min(cx + r + 6, w))
        yy, xx = np.ogrid[y0:y1, x0:x1]
        d = np.hypot(yy - np.float32(cy), xx - np.float32(cx)).astype(np.float32) - np.float32(r)
        out[y0:y1, x0:x1] += np.float32(rng.uniform(-8, 10)) * np.exp(-d * d / np.float32(2 * (1.2 * px) ** 2))
    return out * ~fg


def _render_phase(
    rng: np.random.Generator, labels: np.ndarray, cell_type: str, zoom: float, neurites: bool = True
) -> np.ndarray:
    """(H, W) uint8 phase-contrast image of ``labels`` (the ``phase`` look).

    Drawn from the label image alone (module docstring, "The phase look"): the band across every edge
    (:func:`_phase_band`), the cells (:func:`_phase_cells`), unannotated clutter
    (:func:`_phase_clutter`), faint bright seams between touching cells; then smooth illumination,
    optics blur, the contrast raised (at most ``MAX_PHASE_GAIN`` x) towards a standard deviation drawn
    from ``TARGET_STD``, a mean from ``TARGET_MEAN`` and Gaussian camera noise.

    Args:
        rng: the image's generator (drawn from after the cells and annotations).
        labels: (H, W) int32 cells, 0 = background, ids 1..N (non-overlapping).
        cell_type: the image's type (processes for shsy5y / astro, the debris count).
        zoom: the cells' magnification (>= 1): edge widths and blurs scale with ``sqrt(zoom)``.
        neurites: draw the unannotated processes (:func:`_neurites`).

    Returns:
        (H, W) uint8 image.
    """
    fg = labels > 0
    seams = _seams(labels, fg)
    geometry = _cell_geometry(labels, fg, seams)
    px = max(1.0, zoom**0.5)  # optics scale with the magnification a little (edges stay 1-4 px)
    neur = _neurites(rng, labels, cell_type, neurites)
    sp = _debris(rng, SPECS[cell_type], fg)
    band = _phase_band(rng, fg | ndimage.binary_dilation(neur), geometry[0], px)
    signal = _phase_cells(rng, labels, band, geometry, px)
    signal += _phase_clutter(rng, fg, neur, sp, px)
    signal += np.float32(4.0) * seams
    signal += _phase_ghosts(rng, fg, px)
    illum = _illumination(rng, *labels.shape)
    dev = (illum - np.float32(illum.mean())) * np.float32(rng.uniform(0.3, 1.0))
    blur = rng.uniform(0.4, 1.5)  # focus varies from image to image
    img = ndimage.gaussian_filter(signal, blur, truncate=2.5) * (illum * np.float32(1 / 128)) + dev
    return _camera(rng, img, min_gain=1.0)


def _camera(rng: np.random.Generator, img: np.ndarray, min_gain: float) -> np.ndarray:
    """(H, W) uint8 of the look's grey levels ``img`` ((H, W) float32, any offset) with the
    competition's statistics: the contrast scaled towards a standard deviation drawn from
    ``TARGET_STD`` (by ``min_gain`` to ``MAX_PHASE_GAIN``), the mean drawn from ``TARGET_MEAN``, and
    Gaussian camera noise (1.5-6 grey levels, drawn per image)."""
    noise_sd = np.float32(rng.uniform(1.5, 6.0))
    target = rng.uniform(*TARGET_STD)
    gain = math.sqrt(max(target**2 - float(noise_sd) ** 2, 1.0) / max(float(img.var()), 1e-6))
    img = (img - np.float32(img.mean())) * np.float32(min(max(gain, min_gain), MAX_PHASE_GAIN))
    img += np.float32(rng.uniform(*TARGET_MEAN))
    img += rng.standard_normal(img.shape, dtype=np.float32) * noise_sd
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


#: The ``optics`` look's Zernike phase plate: the direct light's amplitude (its share that passes the
#: ring's absorbing coat) and the range of the halo's spatial scale in px (times ``sqrt(zoom)``).
OPTICS_PLATE_AMPLITUDE = (0.15, 0.4)
OPTICS_HALO_PX = (1.5, 4.0)


def _optics_phase(
    rng: np.random.Generator,
    labels: np.ndarray,
    cell_type: str,
    geometry: tuple[np.ndarray, np.ndarray, np.ndarray],
    seams: np.ndarray,
    px: float,
    neurites: bool = True,
) -> np.ndarray:
    """(H, W) float32 optical path of the frame in radians (the ``optics`` look's specimen).

    Each cell is thin at its edge (0.05-0.25 rad) and thickens inwards to a peak of 0.25-1.0 rad
    (``1 - exp(-d / l)`` of the inner distance ``d``, ``l`` = 20-70 % of the cell's depth): spread
    cells are mostly thin margin, compact ones a dome. Half of the compact cells are rounded (mitotic,
    1.5-3 rad: far past the plate's linear range, so they come out bright). A nucleus bump (-0.2 to
    0.5 rad), nucleoli and granules (dense dots), a fine texture and a thinner seam where two cells
    touch; unannotated neurites, debris and background specks are phase objects too.

    Args:
        rng: the image's generator.
        labels: (H, W) int32 cells, 0 = background.
        cell_type: the image's type (its processes and debris count).
        geometry: :func:`_cell_geometry`'s ``(edt, dcentre, rmax)``.
        seams: (H, W) bool :func:`_seams` of ``labels`` (the geometry's too).
        px: the optics scale, ``sqrt(zoom)`` (>= 1).
        neurites: draw the unannotated processes (:func:`_neurites`).

    Returns:
        (H, W) float32 phase, 0 on the empty background.
    """
    edt, dcentre, rmax = geometry
    fg = labels > 0
    n = int(labels.max())
    per = lambda lo, hi: rng.uniform(lo, hi, n + 1).astype(np.float32)  # noqa: E731
    peak = per(0.25, 1.0)
    lam = np.maximum(rmax * per(0.2, 0.7), 1.5)
    compact = np.bincount(labels.ravel(), minlength=n + 1) / np.maximum(np.pi * rmax * rmax, 1.0)
    rounded = (rng.random(n + 1) < 0.5) & (compact < 1.6)
    peak[rounded] = rng.uniform(1.5, 3.0, int(rounded.sum()))
    lam[rounded] = np.maximum(rmax[rounded] * 0.5, 1.5)
    margin = per(0.05, 0.25)
    dome = 1.0 - np.exp(-edt / lam[labels])
    phi = (margin[labels] + (peak[labels] - margin[labels]) * dome) * fg
    rn = np.maximum(rmax * per(0.45, 0.75), 2.0)
    has_nucleus = (rmax >= 3.0 * px) & ~rounded
    nuc = fg & has_nucleus[labels] & (dcentre < rn[labels])
    phi += per(-0.2, 0.5)[labels] * ndimage.gaussian_filter(nuc.astype(np.float32), px) * fg
    blobs = _granules(rng, labels, nuc, dcentre, rn, int(has_nucleus.sum()), px)
    phi += np.float32(rng.uniform(0.3, 0.9)) * np.minimum(blobs, 1.5)
    tex = ndimage.gaussian_filter(rng.standard_normal(labels.shape).astype(np.float32), 0.8 * px)
    phi += np.float32(rng.uniform(0.02, 0.12) / max(float(tex.std()), 1e-6)) * tex * fg
    phi -= np.float32(rng.uniform(0.0, 0.3)) * seams * phi
    neur = _neurites(rng, labels, cell_type, neurites)
    phi += np.float32(rng.uniform(0.2, 0.6)) * ndimage.gaussian_filter(neur.astype(np.float32), 0.6 * px) * 2
    sp = _debris(rng, SPECS[cell_type], fg)
    specks = np.zeros(fg.shape, dtype=np.float32)
    specks[sp[:, 0], sp[:, 1]] = 1.0
    phi += np.float32(rng.uniform(0.3, 1.2)) * ndimage.gaussian_filter(specks, 0.8 * px) * 2
    small = _dots(rng, ~fg, np.ones(fg.shape, dtype=np.float32), int(rng.integers(100, 600)))
    phi += np.float32(rng.uniform(0.2, 0.8)) * ndimage.gaussian_filter(small, 0.8) * 4
    return phi


def _zernike(rng: np.random.Generator, phi: np.ndarray, px: float) -> np.ndarray:
    """(H, W) float32 intensity of the phase object ``phi`` ((H, W) radians) under positive phase
    contrast, in the scalar Fourier model (an empty frame gives the plate's amplitude squared).

    The specimen's field ``exp(i phi)`` is filtered in the Fourier domain: the direct light, the
    frequencies within a soft disc around zero (a Gaussian of radius ``1 / (2 pi s)``, ``s`` drawn from
    ``OPTICS_HALO_PX``), is retarded a quarter wave and attenuated to ``OPTICS_PLATE_AMPLITUDE``; a
    Gaussian aperture (0.5-1.5 px) low-passes everything. The squared modulus then shows what phase
    contrast shows without drawing it: thin cells dark on grey, a bright halo around every object (the
    low frequencies the plate treats as direct light), interiors of wide flat cells fading back to the
    background (shade-off), and thick rounded cells turning bright.
    """
    h, w = phi.shape
    ky = np.fft.fftfreq(h).astype(np.float32)[:, None]
    kx = np.fft.fftfreq(w).astype(np.float32)[None, :]
    k2 = ky * ky + kx * kx
    s = rng.uniform(*OPTICS_HALO_PX) * px
    ring = np.exp(-k2 * np.float32(2 * (np.pi * s) ** 2))
    plate = np.complex64(rng.uniform(*OPTICS_PLATE_AMPLITUDE) * np.exp(-0.5j * np.pi))
    blur = rng.uniform(0.5, 1.5) * px
    pupil = np.exp(-k2 * np.float32(2 * (np.pi * blur) ** 2))
    field = np.fft.ifft2(np.fft.fft2(np.exp(1j * phi.astype(np.float32))) * ((1 + (plate - 1) * ring) * pupil))
    return (np.abs(field) ** 2).astype(np.float32)


def _render_optics(
    rng: np.random.Generator, labels: np.ndarray, cell_type: str, zoom: float, neurites: bool = True
) -> np.ndarray:
    """(H, W) uint8 phase-contrast image of ``labels`` (the ``optics`` look): the specimen's optical
    path (:func:`_optics_phase`) imaged through a Zernike phase plate (:func:`_zernike`), the phase
    look's unannotated clutter (:func:`_phase_ghosts`) on top, then the phase look's illumination,
    contrast, mean and camera noise (:func:`_camera`).

    Args:
        rng: the image's generator (drawn from after the cells and annotations).
        labels: (H, W) int32 cells, 0 = background, ids 1..N (non-overlapping).
        cell_type: the image's type (processes for shsy5y / astro, the debris count).
        zoom: the cells' magnification (>= 1): the optics scale with ``sqrt(zoom)``.
        neurites: draw the unannotated processes (:func:`_neurites`).

    Returns:
        (H, W) uint8 image.
    """
    fg = labels > 0
    px = max(1.0, zoom**0.5)
    seams = _seams(labels, fg)
    phi = _optics_phase(rng, labels, cell_type, _cell_geometry(labels, fg, seams), seams, px, neurites)
    inten = _zernike(rng, phi, px)
    # grey levels: 60 per unit of the background's intensity, 0 on the background (outside the cells)
    bg = float(np.median(inten[~fg])) if (~fg).any() else float(inten.mean())
    signal = (inten / np.float32(max(bg, 1e-6)) - np.float32(1.0)) * np.float32(60.0)
    signal += _phase_ghosts(rng, fg, px)
    illum = _illumination(rng, *labels.shape)
    dev = (illum - np.float32(illum.mean())) * np.float32(rng.uniform(0.3, 1.0))
    return _camera(rng, signal * (illum * np.float32(1 / 128)) + dev, min_gain=0.3)


def grow_labels(labels: np.ndarray, pad: float) -> np.ndarray:
    """``labels`` (H, W) int32 with every cell grown ``pad`` px (Euclidean) into the background; a
    background pixel goes to its nearest cell, so grown cells never overlap. ``pad <= 0``: a copy."""
    if pad <= 0 or not labels.any():
        return labels.copy()
    dist, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    return np.where(dist <= pad, labels[iy, ix], 0).astype(labels.dtype)


def check_zoom(zoom: float) -> None:
    """Raise CellsegError unless ``1 <= zoom <= MAX_ZOOM`` (NaN included)."""
    if not 1.0 <= zoom <= MAX_ZOOM:
        raise CellsegError(f"cell zoom must be between 1 and {MAX_ZOOM:g}, got {zoom}")


def check_label_margin(margin: float | None, look: str) -> None:
    """Raise CellsegError unless ``margin`` is None or a finite number of px >= 0 for a look that has
    a margin (``phase``, ``optics``; the classic look's annotations are the drawn cells)."""
    if margin is None:
        return
    if not 0.0 <= margin < math.inf:  # NaN fails both comparisons
        raise CellsegError(f"label margin must be a finite number of px >= 0, got {margin}")
    if look == "classic":
        raise CellsegError("a label margin applies to the phase and optics looks only (--look phase|optics)")


def check_look(look: str) -> None:
    """Raise CellsegError unless ``look`` is one of :data:`LOOKS`."""
    if look not in LOOKS:
        raise CellsegError(f"unknown look {look!r}; expected one of {', '.join(LOOKS)}")


def _zoomed_cells(
    rng: np.random.Generator, cell_type: str, height: int, width: int, zoom: float, polygons: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_place_cells` on a ``1 / zoom`` canvas (``1 / zoom**2`` of the cells), enlarged by
    nearest neighbour to (height, width): cells ``zoom`` times wider (``zoom**2`` the area), as a
    higher magnification shows them. Returns ``(labels, partial)`` as :func:`_place_cells`."""
    small_h, small_w = math.ceil(height / zoom), math.ceil(width / zoom)
    labels, partial = _place_cells(rng, cell_type, small_h, small_w, count_scale=1.0 / zoom**2, polygons=polygons)
    rows = np.minimum((np.arange(height) / zoom).astype(np.int64), small_h - 1)
    cols = np.minimum((np.arange(width) / zoom).astype(np.int64), small_w - 1)
    return np.ascontiguousarray(labels[rows][:, cols]), partial


def make_image(
    rng: np.random.Generator,
    cell_type: str,
    height: int = IMAGE_SHAPE[0],
    width: int = IMAGE_SHAPE[1],
    zoom: float = 1.0,
    look: str = "classic",
    neurites: bool = True,
    label_margin: float | None = None,
) -> SynthImage:
    """Generate one image of ``cell_type`` with its cells and (possibly broken) annotations.

    Args:
        rng: the image's own generator (everything about the image is drawn from it, in a fixed order,
            so one seed gives one image byte for byte).
        cell_type: "shsy5y", "astro" or "cort" (anything else raises CellsegError).
        height, width: frame size in pixels (the competition's 520 x 704 by default).
        zoom: cell magnification (>= 1): cells ``zoom`` times wider and ``zoom**2`` times fewer,
            halo, texture, processes, debris and noise unchanged (the same optics at a higher
            magnification, e.g. 2 for Usiigaci-sized cells, median 1,892 px). 1: the competition's
            sizes, byte-identical to before the option existed.
        look: :data:`LOOKS`: ``classic`` (the default), ``phase`` (drawn to match real phase contrast)
            or ``optics`` (the phase look's cells imaged through a phase plate); module docstring.
        neurites: draw the unannotated thin processes of shsy5y and astro cells (the competition's
            neurites). False leaves them out of the image and nothing else (the same draws are made):
            for data whose thin processes are annotated as part of their cells, as Usiigaci's tails.
        label_margin: px the phase and optics looks' annotations reach past the drawn cells (None:
            ``PHASE_LABEL_PAD * sqrt(zoom)``, 2.1 px at zoom 2); not for the classic look.

    Returns:
        A :class:`SynthImage`: ``image`` (height, width) uint8, ``cells`` and ``annotations`` (N
        non-overlapping CropMasks each), ``broken`` (N,) bool.
    """
    if cell_type not in SPECS:
        raise CellsegError(f"unknown cell type {cell_type!r}; expected one of {', '.join(CELL_TYPES)}")
    check_zoom(zoom)
    check_look(look)
    check_label_margin(label_margin, look)
    polygons = 0.0 if look == "classic" else PHASE_POLYGONS
    if zoom == 1.0:
        labels, partial = _place_cells(rng, cell_type, height, width, polygons=polygons)
    else:
        labels, partial = _zoomed_cells(rng, cell_type, height, width, zoom, polygons)
    cells = _read_cells(labels, partial, SPECS[cell_type].min_area)
    if look != "classic":  # the annotations reach past the drawn edge (PHASE_LABEL_PAD)
        pad = PHASE_LABEL_PAD * max(1.0, zoom) ** 0.5 if label_margin is None else label_margin
        grown = grow_labels(labels, pad)
        cells = [c for _, c in instances(grown)]
    annotations = list(cells)
    broken = np.zeros(len(cells), dtype=bool)
    if cell_type == "astro":
        for i in np.flatnonzero(rng.random(len(cells)) < BROKEN_ASTRO_P):
            if cells[i].area >= BROKEN_MIN_AREA:
                b = _break(rng, cells[i])
                if b is not None:
                    annotations[i], broken[i] = b, True
    if look == "classic":
        image = _render(rng, labels, cell_type, neurites=neurites)
    elif look == "phase":
        image = _render_phase(rng, labels, cell_type, zoom, neurites=neurites)
    else:
        image = _render_optics(rng, labels, cell_type, zoom, neurites=neurites)
    return SynthImage(image, cell_type, cells, annotations, broken)
