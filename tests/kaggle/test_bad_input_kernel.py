"""kernel/submit.py with bad competition input, as a real subprocess against a fake /kaggle tree
(rows of docs/BAD_INPUT.md). On Kaggle a missing submission.csv is the one outcome that must never
happen: with every test image unreadable, or none at all, the kernel still writes a valid file with
every sample_submission.csv id, says why loudly, and exits 0."""

from __future__ import annotations

import argparse
import json
import os
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def assert_fallback_submission(res: Result, root: Path, comp: Path, *words: str) -> None:
    """Exit 0, no traceback, a banner naming what failed, and a valid submission.csv with an (empty)
    row for every sample_submission.csv id and every test PNG."""
    assert res.code == 0, res.err[-3000:]
    assert "Traceback" not in res.text, res.text[-3000:]
    (line,) = [ln for ln in res.err.splitlines() if "PREDICTION FAILED in " in ln]
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    sub = root / "working" / "submission.csv"
    ids = read_sample_submission(comp / "sample_submission.csv")
    assert validate_submission(sub, comp / "test", ids) == []
    expected = set(ids) | {p.stem for p in (comp / "test").iterdir()}
    assert set(read_submission(sub)) == expected and expected
    assert sorted(p.name for p in sub.parent.iterdir()) == ["submission.csv"]


@pytest.mark.slow
def test_kernel_binary_manifest_still_writes_a_submission_and_unwritable_out_is_one_line(weights, tmp_path):
    root, comp = fake_kaggle(tmp_path, weights)
    res = kernel(root, "--manifest", "weights/tiny/model0.pth")
    assert_fallback_submission(res, root, comp, "model0.pth", "not a text file", "expected an ensemble manifest")
    (root / "working" / "submission.csv").unlink()
    (root / "working" / "submission.csv").mkdir()
    res = kernel(root)
    assert_one_line_error(res, "submission.csv: is a folder", prefix="submit")
    assert "loaded" not in res.err


#: (function replaced, exception raised): every stage after the competition folder is found
STAGES = [
    ("kaggle_env:import_cellseg", "KeyError"),  # the offline install / import
    ("cellseg.inference.runner:load_manifest", "ValueError"),
    ("cellseg.inference.runner:resolve_device", "RuntimeError"),
    ("cellseg.inference.ensemble:load_ensemble", "MemoryError"),  # model loading
    ("cellseg.inference.runner:FolderRun._calibrate_once", "ZeroDivisionError"),  # the time budget's calibration
    ("cellseg.inference.ensemble:Ensemble.forward", "IndexError"),  # every image's forward pass
    ("cellseg.inference.ensemble:Ensemble.finish", "AssertionError"),  # vote, fusion + post-processing
    ("cellseg.inference.runner:encode_crop", "OverflowError"),  # RLE encoding
    ("cellseg.inference.runner:write_submission", "OSError"),  # writing
    ("cellseg.inference.runner:validate_submission", "TypeError"),
]
#: a failing image costs only its own row: the runner gives it an empty one and goes on (a calibration
#: that fails twice costs its image, and the next image calibrates)
PER_IMAGE = ("_calibrate_once", "forward", "finish", "encode_crop")


@pytest.mark.slow
def test_kernel_survives_a_failure_at_every_stage(weights, tmp_path):
    """Each stage in turn raises an arbitrary exception (one real process runs the kernel once per
    stage): every run exits 0 with a valid submission.csv holding every id, and a banner naming the
    function that failed and the exception."""
    root, comp = fake_kaggle(tmp_path, weights, n_test=2)
    hook = Path(__file__).with_name("inject_fault.py")
    specs = [f"{t}={e}" for t, e in STAGES]
    cmd = [sys.executable, str(hook), str(tmp_path / "runs"), *specs, "--", "--kaggle-root", str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=child_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chunks = proc.stderr.split("=== fault ")[1:]
    assert len(chunks) == len(STAGES), proc.stderr[-3000:]
    ids = read_sample_submission(comp / "sample_submission.csv")
    expected = set(ids) | {p.stem for p in (comp / "test").iterdir()}
    for k, ((target, exc), chunk) in enumerate(zip(STAGES, chunks)):
        func = target.split(":")[1].split(".")[-1]
        assert f"=== exit {k} 0" in chunk, (target, chunk[-3000:])
        assert "Traceback" not in chunk, (target, chunk[-3000:])
        sub = tmp_path / "runs" / str(k) / "submission.csv"
        assert validate_submission(sub, comp / "test", ids) == [], target
        assert set(read_submission(sub)) == expected, target
        if func in PER_IMAGE:
            assert f"failed with {exc}: injected fault" in chunk, (target, chunk[-3000:])
            continue
        (line,) = [ln for ln in chunk.splitlines() if "PREDICTION FAILED in " in ln]
        assert func in line and f"{exc}: " in line and "injected fault" in line, (target, line)
        assert read_submission(sub) == {i: [] for i in expected}, target


@pytest.mark.slow
def test_kernel_skips_a_test_file_name_that_cannot_be_an_id(weights, tmp_path):
    root, comp = fake_kaggle(tmp_path, weights, n_test=2)
    good = next((comp / "test").iterdir())
    os.link(good, os.path.join(os.fsencode(comp / "test"), b"bad\xff\xfename.png"))
    res = kernel(root)
    assert res.code == 0 and "Traceback" not in res.text, res.err[-3000:]
    assert "PREDICTION FAILED" not in res.err
    warnings = [ln for ln in res.err.splitlines() if "not valid UTF-8" in ln]
    assert warnings and all("bad\\xff\\xfename.png" in w and "skipping" in w for w in warnings), res.err
    sub = root / "working" / "submission.csv"
    ids = read_sample_submission(comp / "sample_submission.csv")
    assert validate_submission(sub, comp / "test", ids) == []
    assert all(i.isprintable() for i in read_submission(sub))


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU"])
def test_kernel_device_takes_cellsegs_choice_list(weights, tmp_path, device):
    from cellseg.commands.common import device_choice

    root, _ = fake_kaggle(tmp_path, weights)
    res = kernel(root, "--device", device)
    assert res.code == 2 and "Traceback" not in res.text
    assert f"invalid device {device!r} (choose from auto, cpu, cuda, cuda:N)" in res.err
    with pytest.raises(argparse.ArgumentTypeError, match="choose from auto, cpu, cuda, cuda:N"):
        device_choice(device)  # the same list as every cellseg command
    assert not (root / "working" / "submission.csv").exists()
