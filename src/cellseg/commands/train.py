"""``cellseg train``: train a Mask R-CNN from a YAML config, single process or under torchrun (DDP)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from cellseg.errors import CellsegError

EPILOG = """\
examples:
  cellseg train --config configs/demo.yaml --data /tmp/synth --fold 0
  cellseg train --config configs/maskrcnn_r50_fpn.yaml --data DATA --init coco_maskrcnn_r50.pth train.lr=0.01
  cellseg train --config configs/demo.yaml --data DATA --out runs/demo --resume      # after a kill
  cellseg train --data DATA --out runs/demo --resume train.epochs=30   # the run's own config.yaml, trained longer
  cellseg train --config configs/demo.yaml --data DATA --init runs/demo/fold0/best.pth \
      --pseudo runs/pseudo.csv --pseudo-ratio 0.5 --out runs/demo_pseudo/fold0   # a new run from the first one
  torchrun --nproc_per_node 4 -m cellseg train --config configs/maskrcnn_r50_fpn_v2.yaml --data DATA

The run folder gets last.pth (every epoch, resumable), best.pth (best hold-out score),
metrics.csv, curves.png and config.yaml; it is made with the first checkpoint. A folder that
already holds a run is never overwritten: pass --resume to continue it or --force to replace it.
Ctrl-C exits with 130 and keeps the last completed epoch: --resume continues from it. See
docs/TRAINING.md.
"""

#: what a run folder holds; any of them present means the folder holds a run
RUN_FILES = ("last.pth", "best.pth", "metrics.csv", "curves.png", "config.yaml")


def check_run_folder(out: Path, resume: bool, force: bool, main_rank: bool) -> None:
    """Refuse to train into a folder that already holds a run, unless ``resume`` (continue it) or
    ``force`` (then the main rank deletes the run's files first, so nothing of the old run mixes
    with the new one).

    Raises:
        CellsegError: one line naming the folder and the files found.
    """
    found = [n for n in RUN_FILES if (out / n).exists()]
    if not found or resume:
        return
    if not force:
        raise CellsegError(
            f"{out} already holds a training run ({', '.join(found)}): pass --resume to continue it, "
            "--force to replace it, or choose another --out"
        )
    if main_rank:
        for name in found:
            (out / name).unlink()


def config_source(config: Path | None, out: Path | None, resume: bool) -> tuple[Path, bool]:
    """The experiment YAML to load and whether it is the run's own ``out/config.yaml``.

    ``--config`` may be left out only to ``--resume`` a run: its folder's config.yaml, as written with
    the run's first checkpoint, is then read. A resume may also name that file itself. It is read
    before anything is written; the run's next checkpoint rewrites it atomically, with this call's
    overrides, as every run's config.yaml records the run as configured.

    Raises:
        CellsegError: no ``--config`` and no run to continue (one line naming what to pass).
    """
    own = out / "config.yaml" if out is not None else None
    if config is None:
        if not resume:
            raise CellsegError(
                "--config is required (only --resume may leave it out, to read the run's own config.yaml)"
            )
        if own is None:
            raise CellsegError("--resume without --config needs --out: the run folder whose config.yaml it continues")
        if not own.is_file():
            raise CellsegError(f"{own}: not found, so there is no run to continue there; pass --config")
        return own, True
    is_own = resume and own is not None and own.is_file() and config.is_file() and os.path.samefile(config, own)
    return config, is_own


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="experiment YAML (configs/*.yaml); with --resume it may be left out: the run's own OUT/config.yaml",
    )
    parser.add_argument("--data", required=True, type=Path, help="competition-layout folder (train.csv, train/)")
    parser.add_argument(
        "--fold",
        default="0",
        help="hold-out fold for validation, 0..data.folds-1 (default 0); 'all' trains on every image without validation",
    )
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="starting weights: torchvision COCO Mask R-CNN state dict, ImageNet ResNet state dict, or a cellseg checkpoint",
    )
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/<config name>/fold<K>)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/last.pth")
    again.add_argument(
        "--force", action="store_true", help="delete the run already in OUT (checkpoints, metrics) and start afresh"
    )
    parser.add_argument(
        "--pseudo",
        type=Path,
        action="append",
        default=None,
        metavar="CSV",
        help="pseudo-labels (train.csv format, `cellseg pseudo-label`) trained on next to train.csv; repeatable "
        "(adds to data.extra_csv)",
    )
    parser.add_argument(
        "--pseudo-ratio",
        type=float,
        default=None,
        metavar="R",
        help="pseudo-labelled images drawn per epoch, as a fraction of the train images (data.extra_ratio; "
        "default: every pseudo-labelled image once per epoch)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=3 model.input_scale=1.5"
    )


def run(args: argparse.Namespace) -> int:
    # lazy imports: `cellseg <command> --help` imports this module and must stay instant (no torch)
    from cellseg.commands.common import command_inputs
    from cellseg.config.experiment import load_experiment
    from cellseg.io import check_writable
    from cellseg.training.loop import check_train_config, train

    fold = None
    if str(args.fold).lower() != "all":
        try:
            fold = int(args.fold)
        except ValueError:
            raise CellsegError(f"--fold must be an integer or 'all', got {args.fold!r}") from None
    config, own_config = config_source(args.config, args.out, args.resume)
    cfg = load_experiment(config, args.overrides)
    check_train_config(cfg.train)  # before any folder: a run that cannot train leaves nothing behind
    for csv in args.pseudo or []:
        if not csv.is_file():
            raise CellsegError(f"--pseudo {csv}: file not found")
        cfg.data.extra_csv.append(str(csv))
    if args.pseudo_ratio is not None:
        if not (0 < args.pseudo_ratio < math.inf):  # NaN fails both comparisons
            raise CellsegError(f"--pseudo-ratio must be a finite number > 0, got {args.pseudo_ratio}")
        cfg.data.extra_ratio = args.pseudo_ratio
    if args.init and not args.resume and not args.init.is_file():
        raise CellsegError(f"--init {args.init}: checkpoint not found")
    name = None if own_config else config.stem  # the run's own config.yaml: its checkpoint keeps the name
    out = args.out or Path("runs") / config.stem / ("all" if fold is None else f"fold{fold}")
    # fail now, not after the first epoch; never into a folder the run reads (checked before --force
    # clears the old run's files, so an --init inside --out is refused, not deleted)
    init = None if args.resume else args.init  # a resume continues last.pth in the folder itself
    read = None if own_config else config  # the run's own config.yaml: read now, rewritten whole at the next checkpoint
    check_writable(out, "dir", inputs=command_inputs(args.data, None, read, init, *(args.pseudo or [])))
    check_run_folder(out, args.resume, args.force, main_rank=os.environ.get("RANK", "0") == "0")
    result = train(
        cfg,
        args.data,
        fold=fold,
        init=args.init,
        out=out,
        resume=args.resume,
        progress=not args.quiet,
        config_name=name,
    )
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return 0
    if result.best_score is not None:
        print(f"best hold-out score {result.best_score:.4f} (epoch {result.best_epoch}); checkpoints in {out}")
    else:
        print(f"trained {result.epochs_done} epoch(s); checkpoints in {out}")
    return 0
