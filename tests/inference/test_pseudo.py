"""predict-raw -> tune, and pseudo-labels, through the real CLI and real (tiny, random) models."""

import json
import subprocess
import sys

import pytest

from cellseg.config.manifest import ClassThresholds, load_manifest
from cellseg.data.truth import cell_type_from_filename, read_train_records
from cellseg.errors import CellsegError
from cellseg.inference.pseudo import pseudo_label, sample_id_from_filename, stricter
from cellseg.tuning.raw_cache import predict_raw
from inference_helpers import make_manifest


def cellseg(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "cellseg", *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"cellseg {' '.join(map(str, args))} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("w"), n_models=1, tta=("identity", "hflip"))


@pytest.mark.slow
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
    r = cellseg(
        "tune",
        "--cache",
        cache,
        "--truth",
        synth_dir / "train.csv",
        "--weights",
        manifest,
        "--folds",
        2,
        "--nms-iou",
        "0.3,0.5",
        "--mask-threshold",
        "0.5",
        "--min-pixels",
        "0,50",
        "--score",
        "0.05,0.3,0.6",
        "--force",  # random models: write whatever tuning found (the write rule is tests/test_tune.py's)
    )
    assert "overall" in r.stdout and "out-of-fold" in r.stdout
    assert (manifest.parent / "manifest.v1.yaml").exists()
    assert list((cache / "plots").glob("tune_*.png"))
    after = load_manifest(manifest)  # still a valid manifest whose checksums verify
    assert after.models == before.models


@pytest.mark.slow
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
    strict = pseudo_label(
        synth_dir,
        manifest,
        tmp_path / "strict.csv",
        device="cpu",
        progress=False,
        score_margin=0.5,
        min_pixels_factor=3.0,
    )
    assert strict.rows < res.rows


def test_stricter_and_sample_id():
    th = ClassThresholds(score=0.5, mask_threshold=0.5, nms_iou=0.3, min_pixels=100)
    s = stricter(th, 0.6, 1.5)
    assert s.score == 0.99 and s.min_pixels == 150 and s.nms_iou == 0.3
    for name in ("shsy5y[diff]_E10-4_Vessel-714_Ph_3_0001.png", "shsy5y[diff]_E10-4_Vessel-714_Ph_3_00d04h00m.png"):
        assert sample_id_from_filename(name) == "shsy5y[diff]_E10-4_Vessel-714_Ph_3"


@pytest.mark.slow
def test_pseudo_label_without_images_is_a_one_line_error(tmp_path, manifest):
    (tmp_path / "train_semi_supervised").mkdir()
    r = cellseg("pseudo-label", "--data", tmp_path, "--weights", manifest, "--out", tmp_path / "p.csv", check=False)
    assert r.returncode == 2 and "no unlabeled PNG" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _tiny_competition(root, n_semi=3, h=64, w=80):
    """Bright elliptic cells on a dark background: 9 labelled images (3 per type) and ``n_semi``
    unlabelled cort images named like the real ``train_semi_supervised`` files."""
    import numpy as np

    from cellseg.io import write_gray
    from helpers import train_rows, write_train_csv

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]

    def image_with_cells():
        image, masks, taken = rng.normal(100, 5, (h, w)), [], np.zeros((h, w), bool)
        for _ in range(int(rng.integers(3, 7))):
            cy, cx, ry, rx = rng.integers(8, h - 8), rng.integers(8, w - 8), rng.integers(3, 7), rng.integers(3, 7)
            m = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1) & ~taken
            if m.sum() >= 10:
                taken |= m
                masks.append(m)
                image[m] = 190
        return np.clip(image, 0, 255).astype(np.uint8), masks

    (root / "train").mkdir(parents=True)
    (root / "train_semi_supervised").mkdir()
    rows = []
    for i, cell_type in enumerate(["shsy5y", "astro", "cort"] * 3):
        image, masks = image_with_cells()
        write_gray(root / "train" / f"{i:012x}.png", image)
        rows += train_rows(f"{i:012x}", cell_type, masks, sample_id=f"{cell_type}[x]_s{i}")
    write_train_csv(root / "train.csv", rows)
    for k in range(n_semi):
        write_gray(
            root / "train_semi_supervised" / f"cort[pre-treat]_A{k}_Vessel-1_Ph_1_00d0{k}h00m.png",
            image_with_cells()[0],
        )
    return root


@pytest.mark.slow
def test_train_pseudo_label_retrain_loop(tmp_path, capsys):
    """train -> pseudo-label the unlabelled images -> retrain with them next to train.csv."""
    import re

    from cellseg.config.experiment import load_experiment
    from cellseg.config.manifest import ClassThresholds, FusionConfig, Manifest, ModelEntry, write_manifest
    from cellseg.paths import configs_dir
    from cellseg.training.loop import train
    from train_helpers import TINY_OVERRIDES, train_args

    data = _tiny_competition(tmp_path / "data")
    cfg = load_experiment(configs_dir() / "demo.yaml", [*TINY_OVERRIDES, "train.epochs=2", "train.val_every=0"])
    first = train(cfg, data, fold=0, out=tmp_path / "run1", progress=False)
    ckpt = first.out / "best.pth"
    assert ckpt.exists()

    loose = ClassThresholds(score=0.05, mask_threshold=0.5, nms_iou=0.5, min_pixels=5)
    m = Manifest(
        name="loop",
        models=[ModelEntry(str(ckpt))],
        tta=["identity"],
        fusion=FusionConfig(detections_per_view=30, model_score_thresh=0.01),
        classes={"shsy5y": loose, "astro": loose, "cort": loose},
    )
    manifest = write_manifest(m, tmp_path / "w" / "manifest.yaml")
    res = pseudo_label(
        data, manifest, tmp_path / "pseudo.csv", device="cpu", progress=False, score_margin=0.0, min_pixels_factor=1.0
    )
    df = read_train_records(res.path)
    assert res.rows > 0 and set(df["cell_type"]) == {"cort"}  # type from the file names
    pseudo_ids = set(df["id"])

    capsys.readouterr()
    from cellseg.cli import main

    assert (
        main(train_args(data, tmp_path / "run2", "train.epochs=1", "train.val_every=0", "--pseudo", str(res.path))) == 0
    )
    out = capsys.readouterr()
    n1 = int(re.search(r"(\d+) train / ", out.out + out.err).group(1))
    cfg3 = load_experiment(configs_dir() / "demo.yaml", [*TINY_OVERRIDES, "train.epochs=1", "train.val_every=0"])
    train(cfg3, data, fold=0, out=tmp_path / "run3", progress=False)
    out = capsys.readouterr()
    n0 = int(re.search(r"(\d+) train / ", out.out + out.err).group(1))
    assert n1 == n0 + len(pseudo_ids)
    assert str(res.path) in (tmp_path / "run2" / "config.yaml").read_text()
    assert main(train_args(data, tmp_path / "run4", "--pseudo", str(tmp_path / "nope.csv"))) == 2
