"""``cellseg show-aug``: draw augmented training samples with their mask contours into one PNG grid,
so a person can see exactly what the model is fed (image after augmentation, one coloured outline
per instance, boxes optional)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="competition-layout folder (train.csv + train/)")
    parser.add_argument("-n", "--num", type=int, default=8, help="number of samples to draw (default 8)")
    parser.add_argument("--out", type=Path, default=Path("aug_grid.png"), help="output PNG (default aug_grid.png)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the image choice and the augmentation (default 0)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML with the augmentation: an experiment config (its 'augment' section is used) or a bare "
        "AugmentConfig mapping; default: AugmentConfig() defaults",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an augment field, e.g. --set copy_paste_p=1 --set crop_size=[256,256]",
    )
    parser.add_argument("--ids", nargs="*", default=None, help="draw these image ids (cycled) instead of random ones")
    parser.add_argument("--no-fill-holes", action="store_true", help="show train.csv masks as annotated (holes kept)")
    parser.add_argument("--boxes", action="store_true", help="also draw the target boxes")
    parser.add_argument("--cols", type=int, default=0, help="grid columns (default: about sqrt(n))")


def load_augment(path: Path | None, overrides: list[str]):
    """AugmentConfig from a YAML file (experiment config or bare section) plus ``KEY=VALUE`` overrides."""
    from cellseg.config import apply_overrides, from_dict, read_yaml
    from cellseg.errors import CellsegError
    from cellseg.model.experiment import AugmentConfig

    data = read_yaml(path) if path is not None else {}
    if "augment" in data or {"model", "train", "data"} & set(data):  # an experiment config
        data = data.get("augment") or {}
    if not isinstance(data, dict):
        raise CellsegError(f"{path}: 'augment' must be a mapping")
    data = apply_overrides(dict(data), overrides)
    try:
        return from_dict(AugmentConfig, data, "augment")
    except CellsegError as e:
        raise CellsegError(f"{path or '--set'}: {e}") from None


def outline(masks: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contour pixels (mask xor eroded mask) of a (N, H, W) stack, computed on each instance's box.

    Returns ``coords`` (K, 2) int (row, col) and ``owner`` (K,) int: the instance of each pixel.
    """
    from scipy import ndimage

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
    """(H, W, 3) uint8: the grey image with one coloured contour per instance (and boxes)."""
    import matplotlib

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


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from tqdm.auto import tqdm

    from cellseg import CELL_TYPES
    from cellseg.data.dataset import build_datasets
    from cellseg.errors import CellsegError
    from cellseg.io import atomic_path, check_writable
    from cellseg.model.experiment import DataConfig, ExperimentConfig

    check_writable(args.out, "file")
    if args.num < 1:
        raise CellsegError(f"-n must be >= 1, got {args.num}")
    augment = load_augment(args.config, args.overrides)
    cfg = ExperimentConfig(data=DataConfig(fill_holes=not args.no_fill_holes), augment=augment)
    ds, _ = build_datasets(cfg, args.data, fold=None)
    if len(ds) == 0:
        raise CellsegError(f"{args.data}: no training images")
    rng = np.random.default_rng(args.seed)
    if args.ids:
        by_id = {ds.record(i).image_id: i for i in range(len(ds))}
        missing = [i for i in args.ids if i not in by_id]
        if missing:
            raise CellsegError(f"image id {missing[0]!r} is not in {args.data}/train.csv")
        picks = [by_id[args.ids[j % len(args.ids)]] for j in range(args.num)]
    else:
        picks = rng.choice(len(ds), size=args.num, replace=args.num > len(ds)).tolist()
    torch.manual_seed(args.seed)
    cols = args.cols or math.ceil(math.sqrt(args.num))
    rows = math.ceil(args.num / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, idx in zip(axes.ravel(), tqdm(picks, desc="show-aug", unit="img", disable=None)):
        image, target = ds[idx]
        masks, boxes = target["masks"].numpy(), target["boxes"].numpy()
        ax.imshow(render(image.numpy(), masks, boxes, args.boxes), interpolation="nearest")
        labels = target["labels"].numpy()
        kinds = ", ".join(f"{CELL_TYPES[c - 1]} {int((labels == c).sum())}" for c in np.unique(labels)) or "no cells"
        ax.set_title(f"{target['image_id'][:12]}  {image.shape[2]}x{image.shape[1]}\n{kinds}", fontsize=8)
    fig.suptitle(f"{args.data.name}: {args.num} augmented samples (seed {args.seed})", fontsize=10)
    fig.tight_layout()
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    print(f"wrote {args.out} ({args.num} samples, {rows}x{cols} grid)")
    return 0
