"""Ctrl-C during ``cellseg train``: always exit 130 with a run folder that ``--resume`` continues, and
``train.epochs=0`` is refused before any folder is made.

Ctrl-C in a terminal sends SIGINT to the whole foreground process group: the training process and its
DataLoader workers. Here each run gets its own session (``start_new_session``) and the signal goes to
that group with ``os.killpg``, as a terminal would send it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from cellseg.model.checkpoint import read_checkpoint_info
from cellseg.training.interrupt import deferred_interrupts, interrupt_guard
from train_helpers import cli, train_args

#: two-epoch runs with one loader worker (the worker gets the SIGINT too, as under a terminal)
EXTRA = ["train.epochs=2", "train.num_workers=1"]

#: ``cellseg train`` with a SIGINT sent to its own process group at the moment a DataLoader iterator is
#: torn down at the end of epoch N (argv[1]): Python raises the KeyboardInterrupt inside the iterator's
#: ``__del__``, where exceptions are printed as "ignored" and dropped.
INTERRUPT_IN_LOADER_TEARDOWN = """
import os, signal, sys
from torch.utils.data import dataloader
original = dataloader._MultiProcessingDataLoaderIter.__del__
calls = []
def teardown(self):
    calls.append(1)
    if len(calls) == int(sys.argv[1]):
        os.killpg(0, signal.SIGINT)
    original(self)
dataloader._MultiProcessingDataLoaderIter.__del__ = teardown
from cellseg.cli import main
sys.exit(main(sys.argv[2:]))
"""


def as_in_a_terminal() -> None:
    """The child's SIGINT disposition as under a terminal: a job started in the background (``cmd &``)
    inherits SIGINT ignored, and Python then leaves it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def metrics_epochs(out: Path) -> list[int]:
    return pd.read_csv(out / "metrics.csv")["epoch"].tolist()


def interrupted_in_teardown(data: Path, out: Path, epoch: int) -> subprocess.CompletedProcess:
    script = out.parent / "interrupt.py"
    script.write_text(INTERRUPT_IN_LOADER_TEARDOWN)
    return subprocess.run(
        [sys.executable, str(script), str(epoch), *train_args(data, out, *EXTRA)],
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
        preexec_fn=as_in_a_terminal,
    )


class DropsAnInterrupt:
    """Sends SIGINT to this process from its ``__del__``: Python raises the KeyboardInterrupt there and
    drops it ("Exception ignored in ...")."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def sigint_default():
    """SIGINT as Python installs it for a foreground process (a background pytest inherits it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt
def test_guard_raises_an_interrupt_that_python_dropped(sigint_default):
    with pytest.raises(KeyboardInterrupt):
        with interrupt_guard():
            DropsAnInterrupt()  # collected at once: the interrupt is raised and dropped inside __del__
            done = True  # the block runs on to its end
    assert done
    # another error after the interrupt (a loader worker that the same Ctrl-C stopped) is the interrupt
    with pytest.raises(KeyboardInterrupt):
        with interrupt_guard():
            DropsAnInterrupt()
            raise RuntimeError("DataLoader worker (pid 123) exited unexpectedly")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    with interrupt_guard():  # the flag does not outlive the block that received it
        pass
    # inside a deferred block the interrupt waits for the block's end
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with interrupt_guard():
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                steps.append("written")
            steps.append("after")
    assert steps == ["written"]


def test_guard_leaves_an_ignored_sigint_alone():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a job started in the background
    try:
        with interrupt_guard():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
def test_sigint_in_loader_teardown_is_not_swallowed(tiny_data, tmp_path):  # noqa: F811
    """The interrupt lands where Python drops exceptions (a ``__del__``): the run must still stop with
    130 after epoch 1's checkpoint, not train on and exit 0; ``--resume`` then finishes the run."""
    out = tmp_path / "run"
    r = interrupted_in_teardown(tiny_data, out, 2)
    assert r.returncode == 130, (r.stdout + r.stderr)[-3000:]
    assert "interrupted" in r.stderr.splitlines()[-1]
    assert read_checkpoint_info(out / "last.pth").provenance["epoch"] == 1
    assert metrics_epochs(out) == [1]
    done = cli(*train_args(tiny_data, out, *EXTRA, "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout + done.stderr
    assert metrics_epochs(out) == [1, 2]
    assert read_checkpoint_info(out / "last.pth").provenance["epoch"] == 2


@pytest.mark.slow
def test_sigint_in_the_first_epoch_leaves_no_folder(tiny_data, tmp_path):  # noqa: F811
    """Interrupted before its first checkpoint, a run trained nothing: no folder (and so nothing that
    blocks the next run into the same --out)."""
    out = tmp_path / "run"
    r = interrupted_in_teardown(tiny_data, out, 1)
    assert r.returncode == 130, (r.stdout + r.stderr)[-3000:]
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.3, 0.6])
def test_ctrl_c_after_the_first_checkpoint_exits_130_and_resumes(tiny_data, tmp_path, delay):  # noqa: F811
    """SIGINT to the process group once epoch 1 is saved, at a few offsets after it (4 epochs: time
    left to interrupt on a fast machine too); ``last.pth`` and ``metrics.csv`` agree whatever it hit."""
    out = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "cellseg", *train_args(tiny_data, out, "train.epochs=4", "train.num_workers=1")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=as_in_a_terminal,
    )
    deadline = time.monotonic() + 240
    while not (out / "metrics.csv").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    assert p.poll() is None, "the run ended before it could be interrupted"
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    saved = read_checkpoint_info(out / "last.pth").provenance["epoch"]
    assert 1 <= saved < 4 and metrics_epochs(out) == list(range(1, saved + 1))
    done = cli(*train_args(tiny_data, out, "train.epochs=4", "train.num_workers=1", "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics_epochs(out) == [1, 2, 3, 4]


@pytest.mark.slow
def test_zero_epochs_is_refused_before_any_folder_is_made(tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "nothing"
    r = cli(*train_args(tiny_data, out, "train.epochs=0"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-3000:]
    assert "train.epochs" in r.stderr and "checkpoints in" not in r.stdout
    assert not out.exists()
