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

The images themselves (cell shapes, placement, broken astro annotations, the phase-contrast look)
come from :func:`cellseg.data.synth_image.make_image`, whose module docstring describes them; this
module draws the cell types, sample groups, ids and metadata, runs the images (in worker processes)
and writes the folder and its CSVs.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cellseg import CELL_TYPES, IMAGE_SHAPE
from cellseg.config.provenance import write_synth_marker
from cellseg.data.rle import encode_crop
from cellseg.data.synth_image import check_label_margin, check_look, check_zoom, make_image
from cellseg.data.truth import TRAIN_COLUMNS
from cellseg.errors import CellsegError
from cellseg.io import write_gray

#: Image share of each cell type in the real train set (320 : 155 : 131 of 606 images).
TYPE_SHARE: dict[str, int] = {"cort": 320, "shsy5y": 155, "astro": 131}


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
                donor = max(counts, key=counts.__getitem__)
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


def _job(task: tuple[np.random.SeedSequence, str, str, bool, dict]) -> tuple[list[str], list[int], int]:
    """Worker: render one image, write its PNG; return (RLEs, annotation areas, broken count).
    ``task``: the image's seed, cell type, PNG path, whether it is annotated, and :func:`make_image`'s
    keyword arguments (``zoom``, ``look``, ``neurites``, ``label_margin``)."""
    seed_seq, cell_type, path, annotate, render = task
    height, width = IMAGE_SHAPE
    si = make_image(np.random.default_rng(seed_seq), cell_type, height, width, **render)
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


def _plan(
    seed: int,
    train_images: int,
    test_images: int,
    semi_images: int,
    tmp: Path,
    render: dict | None = None,
) -> tuple[list[tuple], list[_Meta], list[str], list[str]]:
    """Draw the types, samples and ids, and one render task per image (paths under ``tmp``).

    ``render``: :func:`make_image`'s keyword arguments for every image (``zoom``, ``look``,
    ``neurites``, ``label_margin``; default: its defaults). Returns ``(tasks, train_meta, train_ids,
    test_ids)``; tasks are :func:`_job`'s arguments, train images first, then test, then
    semi-supervised.
    """
    render = render or {}
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
    train_dir, test_dir, semi_dir = tmp / "train", tmp / "test", tmp / "train_semi_supervised"
    tasks = [(seqs[1 + i], t, str(train_dir / f"{train_ids[i]}.png"), True, render) for i, t in enumerate(train_types)]
    k = 1 + train_images
    tasks += [(seqs[k + i], t, str(test_dir / f"{test_ids[i]}.png"), False, render) for i, t in enumerate(test_types)]
    k += test_images
    tasks += [(seqs[k + i], m.cell_type, str(semi_dir / _semi_name(m)), False, render) for i, m in enumerate(semi_meta)]
    return tasks, train_meta, train_ids, test_ids


def _run_jobs(tasks: list[tuple], workers: int, progress: bool) -> list[tuple[list[str], list[int], int]]:
    """:func:`_job` over all tasks, in worker processes when there are enough of them (same output)."""
    bar = dict(total=len(tasks), desc="synth", unit="img", disable=None if progress else True)
    if workers > 1 and len(tasks) >= 4 * workers:
        # fork is cheap; but never fork a process that has torch (and its thread pools) loaded
        start = "fork" if os.name == "posix" and "torch" not in sys.modules else "spawn"
        ctx = multiprocessing.get_context(start)
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx) as pool:
            return list(tqdm(pool.map(_job, tasks, chunksize=4), **bar))
    return [_job(t) for t in tqdm(tasks, **bar)]


def _train_rows(results: list, train_meta: list[_Meta], train_ids: list[str]) -> tuple[dict[str, list], dict]:
    """train.csv columns of the annotated images, and per cell type their counts, areas, broken count."""
    rows: dict[str, list] = {c: [] for c in TRAIN_COLUMNS}
    per_type: dict[str, dict] = {}
    height, width = IMAGE_SHAPE
    for i, (rles, areas, nbroken) in enumerate(results):
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
    return rows, per_type


def _type_stats(per_type: dict) -> dict:
    """Summary per cell type: images, instances, mean/min/max instances, mean area, broken share."""
    stats = {}
    for t in CELL_TYPES:
        st = per_type.get(t)
        if not st:
            continue
        counts, areas = np.array(st["counts"]), np.array(st["areas"])
        stats[t] = {
            "images": int(counts.size),
            "instances": int(counts.sum()),
            "mean_instances": round(float(counts.mean()), 1),
            "min_instances": int(counts.min()),
            "max_instances": int(counts.max()),
            "mean_area": round(float(areas.mean()), 1) if areas.size else 0.0,
            "broken": int(st["broken"]),
            "broken_share": round(st["broken"] / max(1, int(counts.sum())), 3),
        }
    return stats


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)


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
    cell_zoom: float = 1.0,
    look: str = "classic",
    neurites: bool = True,
    label_margin: float | None = None,
) -> dict:
    """Write a synthetic dataset in the competition layout to ``out`` and return a summary.

    The folder is built beside ``out`` and renamed into place at the end, so ``out`` is either
    complete or untouched. A non-empty existing ``out`` raises CellsegError unless ``force``
    (then it is replaced). ``workers`` processes render the images (None: one per core; runs of
    fewer than 4 images per worker stay in this process); files are byte-identical for a seed whatever the
    worker count. ``cell_zoom`` (1-8) draws cells that many times wider and fewer, as a higher
    magnification shows them (:func:`cellseg.data.synth_image.make_image`'s ``zoom``); 1 keeps the
    competition's sizes. ``look`` is ``classic`` (the default), ``phase`` or ``optics``
    (:data:`~cellseg.data.synth_image.LOOKS`, :func:`cellseg.data.synth_image.make_image`).
    ``neurites=False`` leaves the unannotated processes out of every image, ``label_margin`` (px) sets
    how far the phase and optics looks' annotations reach past the drawn cells (both recorded in the
    marker when given).

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
    check_zoom(cell_zoom)  # before the temporary folder and the workers
    check_look(look)
    check_label_margin(label_margin, look)
    out = Path(out)
    _check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        for sub in ("train", "test", "train_semi_supervised"):
            (tmp / sub).mkdir()
        render = {"zoom": cell_zoom, "look": look, "neurites": neurites, "label_margin": label_margin}
        tasks, train_meta, train_ids, test_ids = _plan(seed, train_images, test_images, semi_images, tmp, render)
        results = _run_jobs(tasks, workers, progress)
        rows, per_type = _train_rows(results[:train_images], train_meta, train_ids)
        pd.DataFrame(rows, columns=list(TRAIN_COLUMNS)).to_csv(tmp / "train.csv", index=False)
        pd.DataFrame({"id": test_ids, "predicted": [""] * len(test_ids)}).to_csv(
            tmp / "sample_submission.csv", index=False
        )
        counts = {"train_images": train_images, "test_images": test_images, "semi_images": semi_images}
        # marks the folder as synthetic: training on it is recorded so (cellseg.model.provenance)
        zoomed = {"cell_zoom": cell_zoom} if cell_zoom != 1.0 else {}
        looked = {"look": look} if look != "classic" else {}
        bare = ({} if neurites else {"neurites": False}) | (
            {} if label_margin is None else {"label_margin": label_margin}
        )
        write_synth_marker(tmp, {"seed": seed, **counts, **zoomed, **looked, **bare, "instances": len(rows["id"])})
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": str(out),
        "seed": seed,
        **counts,
        "instances": len(rows["id"]),
        "per_type": _type_stats(per_type),
        "seconds": round(time.perf_counter() - t0, 2),
    }
