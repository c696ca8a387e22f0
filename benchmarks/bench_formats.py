"""Foundation benchmarks: RLE encode, the metric, and train.csv decoding.

    .venv/bin/python benchmarks/bench_formats.py [--data DIR]

(a) RLE encode of the same 300 masks (520x704): ours (full frame, and from crops) vs
    ``pycocotools.mask.encode``. Target: ours within 2x.
(b) Metric on 100 shsy5y-like images (~340 instances each): ours (sparse bincount) vs the public
    notebooks' histogram2d IoU. Target: >= 20x faster.
(c) Decode a full-size synthetic train.csv (~73k rows) into crops. Target: <= 10 s. Baseline in the
    same run: decoding each row onto the full frame.
Each section prints a ratio against a baseline measured in this run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from cellseg.data import rle
from cellseg.data.masks import CropMask
from cellseg.data.truth import read_train_csv, read_train_records
from cellseg.evaluation import metric

H, W = 520, 704


def random_label_image(rng, n=340, radius=(4, 12)):
    """(H, W) int32 label image of ~n non-overlapping blobs (ellipses painted in order)."""
    lab = np.zeros((H, W), np.int32)
    yy, xx = np.mgrid[-16:17, -16:17]
    k = 0
    for _ in range(n):
        cy, cx = rng.integers(16, H - 17), rng.integers(16, W - 17)
        ry, rx = rng.uniform(*radius, size=2)
        blob = (yy / ry) ** 2 + (xx / rx) ** 2 <= 1
        view = lab[cy - 16 : cy + 17, cx - 16 : cx + 17]
        free = blob & (view == 0)
        if free.sum() > 20:
            k += 1
            view[free] = k
    return lab, k


def timeit(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_rle(rng):
    lab, n = random_label_image(rng, 300)
    ids = np.arange(1, min(n, 300) + 1)
    masks = [lab == i for i in ids]
    crops = [CropMask.from_full(m) for m in masks]
    stack = np.asfortranarray(np.stack(masks, axis=-1).astype(np.uint8))
    t_coco = timeit(lambda: mask_utils.encode(stack))
    t_ours = timeit(lambda: [rle.encode(m) for m in masks])
    t_crop = timeit(lambda: [rle.encode_crop(c, H, W) for c in crops])
    print(f"(a) RLE encode {len(masks)} masks {H}x{W}")
    print(f"    pycocotools.mask.encode (stack)  {t_coco * 1e3:8.1f} ms   (baseline)")
    print(f"    cellseg rle.encode (full frame)  {t_ours * 1e3:8.1f} ms   ratio {t_ours / t_coco:5.2f}x of pycocotools")
    print(f"    cellseg rle.encode_crop (crops)  {t_crop * 1e3:8.1f} ms   ratio {t_crop / t_coco:5.2f}x of pycocotools")


def histogram2d_score(labels, y_pred):
    """The public notebooks' metric (histogram2d IoU), kept as the baseline."""
    true_objects = len(np.unique(labels))
    pred_objects = len(np.unique(y_pred))
    intersection = np.histogram2d(labels.flatten(), y_pred.flatten(), bins=(true_objects, pred_objects))[0]
    area_true = np.histogram(labels, bins=true_objects)[0]
    area_pred = np.histogram(y_pred, bins=pred_objects)[0]
    union = np.expand_dims(area_true, -1) + np.expand_dims(area_pred, 0) - intersection
    iou = (intersection / union)[1:, 1:]
    prec = []
    for t in np.arange(0.5, 1.0, 0.05):
        matches = iou > t
        tp = np.sum(np.sum(matches, axis=1) == 1)
        fp = np.sum(np.sum(matches, axis=0) == 0)
        fn = np.sum(np.sum(matches, axis=1) == 0)
        prec.append(tp / (tp + fp + fn))
    return float(np.mean(prec))


def bench_metric(rng, n_images):
    pairs = []
    for _ in range(n_images):
        gt, ng = random_label_image(rng, 340)
        pred = np.roll(gt, rng.integers(-2, 3), axis=1)
        pairs.append((gt, pred, ng))
    t = time.perf_counter()
    ours = [metric.image_score(g, p, n, n) for g, p, n in pairs]
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = [histogram2d_score(g, p) for g, p, _ in pairs]
    t_ref = time.perf_counter() - t
    assert np.allclose(ours, ref), "metric disagrees with the histogram2d reference"
    mean_n = np.mean([n for *_, n in pairs])
    print(f"(b) metric on {n_images} images, {mean_n:.0f} instances each")
    print(f"    histogram2d reference {t_ref:7.2f} s  ({t_ref / n_images * 1e3:6.1f} ms/image)  (baseline)")
    print(
        f"    cellseg.evaluation.metric        {t_ours:7.2f} s  ({t_ours / n_images * 1e3:6.1f} ms/image)  speed-up {t_ref / t_ours:5.1f}x"
    )


def bench_decode(data: Path):
    csv = data / "train.csv"
    df = read_train_records(csv)
    t = time.perf_counter()
    ts = read_train_csv(csv)
    t_ours = time.perf_counter() - t
    sample = df.iloc[:: max(1, len(df) // 5000)]
    t = time.perf_counter()
    for a, h, w in zip(sample["annotation"], sample["height"], sample["width"]):
        rle.decode(a, h, w)
    t_full = (time.perf_counter() - t) * len(df) / len(sample)
    print(f"(c) decode {csv} ({len(df)} rows, {len(ts)} images)")
    print(f"    full-frame decode per row (extrapolated from {len(sample)} rows) {t_full:6.2f} s  (baseline)")
    print(
        f"    read_train_csv (crops, validated)                      {t_ours:6.2f} s  speed-up {t_full / t_ours:4.1f}x"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="competition folder with a full-size train.csv (default: generate one)")
    ap.add_argument("--metric-images", type=int, default=100)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    bench_rle(rng)
    bench_metric(rng, args.metric_images)
    if args.data:
        bench_decode(args.data)
    else:
        from cellseg.data.synth import generate

        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            generate(Path(tmp) / "synth", train_images=606, test_images=3, semi_images=0, seed=0, progress=False)
            print(f"    (synthetic full-size dataset generated in {time.perf_counter() - t:.1f} s)")
            bench_decode(Path(tmp) / "synth")


if __name__ == "__main__":
    main()
