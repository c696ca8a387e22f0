import numpy as np
import pandas as pd
import pytest

from cellseg.data.folds import group_folds, holdout_split, make_folds, split
from cellseg.data.truth import read_train_csv
from cellseg.errors import CellsegError
from helpers import train_rows, write_train_csv


def make_set(tmp_path, n_samples=12, per_sample=3):
    m = np.zeros((8, 8), bool)
    m[1:4, 1:4] = True
    rows = []
    types = ["cort", "shsy5y", "astro"]
    for s in range(n_samples):
        ct = types[s % 3]
        for j in range(per_sample):
            rows += train_rows(f"im{s}_{j}", ct, [m], sample_id=f"{ct}_sample{s}")
    return read_train_csv(write_train_csv(tmp_path / "train.csv", rows))


def test_grouped_stratified_deterministic(tmp_path):
    ts = make_set(tmp_path)
    f1 = make_folds(ts, k=3, seed=7)
    assert list(f1.columns) == ["id", "sample_id", "cell_type", "fold"]
    assert set(f1["fold"]) == {0, 1, 2}
    # a sample never straddles folds
    assert (f1.groupby("sample_id")["fold"].nunique() == 1).all()
    # each fold holds every cell type (4 samples per type, 3 folds)
    assert (f1.groupby("fold")["cell_type"].nunique() == 3).all()
    assert f1.equals(make_folds(ts, k=3, seed=7))
    tr, ho = split(f1, 0)
    assert set(tr).isdisjoint(ho) and len(tr) + len(ho) == len(f1)


def test_seed_changes_assignment(tmp_path):
    ts = make_set(tmp_path, n_samples=30, per_sample=1)
    assignments = {tuple(make_folds(ts, k=5, seed=s)["fold"]) for s in range(5)}
    assert len(assignments) > 1


def test_too_few_groups(tmp_path):
    ts = make_set(tmp_path, n_samples=2)
    with pytest.raises(CellsegError, match="cannot make 5 folds from 2"):
        make_folds(ts, k=5)


def test_group_folds_keeps_groups_together_and_makes_fewer_folds_for_few_groups():
    groups = ["a", "a", "b", "c", "c", "c", "d", "e"]
    fold = group_folds(groups, k=3, seed=1)
    assert fold.dtype == np.int64 and set(fold.tolist()) == {0, 1, 2}
    for g in set(groups):
        assert len({f for f, gg in zip(fold, groups) if gg == g}) == 1
    assert np.array_equal(fold, group_folds(groups, k=3, seed=1))
    assert set(group_folds(["a", "a", "b"], k=5).tolist()) == {0, 1}  # 2 groups: 2 folds
    assert group_folds(["a", "a"], k=3).tolist() == [0, 0]  # one group: everything in fold 0


def test_holdout_split_from_folds_or_a_folds_file(tmp_path):
    ts = make_set(tmp_path)
    assert holdout_split(ts, None) == (list(ts.images), [])
    train, hold = holdout_split(ts, 1, k=3, seed=2)
    assert (train, hold) == split(make_folds(ts, k=3, seed=2), 1)
    with pytest.raises(CellsegError, match=r"--fold 3 out of range 0..2 \(data.folds=3\)"):
        holdout_split(ts, 3, k=3)
    csv = tmp_path / "folds.csv"
    make_folds(ts, k=3, seed=2).to_csv(csv, index=False)
    assert holdout_split(ts, 1, folds_csv=csv) == (train, hold)
    bad = pd.read_csv(csv)
    bad.loc[0, "id"] = "stranger"
    bad.to_csv(csv, index=False)
    with pytest.raises(CellsegError, match="made for other data"):
        holdout_split(ts, 1, folds_csv=csv)
