"""kernel/submit.py with bad competition input, as a real subprocess against a fake /kaggle tree
(rows of docs/BAD_INPUT.md). On Kaggle a missing submission.csv is the one outcome that must never
happen: with every test image unreadable, or none at all, the kernel still writes a valid file with
every sample_submission.csv id, says why loudly, and exits 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bad_input_helpers import Result, assert_one_line_error, child_env
from cellseg.data.submission import read_submission, validate_submission
from cellseg.data.truth import read_sample_submission
from cellseg.paths import kernel_entry
from inference_helpers import make_competition, make_manifest

SLUG = "sartorius-cell-instance-segmentation"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_manifest(tmp_path_factory.mktemp("w") / "tiny", n_models=1, tta=("identity",), detections_per_view=30)


def fake_kaggle(tmp: Path, weights: Path, n_test: int = 2) -> tuple[Path, Path]:
    """A /kaggle tree (new mount layout) whose bundle holds ``weights`` but no wheel: cellseg is
    imported from PYTHONPATH, as it would be after the offline install (tested in test_kernel.py)."""
    root = tmp / "kaggle"
    comp = make_competition(root / "input" / "competitions" / SLUG, n_test=n_test)
    bundle = root / "input" / "datasets" / "someone" / "cellseg-weights"
    (bundle / "weights").mkdir(parents=True)
    (bundle / "weights" / "tiny").symlink_to(weights.parent, target_is_directory=True)
    (bundle / "cellseg-bundle.json").write_text(json.dumps({"manifest": "weights/tiny/manifest.yaml"}))
    (root / "working").mkdir(parents=True)
    (root / "temp").mkdir()
    return root, comp


def kernel(root: Path, *args: str) -> Result:
    cmd = [sys.executable, str(kernel_entry()), "--kaggle-root", str(root), "--time-budget", "5m", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=child_env(), timeout=300)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_kernel_every_image_unreadable_still_writes_a_valid_submission(weights, tmp_path):
    root, comp = fake_kaggle(tmp_path, weights, n_test=3)
    ids = read_sample_submission(comp / "sample_submission.csv")
    (comp / "test" / f"{ids[0]}.png").write_bytes(b"")
    for i in ids[1:]:
        (comp / "test" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    res = kernel(root)
    assert res.code == 0, res.err[-3000:]
    assert "Traceback" not in res.text
    assert "NO TEST IMAGE WAS PREDICTED: every one of the 3 test image(s) is unreadable" in res.err
    assert "will score 0" in res.err
    sub = root / "working" / "submission.csv"
    assert validate_submission(sub, comp / "test", ids) == []
    assert read_submission(sub) == {i: [] for i in ids}
    assert sorted(p.name for p in sub.parent.iterdir()) == ["submission.csv"]


def test_kernel_empty_test_folder_writes_every_sample_id(weights, tmp_path):
    root, comp = fake_kaggle(tmp_path, weights, n_test=2)
    ids = read_sample_submission(comp / "sample_submission.csv")
    for p in (comp / "test").iterdir():
        p.unlink()
    res = kernel(root)
    assert res.code == 0, res.err[-3000:]
    assert "Traceback" not in res.text
    assert "holds no PNG image" in res.err and "NO TEST IMAGE WAS PREDICTED" in res.err
    sub = root / "working" / "submission.csv"
    assert read_submission(sub) == {i: [] for i in ids}
    assert validate_submission(sub, comp / "test", ids) == []


def test_kernel_binary_manifest_and_unwritable_out_are_one_line(weights, tmp_path):
    root, _ = fake_kaggle(tmp_path, weights)
    res = kernel(root, "--manifest", "weights/tiny/model0.pth")
    assert_one_line_error(res, "model0.pth", "not a text file", "expected an ensemble manifest", prefix="submit")
    (root / "working" / "submission.csv").mkdir()
    res = kernel(root)
    assert_one_line_error(res, "submission.csv: is a folder", prefix="submit")
    assert "loaded" not in res.err
