"""Training targets without full-frame copies: same targets as torchvision's path, less memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.roi_heads import project_masks_on_boxes
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou

from cellseg.config.experiment import ModelConfig
from cellseg.data.dataset import CellDataset, train_records
from cellseg.data.synth import generate
from cellseg.data.transforms import AugmentConfig
from cellseg.data.truth import read_train_csv
from cellseg.detectron2.modeling import D2RPN, D2RoIHeads, D2Transform
from cellseg.model import targets
from cellseg.model.build import build_model
from helpers import TINY
from reference_targets import old_path


@pytest.fixture(scope="module")
def synth_items(tmp_path_factory):
    """Two real synthetic items (the densest of 6 images first), scale jitter at 1.25, 256 x 320 crops
    (small enough for torchvision's full-stack float path to run in a test)."""
    data = tmp_path_factory.mktemp("synth") / "data"
    generate(data, train_images=6, test_images=0, semi_images=0, seed=11, progress=False, workers=1)
    ts = read_train_csv(data / "train.csv", fill_holes=True)
    ids = sorted(ts.images, key=lambda i: -len(ts.images[i].instances))[:2]
    aug = AugmentConfig(
        scale_range=(1.25, 1.25), crop_size=(256, 320), brightness=(1.0, 1.0), contrast=(1.0, 1.0), rot90=0.0
    )
    torch.manual_seed(0)
    ds = CellDataset(train_records(ts, data / "train", ids), aug)
    return [ds[0], ds[1]]


def jittered_proposals(boxes: torch.Tensor, per_box: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """Proposals around each box (as matched RoIs look): shifted and rescaled, a few tiny, clipped."""
    g = torch.Generator().manual_seed(seed)
    b = boxes.repeat_interleave(per_box, 0)
    wh = (b[:, 2:] - b[:, :2]).clamp(min=1)
    centre = (b[:, :2] + b[:, 2:]) / 2 + (torch.rand(b.shape[0], 2, generator=g) - 0.5) * 0.6 * wh
    wh = wh * (0.6 + 0.8 * torch.rand(b.shape[0], 2, generator=g))
    wh[::17] = torch.rand(len(wh[::17]), 2, generator=g) * 1.5  # degenerate boxes (< 1 px)
    out = torch.cat([centre - wh / 2, centre + wh / 2], 1)
    out[:, 0::2] = out[:, 0::2].clamp(0, size[1])
    out[:, 1::2] = out[:, 1::2].clamp(0, size[0])
    return out


@pytest.mark.parametrize("scale", [1.0, 2.0, 1.37])
def test_mask_targets_equal_torchvisions_on_a_synthetic_image(synth_items, scale):
    """project_masks on uint8 source masks == project_masks_on_boxes on the float-upsampled stack.

    Tolerance: max abs difference < 1e-3 and mean < 1e-5 (RoIAlign's sample positions round
    differently for the box shifted into its window: a float32 ulp at x ~ 1000 is 6e-5), and the
    0.5-thresholded targets identical on >= 99.99 % of pixels."""
    _, target = synth_items[0]
    masks = target["masks"]
    h, w = masks.shape[-2:]
    size = (round(h * scale), round(w * scale))
    assert masks.dtype == torch.uint8 and masks.shape[0] > 20
    boxes = resize_boxes(target["boxes"], (h, w), size)
    proposals = jittered_proposals(boxes, 3, size, seed=int(scale * 100))
    matched = torch.arange(masks.shape[0]).repeat_interleave(3)
    upsampled = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0]
    old = project_masks_on_boxes(upsampled, proposals, matched, 28)
    new = targets.project_masks(masks, proposals, matched, size, 28)
    assert new.shape == old.shape == (len(matched), 28, 28)
    diff = (new - old).abs()
    assert diff.max() < 1e-3 and diff.mean() < 1e-5
    assert ((new > 0.5) == (old > 0.5)).float().mean() >= 0.9999
    assert old.sum() > 1000  # the targets hold the cells, not just empty windows
    # windows processed in small groups give the same targets
    grouped = targets.project_masks(masks, proposals, matched, size, 28, max_elements=4096)
    assert torch.equal(grouped, new)
    # bool masks work too, and nothing is projected for no proposals
    assert torch.equal(targets.project_masks(masks.bool(), proposals, matched, size, 28), new)
    assert targets.project_masks(masks, proposals[:0], matched[:0], size, 28).shape == (0, 28, 28)


@pytest.mark.slow
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_training_losses_equal_torchvisions_path(synth_items, scale):
    """A training forward of the built model gives the old path's losses (same sampled RoIs)."""
    cfg = ModelConfig(**{**TINY, "input_scale": scale, "box_batch_size_per_image": 128})
    torch.manual_seed(0)
    new = build_model(cfg).train()
    old = build_model(cfg).train()
    old.load_state_dict(new.state_dict())
    old_path(old)
    assert old.roi_heads.training_forward is None and old.rpn.anchor_matching is None
    images = [im for im, _ in synth_items]

    def losses(model):
        tgts = [{k: v.clone() for k, v in t.items() if torch.is_tensor(v)} for _, t in synth_items]
        torch.manual_seed(1)
        return {k: float(v.detach()) for k, v in model(images, tgts).items()}

    got, want = losses(new), losses(old)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
    assert want["loss_mask"] > 0.1


@pytest.mark.slow
def test_no_full_frame_float_copy_of_the_masks(synth_items):
    """Largest single CPU allocation of a training step: the old path allocates the float mask stack
    (N x H x W x 4 bytes at the input scale); the new path allocates nothing half that size."""
    cfg = ModelConfig(**{**TINY, "input_scale": 2.0, "box_batch_size_per_image": 64})
    image, target = synth_items[0]
    n, h, w = target["masks"].shape
    stack_bytes = n * (2 * h) * (2 * w) * 4

    def largest_allocation(model) -> int:
        tgt = {k: v.clone() for k, v in target.items() if torch.is_tensor(v)}
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            sum(model([image], [tgt]).values()).backward()
        return max(e.cpu_memory_usage for e in prof.events())

    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert largest_allocation(model) < stack_bytes / 2
    old_path(model)
    assert largest_allocation(model) >= stack_bytes  # the check can see the copy


def test_chunked_anchor_matching_equals_matcher():
    """match_anchors == Matcher(box_iou(...)) with blocks, ties across blocks, no-overlap ground truth."""
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(40, 2, generator=g) * 300
    gt = torch.cat([gt, gt + 4 + torch.rand(40, 2, generator=g) * 50], 1)
    gt[7] = torch.tensor([1000.0, 1000.0, 1010.0, 1010.0])  # overlaps no anchor: best IoU 0 ties everywhere
    anchors = torch.rand(5000, 2, generator=g) * 350
    anchors = torch.cat([anchors, anchors + 1 + torch.rand(5000, 2, generator=g) * 60], 1)
    anchors[10] = anchors[4000] = gt[3]  # a ground truth's best IoU (1.0) in two blocks
    for low_quality in (True, False):
        matcher = Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)
        want = matcher(box_iou(gt, anchors))
        for chunk, tiled in ((512, True), (None, True), (700, False)):
            got = targets.match_anchors(matcher, gt, anchors, chunk=chunk, tiled=tiled)
            assert torch.equal(got, want), (low_quality, chunk, tiled)
    gt7_free = torch.cat([gt[:7], gt[8:]])
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)
    assert torch.equal(targets.match_anchors(matcher, gt7_free, anchors, 700), matcher(box_iou(gt7_free, anchors)))


def test_anchor_matching_with_the_models_anchors(synth_items):
    """The RPN's own anchors (location-major grids, 3 levels) and real cells: same labels and boxes as
    torchvision's assign_targets_to_anchors."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, "input_scale": 2.0})).train()
    image, target = synth_items[0]
    images, tgts = model.transform([image], [{k: v for k, v in target.items() if torch.is_tensor(v)}])
    features = list(model.backbone(images.tensors).values())
    anchors = model.rpn.anchor_generator(images, features)
    assert anchors[0].shape[0] > 10000 and tgts[0]["boxes"].shape[0] > 20
    got = model.rpn.assign_targets_to_anchors(anchors, tgts)
    want = RegionProposalNetwork.assign_targets_to_anchors(model.rpn, anchors, tgts)
    assert torch.equal(got[0][0], want[0][0]) and torch.equal(got[1][0], want[1][0])
    assert int((want[0][0] == 1).sum()) > 20  # positives exist


def test_training_targets_cover_detectron2_options_and_keep_inference(synth_items):
    cfg = ModelConfig(**{**TINY, "input_scale": 0.0, "min_size": 300, "max_size": 500, "detectron2_inference": True})
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model.roi_heads) is D2RoIHeads and type(model.rpn) is D2RPN and type(model.transform) is D2Transform
    assert model.roi_heads.training_forward is targets.source_mask_forward
    assert model.rpn.anchor_matching is targets.chunked_anchor_matching
    image, target = synth_items[1]
    tgt = {k: v for k, v in target.items() if torch.is_tensor(v)}
    model.train()
    losses = model([image], [tgt])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    batch, out_targets = model.transform([image], [dict(tgt)])
    assert batch.image_sizes[0] != tuple(image.shape[-2:])  # resized to min_size 300 ...
    assert out_targets[0]["masks"] is tgt["masks"]  # ... but the masks are left at the source resolution
    model.eval()
    with torch.no_grad():
        out = model([image])[0]
    assert out["masks"].shape[-2:] == image.shape[-2:]


def test_soft_dice_counts_each_masks_overlap_once():
    """1 - Dice per mask, averaged over masks: a perfect mask gives 0, a mask twice its target's area
    (containing it) 1/3, a disjoint one ~1, and a small perfect mask weighs as much as a large wrong one."""
    big = 20.0

    def logits_of(mask):
        return torch.where(mask > 0, big, -big)

    target = torch.zeros(28, 28)
    target[5:15, 5:15] = 1  # 100 px
    double = torch.zeros(28, 28)
    double[5:25, 5:15] = 1  # 200 px, containing the target
    disjoint = torch.zeros(28, 28)
    disjoint[18:28, 18:28] = 1
    loss = targets.soft_dice_loss
    assert float(loss(logits_of(target)[None], target[None])) < 1e-3
    assert float(loss(logits_of(double)[None], target[None])) == pytest.approx(1 / 3, abs=0.01)
    assert float(loss(logits_of(disjoint)[None], target[None])) == pytest.approx(1.0, abs=0.01)
    small = torch.zeros(28, 28)
    small[0:2, 0:2] = 1  # a 4 px mask drawn exactly, next to the 100 px one drawn disjoint
    pair = loss(torch.stack([logits_of(small), logits_of(disjoint)]), torch.stack([small, target]))
    assert float(pair) == pytest.approx(0.5, abs=0.01)  # pooled over pixels it would be ~0.96
    none = torch.zeros(0, 28, 28, requires_grad=True)
    empty = loss(none, torch.zeros(0, 28, 28))
    assert float(empty.detach()) == 0.0
    empty.backward()  # no positive proposal in a batch: still a graph to step through
    assert none.grad is not None


def test_bce_dice_adds_one_term_and_keeps_the_others(synth_items):
    """``model.mask_loss: bce+dice``: the same five torchvision terms as ``bce`` (same weights, same
    sampled RoIs) plus ``loss_mask_dice``, whose gradient reaches the mask branch and not the box head."""
    cfg = ModelConfig(**{**TINY, "box_batch_size_per_image": 128})
    torch.manual_seed(0)
    plain = build_model(cfg).train()
    dice = build_model(ModelConfig(**{**TINY, "box_batch_size_per_image": 128, "mask_loss": "bce+dice"})).train()
    dice.load_state_dict(plain.state_dict())
    images = [im for im, _ in synth_items]

    def losses(model):
        tgts = [{k: v.clone() for k, v in t.items() if torch.is_tensor(v)} for _, t in synth_items]
        torch.manual_seed(1)
        return model(images, tgts)

    want, got = losses(plain), losses(dice)
    assert set(got) == set(want) | {"loss_mask_dice"}
    for k in want:
        assert float(got[k].detach()) == pytest.approx(float(want[k].detach()), rel=1e-6), k
    assert 0.05 < float(got["loss_mask_dice"].detach()) < 1.0
    got["loss_mask_dice"].backward()
    mask_grad = dice.roi_heads.mask_predictor.mask_fcn_logits.weight.grad
    assert mask_grad is not None and float(mask_grad.abs().sum()) > 0
    box_grad = dice.roi_heads.box_predictor.cls_score.weight.grad
    assert box_grad is None or float(box_grad.abs().sum()) == 0
