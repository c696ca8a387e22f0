"""K folds grouped by ``sample_id`` (images of one sample never straddle folds) and stratified by
cell type, via scikit-learn's ``StratifiedGroupKFold``; deterministic for a seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from cellseg.errors import CellsegError

FOLD_COLUMNS = ("id", "sample_id", "cell_type", "fold")


def make_folds(train_set, k: int = 5, seed: int = 0) -> pd.DataFrame:
    """Assign each image of a :class:`cellseg.data.truth.TrainSet` to one of ``k`` folds.

    Returns a DataFrame with columns id, sample_id, cell_type, fold (0..k-1), in train.csv order.
    """
    rows = [(a.id, a.meta.get("sample_id") or a.id, a.cell_type) for a in train_set.images.values()]
    df = pd.DataFrame(rows, columns=["id", "sample_id", "cell_type"])
    groups = df["sample_id"].nunique()
    if k < 2:
        raise CellsegError(f"need at least 2 folds, got {k}")
    if groups < k:
        raise CellsegError(f"cannot make {k} folds from {groups} sample_id group(s)")
    df["fold"] = -1
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    try:
        for fold, (_, hold) in enumerate(splitter.split(df, df["cell_type"], groups=df["sample_id"])):
            df.loc[df.index[hold], "fold"] = fold
    except ValueError as e:  # sklearn's own message says what is too small
        raise CellsegError(f"cannot make {k} folds: {e}") from None
    return df


def read_folds(path: str | Path) -> pd.DataFrame:
    """Read a folds CSV written by :func:`make_folds` (``cellseg folds``)."""
    path = Path(path)
    if not path.is_file():
        raise CellsegError(f"{path}: folds file not found")
    df = pd.read_csv(path, dtype={"id": str, "sample_id": str, "cell_type": str, "fold": int})
    missing = [c for c in FOLD_COLUMNS if c not in df.columns]
    if missing:
        raise CellsegError(f"{path}:1: missing column(s) {', '.join(missing)}")
    return df


def load_folds(train_set, k: int = 5, seed: int = 0, csv: str | Path | None = None) -> pd.DataFrame:
    """The folds of ``train_set``: read from ``csv`` (a file of :func:`make_folds` / ``cellseg folds``)
    when given, else made with ``k`` and ``seed``. Same columns as :func:`make_folds`.

    Raises:
        CellsegError: the CSV's ids are not exactly the train images (it was made for other data).
    """
    if not csv:
        return make_folds(train_set, k=k, seed=seed)
    df = read_folds(csv)
    ids, listed = set(train_set.images), set(df["id"])
    if ids != listed:
        missing, unknown = sorted(ids - listed), sorted(listed - ids)
        raise CellsegError(
            f"{csv}: made for other data ({len(missing)} train image(s) in no fold, e.g. "
            f"{(missing or ['-'])[0]}; {len(unknown)} id(s) not in train.csv, e.g. {(unknown or ['-'])[0]}); "
            "run `cellseg folds` on this data"
        )
    return df


def split(folds: pd.DataFrame, fold: int) -> tuple[list[str], list[str]]:
    """(train ids, hold-out ids) for ``fold``."""
    k = int(folds["fold"].max()) + 1
    if not 0 <= fold < k:
        raise CellsegError(f"fold {fold} out of range 0..{k - 1}")
    hold = folds["fold"] == fold
    return folds.loc[~hold, "id"].tolist(), folds.loc[hold, "id"].tolist()


def select_ids(
    train_set,
    fold: int | None = None,
    k: int = 5,
    seed: int = 0,
    images: int | None = None,
    folds_csv: str | Path | None = None,
) -> list[str]:
    """Train image ids for a hold-out run: fold ``fold``'s hold-out (folds from ``folds_csv`` when
    given, else made with ``k`` and ``seed``), or a seeded random sample of ``images`` ids
    (stratified order kept), or every image when neither is given."""
    ids = list(train_set.images)
    if fold is not None and images is not None:
        raise CellsegError("give either a fold or a number of images, not both")
    if fold is not None:
        return split(load_folds(train_set, k=k, seed=seed, csv=folds_csv), fold)[1]
    if images is not None:
        if images < 1:
            raise CellsegError(f"--images must be >= 1, got {images}")
        rng = np.random.default_rng(seed)
        pick = set(rng.permutation(len(ids))[: min(images, len(ids))].tolist())
        return [i for n, i in enumerate(ids) if n in pick]
    return ids
