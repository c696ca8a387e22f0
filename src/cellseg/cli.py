"""The ``cellseg`` command line: one subcommand per job.

Each subcommand lives in ``cellseg/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; only the chosen one is imported, so ``cellseg --help`` is instant and does not
import torch. Expected failures (:class:`~cellseg.errors.CellsegError`) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from cellseg import __version__
from cellseg.errors import CellsegError

#: name -> (module under cellseg.commands, one-line help). Order is the order shown by --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "the main job on the embedded default: synthetic data -> submission -> score"),
    "synth": ("synth", "write a synthetic dataset in the competition's folder layout"),
    "import-labels": ("import_labels", "convert instance-label images to the competition layout"),
    "folds": ("folds", "K folds grouped by sample_id, stratified by cell type -> CSV"),
    "score": ("score", "score a submission against train.csv with the exact competition metric"),
    "validate": ("validate", "check a submission.csv the way the Kaggle scorer would"),
    "train": ("train", "train a Mask R-CNN from a YAML config (single process or torchrun DDP)"),
    "show-aug": ("show_aug", "draw augmented training samples with mask contours to a PNG grid"),
    "predict": ("predict", "run an ensemble on a competition folder's test/ and write submission.csv"),
    "dry-run": ("dry_run", "run the kernel's exact path on train images and score it"),
    "predict-raw": ("predict_raw", "cache pre-fusion predictions (every model x TTA view) for threshold tuning"),
    "tune": ("tune", "tune per-class post-processing thresholds on cached predictions"),
    "pseudo-label": ("pseudo_label", "pseudo-label the unlabeled images into a train.csv-format file"),
    "export": ("export", "turn trained checkpoints into a weights folder with its manifest"),
    "bundle": ("bundle", "stage the Kaggle dataset bundle: wheel, weights, manifest, metadata"),
    "convert-detectron2": ("convert_detectron2", "convert a Detectron2 Mask R-CNN checkpoint into ours"),
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(f"cellseg.commands.{module}") is not None


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellseg",
        description="Train, check and submit Mask R-CNN models for Kaggle's Sartorius cell segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"cellseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (module, help_) in COMMANDS.items():
        if not _available(module):
            continue
        p = sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
        if name == chosen:
            mod = importlib.import_module(f"cellseg.commands.{module}")
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # KEY=VALUE config overrides may sit anywhere on the line (argparse only takes one block of
        # positionals): `cellseg train --config X train.lr=0.01 --out R train.epochs=2`.
        if isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra
        ):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except CellsegError as e:
        print(f"cellseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cellseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
