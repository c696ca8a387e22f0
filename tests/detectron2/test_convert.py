"""Detectron2 checkpoints in our pipeline without Detectron2 (cellseg.detectron2.config, .convert, .modeling,
``cellseg convert-detectron2``), checked against real Detectron2 v0.6 outputs stored in
tests/fixtures/detectron2 (see its README.md): a Mask R-CNN R50-FPN with deterministic weights
regenerated here by the fixture's own make_weights.py, run on a 260 x 352 grey image.

The converted model is built once per module (through the real converter, checkpoint file and
``load_model``); each test compares one stage of inference.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from cellseg.config.manifest import load_manifest
from cellseg.detectron2 import convert as d2
from cellseg.detectron2 import modeling as d2compat
from cellseg.errors import CellsegError
from cellseg.model.export import export_weights
from cellseg.model.provenance import summarize, synthetic_only

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "detectron2"
CLASSES = ["shsy5y", "astro", "cort"]


def _make_weights_module():
    spec = importlib.util.spec_from_file_location("d2_make_weights", FIXTURE / "make_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def d2_state() -> dict[str, torch.Tensor]:
    """The fixture's Detectron2 weights (seed 0), regenerated; nothing binary is committed."""
    return _make_weights_module().make_state_dict(0)


@pytest.fixture(scope="module")
def d2_weights(tmp_path_factory, d2_state) -> Path:
    path = tmp_path_factory.mktemp("d2w") / "model_final.pth"
    torch.save({"model": d2_state, "iteration": 0}, path)  # Detectron2's checkpoint layout
    return path


@pytest.fixture(scope="module")
def d2_cfg() -> dict:
    return d2.read_d2_config(FIXTURE / "config.yaml")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, d2_weights) -> Path:
    """weights/<name>/ written by the library converter: model.pth + manifest.yaml."""
    out = tmp_path_factory.mktemp("weights") / "d2_r50"
    d2.convert_checkpoint(d2_weights, FIXTURE / "config.yaml", out, CLASSES)
    return out


@pytest.fixture(scope="module")
def model(converted):
    """The converted model rebuilt from its checkpoint alone, as predict and the kernel do."""
    from cellseg.model.checkpoint import load_model

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    m, info = load_model(converted / "model.pth")
    assert info.class_names == CLASSES
    return m


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIXTURE / "expected.npz"))


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """(3, 260, 352) float32 in [0, 1], grey repeated: our models' input convention."""
    grey = np.array(Image.open(FIXTURE / "image.png"))
    assert grey.shape == (260, 352) and grey.dtype == np.uint8
    return torch.from_numpy(grey).float().div(255.0)[None].repeat(3, 1, 1)


@pytest.fixture(scope="module")
def features(model, image):
    with torch.no_grad():
        images, _ = model.transform([image])
        return images, model.backbone(images.tensors)


def _pasted_d2_masks() -> np.ndarray:
    data = json.loads((FIXTURE / "expected_masks.json").read_text())
    h, w = data["height"], data["width"]
    rles = [{"size": [h, w], "counts": c.encode()} for c in data["coco_rle_column_major"]]
    return np.stack([mask_utils.decode(r) for r in rles]).astype(bool)  # (N, H, W)


# ------------------------------------------------------------------------------ fidelity


@pytest.mark.slow
def test_padded_input_and_fpn_features_match_detectron2(features, expected):
    images, feats = features
    assert tuple(images.tensors.shape) == tuple(expected["padded_input_shape"])  # 260 -> 288: padding to 32
    assert images.image_sizes == [(260, 352)]  # MIN_SIZE_TEST 260: not resized
    diffs = {}
    for i, name in enumerate(["0", "1", "2", "3", "pool"]):
        ref = expected[f"features_p{i + 2}"].astype(np.float32)
        ours = feats[name][0].numpy()
        assert ours.shape == ref.shape
        diffs[f"p{i + 2}"] = float(np.abs(ours - ref).max())
    print("FPN max abs diff:", diffs)
    assert max(diffs.values()) <= 2e-2, diffs


def test_box_head_on_detectron2_proposals(model, features, expected):
    images, feats = features
    proposals = torch.from_numpy(expected["proposals"]).float()
    rh = model.roi_heads
    with torch.no_grad():
        logits, deltas = rh.box_predictor(rh.box_head(rh.box_roi_pool(feats, [proposals], images.image_sizes)))
    ref_logits, ref_deltas = expected["box_cls_logits"], expected["box_deltas"]
    k = ref_logits.shape[1] - 1
    # Detectron2 puts background last, torchvision first
    d_logits = np.abs(logits[:, [*range(1, k + 1), 0]].numpy() - ref_logits).max()
    d_deltas = np.abs(deltas[:, 4:].numpy() - ref_deltas).max()
    print(f"box head: logits {d_logits:.2e}, deltas {d_deltas:.2e}")
    assert d_logits <= 1e-3 and d_deltas <= 1e-3
    assert torch.all(deltas[:, :4] == 0)  # torchvision's background regression: zero rows


def test_mask_head_on_detectron2_boxes(model, features, expected):
    images, feats = features
    boxes = torch.from_numpy(expected["mask_boxes"]).float()
    rh = model.roi_heads
    with torch.no_grad():
        logits = rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(feats, [boxes], images.image_sizes)))
    diff = float(np.abs(logits[:, 1:].numpy() - expected["mask_logits"].astype(np.float32)).max())
    print(f"mask logits max abs diff {diff:.2e}")
    assert diff <= 2e-2
    assert torch.all(logits[:, 0] == 0)  # background channel: zero weights and bias


def test_rpn_proposals_match_detectron2(model, features, expected):
    images, feats = features
    with torch.no_grad():
        proposals, _ = model.rpn(images, feats)
    ref = torch.from_numpy(expected["proposals"][:300]).float()
    best = box_iou(ref, proposals[0]).max(dim=1).values
    matched = float((best >= 0.95).float().mean())
    print(
        f"RPN: {len(proposals[0])} proposals; top-300 Detectron2 matched at IoU>=0.95: {matched:.3f}, "
        f"min best IoU {float(best.min()):.4f}"
    )
    assert matched >= 0.95


def _match_detections(boxes, scores, labels, masks, expected, ref_masks):
    """For each Detectron2 detection with score >= 0.3: matched?, and mask IoU of the match."""
    ref_boxes = torch.from_numpy(expected["det_boxes"]).float()
    ref_scores = torch.from_numpy(expected["det_scores"]).float()
    ref_labels = torch.from_numpy(expected["det_classes"]).long() + 1  # ours: 0 = background
    iou = box_iou(ref_boxes, boxes)
    results = []
    for i in torch.nonzero(ref_scores >= 0.3)[:, 0].tolist():
        ok = (labels == ref_labels[i]) & (iou[i] >= 0.9) & ((scores - ref_scores[i]).abs() <= 0.02)
        if not bool(ok.any()):
            results.append((False, 0.0, float("inf")))
            continue
        j = int(torch.nonzero(ok)[:, 0][iou[i][ok].argmax()])
        a, b = ref_masks[i], masks[j]
        results.append((True, float((a & b).sum() / max((a | b).sum(), 1)), float((scores[j] - ref_scores[i]).abs())))
    return results


@pytest.mark.slow
def test_final_detections_and_masks_match_detectron2(model, image, expected):
    with torch.no_grad():
        out = model([image])[0]
    masks = out["masks"][:, 0].numpy() >= 0.5  # Detectron2 binarises its pasted masks at 0.5
    results = _match_detections(out["boxes"], out["scores"], out["labels"], masks, expected, _pasted_d2_masks())
    matched = np.mean([r[0] for r in results])
    ious = [r[1] for r in results if r[0]]
    print(
        f"detections >= 0.3: {len(results)}, matched {matched:.3f}, mask IoU min {min(ious):.4f}, "
        f"max |score diff| {max(r[2] for r in results if r[0]):.2e}"
    )
    assert len(results) > 0
    assert matched >= 0.9
    assert min(ious) >= 0.85


@pytest.mark.slow
def test_kernel_inference_path_matches_detectron2(converted, image, expected):
    """The converted manifest through the kernel's own loading, raw inference and crop pasting."""
    from cellseg.config.manifest import load_manifest
    from cellseg.inference.forward import load_ensemble, predict_views, raw_to_detections

    manifest = load_manifest(converted / "manifest.yaml")
    loaded = load_ensemble(manifest, torch.device("cpu"), fp16=False)
    for lm in loaded:  # the kernel loosens filtering to the fusion settings; use Detectron2's here
        lm.model.roi_heads.score_thresh, lm.model.roi_heads.nms_thresh = 0.05, 0.5
        lm.model.roi_heads.detections_per_img = 100
    grey = (image[0] * 255).round().to(torch.uint8).numpy()
    raw = predict_views(loaded, grey, ["identity"], torch.device("cpu"))
    assert [lm.paste_shift for lm in loaded] == [0.0]  # Detectron2 pastes masks unshifted
    dets = raw_to_detections(raw, loaded, 260, 352)
    full = np.zeros((len(dets.masks), 260, 352), dtype=bool)
    for n, c in enumerate(dets.masks):
        full[n, c.top : c.top + c.prob.shape[0], c.left : c.left + c.prob.shape[1]] = c.prob >= 0.5
    results = _match_detections(
        torch.from_numpy(dets.boxes),
        torch.from_numpy(dets.scores),
        torch.from_numpy(dets.labels),
        full,
        expected,
        _pasted_d2_masks(),
    )
    matched = np.mean([r[0] for r in results])
    ious = [r[1] for r in results if r[0]]
    print(f"kernel path: matched {matched:.3f}, mask IoU min {min(ious):.4f}")
    assert matched >= 0.9 and min(ious) >= 0.85


@pytest.mark.slow
def test_converted_manifest_records_a_detectron2_import_with_the_source_sha256(converted, d2_weights, tmp_path):
    digest = hashlib.sha256(d2_weights.read_bytes()).hexdigest()
    m = load_manifest(converted / "manifest.yaml")
    (p,) = [e.provenance for e in m.models]
    assert (p.origin, p.imported.path, p.imported.sha256) == ("detectron2 import", "model_final.pth", digest)
    assert summarize(m) == f"1 model: detectron2 import (sha256 {digest[:12]})" and not synthetic_only(m)
    # re-exported (e.g. to fp16), the model still says where it came from
    again = load_manifest(export_weights([converted / "model.pth"], tmp_path / "w").manifest)
    assert again.models[0].provenance == p


@pytest.mark.slow
def test_plain_torchvision_behaviour_does_not_match(d2_state, d2_cfg, features, expected):
    """Negative control: the same weights without the Detectron2 options (stride on the 3x3 conv,
    rounded anchors at torchvision's derived strides) miss the reference, so the tests above can fail."""
    from cellseg.config.experiment import ModelConfig
    from cellseg.model.build import build_model

    fields = d2.model_fields(d2_cfg, CLASSES)
    fields.update(stride_in_1x1=False, roi_aligned=False, detectron2_inference=False)
    plain = build_model(ModelConfig(**fields)).eval()
    plain.load_state_dict(d2.convert_state_dict(d2_state, d2.head_layout(d2_cfg), plain.state_dict()))
    images, _ = features
    with torch.no_grad():
        p2 = plain.backbone(images.tensors)["0"][0].numpy()
        tv_anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
        fmaps = [torch.zeros(1, 1, *f.shape[-2:]) for f in features[1].values()]
        rounded = tv_anchors(images, fmaps)[0]
    assert np.abs(p2 - expected["features_p2"].astype(np.float32)).max() > 0.5
    ours = d2compat.D2AnchorGenerator(
        ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5, [4, 8, 16, 32, 64]
    )(images, fmaps)[0]
    assert rounded.shape == ours.shape
    assert (rounded - ours).abs().max() > 1.0


# ------------------------------------------------------------------------------ building blocks


def test_anchor_generator_is_unrounded_size_major_at_fixed_strides():
    gen = d2compat.D2AnchorGenerator(((32, 64), (128, 256)), ((0.5, 2.0), (1.0, 2.0)), [8, 64])
    cell = gen.cell_anchors[0]
    w = (32 * 32 / 0.5) ** 0.5
    assert torch.allclose(cell[0], torch.tensor([-w / 2, -0.5 * w / 2, w / 2, 0.5 * w / 2]))  # 22.627, not 23
    assert torch.allclose(cell[1, 2] - cell[1, 0], torch.tensor((32 * 32 / 2.0) ** 0.5))  # size 32, ratio 2
    assert torch.allclose(cell[2, 2] - cell[2, 0], torch.tensor((64 * 64 / 0.5) ** 0.5))  # size-major
    images = ImageList(torch.zeros(1, 3, 288, 352), [(260, 352)])
    # 288 // 5 = 57 is what torchvision would derive for the coarse level; Detectron2 uses 64
    anchors = gen(images, [torch.zeros(1, 1, 36, 44), torch.zeros(1, 1, 5, 6)])[0]
    coarse = anchors[36 * 44 * 4 :].view(5, 6, 4, 4)
    assert torch.allclose(coarse[1, 0, 0] - coarse[0, 0, 0], torch.tensor([0.0, 64.0, 0.0, 64.0]))


def test_move_stride_to_1x1():
    from torchvision.models import resnet50

    body = resnet50(weights=None)
    assert d2compat.move_stride_to_1x1(body) == 3
    for layer in (body.layer2, body.layer3, body.layer4):
        assert layer[0].conv1.stride == (2, 2) and layer[0].conv2.stride == (1, 1)
    assert body.layer1[0].conv1.stride == (1, 1)
    assert body(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)  # still the same output grid


def test_pooler_level_assignment_is_detectron2s():
    pool = d2compat.D2ROIPooler(["0", "1", "2", "3"], [4, 8, 16, 32], 7, 0, True)
    boxes = torch.tensor([[0, 0, 111.9, 111.9], [0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 448, 448], [0, 0, 9, 9]])
    assert pool.assign_levels(boxes).tolist() == [0, 1, 2, 3, 0]  # p2, p3, p4, p5, p2


def test_d2_resize_rule():
    assert d2compat.d2_resized_shape(520, 704, 1040, 2000) == (1040, 1408)
    assert d2compat.d2_resized_shape(520, 704, 800, 1333) == (800, 1083)  # 1083.08 -> 1083
    assert d2compat.d2_resized_shape(260, 352, 0, 1333) == (260, 352)  # MIN_SIZE_TEST 0: no resize
    assert d2compat.d2_resized_shape(100, 1000, 800, 1333) == (133, 1333)  # long side capped


# ------------------------------------------------------------------------------ config and weights


def _with(cfg: dict, key: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value
    return cfg


@pytest.mark.parametrize(
    "key, value",
    [
        ("MODEL.META_ARCHITECTURE", "PanopticFPN"),
        ("MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True]),
        ("MODEL.ROI_HEADS.NAME", "CascadeROIHeads"),
        ("MODEL.RESNETS.NORM", "SyncBN"),
        ("MODEL.RESNETS.DEPTH", 152),
        ("MODEL.FPN.NORM", "GN"),
        ("MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIPool"),
        ("MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", "yes"),
        ("INPUT.FORMAT", "L"),
        ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[0.5], [1.0], [2.0], [1.0], [1.0]]),
        ("MODEL.MASK_ON", False),
    ],
)
def test_unsupported_config_is_refused_naming_key_and_value(d2_cfg, key, value):
    with pytest.raises(CellsegError) as err:
        d2.model_fields(_with(d2_cfg, key, value), CLASSES)
    msg = str(err.value)
    assert key in msg and repr(value) in msg and "\n" not in msg


def test_config_maps_to_model_fields(d2_cfg):
    f = d2.model_fields(d2_cfg, CLASSES)
    assert f["backbone"] == "resnet50" and f["num_classes"] == 4 and f["stride_in_1x1"] and f["roi_aligned"]
    # BGR 0-255 mean/std -> RGB [0, 1]: reversed and divided by 255
    assert np.allclose(f["image_mean"], [123.675 / 255, 116.28 / 255, 103.53 / 255])
    assert np.allclose(f["image_std"], [1 / 255] * 3)
    assert f["anchor_sizes"] == [[32], [64], [128], [256], [512]] and f["aspect_ratios"] == [0.5, 1.0, 2.0]
    assert (f["min_size"], f["max_size"], f["roi_sampling_ratio"], f["mask_roi_size"]) == (260, 1333, 0, 14)
    assert (f["box_head_dim"], f["mask_head_convs"]) == (1024, 4)
    assert (f["rpn_pre_nms_top_n_test"], f["rpn_post_nms_top_n_test"], f["box_detections_per_img"]) == (1000, 1000, 100)
    r101 = d2.model_fields(
        _with(_with(d2_cfg, "MODEL.RESNETS.DEPTH", 101), "MODEL.RESNETS.STRIDE_IN_1X1", False), CLASSES
    )
    assert r101["backbone"] == "resnet101" and not r101["stride_in_1x1"]
    with pytest.raises(CellsegError, match="2 class names"):
        d2.model_fields(d2_cfg, ["a", "b"])


@pytest.mark.slow
def test_r101_checkpoint_converts_and_runs(d2_state, d2_cfg):
    """ResNet-101: res4 has 23 blocks (Detectron2 res4.0-22 -> torchvision layer3.0-22)."""
    from cellseg.config.experiment import ModelConfig
    from cellseg.model.build import build_model

    state = dict(d2_state)
    for b in range(6, 23):
        for k, v in d2_state.items():
            if k.startswith("backbone.bottom_up.res4.5."):
                state[k.replace("res4.5.", f"res4.{b}.")] = v * 0.5
    cfg = _with(d2_cfg, "MODEL.RESNETS.DEPTH", 101)
    # small and cheap: no resize (MIN_SIZE_TEST 0), 50 proposals, 5 detections
    for key, value in (
        ("INPUT.MIN_SIZE_TEST", 0),
        ("MODEL.RPN.POST_NMS_TOPK_TEST", 50),
        ("TEST.DETECTIONS_PER_IMAGE", 5),
    ):
        cfg = _with(cfg, key, value)
    model = build_model(ModelConfig(**d2.model_fields(cfg, CLASSES))).eval()
    converted = d2.convert_state_dict(state, d2.head_layout(cfg), model.state_dict())
    model.load_state_dict(converted)
    assert torch.equal(model.backbone.body.layer3[22].conv2.weight, state["backbone.bottom_up.res4.22.conv2.weight"])
    assert model.backbone.body.layer3[0].conv1.stride == (2, 2)  # STRIDE_IN_1X1 also for R101
    with torch.no_grad():
        images, _ = model.transform([torch.rand(3, 70, 90)])
        out = model([torch.rand(3, 70, 90)])[0]
    assert images.image_sizes == [(70, 90)] and images.tensors.shape[-2:] == (96, 96)  # not resized, padded
    assert out["masks"].shape[-2:] == (70, 90) and len(out["boxes"]) <= 5


def test_bgr_and_rgb_descriptions_of_one_network_convert_identically(d2_state, d2_cfg, model):
    """The same network written as a BGR model and as an RGB model (first-conv input channels and
    pixel mean reversed) must give the same torchvision weights and normalisation."""
    target = model.state_dict()
    bgr = d2.convert_state_dict(d2_state, d2.head_layout(d2_cfg), target)
    rgb_state = dict(d2_state)
    stem = "backbone.bottom_up.stem.conv1.weight"
    rgb_state[stem] = d2_state[stem].flip(1)
    rgb_cfg = _with(_with(d2_cfg, "INPUT.FORMAT", "RGB"), "MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53])
    rgb = d2.convert_state_dict(rgb_state, d2.head_layout(rgb_cfg), target)
    assert all(torch.equal(bgr[k], rgb[k]) for k in bgr)
    assert d2.model_fields(rgb_cfg, CLASSES)["image_mean"] == d2.model_fields(d2_cfg, CLASSES)["image_mean"]
    assert not torch.equal(bgr[stem.replace("bottom_up.stem", "body")], d2_state[stem])


def test_class_agnostic_heads_are_repeated_per_class(d2_state, d2_cfg, model):
    state = dict(d2_state)
    for p in ("weight", "bias"):
        state[f"roi_heads.box_predictor.bbox_pred.{p}"] = d2_state[f"roi_heads.box_predictor.bbox_pred.{p}"][:4]
        state[f"roi_heads.mask_head.predictor.{p}"] = d2_state[f"roi_heads.mask_head.predictor.{p}"][:1]
    cfg = _with(
        _with(d2_cfg, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True), "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", True
    )
    out = d2.convert_state_dict(state, d2.head_layout(cfg), model.state_dict())
    reg = out["roi_heads.box_predictor.bbox_pred.weight"].view(4, 4, -1)
    assert all(torch.equal(reg[c], state["roi_heads.box_predictor.bbox_pred.weight"]) for c in range(4))
    mask = out["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert torch.all(mask[0] == 0) and all(
        torch.equal(mask[c], state["roi_heads.mask_head.predictor.weight"][0]) for c in (1, 2, 3)
    )
    # class-specific checkpoint with an agnostic config: refused, not silently wrong
    with pytest.raises(CellsegError, match="bbox_pred has 12 outputs"):
        d2.convert_state_dict(d2_state, d2.head_layout(cfg), model.state_dict())


@pytest.mark.slow
def test_bare_state_dict_accepted_and_foreign_keys_refused(tmp_path, d2_state, d2_cfg, model):
    bare = tmp_path / "bare.pth"
    torch.save(d2_state, bare)
    loaded = d2.load_d2_weights(bare)
    assert loaded.keys() == d2_state.keys()
    zoo = tmp_path / "model_zoo.pkl"  # Detectron2 model-zoo layout: a plain pickle of numpy arrays
    with open(zoo, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in d2_state.items()}, "__author__": "test"}, f)
    assert all(torch.equal(v, d2_state[k]) for k, v in d2.load_d2_weights(zoo).items())
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CellsegError, match="not a readable"):
        d2.load_d2_weights(junk)
    extra = dict(d2_state)
    extra["roi_heads.keypoint_head.conv_fcn1.weight"] = torch.zeros(1)
    with pytest.raises(CellsegError, match="keypoint_head.conv_fcn1.weight"):
        d2.convert_state_dict(extra, d2.head_layout(d2_cfg), model.state_dict())
    missing = {k: v for k, v in d2_state.items() if "res4.5.conv2.weight" not in k}
    with pytest.raises(CellsegError, match="layer3.5.conv2.weight"):
        d2.convert_state_dict(missing, d2.head_layout(d2_cfg), model.state_dict())


# ------------------------------------------------------------------------------ CLI


def _cellseg(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cellseg", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_cli_refuses_unsupported_config_in_one_line(tmp_path, d2_weights, d2_cfg, capsys):
    from cellseg.cli import main

    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(_with(d2_cfg, "MODEL.ROI_HEADS.NAME", "CascadeROIHeads")))
    rc = main(["convert-detectron2", str(d2_weights), "--config", str(cfg), "--out", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().count("\n") == 0 and "MODEL.ROI_HEADS.NAME = 'CascadeROIHeads'" in err
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_cli_converts_and_predict_runs_it_in_an_ensemble_with_our_model(tmp_path, d2_weights, d2_cfg):
    """``cellseg convert-detectron2 --half`` -> manifest; one of our own models added to the same
    ensemble; ``cellseg predict`` (the kernel's pipeline, a subprocess) writes a valid submission
    from both. The config asks
    for MIN_SIZE_TEST 64 (the 96 x 128 test images are downscaled) and 100 proposals per image to
    keep the CPU time small."""
    from cellseg.cli import main
    from cellseg.config.manifest import ModelEntry, load_manifest, write_manifest
    from cellseg.data.submission import read_submission, validate_submission
    from inference_helpers import make_checkpoint, make_competition

    out = tmp_path / "weights" / "d2_r50"
    config = tmp_path / "config.yaml"
    small = _with(_with(d2_cfg, "INPUT.MIN_SIZE_TEST", 64), "MODEL.RPN.POST_NMS_TOPK_TEST", 100)
    config.write_text(yaml.safe_dump(small))
    rc = main(
        [
            "convert-detectron2",
            str(d2_weights),
            "--config",
            str(config),
            "--out",
            str(out),
            "--classes",
            "shsy5y,astro,cort",
            "--half",
        ]
    )
    assert rc == 0
    manifest = load_manifest(out / "manifest.yaml")  # checksums verified
    assert [e.checkpoint for e in manifest.models] == ["model.pth"]
    make_checkpoint(out / "ours.pth")
    manifest.models.append(ModelEntry(checkpoint="ours.pth", weight=0.5))
    manifest.tta = ["identity", "hflip"]
    manifest.fusion.detections_per_view = 8  # the mask head (4 convs of 256 channels per box) dominates CPU time
    write_manifest(manifest, out / "manifest.yaml")
    from cellseg.inference.forward import load_ensemble

    # each model keeps its own mask paste shift in the mixed ensemble
    shifts = [lm.paste_shift for lm in load_ensemble(load_manifest(out / "manifest.yaml"), torch.device("cpu"))]
    assert shifts == [0.0, manifest.fusion.paste_shift] and manifest.fusion.paste_shift == 0.25

    comp = make_competition(tmp_path / "comp", n_test=2)
    sub = tmp_path / "submission.csv"
    r = _cellseg(
        "predict",
        "--data",
        str(comp),
        "--weights",
        str(out / "manifest.yaml"),
        "--out",
        str(sub),
        "--device",
        "cpu",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert validate_submission(sub, comp / "test") == []
    assert set(read_submission(sub)) == {p.stem for p in (comp / "test").glob("*.png")}
