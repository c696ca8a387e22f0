"""Per-item cost of cellseg.data.dataset at competition size (704 x 520, ~340 cells) against baselines
measured in the same run:

* item (no augmentation): ours (crops -> one (N, H, W) stack) vs. decoding every RLE to a full frame
  (``rle.decode`` per instance + ``np.stack``), the straightforward way;
* augmentation (flips, rot90, multi-scale short side + 512 crop, tight boxes): ours vs. the stock
  torchvision v2 pipeline (flips, RandomShortestSize, RandomCrop, SanitizeBoundingBoxes,
  ``torchvision.ops.masks_to_boxes``) on the same sample;
* default AugmentConfig (flips, rot90, brightness/contrast): ours (box-by-box mask moves) vs.
  ``v2.RandomHorizontalFlip`` + ``v2.RandomVerticalFlip`` + whole-frame rot90 + ColorJitter.

One torch thread (as in a DataLoader worker). Run: ``.venv/bin/python benchmarks/bench_dataset.py``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def make_folder(root: Path, n_cells: int, seed: int = 0) -> Path:
    """A competition folder with 2 shsy5y images of ``n_cells`` elongated cells each (~225 px)."""
    from cellseg.data import rle
    from cellseg.data.masks import CropMask
    from cellseg.data.truth import TRAIN_COLUMNS
    from cellseg.io import write_gray

    rng = np.random.default_rng(seed)
    h, w = 520, 704
    (root / "train").mkdir(parents=True)
    rows = []
    for k in range(2):
        image_id = f"bench{k}"
        img = rng.normal(128, 10, (h, w))
        for _ in range(n_cells):
            a, b = rng.uniform(4, 14), rng.uniform(3, 6)
            t = rng.uniform(0, np.pi)
            yy, xx = np.mgrid[-15:16, -15:16]
            u = (xx * np.cos(t) + yy * np.sin(t)) / a
            v = (-xx * np.sin(t) + yy * np.cos(t)) / b
            crop = (u**2 + v**2) <= 1
            y0, x0 = rng.integers(0, h - 31), rng.integers(0, w - 31)
            c = CropMask(int(y0), int(x0), crop).tight()
            img[c.top : c.top + c.mask.shape[0], c.left : c.left + c.mask.shape[1]][c.mask] -= 40
            rows.append(
                {
                    "id": image_id,
                    "annotation": rle.encode_crop(c, h, w),
                    "width": w,
                    "height": h,
                    "cell_type": "shsy5y",
                    "plate_time": "",
                    "sample_date": "",
                    "sample_id": f"s{k}",
                    "elapsed_timedelta": "",
                }
            )
        write_gray(root / "train" / f"{image_id}.png", np.clip(img, 0, 255).astype(np.uint8))
    pd.DataFrame(rows, columns=list(TRAIN_COLUMNS)).to_csv(root / "train.csv", index=False)
    return root


def timed(fn, reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=340)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from torchvision.ops import masks_to_boxes as tv_masks_to_boxes
    from torchvision.transforms import v2

    from cellseg.config.experiment import AugmentConfig, ExperimentConfig
    from cellseg.data import rle
    from cellseg.data.dataset import build_datasets
    from cellseg.io import read_gray

    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(Path(tmp) / "data", args.cells)
        df = pd.read_csv(root / "train.csv")
        rles = df.loc[df["id"] == "bench0", "annotation"].tolist()

        def naive_item():
            image = read_gray(root / "train" / "bench0.png")
            masks = np.stack([rle.decode(r, 520, 704) for r in rles])
            m = torch.from_numpy(masks.astype(np.uint8))
            return torch.from_numpy(image).float().div(255).expand(3, -1, -1), m, tv_masks_to_boxes(m)

        plain, _ = build_datasets(ExperimentConfig(augment=AugmentConfig(enabled=False)), root)
        geo = AugmentConfig(
            hflip=0.5,
            vflip=0.5,
            rot90=0.5,
            short_sides=(480, 520, 600, 700),
            crop_size=(512, 512),
            brightness=(1, 1),
            contrast=(1, 1),
        )
        aug, _ = build_datasets(ExperimentConfig(augment=geo), root)
        default, _ = build_datasets(ExperimentConfig(augment=AugmentConfig()), root)
        paste, _ = build_datasets(
            ExperimentConfig(augment=AugmentConfig(copy_paste_p=1.0, copy_paste_max_cells=20)), root
        )
        n = len(plain[0][1]["labels"])

        stock = v2.Compose(
            [
                v2.RandomHorizontalFlip(0.5),
                v2.RandomVerticalFlip(0.5),
                v2.RandomShortestSize([480, 520, 600, 700]),
                v2.RandomCrop((512, 512), pad_if_needed=True),
                v2.ClampBoundingBoxes(),
                v2.SanitizeBoundingBoxes(),
            ]
        )

        def stock_item():
            image, masks, labels, boxes = _raw(plain, 0)
            img, t = stock(image, {"boxes": boxes, "labels": labels, "masks": masks})
            m = t["masks"][t["masks"].flatten(1).any(1)]
            return img.float().div(255), m, tv_masks_to_boxes(m)

        from cellseg.data.geometric import rot90

        # whole-frame torch.rot90 by 90 or 270 degrees with p 0.5, composed from stock v2 parts
        stock_rot90 = v2.RandomApply(
            [v2.RandomChoice([v2.Lambda(functools.partial(rot90, k=1)), v2.Lambda(functools.partial(rot90, k=3))])],
            p=0.5,
        )
        stock_flips = v2.Compose(
            [
                v2.RandomHorizontalFlip(0.5),
                v2.RandomVerticalFlip(0.5),
                stock_rot90,
                v2.ToDtype(torch.float32, scale=True),
                v2.ColorJitter(brightness=(0.9, 1.1), contrast=(0.9, 1.1)),
            ]
        )

        def stock_default_item():
            image, masks, labels, boxes = _raw(plain, 0)
            img, t = stock_flips(image, {"boxes": boxes, "labels": labels, "masks": masks})
            return img, t["masks"], tv_masks_to_boxes(t["masks"])

        torch.manual_seed(0)
        rows = [
            (
                "item, no augmentation",
                timed(naive_item, args.reps),
                timed(lambda: plain[0], args.reps),
                "rle.decode per cell + stack",
            ),
            (
                "item, flips+rot90+scale+crop 512",
                timed(stock_item, args.reps),
                timed(lambda: aug[0], args.reps),
                "stock v2 pipeline",
            ),
            (
                "item, default AugmentConfig",
                timed(stock_default_item, args.reps),
                timed(lambda: default[0], args.reps),
                "v2 flips + whole-frame rot90 + jitter",
            ),
            ("item, default + copy-paste p=1", None, timed(lambda: paste[0], args.reps), ""),
        ]
    cpu = cpu_model()
    print(f"{n} instances per image, 704x520, 1 torch thread, median of {args.reps}; CPU: {cpu}")
    print(f"{'case':36s} {'baseline ms':>12s} {'ours ms':>9s} {'ratio':>7s}  baseline")
    for name, base, ours, what in rows:
        ratio = f"{base / ours:6.2f}x" if base else "      -"
        b = f"{base * 1000:12.1f}" if base else f"{'-':>12s}"
        print(f"{name:36s} {b} {ours * 1000:9.1f} {ratio}  {what}")


def _raw(ds, i):
    """The un-augmented sample of item i as tv_tensors (uint8 image), for the stock pipeline."""
    from torchvision import tv_tensors

    from cellseg.data.dataset import load_record

    image, masks, labels, boxes = load_record(ds.record(i))
    h, w = image.shape
    return (
        tv_tensors.Image(torch.from_numpy(image.copy())[None]),
        tv_tensors.Mask(torch.from_numpy(masks.view(np.uint8))),
        torch.from_numpy(labels),
        tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=(h, w)),
    )


if __name__ == "__main__":
    main()
