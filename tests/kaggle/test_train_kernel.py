"""kernel/train.py as push.py uploads it (kernel/kaggle_env.py inlined, STAGED filled in), run with no
arguments against a fake /kaggle tree from a venv where cellseg is not installed: it installs the
bundle's wheel, trains on CPU until ``train.time_limit`` stops it, and a second session with the first
one's output attached resumes and completes."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from cellseg.kaggle.kernel_code import write_staged
from cellseg.kaggle.training import OUTPUT_MARKER, stage_train_bundle, verify_output
from cellseg.paths import configs_dir, repo_root
from kernel_helpers import bare_env
from train_helpers import TINY_OVERRIDES

SLUG = "sartorius-cell-instance-segmentation"
ENTRY = repo_root() / "kernel" / "train.py"


def load_kernel():
    spec = importlib.util.spec_from_file_location("kernel_train", ENTRY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def session(tmp: Path, data: Path, bundle: Path) -> Path:
    """A fresh /kaggle: competition data (new mount layout), the training bundle, empty working/."""
    root = tmp / "kaggle"
    comp = root / "input" / "competitions" / SLUG
    comp.mkdir(parents=True)
    shutil.copy2(data / "train.csv", comp / "train.csv")
    shutil.copytree(data / "train", comp / "train")
    shutil.copytree(bundle, root / "input" / "datasets" / "alice" / "sartorius-cellseg-train-bundle")
    (root / "working").mkdir()
    (root / "temp").mkdir()
    return root


@pytest.fixture(scope="module")
def train_bundle(tmp_path_factory):
    """The training bundle as push.py train stages it: fold 0, tiny model, 2 epochs, a 1 ms time limit."""
    out = tmp_path_factory.mktemp("train-bundle") / "bundle"
    overrides = [*TINY_OVERRIDES, "train.epochs=2", "train.time_limit=0.001s"]
    return stage_train_bundle(configs_dir() / "demo.yaml", out, ["0"], overrides, username="alice")


def run_kernel(python: Path, code: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), str(code), *args],
        capture_output=True,
        text=True,
        cwd=code.parent,
        timeout=300,
        env=bare_env(CELLSEG_KAGGLE_ROOT=str(root)),
    )


@pytest.mark.slow
def test_stop_at_time_limit_then_next_session_resumes(bare_python, tiny_data, train_bundle, tmp_path):  # noqa: F811
    code = tmp_path / "pushed" / "train.py"  # alone in its folder, as Kaggle runs it
    staged = {"fold": "0", "bundle_id": train_bundle.marker["bundle_id"]}
    write_staged(ENTRY, code, "train.py", staged)

    # Session 1: Kaggle passes no arguments; the 1 ms limit stops the run after its first epoch.
    root1 = session(tmp_path / "s1", tiny_data, train_bundle.root)
    p = run_kernel(bare_python, code, root1)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "installing sartorius-cellseg" in p.stderr and "stopping after epoch 1 of 2" in p.stdout
    assert "cellseg 0.1.0 from " + str(root1 / "temp" / "cellseg-pkg-") in p.stderr  # the wheel, not the checkout
    working = root1 / "working"
    out = verify_output(working)
    assert (out["fold"], out["status"], out["epochs_done"], out["epochs"], out["step"]) == ("0", "stopped", 1, 2, 3)
    assert out["bundle_id"] == staged["bundle_id"] and out["resumed_from"] is None
    assert {f["path"] for f in out["files"]} >= {"run/last.pth", "run/best.pth", "run/metrics.csv", "run/config.yaml"}

    # Session 2: the first session's output attached as a kernel source (Kaggle mounts it read-only
    # under input/); a longer limit from the command line, after the bundle's overrides.
    root2 = session(tmp_path / "s2", tiny_data, train_bundle.root)
    shutil.copytree(working, root2 / "input" / "sartorius-cellseg-train-fold0")
    p = run_kernel(bare_python, code, root2, "train.time_limit=1h")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stderr and "resuming " + str(root2 / "working" / "run") + " after epoch 1" in p.stdout
    out = verify_output(root2 / "working")
    assert (out["status"], out["epochs_done"], out["step"]) == ("complete", 2, 6)
    assert out["resumed_from"] == str(root2 / "input" / "sartorius-cellseg-train-fold0")
    metrics = pd.read_csv(root2 / "working" / "run" / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2] and metrics["step"].tolist() == [3, 6]
    assert out["best_score"] == pytest.approx(metrics["val_score"].max())


def test_a_corrupted_attached_output_is_refused(train_bundle, tmp_path, capsys):
    kernel = load_kernel()
    root = tmp_path / "kaggle"
    prev = root / "input" / "sartorius-cellseg-train-fold0"
    (prev / "run").mkdir(parents=True)
    (prev / "run" / "last.pth").write_bytes(b"x" * 10)
    marker = {"kind": "train-output", "fold": "0", "files": [{"path": "run/last.pth", "size": 20, "sha256": "0" * 64}]}
    (prev / OUTPUT_MARKER).write_text(json.dumps(marker))
    with pytest.raises(kernel.KernelError, match="run/last.pth is missing or differs"):
        kernel.previous_output(root / "input", "0")
    assert kernel.previous_output(root / "input", "1") is None  # another fold's output is not ours


@pytest.mark.parametrize(
    "staged, args, message",
    [
        ({"fold": "0", "bundle_id": "0123456789abcdef"}, [], "this kernel was pushed for 0123456789abcdef"),
        ({}, ["--fold", "3"], "fold 3 is not one the bundle was staged for (['0'])"),
    ],
)
def test_bundle_mismatches_are_one_line_errors(train_bundle, tmp_path, capsys, staged, args, message):
    kernel = load_kernel()
    kernel.STAGED = staged
    root = tmp_path / "kaggle"
    shutil.copytree(train_bundle.root, root / "input" / "train-bundle")
    assert kernel.main(["--kaggle-root", str(root), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train: error: ") and message in err and "\n" not in err


def test_no_training_bundle_is_a_one_line_error(tmp_path, capsys):
    kernel = load_kernel()
    bundle = tmp_path / "input" / "cellseg-weights"
    bundle.mkdir(parents=True)
    (bundle / "cellseg-bundle.json").write_text(json.dumps({"manifest": "weights/x/manifest.yaml"}))  # inference
    assert kernel.main(["--kaggle-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert 'no cellseg-bundle.json of kind "train" under' in err and "\n" not in err


@pytest.mark.parametrize("devices, torchrun", [(0, False), (1, False), (2, True)])
def test_processes_follow_the_gpus_torch_sees(tmp_path, monkeypatch, devices, torchrun):
    """``--nproc auto`` asks torch how many CUDA devices there are (the 2 x T4 of NvidiaTeslaT4 -> two
    processes). No GPU here: torch's own count is replaced, which is the one value the kernel reads."""
    import torch

    kernel = load_kernel()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    args = kernel.parse_args([])
    cmd = kernel.train_command(args, tmp_path, {"config": "c.yaml"}, tmp_path, tmp_path / "run", "0")
    assert ("torch.distributed.run" in cmd) is torchrun
    if torchrun:
        assert cmd[cmd.index("--nproc_per_node") + 1] == str(devices)


def test_a_torchvision_below_the_floor_is_a_one_line_refusal(monkeypatch):
    """The wheel installs with --no-deps: the kernel itself refuses an image older than the floor,
    before it starts a training that would fail with a traceback."""
    import torchvision

    kernel = load_kernel()
    monkeypatch.setattr(torchvision, "__version__", "0.18.1+cu121")
    with pytest.raises(kernel.KernelError, match=r"torchvision 0.18.1\+cu121 is older than 0.19"):
        kernel.check_training_floor()
    monkeypatch.setattr(torchvision, "__version__", "0.19.1")
    kernel.check_training_floor()
