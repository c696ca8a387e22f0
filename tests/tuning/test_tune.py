import dataclasses
import json

import numpy as np
import pytest
import yaml

from cellseg.cli import main
from cellseg.config.manifest import ClassThresholds, Manifest, ModelEntry, load_manifest, write_manifest
from cellseg.data.masks import CropMask, label_image
from cellseg.data.truth import ImageAnnotation
from cellseg.evaluation.metric import image_score
from cellseg.inference.fusion import Detections, SoftCrop, fuse
from cellseg.inference.postprocess import postprocess
from cellseg.io import write_gray
from cellseg.tuning import raw_cache
from cellseg.tuning.raw_cache import CachedImage, cache_fingerprint, load_cached, predict_raw, save_cached
from cellseg.tuning.report import (
    decide,
    extended_grid,
    grid_edge_warnings,
    grid_edges,
    report,
    report_table,
    write_tuned_manifest,
)
from cellseg.tuning.tune import TuneGrid, choose, image_grid_scores, plot_curves, tune
from helpers import train_rows, write_train_csv
from inference_helpers import make_manifest

H, W = 60, 80


def disk(cy, cx, r, h=H, w=W):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def make_case(rng, image_id, cell_type="cort", n=6, fingerprint="", sample_id=None, voted=None):
    """Truth: n disks. Cache: each cell seen by 2 views (shifted soft masks, high scores), plus
    low-score spurious blobs and small high-score fragments that min-pixels should remove."""
    truth, dets = [], []
    centers = [(10 + 20 * (i // 3), 12 + 25 * (i % 3)) for i in range(n)]
    for cy, cx in centers:
        m = disk(cy, cx, 6)
        truth.append(CropMask.from_full(m))
        for view, shift in enumerate((0, 1)):
            c = CropMask.from_full(np.roll(m, shift, axis=1))
            prob = np.clip(c.mask * 0.9 + rng.normal(0, 0.05, c.mask.shape), 0, 1).astype(np.float32)
            dets.append((SoftCrop(c.top, c.left, prob), rng.uniform(0.7, 0.95), view))
    for _ in range(4):  # spurious, low score
        cy, cx = rng.integers(5, H - 5), rng.integers(5, W - 5)
        c = CropMask.from_full(disk(cy, cx, 4))
        dets.append((SoftCrop(c.top, c.left, c.mask.astype(np.float32) * 0.8), rng.uniform(0.1, 0.3), 0))
    for _ in range(3):  # tiny fragments, high score
        cy, cx = rng.integers(3, H - 3), rng.integers(3, W - 3)
        c = CropMask.from_full(disk(cy, cx, 1))
        dets.append((SoftCrop(c.top, c.left, c.mask.astype(np.float32)), 0.99, 1))
    boxes = np.array([d[0].box for d in dets], np.float32)
    scores = np.array([d[1] for d in dets], np.float32)
    d = Detections(
        boxes,
        scores,
        np.full(len(dets), 3, np.int64),
        [x[0] for x in dets],
        np.array([x[2] for x in dets]),
        np.ones(len(dets), np.float32),
    )
    ann = ImageAnnotation(image_id, cell_type, H, W, truth, meta={"sample_id": sample_id or f"s{image_id}"})
    return CachedImage(image_id, voted or cell_type, H, W, 2.0, d, fingerprint), ann


def manifest_with(th: ClassThresholds) -> Manifest:
    return Manifest(
        name="t",
        models=[ModelEntry("m.pth")],
        tta=["identity", "hflip"],
        classes={"shsy5y": th, "astro": th, "cort": th},
    )


def test_cache_round_trip(tmp_path):
    img, _ = make_case(np.random.default_rng(0), "a", fingerprint="f" * 64)
    save_cached(tmp_path / "a.npz", img)
    back = load_cached(tmp_path / "a.npz")
    assert (back.id, back.cell_type, back.height, back.width, back.total_weight) == ("a", "cort", H, W, 2.0)
    assert back.fingerprint == img.fingerprint
    assert np.array_equal(back.dets.scores, img.dets.scores)
    for m0, m1 in zip(img.dets.masks, back.dets.masks):
        assert (m0.top, m0.left, m0.prob.shape) == (m1.top, m1.left, m1.prob.shape)
        assert np.abs(m0.prob - m1.prob).max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grid_equals_running_the_pipeline(seed):
    """The one-pass-per-(nms, mask, min px) trick must give exactly the kernel's post-processing score."""
    rng = np.random.default_rng(seed)
    img, ann = make_case(rng, "a")
    grid = TuneGrid(nms_iou=[0.3, 0.6], mask_threshold=[0.5, 0.7], min_pixels=[0, 20], score=[0.05, 0.5, 0.98])
    table = image_grid_scores(img, ann, grid, manifest_with(ClassThresholds()))
    gt, _ = label_image(ann.instances, H, W)
    m = manifest_with(ClassThresholds())
    for idx in np.ndindex(*grid.shape):
        th = grid.values(idx)
        fused = fuse(img.dets, th, m.fusion, H, W, total_weight=img.total_weight)
        crops, _ = postprocess(fused, th, m.postprocess, H, W)
        pred, _ = label_image(crops, H, W)
        expected = image_score(gt, pred, len(ann.instances), len(crops))
        assert table[idx] == pytest.approx(expected), (idx, th)


BAD = ClassThresholds(score=0.05, mask_threshold=0.5, nms_iou=0.9, min_pixels=0)


def make_tuning_case(tmp_path, n=6, th=BAD, **case):
    """A manifest (thresholds ``th``) and a cache of ``n`` make_case images predicted by its ensemble."""
    mpath = tmp_path / "w" / "manifest.yaml"
    mpath.parent.mkdir()
    (mpath.parent / "m.pth").write_bytes(b"not really a model")
    write_manifest(manifest_with(th), mpath)
    manifest = load_manifest(mpath, verify=False)
    rng = np.random.default_rng(5)
    cache = tmp_path / "cache"
    cache.mkdir()
    truth = {}
    for i in range(n):
        img, ann = make_case(rng, f"im{i}", fingerprint=cache_fingerprint(manifest), **case)
        save_cached(cache / f"{img.id}.npz", img)
        truth[img.id] = ann
    return mpath, manifest, cache, truth


@pytest.mark.slow
def test_tune_improves_bad_defaults_and_writes_new_manifest_version(tmp_path):
    mpath, manifest, cache, truth = make_tuning_case(tmp_path)
    res = tune(cache, truth, manifest, folds=3, progress=False)
    r = res.classes["cort"]
    assert r.images == 6
    assert r.tuned_score > r.default_score + 0.2
    # removes the spurious detections (scores < 0.3) but keeps the cells (scores >= 0.7)
    assert 0.3 - 1e-6 <= r.tuned.score <= 0.7 and r.tuned.min_pixels > 0 and r.tuned.nms_iou < 0.9
    assert r.out_of_fold_score <= r.tuned_score + 1e-12
    assert "cort" in report_table(res)
    pngs = plot_curves(res, tmp_path / "plots")
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    decision = decide(res)
    assert decision.write and decision.changed == ["cort"] and decision.classes["cort"] == r.tuned
    assert decision.reasons["cort"].startswith("changed (score 0.05 -> ")
    new, old = write_tuned_manifest(mpath, manifest, decision.classes)
    assert old.name == "manifest.v1.yaml"
    assert yaml.safe_load(old.read_text())["classes"]["cort"]["min_pixels"] == 0
    written = load_manifest(new, verify=False).classes["cort"]
    assert written == r.tuned
    # a second tuning keeps both earlier versions
    _, old2 = write_tuned_manifest(mpath, load_manifest(mpath, verify=False), decision.classes)
    assert old2.name == "manifest.v2.yaml" and old.exists()


def test_choose_moves_a_value_only_when_it_scores_higher():
    tables = np.array([[[0.5, 0.5], [0.2, 0.1]], [[0.3, 0.3], [0.2, 0.1]]])  # (images, 2, 2): a tie at row 0
    assert choose(tables) == (0, 0)
    assert choose(tables, prefer=(0, 1)) == (0, 1)  # the current value wins the tie
    assert choose(tables, prefer=(1, 1)) == (0, 0)  # a strictly better value still wins


def test_cli_tune_writes_only_what_beats_the_current_thresholds_out_of_fold(tmp_path, capsys):
    """First run: bad thresholds, the tuned ones win out-of-fold -> written, saying what changed.
    Second run on the same cache: the thresholds just written are current and nothing beats them by
    the margin -> the manifest stays byte for byte, and the report says why."""
    mpath, _, cache, _ = make_tuning_case(tmp_path)
    truth_csv = tmp_path / "train.csv"
    write_truth_csv(truth_csv, tmp_path)
    args = ["tune", "--cache", str(cache), "--truth", str(truth_csv), "--weights", str(mpath), "--folds", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "cort: changed (score 0.05 -> " in out and "out-of-fold" in out
    assert "wrote cort thresholds to" in out and (mpath.parent / "manifest.v1.yaml").exists()
    tuned = mpath.read_bytes()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "cort: kept" in out and "is left as it is" in out
    assert mpath.read_bytes() == tuned and not (mpath.parent / "manifest.v2.yaml").exists()


def write_truth_csv(path, tmp_path):
    """train.csv for the make_tuning_case images (same rng sequence: the truth disks only)."""
    rng = np.random.default_rng(5)
    rows = []
    for i in range(6):
        _, ann = make_case(rng, f"im{i}")
        rows += train_rows(ann.id, ann.cell_type, [m.to_full(H, W) for m in ann.instances], sample_id=f"sim{i}")
    write_train_csv(path, rows)


def test_one_sample_group_has_no_out_of_fold_figure(tmp_path):
    mpath, manifest, cache, truth = make_tuning_case(tmp_path, sample_id="one-sample")
    res = tune(cache, truth, manifest, folds=3, progress=False)
    r = res.classes["cort"]
    assert r.groups == 1 and r.out_of_fold_score is None and res.out_of_fold_score is None
    assert r.tuned_score > r.default_score  # tuning found an in-sample gain ...
    decision = decide(res)
    assert not decision.write and "no out-of-fold figure" in decision.reasons["cort"]  # ... that nothing checks
    text = report(res, decision)
    assert "n/a" in text and "one sample group" in text
    assert decide(res, force=True).write


def test_rows_are_grouped_by_true_type_and_the_vote_is_reported(tmp_path):
    mpath, manifest, cache, truth = make_tuning_case(tmp_path)
    for image_id in ("im1", "im4"):  # two cort images the ensemble voted shsy5y
        img = load_cached(cache / f"{image_id}.npz")
        save_cached(cache / f"{image_id}.npz", dataclasses.replace(img, cell_type="shsy5y"))
    res = tune(cache, truth, manifest, folds=3, progress=False)
    assert list(res.classes) == ["cort"] and res.classes["cort"].images == 6
    assert res.vote_right == 4 and sorted(res.classes["cort"].misvoted) == ["im1", "im4"]
    assert "4/6 image(s) voted their true type" in report(res, decide(res))


def test_a_threshold_at_the_edge_of_its_grid_is_warned_about(tmp_path):
    mpath, manifest, cache, truth = make_tuning_case(tmp_path)
    # the 5-pixel fragments go at min_pixels 10; 10 is the largest value tried and beats 0
    edge = tune(cache, truth, manifest, grid=TuneGrid(min_pixels=[0, 10]), progress=False)
    assert edge.classes["cort"].tuned.min_pixels == 10
    assert any(
        "cort min_pixels = 10 is the largest value tried" in w and "--min-pixels 0,10,20,30" in w
        for w in grid_edge_warnings(edge)
    )
    inner = tune(cache, truth, manifest, grid=TuneGrid(min_pixels=[0, 10, 40]), progress=False)
    assert inner.classes["cort"].tuned.min_pixels == 10
    assert not [w for w in grid_edge_warnings(inner) if "min_pixels" in w]
    # the grid extended past the edge: the two values beyond it, other thresholds as they were
    grid = TuneGrid(min_pixels=[0, 10])
    bigger = extended_grid(grid, grid_edges(edge))
    assert bigger is not None and bigger.min_pixels == [0, 10, 20, 30] and bigger.score == grid.score
    assert extended_grid(bigger, grid_edges(edge)) is None  # nothing new to add: the rounds stop


def test_cli_tune_extend_grid_searches_past_the_edge(tmp_path, capsys):
    """``--extend-grid N`` re-tunes with the values past an edge instead of only warning about it."""
    mpath, _, cache, _ = make_tuning_case(tmp_path)
    truth_csv = tmp_path / "train.csv"
    write_truth_csv(truth_csv, tmp_path)
    args = ["tune", "--cache", str(cache), "--truth", str(truth_csv), "--weights", str(mpath), "--no-write"]
    assert main([*args, "--min-pixels", "0,10"]) == 0
    out = capsys.readouterr().out
    assert "cort min_pixels = 10 is the largest value tried" in out and "extending the grid" not in out
    assert main([*args, "--min-pixels", "0,10", "--extend-grid", "3"]) == 0
    out = capsys.readouterr().out
    assert "extending the grid: cort min_pixels past 10" in out
    assert "min_pixels = 10 is the largest value tried" not in out  # 10 now has 20 and 30 beyond it
    with pytest.raises(SystemExit) as bad:
        main([*args, "--extend-grid", "-1"])
    assert bad.value.code == 2 and "--extend-grid: must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        main([*args, "--extend-grid", "two"])
    assert bad.value.code == 2 and "--extend-grid: expected an integer" in capsys.readouterr().err


# ------------------------------------------------------------------- predict-raw: one ensemble per cache


def tiny_train_folder(root, n=3):
    """``n`` 64 x 80 cort images with three bright disks each (train/ + train.csv)."""
    (root / "train").mkdir(parents=True)
    rows, ids = [], []
    for i in range(n):
        image_id = f"{i:012x}"
        masks = [disk(15 + 15 * k, 15 + 20 * k, 5, 64, 80) for k in range(3)]
        image = np.full((64, 80), 90, np.uint8)
        for m in masks:
            image[m] = 200
        write_gray(root / "train" / f"{image_id}.png", image)
        rows += train_rows(image_id, "cort", masks, sample_id=f"cort[x]_s{i}")
        ids.append(image_id)
    write_train_csv(root / "train.csv", rows)
    return root, ids


@pytest.mark.slow
def test_a_cache_holds_one_ensemble_even_after_a_kill(tmp_path, monkeypatch, capsys):
    data, ids = tiny_train_folder(tmp_path / "data")
    a = make_manifest(tmp_path / "a", n_models=1, tta=("identity", "hflip"))
    b = make_manifest(tmp_path / "b", n_models=1, tta=("identity",))
    cache = tmp_path / "cache"

    def killed(path, img):
        raise KeyboardInterrupt  # the run dies while writing its first image

    monkeypatch.setattr(raw_cache, "save_cached", killed)
    with pytest.raises(KeyboardInterrupt):
        predict_raw(data, a, cache, ids, device="cpu", progress=False)
    monkeypatch.undo()
    index = json.loads((cache / "index.json").read_text())  # written before the first image
    assert index["fingerprint"] == cache_fingerprint(load_manifest(a)) and index["ids"] == []

    # another manifest is refused by predict-raw (one line, nothing added) ...
    base = ["--data", str(data), "--out", str(cache), "--device", "cpu"]
    assert main(["predict-raw", *base, "--weights", str(b)]) == 2
    err = capsys.readouterr().err
    assert "another manifest" in err and len(err.strip().splitlines()) == 1
    assert not list(cache.glob("*.npz"))
    predict_raw(data, a, cache, ids[:1], device="cpu", progress=False)  # one image of A cached
    first = (cache / f"{ids[0]}.npz").stat().st_mtime_ns
    # ... and by tune --weights
    tune_args = ["tune", "--cache", str(cache), "--truth", str(data / "train.csv"), "--no-write"]
    assert main([*tune_args, "--weights", str(b)]) == 2
    err = capsys.readouterr().err
    assert "another ensemble" in err and len(err.strip().splitlines()) == 1

    # the same manifest resumes; progress counts only the 2 images still to do (stderr is no terminal here)
    assert main(["predict-raw", *base, "--weights", str(a)]) == 0
    out = capsys.readouterr()
    assert "predict-raw: 2/2 img" in out.err and "/3 img" not in out.err
    assert "1 were already cached, 2 predicted now" in out.out
    assert sorted(p.stem for p in cache.glob("*.npz")) == ids
    assert (cache / f"{ids[0]}.npz").stat().st_mtime_ns == first
    assert main([*tune_args, "--weights", str(a)]) == 0


@pytest.mark.parametrize(
    "grid, words",
    [
        ({"score": [0.5, 1.5]}, r"--score: 1.5 is out of range \(allowed: \[0, 1\]\)"),
        ({"nms_iou": [0.0]}, r"--nms-iou: 0.0 is out of range \(allowed: \(0, 1\]\)"),
        ({"min_pixels": [-2]}, r"--min-pixels: -2 is out of range"),
        ({"mask_threshold": [float("nan")]}, r"--mask-threshold: nan is not allowed"),
        ({"score": []}, r"--score: no candidate value given"),
    ],
)
def test_a_grid_can_only_hold_values_a_manifest_may_hold(grid, words):
    from cellseg.errors import CellsegError
    from cellseg.tuning.tune import TuneGrid

    with pytest.raises(CellsegError, match=words):
        TuneGrid(**grid).check()
    TuneGrid().check()  # the defaults are inside every range
