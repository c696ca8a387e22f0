"""Raw prediction (crop pasting, flip TTA, fp16 wrappers, folded BatchNorm, the out-of-memory retry),
on real tiny models."""

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import project_masks_on_boxes
from torchvision.ops import FrozenBatchNorm2d

from cellseg.config.manifest import FusionConfig, load_manifest
from cellseg.data.masks import label_image
from cellseg.evaluation.metric import iou_matrix
from cellseg.inference.ensemble import Ensemble
from cellseg.inference.forward import load_ensemble, paste_soft, predict_views
from inference_helpers import blob_image, make_manifest

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


@pytest.mark.slow
def test_model_returns_crops_not_full_masks(ensemble):
    _, m, loaded = ensemble
    raw = predict_views(loaded[:1], blob_image(1), ["identity", "hflip"], CPU)
    assert len(raw) == 2 and raw[0].masks.shape[1:] == (28, 28)
    assert raw[0].masks.shape[0] <= m.fusion.detections_per_view and raw[0].masks.shape[0] > 0


@pytest.mark.slow
@pytest.mark.parametrize("flip", ["h", "v"])
def test_flipped_input_gives_flipped_output(ensemble, flip):
    _, m, loaded = ensemble
    img = blob_image(2)
    flipped = np.ascontiguousarray(img[:, ::-1] if flip == "h" else img[::-1])
    ens = Ensemble(m, loaded, CPU)
    a, b = ens.predict(img), ens.predict(flipped)
    assert len(a.crops) > 10 and len(a.crops) == len(b.crops)
    la, _ = label_image(a.crops, *img.shape)
    lb, _ = label_image(b.crops, *img.shape)
    lb = lb[:, ::-1] if flip == "h" else lb[::-1]
    iou = iou_matrix(la, np.ascontiguousarray(lb))
    assert np.all(iou.max(axis=1) > 0.99)  # every instance has its mirror image
    np.testing.assert_allclose(np.sort(a.scores), np.sort(b.scores), rtol=1e-5)


@pytest.mark.slow
def test_identity_view_alone_is_not_flip_equivariant(ensemble):
    """Control for the test above: without TTA a random model is not symmetric, so it can fail."""
    _, m, loaded = ensemble
    img = blob_image(2)
    ens = Ensemble(m, loaded, CPU, ["identity"])
    a, b = ens.predict(img), ens.predict(np.ascontiguousarray(img[:, ::-1]))
    la, _ = label_image(a.crops, *img.shape)
    lb, _ = label_image(b.crops, *img.shape)
    iou = iou_matrix(la, np.ascontiguousarray(lb[:, ::-1]))
    assert not np.all(iou.max(axis=1) > 0.99)


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory):
    return make_manifest(
        tmp_path_factory.mktemp("small"), n_models=1, tta=("identity", "hflip"), detections_per_view=30
    )


def test_autocast_wrapper_returns_float32_through_nested_outputs():
    """The autocast wrapper hands the un-wrapped model float32 tensors whatever the wrapped part returns
    (dicts, lists, tuples of half tensors), leaves integer tensors alone, and with ``keep_half`` passes
    the half-precision outputs through. CPU autocast with bfloat16 stands in for CUDA fp16."""
    from cellseg.model.precision import Autocast as _Autocast

    class Net(torch.nn.Module):
        def forward(self, x):
            y = x @ x.T  # a matmul: runs in the autocast dtype
            return {"a": y, "b": [y * 2, (y + 1, torch.arange(3))]}, y.sum()

    x = torch.rand(4, 4)
    out, total = _Autocast(Net(), device_type="cpu", dtype=torch.bfloat16)(x)
    assert out["a"].dtype == out["b"][0].dtype == out["b"][1][0].dtype == total.dtype == torch.float32
    assert isinstance(out["b"], list) and isinstance(out["b"][1], tuple) and out["b"][1][1].dtype == torch.int64
    assert torch.allclose(out["a"], x @ x.T, atol=0.05)
    half, _ = _Autocast(Net(), keep_half=True, device_type="cpu", dtype=torch.bfloat16)(x)
    assert half["a"].dtype == torch.bfloat16  # autocast really ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast('cuda') only acts on a GPU")
def test_fp16_wrappers_keep_the_detections_on_gpu(small_manifest):
    """On a GPU the conv parts run in fp16: the detections stay those of the fp32 model (same boxes
    to a pixel's fraction, same masks to fp16 precision)."""
    from cellseg.inference.forward import LoadedModel, label_map_for, prepare_model
    from cellseg.model.checkpoint import load_model

    gpu = torch.device("cuda")
    m = load_manifest(small_manifest)
    path = m.checkpoint_path(m.models[0])
    plain = LoadedModel(prepare_model(load_model(path, gpu)[0], m.fusion, gpu, fp16=False), 1.0, label_map_for(None, 4))
    wrapped = LoadedModel(
        prepare_model(load_model(path, gpu)[0], m.fusion, gpu, fp16=True), 1.0, label_map_for(None, 4)
    )
    assert type(wrapped.model.backbone).__name__ == "Autocast"
    a = predict_views([plain], blob_image(3), ["identity"], gpu)[0]
    b = predict_views([wrapped], blob_image(3), ["identity"], gpu)[0]
    assert len(a.scores) > 0
    top = min(len(a.scores), len(b.scores), 10)  # the confident ones: low scores may swap order
    assert torch.allclose(a.boxes[:top], b.boxes[:top], atol=0.5)
    assert torch.allclose(a.masks[:top], b.masks[:top], atol=0.02)


# ----------------------------------------------------------------------------- the GPU path, on CPU


def _tiny_prepared(norm: str, heads: str = "v1", seed: int = 0, **prep):
    """A tiny Mask R-CNN with random, non-trivial BatchNorm statistics, prepared for inference."""
    from cellseg.inference.forward import prepare_model
    from cellseg.model.build import build_model
    from inference_helpers import tiny_model_config

    torch.manual_seed(seed)
    model = build_model(tiny_model_config(norm=norm, heads=heads))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = mod.running_var.shape[0]
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.2)
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(1.0)
        model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([-2.0, 0.4, 0.0, -0.2]))
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.01)
    return prepare_model(model.eval(), FusionConfig(detections_per_view=40, model_score_thresh=0.01), CPU, **prep)


@pytest.mark.slow
@pytest.mark.parametrize("norm, heads", [("frozen_bn", "v1"), ("bn", "v2")])
def test_folded_batchnorm_gives_the_same_outputs_in_fp32(norm, heads):
    import copy

    from cellseg.inference.forward import LoadedModel, fold_batchnorm, label_map_for

    plain = _tiny_prepared(norm, heads, fp16=False, fold_bn=False)
    folded = copy.deepcopy(plain)
    n = fold_batchnorm(folded)
    left = [name for name, m in folded.named_modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert n >= 5 and left == []  # ResNet stem, blocks and downsample (+ v2 heads' conv-BN) all folded
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        fa, fb = plain.backbone(x), folded.backbone(x)
    for k in fa:
        np.testing.assert_allclose(fb[k].numpy(), fa[k].numpy(), atol=1e-4, rtol=1e-4)
    lut = label_map_for(None, 4)
    a = predict_views([LoadedModel(plain, 1.0, lut)], blob_image(4), ["identity", "hflip"], CPU)
    b = predict_views([LoadedModel(folded, 1.0, lut)], blob_image(4), ["identity", "hflip"], CPU)
    for ra, rb in zip(a, b):
        assert len(ra.scores) > 5 and len(ra.scores) == len(rb.scores)
        np.testing.assert_allclose(rb.boxes.numpy(), ra.boxes.numpy(), atol=1e-3)
        np.testing.assert_allclose(rb.scores.numpy(), ra.scores.numpy(), atol=1e-4)
        np.testing.assert_allclose(rb.masks.numpy(), ra.masks.numpy(), atol=1e-4)


def test_half_precision_runs_through_the_backbone_and_the_mask_predictor():
    """prepare_model's autocast wiring, exercised on the CPU with bfloat16 standing in for CUDA fp16:
    every ResNet block outputs half precision (an unfolded FrozenBN's float32 buffers would turn it
    back into float32), and the mask predictor's deconv runs in half precision too."""
    from cellseg.inference.forward import LoadedModel, label_map_for
    from cellseg.model.precision import Autocast as _Autocast

    model = _tiny_prepared("frozen_bn", fp16=True)
    wrappers = [m for m in model.modules() if isinstance(m, _Autocast)]
    for w in wrappers:
        w.device_type, w.dtype = "cpu", torch.bfloat16
    seen: dict[str, torch.dtype] = {}

    def hook(name):
        return lambda mod, inp, out: seen.__setitem__(name, out.dtype)

    body = model.backbone.module.body
    for name, block in body.named_modules():
        if type(block).__name__ in ("BasicBlock", "Bottleneck"):
            block.register_forward_hook(hook(f"block {name}"))
    predictor = model.roi_heads.mask_predictor
    deconv = (predictor.module if isinstance(predictor, _Autocast) else predictor).conv5_mask
    deconv.register_forward_hook(hook("mask deconv"))
    raw = predict_views([LoadedModel(model, 1.0, label_map_for(None, 4))], blob_image(4), ["identity"], CPU)
    assert len(raw[0].scores) > 0 and raw[0].masks.dtype == torch.float32
    assert len(seen) >= 4, seen
    assert {k: v for k, v in seen.items() if v != torch.bfloat16} == {}


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_out_of_memory_retry_runs_after_the_exception_is_released(ensemble):
    """A model that runs out of memory once: the retry (one view per forward) must not run while the
    exception, whose traceback holds the failed forward's tensors, is still alive."""
    import sys
    import weakref

    from cellseg.inference.ensemble import OutOfMemoryError
    from cellseg.inference.forward import LoadedModel

    _, m, loaded = ensemble
    real = loaded[0].model
    calls: list[dict] = []
    held: list[weakref.ref] = []

    class OomOnce(torch.nn.Module):
        def forward(self, images):
            calls.append(
                {"n": len(images), "in_except": sys.exc_info()[0] is not None, "held": [r() is not None for r in held]}
            )
            if len(calls) == 1:
                activations = torch.empty(1 << 20)  # the failed forward's memory
                held.append(weakref.ref(activations))
                raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(images)

    lm = LoadedModel(OomOnce(), 1.0, loaded[0].label_map)
    raw = Ensemble(m, [lm], CPU, ["identity", "hflip"]).forward(blob_image(1))
    assert [r.view for r in raw] == ["identity", "hflip"] and len(raw[0].scores) > 0
    assert [c["n"] for c in calls] == [2, 1, 1]  # the batched forward, then one view at a time
    assert [c["in_except"] for c in calls[1:]] == [False, False]
    assert calls[1]["held"] == [False]  # the failed forward's tensors were freed before the retry
