"""K folds grouped by ``sample_id`` (images of one sample never straddle folds) and stratified by
cell type, via scikit-learn's ``StratifiedGroupKFold``; deterministic for a seed.

Every split of the train images goes through here:

* :func:`group_folds`: the fold assignment itself (also used by ``cellseg tune`` for its out-of-fold check);
* :func:`make_folds` / :func:`read_folds` / :func:`load_folds`: a train set's folds (``cellseg folds``
  writes them);
* :func:`holdout_split`: training's (train ids, hold-out ids) for a fold;
* :func:`select_ids`: the images ``cellseg dry-run`` and ``cellseg predict-raw`` run on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cellseg.errors import CellsegError

FOLD_COLUMNS = ("id", "sample_id", "cell_type", "fold")


def group_folds(groups: Sequence[str], k: int, seed: int = 0, strata: Sequence[str] | None = None) -> np.ndarray:
    """Fold index per item: items of one group never straddle folds, strata spread evenly.

    Args:
        groups: (N,) group of each item (e.g. its sample_id).
        k: folds wanted; fewer are made when there are fewer groups (one group: every item in fold 0).
        seed: shuffling seed of ``StratifiedGroupKFold`` (deterministic for a seed).
        strata: (N,) class of each item to stratify by (e.g. its cell type); None = one stratum.

    Returns:
        (N,) int64 fold of each item, 0..min(k, number of groups)-1.
    """
    # scikit-learn only here: importing sklearn.model_selection takes ~0.5 s, and most commands make no folds
    from sklearn.model_selection import StratifiedGroupKFold

    groups = list(groups)
    k = max(1, min(k, len(set(groups))))
    fold = np.zeros(len(groups), dtype=np.int64)
    if k < 2:
        return fold
    y = list(strata) if strata is not None else [0] * len(groups)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    try:
        for f, (_, hold) in enumerate(splitter.split(np.zeros(len(groups)), y, groups=groups)):
            fold[hold] = f
    except ValueError as e:  # sklearn's own message says what is too small
        raise CellsegError(f"cannot make {k} folds: {e}") from None
    return fold


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
    df["fold"] = group_folds(df["sample_id"].tolist(), k, seed, strata=df["cell_type"].tolist())
    return df


def read_folds(path: str | Path) -> pd.DataFrame:
    """Read a folds CSV written by :func:`make_folds` (``cellseg folds``).

    Raises CellsegError naming the file (and the line) for a missing, binary or empty file, a missing
    column, or a ``fold`` that is not an integer >= 0."""
    path = Path(path)
    if not path.is_file():
        raise CellsegError(f"{path}: folds file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (ValueError, pd.errors.ParserError) as e:  # EmptyDataError, UnicodeDecodeError are ValueErrors
        first = str(e).splitlines()[0] if str(e) else ""
        raise CellsegError(f"{path}: not a readable folds CSV ({type(e).__name__}: {first})") from None
    missing = [c for c in FOLD_COLUMNS if c not in df.columns]
    if missing:
        raise CellsegError(f"{path}:1: missing column(s) {', '.join(missing)}")
    ok = df["fold"].str.strip().str.fullmatch(r"[0-9]+")
    if not ok.all():
        i = int(np.flatnonzero(~ok.to_numpy())[0])
        raise CellsegError(f"{path}:{i + 2}: fold must be an integer >= 0, got {df['fold'].iat[i]!r}")
    df["fold"] = df["fold"].astype(np.int64)
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


def holdout_split(
    train_set, fold: int | None, k: int = 5, seed: int = 0, folds_csv: str | Path | None = None
) -> tuple[list[str], list[str]]:
    """(train ids, hold-out ids) of a training run: fold ``fold`` of :func:`load_folds` (``folds_csv``
    when given, else made with ``k`` and ``seed``); ``fold`` None = every image trains, no hold-out.

    Raises CellsegError for a fold out of range or a folds CSV made for other data.
    """
    if fold is None:
        return list(train_set.images), []
    if not folds_csv and not 0 <= fold < k:
        raise CellsegError(f"--fold {fold} out of range 0..{k - 1} (data.folds={k})")
    return split(load_folds(train_set, k=k, seed=seed, csv=folds_csv), fold)


def select_ids(
    train_set,
    fold: int | None = None,
    k: int = 5,
    seed: int = 0,
    images: int | None = None,
    folds_csv: str | Path | None = None,
) -> list[str]:
    """The train images a hold-out run predicts (``cellseg dry-run``, ``cellseg predict-raw``).

    Args:
        train_set: a :class:`cellseg.data.truth.TrainSet`.
        fold: fold ``fold``'s hold-out of :func:`load_folds` (``folds_csv`` when given, else ``k``
            folds made with ``seed``): the hold-out training validates on with the same settings.
        images: else a random sample of this many ids (``seed``), in train.csv order.

    Returns:
        Ids; every image when neither ``fold`` nor ``images`` is given.
    """
    ids = list(train_set.images)
    if fold is not None and images is not None:
        raise CellsegError("give either a fold or a number of images, not both")
    if fold is not None:
        return holdout_split(train_set, fold, k=k, seed=seed, folds_csv=folds_csv)[1]
    if images is not None:
        if images < 1:
            raise CellsegError(f"--images must be >= 1, got {images}")
        rng = np.random.default_rng(seed)
        pick = set(rng.permutation(len(ids))[: min(images, len(ids))].tolist())
        return [i for n, i in enumerate(ids) if n in pick]
    return ids
