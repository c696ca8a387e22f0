"""cellseg.data.import_labels and ``cellseg import-labels``: exact round trip label image -> RLE ->
label image, the three layouts, tiling with cut instances, the intensity transform, sample_id
grouping, and one line + exit 2 for each bad input. Data: a 128 x 192 crop of Usiigaci set31 (MIT,
tests/fixtures/usiigaci)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellseg.data import rle
from cellseg.data.folds import make_folds
from cellseg.data.import_labels import MARKER, REFERENCE_AREA, import_labels, suggest_input_scale, tile_starts
from cellseg.data.truth import TRAIN_COLUMNS, read_train_csv
from cellseg.errors import CellsegError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "usiigaci"
RAW = np.asarray(Image.open(FIXTURE / "set31" / "raw.tif"))
LABELS = np.asarray(Image.open(FIXTURE / "set31" / "instances_ids.png"))
H, W = LABELS.shape


def _cellseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cellseg", "import-labels", *args], capture_output=True, text=True, timeout=120
    )


def _rebuild(csv: pd.DataFrame, image_id: str, values: list[int], h: int, w: int) -> np.ndarray:
    """Paint the rows of one image, row k with values[k], into a label image."""
    rows = csv[csv["id"] == image_id]
    out = np.zeros((h, w), dtype=np.int64)
    assert len(rows) == len(values)
    for v, a in zip(values, rows["annotation"]):
        m = rle.decode(a, h, w)
        assert not np.any(out[m]), "instances overlap"
        out[m] = v
    return out


def test_folders_layout_round_trips_exactly(tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = import_labels(FIXTURE, out, tile=(H, W), cell_type="cort")
    assert s["layout"] == "folders" and s["tiles"] == 1
    csv = pd.read_csv(out / "train.csv", dtype=str, keep_default_na=False)
    assert tuple(csv.columns) == TRAIN_COLUMNS
    values = sorted(int(v) for v in np.unique(LABELS) if v)
    assert set(csv["id"]) == {"set31"} and len(csv) == len(values)
    assert np.array_equal(_rebuild(csv, "set31", values, H, W), LABELS)
    assert (csv["width"] == str(W)).all() and (csv["height"] == str(H)).all() and (csv["cell_type"] == "cort").all()
    png = Image.open(out / "train" / "set31.png")
    assert png.mode == "L" and png.size == (W, H)
    assert (out / "LICENSE").read_text() == (FIXTURE / "LICENSE").read_text()
    assert list(pd.read_csv(out / "sample_submission.csv").columns) == ["id", "predicted"]
    ts = read_train_csv(out / "train.csv")  # the package's own reader accepts it
    assert len(ts.images["set31"].instances) == len(values)


def test_standardize_gives_the_competition_statistics(tmp_path: Path) -> None:
    import_labels(FIXTURE, tmp_path / "o", tile=(H, W))
    img = np.asarray(Image.open(tmp_path / "o" / "train" / "set31.png")).astype(np.float64)
    assert abs(img.mean() - 128) < 1.0 and abs(img.std() - 20) < 1.0
    # monotone in the raw intensity: the brightest raw pixel is at least as bright as the darkest
    assert img.flat[np.argmax(RAW)] > img.flat[np.argmin(RAW)]


def test_intensity_none_keeps_8_bit_values(tmp_path: Path) -> None:
    src = tmp_path / "cp"
    src.mkdir()
    grey = (np.arange(H * W) % 251).astype(np.uint8).reshape(H, W)
    Image.fromarray(grey).save(src / "a.png")
    Image.fromarray(LABELS).save(src / "a_masks.png")
    import_labels(src, tmp_path / "o", tile=(H, W), intensity="none")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "train" / "a.png")), grey)


def _write_pair(folder: Path, stem: str, raw: np.ndarray, labels: np.ndarray, mask_name: str) -> None:
    Image.fromarray(raw).save(folder / f"{stem}.tif")
    Image.fromarray(labels.astype(np.uint16)).save(folder / mask_name)


@pytest.mark.parametrize("layout", ["cellpose", "stardist"])
def test_cellpose_and_stardist_layouts(tmp_path: Path, layout: str) -> None:
    src = tmp_path / "src"
    flipped = LABELS[::-1].astype(np.uint16) * 300  # 16-bit label values, another image
    if layout == "cellpose":
        src.mkdir()
        _write_pair(src, "a", RAW, LABELS, "a_masks.tif")
        _write_pair(src, "b", RAW[::-1], flipped, "b_masks.png")
    else:
        (src / "images").mkdir(parents=True)
        (src / "masks").mkdir()
        for stem, raw, lab in (("a", RAW, LABELS), ("b", RAW[::-1], flipped)):
            Image.fromarray(raw).save(src / "images" / f"{stem}.tif")
            Image.fromarray(lab.astype(np.uint16)).save(src / "masks" / f"{stem}.png")
    s = import_labels(src, tmp_path / "out", tile=(H, W))
    assert s["layout"] == layout and s["samples"] == 2
    csv = pd.read_csv(tmp_path / "out" / "train.csv", dtype=str, keep_default_na=False)
    for stem, lab in (("a", LABELS.astype(np.int64)), ("b", flipped.astype(np.int64))):
        values = sorted(int(v) for v in np.unique(lab) if v)
        assert np.array_equal(_rebuild(csv, stem, values, H, W), lab)


def test_tiles_overlap_keep_cut_instances_when_big_enough(tmp_path: Path) -> None:
    th, tw, min_area = 96, 128, 200
    s = import_labels(FIXTURE, tmp_path / "o", tile=(th, tw), min_area=min_area)
    csv = pd.read_csv(tmp_path / "o" / "train.csv", dtype=str, keep_default_na=False)
    assert tile_starts(H, th) == [0, 32] and tile_starts(W, tw) == [0, 64] and tile_starts(520, 520) == [0]
    assert s["tiles"] == 4 and set(csv["sample_id"]) == {"set31"}
    full_area = {int(v): int(n) for v, n in zip(*np.unique(LABELS, return_counts=True)) if v}
    dropped = 0
    for top in (0, 32):
        for left in (0, 64):
            sub = LABELS[top : top + th, left : left + tw].astype(np.int64)
            vals, counts = np.unique(sub, return_counts=True)
            keep = [int(v) for v, n in zip(vals, counts) if v and (n >= min_area or n == full_area[int(v)])]
            dropped += sum(1 for v in vals if v) - len(keep)
            expected = np.where(np.isin(sub, keep), sub, 0)
            assert np.array_equal(_rebuild(csv, f"set31_r{top}c{left}", keep, th, tw), expected)
            tile_png = np.asarray(Image.open(tmp_path / "o" / "train" / f"set31_r{top}c{left}.png"))
            assert tile_png.shape == (th, tw)
    assert dropped > 0  # the fixture does hold small cut pieces, so the filter was exercised


def test_folds_never_split_a_source_image(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for k in range(1, 7):
        shutil.copytree(FIXTURE / "set31", src / f"set{k}")
    import_labels(src, tmp_path / "o", tile=(96, 128))
    folds = make_folds(read_train_csv(tmp_path / "o" / "train.csv"), 3, seed=0)
    assert folds.groupby("sample_id")["fold"].nunique().max() == 1
    assert folds.groupby("sample_id")["id"].count().min() == 4


def _bad_sources(tmp: Path) -> dict[str, tuple[Path, str]]:
    cases: dict[str, tuple[Path, str]] = {}
    d = tmp / "size" / "s1"
    d.mkdir(parents=True)
    Image.fromarray(RAW).save(d / "raw.tif")
    Image.fromarray(LABELS[:-1]).save(d / "instances_ids.png")
    cases["size"] = (d.parent, "does not match")
    d = tmp / "float" / "s1"
    d.mkdir(parents=True)
    Image.fromarray(RAW).save(d / "raw.tif")
    Image.fromarray(LABELS.astype(np.float32) + 0.5).save(d / "instances_ids.tif")
    cases["float"] = (d.parent, "not an integer label image")
    d = tmp / "nolabel"
    d.mkdir()
    Image.fromarray(RAW).save(d / "a.tif")
    Image.fromarray(LABELS).save(d / "a_masks.png")
    Image.fromarray(RAW).save(d / "b.tif")
    cases["nolabel"] = (d, "image without a label")
    (tmp / "empty").mkdir()
    cases["empty"] = (tmp / "empty", "empty dataset")
    d = tmp / "blank" / "s1"
    d.mkdir(parents=True)
    Image.fromarray(RAW).save(d / "raw.tif")
    Image.fromarray(np.zeros_like(LABELS)).save(d / "instances_ids.png")
    cases["blank"] = (d.parent, "empty dataset")
    return cases


@pytest.mark.parametrize("case", ["size", "float", "nolabel", "empty", "blank"])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    src, message = _bad_sources(tmp_path)[case]
    label = "instances_ids.tif" if case == "float" else "instances_ids.png"
    out = tmp_path / "out"
    r = _cellseg(str(src), "--out", str(out), "--label-name", label)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("cellseg import-labels: error:")
    assert not out.exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.slow
def test_foreign_out_refused_unless_force_and_failure_keeps_the_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    r = _cellseg(str(FIXTURE), "--out", str(out))
    assert r.returncode == 2 and "other files" in r.stderr and (out / "mine.txt").exists()
    r = _cellseg(str(FIXTURE), "--out", str(out), "--force", "--tile", "64x96")
    assert r.returncode == 0, r.stderr
    assert not (out / "mine.txt").exists() and (out / MARKER).is_file()
    before = (out / "train.csv").read_bytes()
    # a run over its own earlier output needs no --force; one failing while it builds (an all-zero label
    # image is found only then) leaves it as it was, with no staging folder beside it
    blank, _ = _bad_sources(tmp_path / "bad")["blank"]
    with pytest.raises(CellsegError, match="empty dataset"):
        import_labels(blank, out)
    assert (out / "train.csv").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    r = _cellseg(str(FIXTURE), "--out", str(out), "--tile", "128x192")
    assert r.returncode == 0 and len(list((out / "train").iterdir())) == 1


def test_bad_tile_option_is_a_usage_error(tmp_path: Path) -> None:
    r = _cellseg(str(FIXTURE), "--out", str(tmp_path / "o"), "--tile", "520")
    assert r.returncode == 2 and "HEIGHTxWIDTH" in r.stderr


def test_records_the_median_cell_area_and_suggests_an_input_scale(tmp_path: Path) -> None:
    """The marker holds the source cells' median area; cells twice as wide get a smaller scale."""
    src = tmp_path / "zoomed" / "set31"
    src.mkdir(parents=True)
    Image.fromarray(RAW.repeat(2, 0).repeat(2, 1)).save(src / "raw.tif")
    Image.fromarray(LABELS.repeat(2, 0).repeat(2, 1)).save(src / "instances_ids.png")
    plain = import_labels(FIXTURE, tmp_path / "plain", tile=(H, W))
    zoomed = import_labels(src.parent, tmp_path / "zoomed-out", tile=(2 * H, 2 * W))
    areas = np.bincount(LABELS.ravel())[1:]
    assert plain["median_area"] == float(np.median(areas[areas > 0]))
    assert zoomed["median_area"] == 4 * plain["median_area"]
    assert zoomed["suggested_input_scale"] < plain["suggested_input_scale"] <= 1.0
    marker = (tmp_path / "plain" / MARKER).read_text()
    assert '"suggested_input_scale"' in marker and '"median_area"' in marker
    # the rule: competition-sized cells keep the recipes' scale, 4x the area halves it, clipped to 0.25-2
    assert suggest_input_scale(REFERENCE_AREA) == 1.0
    assert suggest_input_scale(4 * REFERENCE_AREA) == 0.5
    assert suggest_input_scale(REFERENCE_AREA / 4) == 2.0
    assert suggest_input_scale(1e9) == 0.25 and suggest_input_scale(1.0) == 2.0
    p = _cellseg(str(src.parent), "--out", str(tmp_path / "cli"), "--tile", f"{2 * H}x{2 * W}")
    assert p.returncode == 0, p.stderr
    assert f"model.input_scale={zoomed['suggested_input_scale']:g}" in p.stdout
