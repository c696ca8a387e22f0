"""``cellseg show-aug``: draw augmented training samples with their mask contours into one PNG grid,
so a person can see exactly what the model is fed (image after augmentation, one coloured outline
per instance, boxes optional)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

#: The README's training config (``cellseg train --config configs/maskrcnn_r50_fpn.yaml``): drawn by default.
DEFAULT_CONFIG = "maskrcnn_r50_fpn.yaml"


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
        "AugmentConfig mapping; default: the README's training config, configs/maskrcnn_r50_fpn.yaml "
        "(AugmentConfig() defaults where cellseg runs from a wheel, without configs/)",
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
    # lazy imports: `cellseg <command> --help` imports this module and must stay instant (no torch)
    from cellseg.config.experiment import AugmentConfig
    from cellseg.config.loader import apply_overrides, from_dict, read_yaml
    from cellseg.errors import CellsegError

    data = read_yaml(path) if path is not None else {}
    if "augment" not in data and {"models", "tta", "classes", "fusion"} & set(data):
        raise CellsegError(
            f"{path}: is an ensemble manifest (it lists models and thresholds), not an experiment config; "
            "give the training config (configs/*.yaml) or a bare augment mapping"
        )
    if "augment" in data or {"model", "train", "data"} & set(data):  # an experiment config
        data = data.get("augment") or {}
    if not isinstance(data, dict):
        raise CellsegError(f"{path}: 'augment' must be a mapping")
    data = apply_overrides(dict(data), overrides)
    try:
        return from_dict(AugmentConfig, data, "augment")
    except CellsegError as e:
        raise CellsegError(f"{path or '--set'}: {e}") from None


def default_config() -> tuple[Path | None, str]:
    """The config show-aug draws without ``--config``: what ``cellseg train`` would train on in the README.

    Returns ``(path, description)``: ``configs/maskrcnn_r50_fpn.yaml`` of the checkout, or ``(None,
    "AugmentConfig() defaults ...")`` when cellseg runs from a wheel (no configs/ folder).
    """
    from cellseg.errors import CellsegError
    from cellseg.paths import configs_dir

    try:
        path = configs_dir() / DEFAULT_CONFIG
    except CellsegError:
        return None, "AugmentConfig() defaults (installed wheel: no configs/ folder)"
    return path, f"configs/{DEFAULT_CONFIG} (the README's training config; --config to draw another)"


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from cellseg import CELL_TYPES, plot
    from cellseg.commands.common import command_inputs
    from cellseg.config.experiment import DataConfig, ExperimentConfig
    from cellseg.data.dataset import build_datasets
    from cellseg.errors import CellsegError
    from cellseg.io import check_writable

    check_writable(args.out, "file", inputs=[*command_inputs(args.data), args.config])
    if args.num < 1:
        raise CellsegError(f"-n must be >= 1, got {args.num}")
    config, source = (args.config, str(args.config)) if args.config is not None else default_config()
    print(f"augmentation: {source}" + (f" + {len(args.overrides)} --set override(s)" if args.overrides else ""))
    augment = load_augment(config, args.overrides)
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
    panels = []
    for idx in tqdm(picks, desc="show-aug", unit="img", disable=None):
        image, target = ds[idx]
        masks, boxes = target["masks"].numpy(), target["boxes"].numpy()
        labels = target["labels"].numpy()
        kinds = ", ".join(f"{CELL_TYPES[c - 1]} {int((labels == c).sum())}" for c in np.unique(labels)) or "no cells"
        caption = f"{target['image_id'][:12]}  {image.shape[2]}x{image.shape[1]}\n{kinds}"
        panels.append(plot.AugPanel(plot.render(image.numpy(), masks, boxes, args.boxes), caption))
    title = f"{args.data.name}: {args.num} augmented samples (seed {args.seed})\naugmentation: {source}"
    _, rows, cols = plot.aug_grid(panels, args.out, title, args.cols)
    print(f"wrote {args.out} ({args.num} samples, {rows}x{cols} grid)")
    return 0
