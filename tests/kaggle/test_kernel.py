"""kernel/submit.py against a fake /kaggle tree, from a venv where torch imports but cellseg does not:
the kernel must find the bundle, install our freshly built wheel offline, find the competition folder
and write a valid submission. What runs is the file push.py uploads (kernel/kaggle_env.py inlined),
alone in a folder."""

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cellseg.data.submission import validate_submission
from cellseg.kaggle.kernel_code import write_staged
from cellseg.paths import kernel_entry
from inference_helpers import make_competition, make_manifest
from kernel_helpers import bare_env

SLUG = "sartorius-cell-instance-segmentation"


def load_kernel():
    spec = importlib.util.spec_from_file_location("kernel_submit", kernel_entry())
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_kaggle(tmp: Path, wheel_dir: Path, layout: str) -> Path:
    root = tmp / "kaggle"
    comp_dir = {"new": root / "input" / "competitions" / SLUG, "old": root / "input" / SLUG}[layout]
    bundle = {
        "new": root / "input" / "datasets" / "someone" / "cellseg-weights",
        "old": root / "input" / "cellseg-weights",
    }[layout]
    make_competition(comp_dir, n_test=2)
    shutil.copytree(wheel_dir, bundle / "wheels")
    make_manifest(bundle / "weights" / "tiny", n_models=1, tta=("identity", "hflip"), detections_per_view=30)
    (bundle / "cellseg-bundle.json").write_text(
        json.dumps({"manifest": "weights/tiny/manifest.yaml", "version": "0.1.0"})
    )
    (root / "working").mkdir(parents=True)
    (root / "temp").mkdir()
    return root


@pytest.mark.slow
def test_bare_venv_has_torch_but_not_cellseg(bare_python):
    probe = "import torch, importlib.util; print(importlib.util.find_spec('cellseg') is None)"
    out = subprocess.run([str(bare_python), "-c", probe], capture_output=True, text=True, cwd="/", env=bare_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


@pytest.mark.slow
def test_kernel_installs_wheel_and_writes_valid_submission(bare_python, wheel_dir, tmp_path):
    root = fake_kaggle(tmp_path, wheel_dir, "new")
    pushed = tmp_path / "pushed" / "submit.py"  # alone: no kaggle_env.py beside it, as on Kaggle
    write_staged(kernel_entry(), pushed, "submit.py")
    proc = subprocess.run(
        [str(bare_python), str(pushed), "--kaggle-root", str(root), "--time-budget", "5m"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=bare_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "installing sartorius-cellseg" in proc.stderr
    used = proc.stderr.split("cellseg 0.1.0 from ")[1].splitlines()[0]
    assert used.startswith(str(root / "temp" / "cellseg-pkg-"))  # the wheel's copy, not the checkout
    sub = root / "working" / "submission.csv"
    comp = root / "input" / "competitions" / SLUG
    assert validate_submission(sub, comp / "test") == []
    assert len(sub.read_text().splitlines()) > 3  # masks were found, not just empty rows


def test_discovery_in_old_layout(wheel_dir, tmp_path):
    kernel = load_kernel()
    root = fake_kaggle(tmp_path, wheel_dir, "old")
    assert kernel.find_bundle(root / "input", "predict")[0] == root / "input" / "cellseg-weights"
    assert kernel.find_competition(root / "input") == root / "input" / SLUG


def test_expected_failures_are_one_line(tmp_path, capsys):
    kernel = load_kernel()
    (tmp_path / "input" / "something").mkdir(parents=True)
    assert kernel.main(["--kaggle-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("submit: error: no cellseg-bundle.json under") and "\n" not in err
    assert kernel.main(["--kaggle-root", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err
