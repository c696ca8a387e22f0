"""``cellseg folds``: write a K-fold CSV for a competition folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from cellseg.commands.common import command_inputs
from cellseg.data.folds import make_folds
from cellseg.data.truth import read_train_csv
from cellseg.io import atomic_write_text, check_writable
from cellseg.paths import CompetitionPaths

DESCRIPTION = """\
Assign every train image to one of K folds, grouped by sample_id (images of one sample never straddle
folds) and stratified by cell type, and write them as a CSV (id, sample_id, cell_type, fold). The
commands that hold a fold out read it, so training, caching and the dry run agree on one hold-out:
  cellseg train ... --fold 0 data.folds_csv=CSV
  cellseg predict-raw ... --fold 0 --folds-csv CSV
  cellseg dry-run ... --fold 0 --folds-csv CSV
Without the CSV they make the same folds from data.folds / data.fold_seed (train) or -k / --seed."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--data", required=True, type=Path, help="competition-layout folder holding train.csv")
    p.add_argument("-k", "--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--out", type=Path, help="output CSV (default DATA/folds_k{K}_s{SEED}.csv)")


def run(args: argparse.Namespace) -> int:
    comp = CompetitionPaths(args.data).require("train_csv")
    out = args.out or args.data / f"folds_k{args.folds}_s{args.seed}.csv"
    check_writable(out, "file", inputs=command_inputs(args.data))  # never over the train.csv it reads
    folds = make_folds(read_train_csv(comp.train_csv), k=args.folds, seed=args.seed)
    atomic_write_text(out, folds.to_csv(index=False))
    table = folds.groupby(["fold", "cell_type"]).size().unstack(fill_value=0)
    print(table.to_string())
    print(f"wrote {out} ({len(folds)} images, {folds['sample_id'].nunique()} samples, {args.folds} folds)")
    print(
        f"hold a fold out with: cellseg train ... --fold K data.folds_csv={out}  (predict-raw / dry-run: --folds-csv)"
    )
    return 0
