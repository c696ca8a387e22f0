"""Synthetic cell outlines: star-shaped polar shapes rasterised many at a time.

Each cell is a star-shaped polar outline ``rho <= r(theta)`` (ellipse x low Fourier wobble + narrow
Gaussian bumps for neurites/branches, then bent and swirled; or, on request, a straight-edged polygon
with tails, :func:`_polygon`), rasterised on its own small crop and scaled to a target area. The
inside test is vectorised over all cells of one crop size, with the angle of every pixel read from
a cached lookup table (``np.arctan2`` is the slow part otherwise; benchmarks/bench_synth.py measures
it against a per-cell arctan2 baseline).

Used by :mod:`cellseg.data.synth_image` (one image) and so by :mod:`cellseg.data.synth` (the dataset).
"""

from __future__ import annotations

import numpy as np

from cellseg.data.masks import CropMask

_N_ANGLES = 256
_THETA = np.linspace(-np.pi, np.pi, _N_ANGLES, endpoint=False)

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


def _polygon(rng: np.random.Generator) -> np.ndarray:
    """One unit-scale polygon outline ``r(theta)`` (_N_ANGLES,): straight edges between 3-7 corners.

    What fibroblast-like cells in phase contrast look like, and how they are annotated (Usiigaci's
    labels are hand-drawn polygons): a quarter of the corners are pulled out 1.5-3x into tails, the
    whole is stretched to an aspect of 1-3, and half of the outlines have concave sides. The corners
    are spread so that no gap between them reaches 0.85 pi: the polygon stays star-shaped about its
    centre, as every outline here is.
    """
    k = int(rng.integers(3, 8))
    while True:
        corners = np.sort(rng.uniform(-np.pi, np.pi, k))
        if np.diff(np.concatenate([corners, corners[:1] + 2 * np.pi])).max() < 0.85 * np.pi:
            break
    rad = np.exp(rng.normal(0.0, 0.3, k))
    tails = rng.random(k) < 0.25
    rad[tails] *= rng.uniform(1.5, 3.0, int(tails.sum()))
    a = np.sqrt(rng.uniform(1.0, 3.0))
    rad /= np.sqrt((np.cos(corners) / a) ** 2 + (np.sin(corners) * a) ** 2)
    after = np.searchsorted(corners, _THETA) % k  # the corner after each angle, and the one before
    before = (after - 1) % k
    into = _wrap(_THETA - corners[before]) % (2 * np.pi)  # angle past the corner before
    span = _wrap(corners[after] - corners[before]) % (2 * np.pi)
    r1, r2 = rad[before], rad[after]
    # the straight edge between the corners (r1, t1) and (r2, t2), in polar form
    r = r1 * r2 * np.sin(span) / np.maximum(r1 * np.sin(into) + r2 * np.sin(span - into), 1e-6)
    if rng.random() < 0.5:  # concave sides: each edge bows inwards by 10-35 % at its middle
        r = r * (1.0 - rng.uniform(0.1, 0.35) * np.sin(np.pi * np.clip(into / np.maximum(span, 1e-6), 0, 1)))
    return r


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


def cell_shapes(rng: np.random.Generator, cell_type: str, areas: np.ndarray, polygons: float = 0.0) -> list[CropMask]:
    """Cells of about ``areas`` (n,) px, each a CropMask whose (top, left) are relative to the cell's
    centre pixel.

    Inside test ``rho <= r(theta)`` in the cell's rotated, bent and swirled frame, evaluated for
    many cells at once on crops of equal size (the outline's bounding box rounded up to 4 px).

    Args:
        rng: the generator every draw comes from.
        cell_type: "shsy5y", "astro" or "cort" (the outline family, module docstring).
        areas: (n,) target areas in px.
        polygons: share of shsy5y and astro cells drawn as straight-edged polygons instead
            (:func:`_polygon`, neither bent nor swirled). 0 (the default) draws nothing more from
            ``rng``, so the shapes are those of the generator without the option.

    Returns:
        n CropMasks.
    """
    areas = np.asarray(areas, dtype=np.float64)
    n = areas.size
    r, bend, swirl = _profiles(rng, cell_type, n)
    if polygons > 0 and cell_type in ("shsy5y", "astro"):
        for i in np.flatnonzero(rng.random(n) < polygons):
            r[i] = _polygon(rng)
            bend[i] = swirl[i] = 0.0
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
