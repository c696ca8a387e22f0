"""Synthetic dataset generation speed.

    .venv/bin/python benchmarks/bench_synth.py [--workers N] [--train-images 606] [--semi-images 200]

(a) Cell rasterisation: ``synth_shapes.cell_shapes`` (batched, angle lookup table) vs the baseline measured
    in this run: one cell at a time with ``np.arctan2``/``np.hypot`` (the straightforward version).
    Same profiles and areas; reports the speed-up and the pixel agreement of the two.
(b) The full default dataset (606 train, 3 test, 200 semi) with ``--workers`` processes (default:
    all cores). Target: < 60 s on 2 cores. Prints the wall time and the CPU time of all processes
    (on a shared machine the wall time says more about the neighbours; CPU / 2 is what 2 idle cores
    take), and the CPU of one PNG encode (``cellseg.io.write_gray``, zlib level 6).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cellseg.data import synth, synth_shapes


def naive_shapes(rng: np.random.Generator, cell_type: str, areas: np.ndarray) -> list[np.ndarray]:
    """Baseline: the same outlines rasterised one cell at a time with arctan2 on a square crop."""
    r, bend, swirl = synth_shapes._profiles(rng, cell_type, areas.size)
    r = r * np.sqrt(areas / (0.5 * (r * r).sum(1) * (2 * np.pi / synth_shapes._N_ANGLES)))[:, None]
    out = []
    for k in range(areas.size):
        rmax = float(r[k].max())
        half = int(math.ceil(rmax * (1 + abs(bend[k])))) + 1
        g = np.arange(-half, half + 1, dtype=np.float32)
        yy, xx = g[:, None], g[None, :]
        u, v = xx, yy - np.float32(bend[k] / rmax) * xx * xx
        rho = np.hypot(u, v)
        th = np.arctan2(v, u) + np.float32(swirl[k] / rmax) * rho
        idx = ((th + np.pi) * (synth_shapes._N_ANGLES / (2 * np.pi))).astype(np.int64) % synth_shapes._N_ANGLES
        out.append(rho <= r[k][idx])
    return out


def _cpu() -> float:
    """CPU seconds of this process plus its finished children (the worker processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_shapes() -> None:
    for cell_type, n in (("shsy5y", 2000), ("astro", 400)):
        areas = np.full(n, 230.0 if cell_type == "shsy5y" else 900.0)
        synth_shapes.cell_shapes(np.random.default_rng(0), cell_type, areas[:10])  # build the angle table
        t = time.perf_counter()
        ours = synth_shapes.cell_shapes(np.random.default_rng(1), cell_type, areas)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        base = naive_shapes(np.random.default_rng(1), cell_type, areas)
        t_base = time.perf_counter() - t
        a_ours = np.mean([c.area for c in ours])
        a_base = np.mean([m.sum() for m in base])
        print(
            f"(a) {cell_type:6s} {n} cells: ours {t_ours * 1e3:7.1f} ms, per-cell arctan2 baseline "
            f"{t_base * 1e3:7.1f} ms -> {t_base / t_ours:4.1f}x faster; mean area {a_ours:.0f} vs {a_base:.0f} px"
        )


def bench_full(workers: int, train: int, semi: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cpu0 = _cpu()
        s = synth.generate(
            Path(tmp) / "data",
            train_images=train,
            test_images=3,
            semi_images=semi,
            seed=0,
            progress=False,
            workers=workers,
        )
        cpu = _cpu() - cpu0
        n = train + 3 + semi
        print(
            f"(b) full dataset ({train}/3/{semi} images, {s['instances']} cells) with {workers} worker(s): "
            f"{s['seconds']:.1f} s wall = {s['seconds'] / n * 1e3:.0f} ms/image; CPU of all processes "
            f"{cpu:.1f} s = {cpu / n * 1e3:.0f} ms/image -> {cpu / 2:.0f} s on 2 idle cores (target < 60 s); "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
        for t, st in s["per_type"].items():
            print(
                f"    {t:7s} {st['images']:4d} images, cells/image {st['mean_instances']:6.1f} "
                f"[{st['min_instances']}, {st['max_instances']}], mean area {st['mean_area']:6.1f}, "
                f"broken {st['broken_share']:.1%}"
            )
        pngs = sorted((Path(tmp) / "data" / "train").glob("*.png"))[:20]
        cpu = time.process_time()
        for p in pngs:
            Image.open(p).load()
            arr = np.asarray(Image.open(p))
            Image.fromarray(arr).save(io.BytesIO(), format="PNG")
        enc = (time.process_time() - cpu) / len(pngs)
        print(f"    PNG decode+encode (zlib level 6, as write_gray): {enc * 1e3:.0f} ms CPU/image")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--train-images", type=int, default=606)
    ap.add_argument("--semi-images", type=int, default=200)
    args = ap.parse_args()
    bench_shapes()
    bench_full(args.workers, args.train_images, args.semi_images)


if __name__ == "__main__":
    main()
