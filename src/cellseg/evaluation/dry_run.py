"""Dry run: the kernel's exact predict path on labelled train images, scored with the competition metric.

The chosen train images (a fold's hold-out or a seeded sample) are linked into a temporary
competition-layout folder (``test/`` + ``sample_submission.csv``) and predicted by
:func:`cellseg.inference.runner.predict_folder`, exactly as on Kaggle; the written submission.csv is then
decoded and scored. The report folder receives::

    submission.csv        what the kernel wrote
    per_image.csv         id, cell_type, voted_type, score, n_true, n_pred, seconds (worst first)
    overlays/NN_<id>.png  image with truth (green) and prediction (magenta) contours, unmatched cells
                          hatched, and a legend saying so (cellseg.plot.save_overlay), worst first
    score_by_class.png    bar chart of the score per cell type
    per_threshold.csv     iou, tp, fp, fn, score at each IoU threshold 0.50-0.95 (where the score is lost)
    summary.json          provenance (the ensemble's training data in one line), score, per_class, images,
                          per_threshold, device, seconds per image, projected runtime
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellseg import plot
from cellseg.config.manifest import Manifest, load_manifest
from cellseg.data.folds import select_ids
from cellseg.data.masks import CropMask, label_image
from cellseg.data.submission import decode_submission
from cellseg.data.truth import ImageAnnotation, read_train_csv
from cellseg.errors import CellsegError
from cellseg.evaluation.metric import ScoreReport, score_images
from cellseg.inference.runner import RunResult, predict_folder
from cellseg.io import read_gray
from cellseg.model.provenance import summarize
from cellseg.paths import CompetitionPaths

#: hidden test size the runtime is projected to
HIDDEN_TEST_IMAGES = 240


@dataclass
class DryRunResult:
    score: float
    per_class: dict[str, float]
    per_image: pd.DataFrame
    table: str
    projected_s: float
    report_dir: Path
    summary: dict


def stage_test_folder(paths: CompetitionPaths, ids: Sequence[str], out: Path) -> Path:
    """A competition-layout folder at ``out`` whose test/ links the train PNGs of ``ids``."""
    test = out / "test"
    test.mkdir(parents=True)
    for i in ids:
        src = paths.image("train", i)
        if not src.is_file():
            raise CellsegError(f"{src}: train image not found")
        try:
            os.symlink(src.resolve(), test / src.name)
        except OSError:
            shutil.copy2(src, test / src.name)
    (out / "sample_submission.csv").write_text("id,predicted\n" + "".join(f"{i},\n" for i in ids))
    return out


def dry_run(
    data_dir: str | Path,
    manifest: str | Path,
    report_dir: str | Path,
    fold: int | None = None,
    images: int | None = None,
    seed: int = 0,
    folds: int = 5,
    device: str = "auto",
    time_budget: str | float | None = None,
    overlays: int = 12,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    folds_csv: str | Path | None = None,
) -> DryRunResult:
    """Run the kernel path on train images and write the report folder (see the module docstring).

    The images are :func:`cellseg.data.folds.select_ids`' choice (``fold`` of ``folds_csv``'s folds or of
    ``folds`` sample-grouped folds made with ``seed``, or ``images`` sampled with ``seed``), the same as
    ``cellseg predict-raw`` picks.
    """
    paths = CompetitionPaths(Path(data_dir)).require("train_csv", "train_dir")
    train = read_train_csv(paths.train_csv)
    ids = select_ids(train, fold, folds, seed, images, folds_csv)
    if not ids:
        raise CellsegError("no train image selected")
    report = Path(report_dir)
    report.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cellseg-dryrun-") as tmp:
        comp = stage_test_folder(paths, ids, Path(tmp) / "comp")
        run = predict_folder(
            comp, manifest, report / "submission.csv", time_budget, device, progress, log, kind="train"
        )
    skipped = set(run.skipped)
    if len(skipped) == len(ids):
        raise CellsegError(f"the time budget ({time_budget}) left no time to predict any image")
    truth = {i: train.images[i] for i in ids if i not in skipped}  # images never predicted are not scored
    preds = decode_submission(
        report / "submission.csv", {i: (train.images[i].height, train.images[i].width) for i in ids}
    )
    preds = {i: p for i, p in preds.items() if i in truth}
    scores = score_images(truth, preds)
    per_image = per_image_table(scores, run)
    per_image.to_csv(report / "per_image.csv", index=False, float_format="%.5f")
    scores.per_threshold.to_csv(report / "per_threshold.csv", index=False, float_format="%.5f")
    write_overlays(report / "overlays", paths, per_image.head(overlays), truth, preds)
    plot.score_by_class(
        scores.per_class, per_image["cell_type"].value_counts().to_dict(), report / "score_by_class.png"
    )
    summary = run_summary(load_manifest(manifest, verify=False), scores, run, per_image)
    (report / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = f"{scores.table()}\nensemble: {summary['provenance']}"
    projected = summary[f"projected_seconds_{HIDDEN_TEST_IMAGES}_images"]
    return DryRunResult(scores.score, scores.per_class, per_image, table, projected, report, summary)


def per_image_table(scores: ScoreReport, run: RunResult) -> pd.DataFrame:
    """The metric's per-image rows plus the voted type and seconds of each, worst score first."""
    per_image = scores.per_image.copy()
    per_image["voted_type"] = per_image["id"].map(run.cell_types).fillna("")
    per_image["seconds"] = per_image["id"].map(run.seconds)
    return per_image.sort_values(["score", "id"]).reset_index(drop=True)


def write_overlays(
    folder: Path,
    paths: CompetitionPaths,
    rows: pd.DataFrame,
    truth: dict[str, ImageAnnotation],
    preds: dict[str, list[CropMask]],
) -> None:
    """One overlay PNG per row of ``rows`` (per-image table rows, in rank order) into a fresh ``folder``."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    for rank, row in enumerate(rows.itertuples()):
        ann = truth[row.id]
        img = read_gray(paths.image("train", row.id))
        gt, _ = label_image(ann.instances, ann.height, ann.width)
        pr, _ = label_image(preds.get(row.id, []), ann.height, ann.width)
        title = f"{row.id}  {row.cell_type}  score {row.score:.3f}"
        plot.save_overlay(folder / f"{rank:02d}_{row.id}_{row.score:.3f}.png", img, gt, pr, title)


def run_summary(manifest: Manifest, scores: ScoreReport, run: RunResult, per_image: pd.DataFrame) -> dict:
    """summary.json's content (see the module docstring)."""
    per_img_s = float(np.mean(list(run.seconds.values()))) if run.seconds else float("nan")
    return {
        "provenance": summarize(manifest),  # what the ensemble was trained on
        "score": scores.score,
        "per_class": scores.per_class,
        "images": len(per_image),
        "per_threshold": scores.per_threshold_records(),
        "device": run.device,
        "views": run.views,
        "models": run.models,
        "seconds_per_image": per_img_s,
        "forward_seconds_per_image": run.forward_s / max(len(run.seconds), 1),
        "load_seconds": run.load_s,
        f"projected_seconds_{HIDDEN_TEST_IMAGES}_images": run.load_s + HIDDEN_TEST_IMAGES * per_img_s,
        "failed": run.failed,
        "skipped_for_time": sorted(run.skipped),
        "time_budget_decisions": run.decisions,
        "vote_accuracy": float((per_image["voted_type"] == per_image["cell_type"]).mean()),
    }
