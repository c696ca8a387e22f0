import numpy as np
import pytest
import yaml

from cellseg.data.masks import CropMask, label_image
from cellseg.data.truth import ImageAnnotation
from cellseg.inference.fusion import Detections, SoftCrop, fuse
from cellseg.inference.postprocess import postprocess
from cellseg.metric import image_score
from cellseg.model.manifest import ClassThresholds, Manifest, ModelEntry, load_manifest, write_manifest
from cellseg.tune import (
    CachedImage,
    TuneGrid,
    image_grid_scores,
    load_cached,
    plot_curves,
    report_table,
    save_cached,
    tune,
    write_tuned_manifest,
)

H, W = 60, 80


def disk(cy, cx, r, h=H, w=W):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def make_case(rng, image_id, cell_type="cort", n=6):
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
    ann = ImageAnnotation(image_id, cell_type, H, W, truth, meta={"sample_id": f"s{image_id}"})
    return CachedImage(image_id, cell_type, H, W, 2.0, d), ann


def manifest_with(th: ClassThresholds) -> Manifest:
    return Manifest(
        name="t",
        models=[ModelEntry("m.pth")],
        tta=["identity", "hflip"],
        classes={"shsy5y": th, "astro": th, "cort": th},
    )


def test_cache_round_trip(tmp_path):
    img, _ = make_case(np.random.default_rng(0), "a")
    save_cached(tmp_path / "a.npz", img)
    back = load_cached(tmp_path / "a.npz")
    assert (back.id, back.cell_type, back.height, back.width, back.total_weight) == ("a", "cort", H, W, 2.0)
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
        fused = fuse(
            img.dets,
            H,
            W,
            th.nms_iou,
            m.fusion.iou_type,
            th.mask_threshold,
            m.fusion.average_masks,
            m.fusion.score_mode,
            total_weight=img.total_weight,
        )
        crops, _ = postprocess(fused, th, m.postprocess, H, W)
        pred, _ = label_image(crops, H, W)
        expected = image_score(gt, pred, len(ann.instances), len(crops))
        assert table[idx] == pytest.approx(expected), (idx, th)


def test_tune_improves_bad_defaults_and_writes_new_manifest_version(tmp_path):
    rng = np.random.default_rng(5)
    cache = tmp_path / "cache"
    cache.mkdir()
    truth = {}
    for i in range(6):
        img, ann = make_case(rng, f"im{i}")
        save_cached(cache / f"{img.id}.npz", img)
        truth[img.id] = ann
    bad = ClassThresholds(score=0.05, mask_threshold=0.5, nms_iou=0.9, min_pixels=0)
    mpath = tmp_path / "w" / "manifest.yaml"
    mpath.parent.mkdir()
    (mpath.parent / "m.pth").write_bytes(b"not really a model")
    write_manifest(manifest_with(bad), mpath)
    manifest = load_manifest(mpath, verify=False)
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
    new, old = write_tuned_manifest(mpath, manifest, res)
    assert old.name == "manifest.v1.yaml"
    assert yaml.safe_load(old.read_text())["classes"]["cort"]["min_pixels"] == 0
    written = load_manifest(new, verify=False).classes["cort"]
    assert written == r.tuned
    # a second tuning keeps both earlier versions
    _, old2 = write_tuned_manifest(mpath, load_manifest(mpath, verify=False), res)
    assert old2.name == "manifest.v2.yaml" and old.exists()
