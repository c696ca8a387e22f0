"""Pseudo-labels for the unlabeled images (``train_semi_supervised/``).

The ensemble runs on each unlabeled image through the per-image pipeline
(:meth:`cellseg.inference.ensemble.Ensemble.predict`) with the cell type read from the file name (the vote when
the name does not say), and only confident instances are kept: the manifest's per-class thresholds
made stricter (score + ``score_margin``, minimum pixels x ``min_pixels_factor``). The result is a
train.csv-format file (the 9 columns, the unknown ones empty, plus ``source``) that training takes
next to train.csv.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cellseg.config.manifest import ClassThresholds, Manifest, load_manifest
from cellseg.data.rle import encode_crop
from cellseg.data.truth import TRAIN_COLUMNS, cell_type_from_filename
from cellseg.errors import CellsegError
from cellseg.inference.device import resolve_device
from cellseg.inference.ensemble import Ensemble
from cellseg.io import atomic_path, list_pngs, read_gray


def stricter(th: ClassThresholds, score_margin: float, min_pixels_factor: float) -> ClassThresholds:
    """The thresholds used for pseudo-labels: a higher score bar and a larger minimum size."""
    return dataclasses.replace(
        th, score=float(min(0.99, th.score + score_margin)), min_pixels=int(round(th.min_pixels * min_pixels_factor))
    )


def sample_id_from_filename(name: str) -> str:
    """Drop the frame suffix: ``..._Ph_3_0001.png`` or ``..._Ph_3_00d04h00m.png`` -> ``..._Ph_3``."""
    return re.sub(r"_(\d+|\d+d\d+h\d+m)$", "", Path(name).stem)


@dataclass
class PseudoResult:
    path: Path
    table: pd.DataFrame  # per cell type: images, instances, per_image, mean_score
    rows: int


def pseudo_label(
    data_dir: str | Path,
    manifest_path: str | Path,
    out_csv: str | Path,
    images: int | None = None,
    score_margin: float = 0.1,
    min_pixels_factor: float = 1.5,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> PseudoResult:
    """Pseudo-label ``data_dir/train_semi_supervised/*.png`` into ``out_csv`` (written atomically)."""
    folder = Path(data_dir) / "train_semi_supervised"
    files = list(list_pngs(folder).values())
    if not files:
        raise CellsegError(f"{folder}: no unlabeled PNG images found")
    if images is not None:
        pick = np.sort(np.random.default_rng(seed).permutation(len(files))[:images])
        files = [files[i] for i in pick]
    manifest: Manifest = load_manifest(manifest_path, verify=True)
    ensemble = Ensemble.load(manifest, resolve_device(device))
    rows, stats, unreadable = [], [], []
    for f in tqdm(files, desc="pseudo-label", unit="img", disable=None if progress else True):
        try:
            image = read_gray(f)
        except CellsegError as e:  # one bad file must not end a run of thousands: skip it, say so
            tqdm.write(f"warning: skipping {e}", file=sys.stderr)
            unreadable.append(f.name)
            continue
        h, w = image.shape
        res = ensemble.predict(
            image, cell_type_from_filename(f.name), strictness=lambda th: stricter(th, score_margin, min_pixels_factor)
        )
        crops, scores, cell_type = res.crops, res.scores, res.cell_type
        stats.append((cell_type, len(crops), float(scores.mean()) if len(scores) else np.nan))
        for c in crops:
            rows.append(
                {
                    "id": f.stem,
                    "annotation": encode_crop(c, h, w),
                    "width": w,
                    "height": h,
                    "cell_type": cell_type,
                    "plate_time": "",
                    "sample_date": "",
                    "sample_id": sample_id_from_filename(f.name),
                    "elapsed_timedelta": "",
                    "source": f"pseudo:{manifest.name or Path(manifest_path).parent.name}",
                }
            )
    if unreadable and len(unreadable) == len(files):
        raise CellsegError(f"{folder}: every one of the {len(files)} image(s) is unreadable (first: {unreadable[0]})")
    df = pd.DataFrame(rows, columns=[*TRAIN_COLUMNS, "source"])
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    st = pd.DataFrame(stats, columns=["cell_type", "instances", "mean_score"])
    table = st.groupby("cell_type").agg(
        images=("instances", "size"),
        instances=("instances", "sum"),
        per_image=("instances", "mean"),
        mean_score=("mean_score", "mean"),
    )
    return PseudoResult(Path(out_csv), table, len(df))
