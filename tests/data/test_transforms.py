"""Augmentation: geometric ops keep image, masks and boxes consistent; degenerate instances are
dropped; copy-paste occlusion semantics on hand-built masks; AugmentConfig loads from YAML."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cellseg.config.loader import load_yaml
from cellseg.data.copy_paste import copy_paste
from cellseg.data.geometric import RandomFlipRot90, RandomScaleCrop, TightBoxes, rot90
from cellseg.data.mask_stack import resized_crop_masks, tight_boxes_near
from cellseg.data.transforms import AugmentConfig, build_transform
from cellseg.errors import CellsegError

H, W = 36, 50


def ref_boxes(masks: np.ndarray) -> np.ndarray:
    """Brute-force tight boxes (exclusive max corner) of non-empty masks."""
    out = []
    for m in masks:
        r, c = np.nonzero(m)
        out.append([c.min(), r.min(), c.max() + 1, r.max() + 1])
    return np.array(out, dtype=np.float32).reshape(-1, 4)


def random_masks(rng: np.random.Generator, n: int, h: int = H, w: int = W) -> np.ndarray:
    """n asymmetric blobs (an L shape plus random pixels) at random places, (n, h, w) bool."""
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 10)
        a, b = rng.integers(2, 8), rng.integers(2, 10)
        masks[i, y : y + a, x] = True
        masks[i, y + a - 1, x : x + b] = True
        masks[i, y : y + a, x : x + b] |= rng.random((a, b)) < 0.4
    return masks


def sample(masks: np.ndarray, labels=None):
    """(image, target): the image is the label image (pixel = 10 * (instance + 1)) so it can be
    checked against the masks after geometric ops."""
    n, h, w = masks.shape
    image = np.zeros((1, h, w), dtype=np.uint8)
    for i, m in enumerate(masks):
        image[0][m] = 10 * (i + 1)
    labels = torch.arange(1, n + 1) if labels is None else torch.as_tensor(labels)
    return tv_tensors.Image(torch.from_numpy(image)), {
        "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(ref_boxes(masks)), format="XYXY", canvas_size=(h, w)),
        "labels": labels,
        "masks": tv_tensors.Mask(torch.from_numpy(masks.astype(np.uint8))),
        "image_id": "img",
    }


def arr(t) -> np.ndarray:
    return t.as_subclass(torch.Tensor).numpy()


@pytest.fixture
def masks() -> np.ndarray:
    """7 non-overlapping instances (taken from a painted label image), so the image is exact."""
    m = random_masks(np.random.default_rng(0), 7)
    lab = np.zeros((H, W), dtype=int)
    for i, mi in enumerate(m):
        lab[mi] = i + 1
    out = np.stack([lab == i + 1 for i in range(7)])
    return out[out.reshape(7, -1).any(1)]


# ------------------------------------------------------------------ boxes


def test_windowed_boxes_match_brute_force():
    rng = np.random.default_rng(1)
    m = random_masks(rng, 20)
    m[3] = False  # an empty mask
    want = ref_boxes(m[[i for i in range(20) if i != 3]])
    # hints that are right, shifted, and plain wrong (full scan fallback); (0, 0, 0, 0) for the empty mask
    hints = np.insert(want, 3, 0, axis=0)
    hints[:5] += 2
    hints[5:8] = [0, 0, 1, 1]
    boxes, area = tight_boxes_near(m, hints)
    assert np.array_equal(np.delete(boxes, 3, axis=0), want)
    assert np.array_equal(area, m.reshape(20, -1).sum(1)) and not boxes[3].any()


# ------------------------------------------------------------------ geometric ops


@pytest.mark.parametrize(
    "op, ref",
    [
        (v2.RandomHorizontalFlip(p=1.0), lambda a: a[..., ::-1]),
        (v2.RandomVerticalFlip(p=1.0), lambda a: a[..., ::-1, :]),
    ],
    ids=["hflip", "vflip"],
)
def test_flips_map_image_masks_and_boxes_together(masks, op, ref):
    image, target = sample(masks)
    out_img, out = op(image, target)
    assert np.array_equal(arr(out["masks"]), ref(masks).astype(np.uint8))
    assert np.array_equal(arr(out_img), ref(arr(image)))
    assert np.array_equal(arr(out["boxes"]), ref_boxes(ref(masks)))  # boxes moved by the op itself stay tight


@pytest.mark.parametrize("k", [1, 3])
def test_rot90_maps_image_masks_and_boxes_together(masks, k):
    image, target = sample(masks)
    out_img, out = rot90(image, k), {key: rot90(v, k) for key, v in target.items()}
    want = np.rot90(masks, k, axes=(1, 2))
    assert out["masks"].shape == (len(masks), W, H) and out["boxes"].canvas_size == (W, H)
    assert np.array_equal(arr(out["masks"]), want.astype(np.uint8))
    assert np.array_equal(arr(out_img)[0], np.rot90(arr(image)[0], k))
    assert np.array_equal(arr(out["boxes"]), ref_boxes(want))
    assert torch.equal(out["labels"], target["labels"])


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("h, v", [(False, False), (True, False), (False, True), (True, True)])
def test_fused_flip_rot90_moves_masks_box_by_box_like_whole_frame_ops(masks, h, v, k):
    def ref(a):  # whole-array numpy reference: hflip, then vflip, then rot90
        a = a[..., ::-1] if h else a
        a = a[..., ::-1, :] if v else a
        return np.rot90(a, k, axes=(-2, -1))

    op = RandomFlipRot90()
    op.make_params = lambda flat: {"h": h, "v": v, "k": k}
    image, target = sample(masks)
    target["label_image"] = tv_tensors.Mask(image[0].clone())  # moved by the whole-frame kernels
    out_img, out = TightBoxes()(op(image, target))
    want = ref(masks)
    assert np.array_equal(arr(out["masks"]), want.astype(np.uint8))
    assert np.array_equal(arr(out_img), ref(arr(image)))
    assert np.array_equal(arr(out["label_image"]), ref(arr(image)[0]))
    assert np.array_equal(arr(out["boxes"]), ref_boxes(want)) and out["boxes"].canvas_size == want.shape[-2:]
    assert torch.equal(out["labels"], target["labels"])


def test_fused_flip_rot90_draws_like_three_independent_ops():
    op = RandomFlipRot90(hflip=0.5, vflip=0.25, rot90=0.5)
    torch.manual_seed(0)
    draws = [op.make_params([]) for _ in range(4000)]
    assert abs(np.mean([d["h"] for d in draws]) - 0.5) < 0.04
    assert abs(np.mean([d["v"] for d in draws]) - 0.25) < 0.04
    ks = np.array([d["k"] for d in draws])
    assert abs((ks == 0).mean() - 0.5) < 0.04 and abs((ks == 1).mean() - 0.25) < 0.04


def test_rot90_draws_both_directions_and_identity():
    rot = RandomFlipRot90(hflip=0.0, vflip=0.0, rot90=0.5)
    torch.manual_seed(0)
    draws = [rot.make_params([]) for _ in range(200)]
    assert {d["k"] for d in draws} == {0, 1, 3}
    assert not any(d["h"] or d["v"] for d in draws)


def test_full_geometric_pipeline_keeps_boxes_tight_and_labels_aligned(masks):
    cfg = AugmentConfig(
        hflip=0.5,
        vflip=0.5,
        rot90=0.5,
        scale_range=(0.7, 1.6),
        crop_size=(30, 30),
        brightness=(1, 1),
        contrast=(1, 1),
        min_area=3,
    )
    t = build_transform(cfg)
    lab = np.zeros((H, W), dtype=np.uint8)
    for i, mi in enumerate(masks):
        lab[mi] = i + 1
    torch.manual_seed(0)
    seen_drop = 0
    shapes = set()
    for _ in range(40):
        image, target = sample(masks)
        # the label image rides along as a plain tv_tensors.Mask through torchvision's own kernels
        target["label_image"] = tv_tensors.Mask(torch.from_numpy(lab))
        img, out = t(image, target)
        m = arr(out["masks"]).astype(bool)
        assert out["masks"].dtype == torch.uint8 and img.dtype == torch.float32
        assert img.shape[-2:] == m.shape[-2:] == out["label_image"].shape
        assert len(m) == len(out["labels"]) == len(out["boxes"])
        assert np.array_equal(arr(out["boxes"]), ref_boxes(m))
        assert (m.reshape(len(m), -1).sum(1) >= cfg.min_area).all()
        ref = arr(out["label_image"])
        for mi, label in zip(m, out["labels"].tolist()):  # each mask is its own instance, moved exactly
            assert np.array_equal(mi, ref == label)
        seen_drop += len(m) < len(masks)
        shapes.add(tuple(m.shape[-2:]))
    assert seen_drop and len(shapes) > 1


def test_scale_crop_drops_instances_outside_and_under_min_area():
    m = np.zeros((4, 40, 60), dtype=bool)
    m[0, 2:8, 2:8] = True  # inside the window
    m[1, 30:38, 50:58] = True  # outside the window
    m[2, 18:21, 24:30] = True  # only its top row (6 px) inside: under min_area 10
    m[3, 10:25, 20:22] = True  # 2 x 8 = 16 px inside: kept, box clipped to the window
    crop = RandomScaleCrop(crop_size=(18, 30))  # scale 1: a pure crop
    torch.manual_seed(0)
    params = crop.make_params([tv_tensors.Image(torch.zeros(1, 40, 60, dtype=torch.uint8))])
    assert (params["height"], params["width"]) == (18, 30)
    pipe = v2.Compose([crop, build_transform(AugmentConfig(enabled=False, min_area=10))])
    for seed in range(30):
        torch.manual_seed(seed)
        p = crop.make_params([tv_tensors.Image(torch.zeros(1, 40, 60, dtype=torch.uint8))])
        torch.manual_seed(seed)
        _, out = pipe(*sample(m))  # noqa: F841 (the image is checked below through `_`)
        win = m[:, p["top"] : p["top"] + 18, p["left"] : p["left"] + 30]
        keep = win.reshape(4, -1).sum(1) >= 10
        assert out["labels"].tolist() == (np.flatnonzero(keep) + 1).tolist()
        assert np.array_equal(arr(out["masks"]).astype(bool), win[keep])
        assert np.array_equal(arr(out["boxes"]), ref_boxes(win[keep]))
        img = arr(sample(m)[0])[0, p["top"] : p["top"] + 18, p["left"] : p["left"] + 30]
        assert np.array_equal(np.rint(arr(_) * 255)[0], img)


def test_box_wise_mask_resize_equals_torchvision_resize():
    m = random_masks(np.random.default_rng(3), 12, 40, 60)
    boxes = ref_boxes(m)
    for (t, l, h, w), size in [((3, 5, 30, 41), (47, 66)), ((0, 0, 40, 60), (27, 31)), ((10, 2, 17, 50), (17, 50))]:
        got = resized_crop_masks(m, boxes, t, l, h, w, size)
        want = F.resized_crop(tv_tensors.Mask(torch.from_numpy(m.astype(np.uint8))), t, l, h, w, list(size))
        assert np.array_equal(got, arr(want))


def test_zero_instances_and_everything_cropped_away():
    empty = np.zeros((0, H, W), dtype=bool)
    image, target = sample(empty)
    cfg = AugmentConfig(
        hflip=1, vflip=1, rot90=1, short_sides=(50,), crop_size=(20, 20), noise_sigma=0.1, gamma=(0.5, 2)
    )
    img, out = build_transform(cfg)(image, target)
    assert img.shape == (1, 20, 20) and out["masks"].shape == (0, 20, 20) and out["boxes"].shape == (0, 4)
    assert out["labels"].shape == (0,)
    one = np.zeros((1, H, W), dtype=bool)
    one[0, 0, 0] = True  # a 1-pixel cell: dropped under min_area
    _, out = build_transform(AugmentConfig(min_area=2))(*sample(one))
    assert len(out["masks"]) == len(out["boxes"]) == len(out["labels"]) == 0


def test_photometric_ops_stay_in_range_and_off_means_exact():
    rng = np.random.default_rng(0)
    image = tv_tensors.Image(torch.from_numpy(rng.integers(0, 256, (1, H, W), dtype=np.uint8)))
    _, target = sample(np.zeros((0, H, W), dtype=bool))
    cfg = AugmentConfig(
        hflip=0,
        vflip=0,
        rot90=0,
        brightness=(0.5, 1.5),
        contrast=(0.5, 1.5),
        gamma=(0.5, 2.0),
        noise_sigma=0.2,
        noise_p=1.0,
    )
    torch.manual_seed(0)
    img, _ = build_transform(cfg)(image, target)
    assert img.dtype == torch.float32 and 0 <= float(img.min()) and float(img.max()) <= 1
    assert not torch.allclose(img, image.float() / 255)
    img, _ = build_transform(AugmentConfig(enabled=False))(image, target)
    assert torch.allclose(img, image.float() / 255, atol=1e-6)


# ------------------------------------------------------------------ copy-paste


def _cp_case():
    """Target: A (4x4 at 2,2), B (2x2 at 10,10), C (3x3 at 1,14); source cell P covers B and the
    right half of A; source cell Q is far away."""
    h, w = 20, 20
    masks = np.zeros((3, h, w), dtype=bool)
    masks[0, 2:6, 2:6] = True
    masks[1, 10:12, 10:12] = True
    masks[2, 1:4, 14:17] = True
    src = np.zeros((1, h, w), dtype=bool)
    src[0, 2:13, 4:13] = True  # covers A's columns 4-5 and all of B
    image = np.full((h, w), 50, dtype=np.uint8)
    src_image = np.full((h, w), 200, dtype=np.uint8)
    return image, masks, np.array([1, 1, 1]), src_image, src, np.array([2])


def test_copy_paste_removes_covered_parts_and_drops_fully_covered():
    image, masks, labels, src_image, src, src_labels = _cp_case()
    before = (image.copy(), masks.copy())
    out_img, out_m, out_l = copy_paste(
        image, masks, labels, src_image, src, src_labels, np.random.default_rng(0), max_cells=5
    )
    assert np.array_equal(image, before[0]) and np.array_equal(masks, before[1])  # inputs untouched
    assert out_m.shape == (3, 20, 20) and out_l.tolist() == [1, 1, 2]  # A, C survive, then P
    a = np.zeros((20, 20), dtype=bool)
    a[2:6, 2:4] = True  # A minus P's pixels
    assert np.array_equal(out_m[0], a)
    assert np.array_equal(out_m[1], masks[2])  # C untouched
    assert np.array_equal(out_m[2], src[0])
    assert np.array_equal(out_img, np.where(src[0], 200, 50))
    assert not (out_m[:2] & out_m[2]).any()  # nothing left under the pasted cell


def test_copy_paste_min_area_drops_partly_covered_too():
    image, masks, labels, src_image, src, src_labels = _cp_case()
    _, out_m, out_l = copy_paste(
        image, masks, labels, src_image, src, src_labels, np.random.default_rng(0), 5, min_area=9
    )
    # A keeps 8 px (< 9) and goes; C (9 px) stays; P stays
    assert out_l.tolist() == [1, 2] and np.array_equal(out_m[0], masks[2])


def test_copy_paste_chooses_between_one_and_max_cells_and_handles_no_source():
    rng = np.random.default_rng(0)
    src = random_masks(rng, 15)
    image = np.zeros((H, W), dtype=np.uint8)
    masks = np.zeros((0, H, W), dtype=bool)
    counts = set()
    for _ in range(60):
        _, m, lab = copy_paste(image, masks, np.zeros(0, int), image + 1, src, np.full(15, 3), rng, max_cells=4)
        counts.add(len(m))
        assert all(any(np.array_equal(x, s) for s in src) for x in m) and (lab == 3).all()
    assert counts == {1, 2, 3, 4}
    out = copy_paste(image, masks, np.zeros(0, int), image, np.zeros((0, H, W), bool), np.zeros(0, int), rng, 4)
    assert out[1].shape == (0, H, W)
    # a source of another size is cropped/padded at the top-left
    big = np.zeros((2, H + 10, W + 10), dtype=bool)
    big[0, 1:4, 1:4] = True
    big[1, H + 2 :, W + 2 :] = True  # entirely outside the target frame: never pasted
    for _ in range(10):
        _, m, _ = copy_paste(
            image, masks, np.zeros(0, int), np.ones((H + 10, W + 10), np.uint8), big, np.ones(2, int), rng, 2
        )
        assert len(m) == 1 and m[0].sum() == 9


# ------------------------------------------------------------------ config


def test_augment_config_loads_from_yaml_with_typed_errors(tmp_path):
    p = tmp_path / "aug.yaml"
    p.write_text("hflip: 0.3\nshort_sides: [440, 520]\ncrop_size: [256, 320]\ncopy_paste_p: 1\n")
    cfg = load_yaml(AugmentConfig, p, ["gamma=[0.8, 1.25]"])
    assert cfg.hflip == 0.3 and cfg.short_sides == (440, 520) and cfg.crop_size == (256, 320)
    assert cfg.copy_paste_p == 1.0 and cfg.gamma == (0.8, 1.25) and cfg.vflip == AugmentConfig().vflip
    p.write_text("crop_size: 256\n")
    with pytest.raises(CellsegError, match="crop_size"):
        load_yaml(AugmentConfig, p)
