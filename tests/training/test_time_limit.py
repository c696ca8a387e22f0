"""``train.time_limit``: a run stops cleanly at an epoch boundary, resumes to the same weights as one
uninterrupted run, and refuses a limit that cannot fit one epoch of a resumed run. The runs read a
fake clock (``train(clock=...)``) that moves 1 s per reading: what stops them does not depend on how
fast this machine is."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from cellseg.config.experiment import load_experiment
from cellseg.config.loader import parse_duration
from cellseg.errors import CellsegError
from cellseg.model.checkpoint import read_checkpoint
from cellseg.paths import configs_dir
from cellseg.training.loop import train
from train_helpers import TINY_OVERRIDES


class Ticks:
    """A clock that moves 1 s each time it is read: every epoch lasts at least 1 s of it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def run(data, out, *overrides: str, resume: bool = False):
    cfg = load_experiment(configs_dir() / "demo.yaml", [*TINY_OVERRIDES, *overrides])
    return train(cfg, data, fold=0, out=out, resume=resume, progress=False, clock=Ticks())


def test_parse_duration_units():
    assert parse_duration("11h30m") == 41400 and parse_duration("0.001s") == 0.001 and parse_duration(90) == 90.0
    assert parse_duration("8h30m") == 30600 and parse_duration("90s") == 90 and parse_duration("2.5h") == 9000
    assert parse_duration("120") == 120 and parse_duration(None) is None
    for bad in ("11 hours", "soon"):
        with pytest.raises(CellsegError, match=f"'{bad}' not understood"):
            parse_duration(bad)


@pytest.mark.slow
def test_stop_at_time_limit_then_resume_equals_uninterrupted(tiny_data, tmp_path):  # noqa: F811
    full = run(tiny_data, tmp_path / "full")
    assert not full.timed_out and full.epochs_done == 3

    out = tmp_path / "split"
    # 0.5 s: the first epoch always starts (nothing to project from); the second would not fit.
    first = run(tiny_data, out, "train.time_limit=0.5s")
    assert first.timed_out and first.epochs_done == 1 and first.steps_done == 3
    state = read_checkpoint(out / "last.pth")["train_state"]
    assert state["epoch"] == 1 and state["epoch_seconds"] == 1.0  # read at its start and at its end
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1]

    # The same limit again cannot fit the epoch recorded in last.pth: one clear error, nothing changed.
    before = (out / "last.pth").read_bytes()
    with pytest.raises(CellsegError, match="shorter than one epoch"):
        run(tiny_data, out, "train.time_limit=0.5s", resume=True)
    assert (out / "last.pth").read_bytes() == before

    rest = run(tiny_data, out, "train.time_limit=2h", resume=True)
    assert not rest.timed_out and rest.epochs_done == 3
    a, b = read_checkpoint(tmp_path / "full" / "last.pth"), read_checkpoint(out / "last.pth")
    assert [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])] == []
    assert a["train_state"]["step"] == b["train_state"]["step"] == 9
    la, lb = (pd.read_csv(p / "metrics.csv").drop(columns=["seconds", "data_wait"]) for p in (tmp_path / "full", out))
    pd.testing.assert_frame_equal(la, lb)
