"""cellseg dry-run (and predict) through the real CLI on a small synthetic dataset."""

import json

import pandas as pd
import pytest
from PIL import Image

from cellseg.cli import main
from cellseg.data.folds import select_ids
from cellseg.data.synth import generate
from inference_helpers import make_manifest


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, train_images=10, test_images=2, semi_images=0, progress=False)
    return out


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("w"), n_models=1, tta=("identity",), detections_per_view=30)


@pytest.mark.slow
def test_dry_run_report(synth, manifest, tmp_path, capsys):
    rep = tmp_path / "rep"
    rc = main(
        [
            "dry-run",
            "--data",
            str(synth),
            "--weights",
            str(manifest),
            "--images",
            "3",
            "--report",
            str(rep),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "overall" in out and "projected 240 hidden-test images" in out
    per = pd.read_csv(rep / "per_image.csv")
    assert len(per) == 3 and per["score"].is_monotonic_increasing  # worst first
    assert set(per.columns) >= {"id", "cell_type", "voted_type", "score", "n_true", "n_pred", "seconds"}
    truth = pd.read_csv(synth / "train.csv")
    assert set(per["id"]) <= set(truth["id"])
    pngs = sorted((rep / "overlays").glob("*.png"))
    assert len(pngs) == 3 and pngs[0].name.startswith("00_" + per["id"][0])
    assert Image.open(pngs[0]).mode == "RGB"
    assert Image.open(rep / "score_by_class.png").size[0] > 100
    s = json.loads((rep / "summary.json").read_text())
    assert s["images"] == 3
    assert s["projected_seconds_240_images"] == pytest.approx(s["load_seconds"] + 240 * s["seconds_per_image"])
    assert s["score"] == pytest.approx(per["score"].mean())
    by_iou = pd.read_csv(rep / "per_threshold.csv")
    assert list(by_iou.columns) == ["iou", "tp", "fp", "fn", "score"] and len(by_iou) == 10
    assert by_iou["score"].mean() == pytest.approx(s["score"], abs=1e-5)
    assert ((by_iou["tp"] + by_iou["fn"]) == per["n_true"].sum()).all()
    assert ((by_iou["tp"] + by_iou["fp"]) == per["n_pred"].sum()).all()
    assert [r["tp"] for r in s["per_threshold"]] == by_iou["tp"].tolist()
    assert s["provenance"] == "1 model: provenance unknown" and "ensemble: 1 model: provenance unknown" in out
    sub = (rep / "submission.csv").read_text().splitlines()
    assert sub[0] == "id,predicted" and {line.split(",")[0] for line in sub[1:]} == set(per["id"])


@pytest.mark.slow
def test_dry_run_fold_selection(synth, manifest):
    from cellseg.data.truth import read_train_csv

    train = read_train_csv(synth / "train.csv")
    folds = [set(select_ids(train, fold=k)) for k in range(5)]
    assert set().union(*folds) == set(train.images) and sum(map(len, folds)) == len(train.images)
    assert select_ids(train, images=4) == select_ids(train, images=4) and len(select_ids(train, images=4)) == 4


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 3])
def test_predict_raw_and_dry_run_pick_the_same_images(synth, manifest, tmp_path, seed):
    """Tuning (predict-raw) and the dry run look at the same train images for the same --images/--seed
    (they used two sampling functions that disagreed for every seed)."""
    common = ["--data", str(synth), "--weights", str(manifest), "--images", "6", "--seed", str(seed)]
    assert main(["predict-raw", *common, "--out", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    assert main(["dry-run", *common, "--report", str(tmp_path / "rep"), "--device", "cpu", "--no-progress"]) == 0
    cached = json.loads((tmp_path / "cache" / "index.json").read_text())["ids"]
    scored = pd.read_csv(tmp_path / "rep" / "per_image.csv", dtype={"id": str})["id"]
    assert len(cached) == 6 and sorted(cached) == sorted(scored)


@pytest.mark.slow
def test_predict_command_and_one_line_errors(synth, manifest, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    assert main(["predict", "--data", str(synth), "--weights", str(manifest), "--out", str(out), "--no-progress"]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["predict", "--data", str(tmp_path / "none"), "--weights", str(manifest), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cellseg predict: error:") and "test folder not found" in err[0]
    bad = tmp_path / "m.yaml"
    bad.write_text(manifest.read_text().replace("sha256: ", "sha256: 0"))
    (tmp_path / "model0.pth").symlink_to(manifest.parent / "model0.pth")
    assert main(["predict", "--data", str(synth), "--weights", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model0.pth: sha256 mismatch" in err[0]


@pytest.mark.slow
def test_demo_end_to_end(manifest, tmp_path, capsys):
    """cellseg demo: synth -> fake /kaggle with a wheel built from this checkout -> kernel subprocess
    -> valid submission -> dry-run score (tiny sizes; the real default uses weights/demo)."""
    rc = main(
        [
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--weights",
            str(manifest),
            "--train-images",
            "6",
            "--test-images",
            "2",
            "--dry-run-images",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "demo done" in out and "dry-run score" in out
    bundle = tmp_path / "demo" / "kaggle" / "input" / "datasets" / "demo" / "cellseg-bundle"
    assert len(list((bundle / "wheels").glob("sartorius_cellseg-*.whl"))) == 1
    assert json.loads((bundle / "cellseg-bundle.json").read_text())["manifest"] == "weights/tiny/manifest.yaml"
    sub = (tmp_path / "demo" / "submission.csv").read_text().splitlines()
    test_ids = {p.stem for p in (tmp_path / "demo" / "data" / "test").glob("*.png")}
    assert sub[0] == "id,predicted" and {line.split(",")[0] for line in sub[1:]} == test_ids
    assert (tmp_path / "demo" / "dry-run" / "summary.json").is_file()
