"""``cellseg convert-detectron2``: a Detectron2 Mask R-CNN checkpoint -> our checkpoint + manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from cellseg import CELL_TYPES
from cellseg.errors import CellsegError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Convert a Detectron2 Mask R-CNN R-50/101-FPN checkpoint (model_final.pth: {'model': state_dict} "
        "or a bare state dict) and its fully merged config (the config.yaml a training run writes, "
        "cfg.dump()) into weights/NAME/model.pth + manifest.yaml, usable by `cellseg predict`, the "
        "kernel and ensembles like our own models. Detectron2 is not needed. Unsupported settings "
        "(other meta-architectures, deformable convs, cascade heads, backbone norms other than "
        "FrozenBN, ...) are refused with the key and value."
    )
    p.add_argument("weights", type=Path, help="Detectron2 checkpoint (.pth)")
    p.add_argument("--config", required=True, type=Path, help="the run's fully merged config.yaml")
    p.add_argument("--out", required=True, type=Path, help="output folder, e.g. weights/d2_r50/")
    p.add_argument(
        "--classes",
        default=",".join(CELL_TYPES),
        help="comma-separated names of Detectron2 classes 0, 1, ... (default: %(default)s)",
    )
    p.add_argument("--name", help="manifest name (default: the output folder's name)")
    p.add_argument("--half", action="store_true", help="store the weights as float16 (half the size)")
    p.add_argument("--force", action="store_true", help="write into an --out folder that already holds files")


def run(args: argparse.Namespace) -> int:
    # lazy imports: `cellseg <command> --help` imports this module and must stay instant (no torch)
    from cellseg.detectron2.convert import convert_checkpoint
    from cellseg.io import check_fresh_dir, check_writable, write_errors

    check_writable(args.out, "dir", inputs=[args.weights, args.config])
    check_fresh_dir(args.out, args.force)  # an earlier conversion is replaced only with --force
    names = [c.strip() for c in args.classes.split(",") if c.strip()]
    if not names:
        raise CellsegError("--classes is empty")
    if len(set(names)) != len(names):
        raise CellsegError(f"--classes names a class twice: {args.classes}")
    with write_errors(args.out):
        manifest = convert_checkpoint(args.weights, args.config, args.out, names, name=args.name, half=args.half)
    print(f"wrote {Path(args.out) / 'model.pth'} and {manifest}")
    return 0
