"""``cellseg export``: trained checkpoints -> a weights folder (model files + manifest.yaml)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"every weight must be a finite number > 0, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Copy the weights of trained checkpoints (best.pth / last.pth of `cellseg train`; resume state "
        "dropped, float16 by default) into a weights folder and write its manifest.yaml: sha256 of "
        "every file, the TTA views, and per-class thresholds (the defaults, or those of --thresholds-from). "
        "Several checkpoints (e.g. one per fold) become one ensemble. Tune the thresholds next with "
        "`cellseg predict-raw` + `cellseg tune`."
    )
    p.add_argument("checkpoints", nargs="+", type=Path, metavar="CKPT", help="checkpoint files of `cellseg train`")
    p.add_argument("--out", required=True, type=Path, help="weights folder to write, e.g. weights/r50")
    p.add_argument("--name", default=None, help="ensemble name in the manifest (default: the folder name)")
    p.add_argument(
        "--tta",
        default="identity,hflip",
        help="comma-separated views: identity, hflip, vflip, hvflip (default identity,hflip)",
    )
    p.add_argument(
        "--thresholds-from",
        type=Path,
        default=None,
        metavar="MANIFEST",
        help="keep the fusion, class thresholds and post-processing of this manifest",
    )
    p.add_argument(
        "--model-weights",
        type=_floats,
        default=None,
        metavar="W1,W2,...",
        help="ensemble weight per checkpoint (default 1 each)",
    )
    p.add_argument(
        "--input-scale",
        type=float,
        default=None,
        metavar="S",
        help="predict at this input scale instead of the one each model was trained at (models trained "
        "with model.input_scale > 0 only; e.g. 0.9 for a model trained at 0.75 on larger cells than the "
        "test images hold); written per model into the manifest",
    )
    p.add_argument(
        "--adapt-bn",
        type=Path,
        default=None,
        metavar="DIR",
        help="recompute the backbone's and FPN's BatchNorm statistics on the unlabelled PNG images of DIR "
        "(e.g. the competition's train_semi_supervised/): for a model trained on other images (cellseg synth, "
        "another microscope) that will predict images like these; no label is read and no weight is trained "
        "(docs/TRAINING.md). bn and frozen_bn models; runs on the CPU (the demo model: ~13 images a second on one core)",
    )
    p.add_argument(
        "--adapt-images",
        type=int,
        default=None,
        metavar="N",
        help="with --adapt-bn: use at most N of its images, evenly spaced over the sorted names (default 200)",
    )
    p.add_argument("--float32", action="store_true", help="keep float32 weights (default: float16, half the size)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier export in --out (built beside it and swapped in only when complete and checked)",
    )


def run(args: argparse.Namespace) -> int:
    # lazy imports: `cellseg <command> --help` imports this module and must stay instant (no torch)
    from cellseg.errors import CellsegError
    from cellseg.io import check_writable
    from cellseg.model.export import export_weights

    # before any checkpoint is read; export_weights checks every argument before it writes, and
    # builds the folder beside --out, so checkpoints or a template inside --out are read safely
    check_writable(args.out, "dir")
    if args.adapt_bn is None and args.adapt_images is not None:
        raise CellsegError("--adapt-images needs --adapt-bn DIR")
    tta = args.tta.split(",")
    res = export_weights(
        args.checkpoints,
        args.out,
        name=args.name,
        half=not args.float32,
        tta=tta,
        template=args.thresholds_from,
        weights=args.model_weights,
        force=args.force,
        input_scale=args.input_scale,
        adapt_bn=args.adapt_bn,
        adapt_images=200 if args.adapt_images is None else args.adapt_images,
    )
    for dest, src, size in res.files:
        print(f"{dest}  {size / 1e6:.1f} MB  <- {src}")
    print(f"wrote {res.manifest}")
    return 0
