"""predict-raw -> tune, and pseudo-labels, through the real CLI and real (tiny, random) models."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from cellseg.data import cell_type_from_filename, read_train_records
from cellseg.errors import CellsegError
from cellseg.tune import predict_raw
from cellseg.manifest import load_manifest
from cellseg.pseudo import pseudo_label, sample_id_from_filename, stricter
from cellseg.manifest import ClassThresholds

from inference_helpers import make_manifest


def cellseg(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "cellseg", *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"cellseg {' '.join(map(str, args))} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("w"), n_models=1, tta=("identity", "hflip"))


def test_predict_raw_then_tune_cli(synth_dir, manifest, tmp_path):
    cache = tmp_path / "cache"
    cellseg("predict-raw", "--data", synth_dir, "--weights", manifest, "--out", cache, "--images", 2, "--device", "cpu")
    files = sorted(cache.glob("*.npz"))
    index = json.loads((cache / "index.json").read_text())
    assert len(files) == 2 and sorted(index["ids"]) == [f.stem for f in files]
    mtimes = [f.stat().st_mtime_ns for f in files]
    predict_raw(synth_dir, manifest, cache, index["ids"], device="cpu", progress=False)
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # resumed: nothing recomputed
    other = make_manifest(tmp_path / "other", n_models=1, tta=("identity",))
    with pytest.raises(CellsegError, match="another manifest"):
        predict_raw(synth_dir, other, cache, index["ids"], device="cpu", progress=False)

    before = load_manifest(manifest)
    r = cellseg("tune", "--cache", cache, "--truth", synth_dir / "train.csv", "--weights", manifest, "--folds", 2,
                "--nms-iou", "0.3,0.5", "--mask-threshold", "0.5", "--min-pixels", "0,50", "--score", "0.05,0.3,0.6")
    assert "overall" in r.stdout and "out-of-fold" in r.stdout
    assert (manifest.parent / "manifest.v1.yaml").exists()
    assert list((cache / "plots").glob("tune_*.png"))
    after = load_manifest(manifest)  # still a valid manifest whose checksums verify
    assert after.models == before.models


def test_pseudo_label_writes_valid_train_csv(synth_dir, manifest, tmp_path):
    out = tmp_path / "pseudo.csv"
    res = pseudo_label(synth_dir, manifest, out, device="cpu", progress=False, score_margin=0.0, min_pixels_factor=1.0)
    df = read_train_records(out)  # the same validation as train.csv (columns, types, cell types)
    assert "source" in df.columns and (df["source"] == "pseudo:tiny").all()
    assert res.rows == len(df) > 0
    semi = sorted(p.name for p in (synth_dir / "train_semi_supervised").glob("*.png"))
    for image_id, g in df.groupby("id"):
        name = next(n for n in semi if n.startswith(image_id))
        assert (g["cell_type"] == cell_type_from_filename(name)).all()
        assert (g["sample_id"] == sample_id_from_filename(name)).all()
    assert set(res.table.index) <= {"shsy5y", "astro", "cort"}
    # stricter thresholds keep fewer instances
    strict = pseudo_label(synth_dir, manifest, tmp_path / "strict.csv", device="cpu", progress=False,
                          score_margin=0.5, min_pixels_factor=3.0)
    assert strict.rows < res.rows


def test_stricter_and_sample_id():
    th = ClassThresholds(score=0.5, mask_threshold=0.5, nms_iou=0.3, min_pixels=100)
    s = stricter(th, 0.6, 1.5)
    assert s.score == 0.99 and s.min_pixels == 150 and s.nms_iou == 0.3
    for name in ("shsy5y[diff]_E10-4_Vessel-714_Ph_3_0001.png", "shsy5y[diff]_E10-4_Vessel-714_Ph_3_00d04h00m.png"):
        assert sample_id_from_filename(name) == "shsy5y[diff]_E10-4_Vessel-714_Ph_3"


def test_pseudo_label_without_images_is_a_one_line_error(tmp_path, manifest):
    (tmp_path / "train_semi_supervised").mkdir()
    r = cellseg("pseudo-label", "--data", tmp_path, "--weights", manifest, "--out", tmp_path / "p.csv", check=False)
    assert r.returncode == 2 and "no unlabeled PNG" in r.stderr and len(r.stderr.strip().splitlines()) == 1
