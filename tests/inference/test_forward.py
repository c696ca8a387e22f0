"""Raw prediction (crop pasting, flip TTA) and the predict-a-folder pipeline, on real tiny models."""

import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from cellseg.data.masks import label_image
from cellseg.errors import CellsegError
from cellseg.inference.forward import load_ensemble, paste_soft, predict_views
from cellseg.inference.pipeline import predict_image
from cellseg.inference.runner import parse_duration, plan_within_budget, predict_folder
from cellseg.metric import iou_matrix
from cellseg.model.manifest import FusionConfig, load_manifest
from cellseg.submission import read_submission, validate_submission
from inference_helpers import blob_image, make_competition, make_manifest

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    path = make_manifest(tmp_path_factory.mktemp("weights"), n_models=1, detections_per_view=40)
    m = load_manifest(path)
    return path, m, load_ensemble(m, CPU)


def _smooth_masks(n):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    shapes = [(1, 1), (0.7, 1.2), (1.1, 0.6)]
    return torch.stack(
        [torch.sigmoid(6 * (0.6 - (yy / a) ** 2 - (xx / b) ** 2 + 0.3 * xx * yy)) for a, b in (shapes * n)[:n]]
    )


def _random_boxes(n, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 70 - 5  # some boxes cross the image border
    return torch.cat([xy, xy + lo + torch.rand(n, 2, generator=g) * (hi - lo)], 1)


def test_paste_soft_samples_each_mask_on_its_box():
    """Reference: scipy map_coordinates (bilinear, zero outside) of the 28x28 grid stretched over the box."""
    from scipy.ndimage import map_coordinates

    masks, boxes = _smooth_masks(20), _random_boxes(20, 3, 40)
    crops = paste_soft(masks, boxes, 100, 120, bucket=6, shift=0.3)  # several size buckets
    for c, m, b in zip(crops, masks.numpy(), boxes.tolist()):
        x0, y0, x1, y1 = (v + 0.3 for v in b)  # the mask's frame: box shifted down-right
        assert c.top == max(int(np.floor(y0)) - 1, 0) and c.left == max(int(np.floor(x0)) - 1, 0)
        assert c.top + c.prob.shape[0] == min(int(np.ceil(y1)) + 1, 100)
        ys = (np.arange(c.prob.shape[0]) + c.top + 0.5 - y0) / (y1 - y0) * 28 - 0.5
        xs = (np.arange(c.prob.shape[1]) + c.left + 0.5 - x0) / (x1 - x0) * 28 - 0.5
        gy, gx = np.meshgrid(ys, xs, indexing="ij")
        ref = map_coordinates(m, [gy, gx], order=1, mode="grid-constant", cval=0.0)
        np.testing.assert_allclose(c.prob, ref, atol=1e-5)


def test_paste_soft_reproduces_torchvision_training_targets():
    """Real masks -> the 28x28 targets torchvision trains on -> paste_soft: the masks come back."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:100, :120]
    truth, boxes = [], []
    for _ in range(30):
        cy, cx, ry, rx = rng.uniform(20, 80), rng.uniform(20, 100), rng.uniform(4, 12), rng.uniform(4, 12)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        r, c = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        truth.append(m)
        boxes.append([c[0], r[0], c[-1] + 1, r[-1] + 1])
    boxes = torch.tensor(boxes, dtype=torch.float32)
    targets = project_masks_on_boxes(torch.tensor(np.stack(truth)), boxes, torch.arange(30), 28)

    def mean_iou(shift):
        ious = []
        for c, t in zip(paste_soft(targets, boxes, 100, 120, shift=shift), truth):
            full = np.zeros((100, 120), bool)
            full[c.top : c.top + c.prob.shape[0], c.left : c.left + c.prob.shape[1]] = c.prob >= 0.5
            ious.append((full & t).sum() / (full | t).sum())
        return float(np.mean(ious))

    assert mean_iou(FusionConfig().paste_shift) > 0.99
    assert mean_iou(0.0) < 0.95  # the unshifted paste loses IoU at these cell sizes


def test_model_returns_crops_not_full_masks(ensemble):
    _, m, loaded = ensemble
    raw = predict_views(loaded[:1], blob_image(1), ["identity", "hflip"], CPU)
    assert len(raw) == 2 and raw[0].masks.shape[1:] == (28, 28)
    assert raw[0].masks.shape[0] <= m.fusion.detections_per_view and raw[0].masks.shape[0] > 0


@pytest.mark.parametrize("flip", ["h", "v"])
def test_flipped_input_gives_flipped_output(ensemble, flip):
    _, m, loaded = ensemble
    img = blob_image(2)
    flipped = np.ascontiguousarray(img[:, ::-1] if flip == "h" else img[::-1])
    a = predict_image(img, loaded, m.tta, m, CPU)
    b = predict_image(flipped, loaded, m.tta, m, CPU)
    assert len(a.crops) > 10 and len(a.crops) == len(b.crops)
    la, _ = label_image(a.crops, *img.shape)
    lb, _ = label_image(b.crops, *img.shape)
    lb = lb[:, ::-1] if flip == "h" else lb[::-1]
    iou = iou_matrix(la, np.ascontiguousarray(lb))
    assert np.all(iou.max(axis=1) > 0.99)  # every instance has its mirror image
    np.testing.assert_allclose(np.sort(a.scores), np.sort(b.scores), rtol=1e-5)


def test_identity_view_alone_is_not_flip_equivariant(ensemble):
    """Control for the test above: without TTA a random model is not symmetric, so it can fail."""
    _, m, loaded = ensemble
    img = blob_image(2)
    a = predict_image(img, loaded, ["identity"], m, CPU)
    b = predict_image(np.ascontiguousarray(img[:, ::-1]), loaded, ["identity"], m, CPU)
    la, _ = label_image(a.crops, *img.shape)
    lb, _ = label_image(b.crops, *img.shape)
    iou = iou_matrix(la, np.ascontiguousarray(lb[:, ::-1]))
    assert not np.all(iou.max(axis=1) > 0.99)


def _odd_images(comp):
    test = comp / "test"
    ids = sorted(p.stem for p in test.glob("*.png"))
    rgb = np.stack([blob_image(5)] * 3, -1)
    Image.fromarray(rgb, "RGB").save(test / f"{ids[0]}.png")
    Image.fromarray(blob_image(6).astype(np.uint16) * 200).save(test / f"{ids[1]}.png")
    (test / f"{ids[2]}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(blob_image(7, 80, 100), "L").save(test / "00000000ffff.png")  # another size
    return ids


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory):
    return make_manifest(
        tmp_path_factory.mktemp("small"), n_models=1, tta=("identity", "hflip"), detections_per_view=30
    )


def test_predict_folder_handles_odd_images(small_manifest, tmp_path):
    path = small_manifest
    comp = make_competition(tmp_path / "comp", n_test=4)
    ids = _odd_images(comp)
    logs = []
    res = predict_folder(comp, path, tmp_path / "sub.csv", progress=False, log=logs.append)  # validates
    sub = read_submission(tmp_path / "sub.csv")
    assert set(sub) == set(ids) | {"00000000ffff"}
    assert list(res.failed) == [ids[2]] and sub[ids[2]] == []
    assert any(ids[2] in line and "empty row" in line for line in logs)
    for i in (ids[0], ids[1], ids[3], "00000000ffff"):
        assert len(sub[i]) > 0  # RGB and 16-bit converted, other size handled


def test_missing_test_folder_and_bad_manifest_stop_early(ensemble, tmp_path):
    path, _, _ = ensemble
    with pytest.raises(CellsegError, match="test folder not found"):
        predict_folder(tmp_path / "nowhere", path, tmp_path / "s.csv", progress=False)
    comp = make_competition(tmp_path / "comp", n_test=1)
    bad = tmp_path / "empty.yaml"
    bad.write_text("name: x\nmodels: []\n")
    with pytest.raises(CellsegError, match="no models listed"):
        predict_folder(comp, bad, tmp_path / "s.csv", progress=False)
    assert not (tmp_path / "s.csv").exists()


def test_plan_within_budget_drops_views_then_models():
    views = ["identity", "hflip", "vflip", "hvflip"]
    p = plan_within_budget(views, [0, 1, 2], [1.0, 0.5, 2.0], 1.0, images_left=10, seconds_left=1000)
    assert p.views == views and p.models == [0, 1, 2] and p.decisions == []
    p = plan_within_budget(views, [0, 1, 2], [1.0, 0.5, 2.0], 1.0, images_left=10, seconds_left=65)
    assert p.views == ["identity", "hflip"] and p.models == [0, 1, 2] and len(p.decisions) == 2
    assert "hvflip" in p.decisions[0] and "vflip" in p.decisions[1]
    p = plan_within_budget(views, [0, 1, 2], [1.0, 0.5, 2.0], 1.0, images_left=10, seconds_left=25)
    assert p.views == ["identity"] and p.models == [0, 2] and "model #1" in p.decisions[-1]
    p = plan_within_budget(views, [0, 1, 2], [1.0, 0.5, 2.0], 1.0, images_left=10, seconds_left=1)
    assert p.views == ["identity"] and p.models == [2]


def test_parse_duration():
    assert parse_duration("8h30m") == 30600 and parse_duration("90s") == 90 and parse_duration("2.5h") == 9000
    assert parse_duration("120") == 120 and parse_duration(None) is None
    with pytest.raises(CellsegError, match="not understood"):
        parse_duration("soon")


def test_time_budget_is_never_overrun(small_manifest, tmp_path):
    comp = make_competition(tmp_path / "comp", n_test=10)
    logs = []
    t0 = time.monotonic()
    res = predict_folder(
        comp,
        small_manifest,
        tmp_path / "sub.csv",
        time_budget=3.0,
        progress=False,
        log=lambda s: logs.append(s) or print(f"{time.monotonic() - t0:.2f}s {s}"),
    )
    took = time.monotonic() - t0
    assert took < 3.0 + 1.0  # the budget plus scheduling slack of this shared machine
    assert validate_submission(tmp_path / "sub.csv", comp / "test") == []
    assert res.decisions, "a 3 s budget for 10 images x 2 views must force decisions"
    assert all(line in logs for line in res.decisions)
    assert len(res.seconds) + len(res.skipped) == 10
    if res.seconds:
        assert res.views == ["identity"]  # the hflip view went first


def test_exhausted_budget_writes_all_empty_rows(small_manifest, tmp_path):
    comp = make_competition(tmp_path / "comp", n_test=2)
    res = predict_folder(
        comp, small_manifest, tmp_path / "sub.csv", time_budget=0.01, progress=False, log=lambda s: None
    )
    assert res.skipped == sorted(res.rows) and not res.seconds
    assert read_submission(tmp_path / "sub.csv") == {i: [] for i in res.rows}


def test_pipelined_run_matches_sequential(small_manifest, tmp_path):
    comp = make_competition(tmp_path / "comp", n_test=3)
    a = predict_folder(comp, small_manifest, tmp_path / "a.csv", progress=False, log=lambda s: None, pipeline=False)
    b = predict_folder(comp, small_manifest, tmp_path / "b.csv", progress=False, log=lambda s: None, pipeline=True)
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    assert a.cell_types == b.cell_types and len(b.seconds) == 3 and sum(map(len, b.rows.values())) > 0


def test_fp16_wrappers_keep_the_model_working(small_manifest):
    """The CUDA autocast wrappers around backbone / RPN head / box and mask heads pass every output
    type through (on CPU autocast('cuda') is inactive, so the detections must be identical)."""
    import warnings

    from cellseg.inference.forward import LoadedModel, label_map_for, prepare_model
    from cellseg.model.checkpoint import load_model

    m = load_manifest(small_manifest)
    path = m.checkpoint_path(m.models[0])
    plain = LoadedModel(prepare_model(load_model(path, CPU)[0], m.fusion, CPU, fp16=False), 1.0, label_map_for(None, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = LoadedModel(
            prepare_model(load_model(path, CPU)[0], m.fusion, CPU, fp16=True), 1.0, label_map_for(None, 4)
        )
        a = predict_views([plain], blob_image(3), ["identity"], CPU)[0]
        b = predict_views([wrapped], blob_image(3), ["identity"], CPU)[0]
    assert type(wrapped.model.backbone).__name__ == "_Autocast"
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.masks, b.masks) and len(a.scores) > 0
