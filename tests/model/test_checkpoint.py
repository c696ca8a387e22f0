"""Checkpoints: self-describing round trip, fp16, atomic writes, and --init from torchvision weights."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torchvision

from cellseg.config.experiment import ExperimentConfig, ModelConfig
from cellseg.errors import CellsegError
from cellseg.model.build import build_model, class_specific
from cellseg.model.checkpoint import load_init, load_model, read_checkpoint_info, save_checkpoint
from helpers import TINY


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(1)
    m = build_model(ModelConfig(**TINY))
    # move BatchNorm statistics away from their defaults so that they are checked too
    m.train()
    with torch.no_grad():
        m.backbone(torch.rand(2, 3, 64, 64))
    return m.eval()


@pytest.fixture(scope="module")
def torchvision_files(tmp_path_factory):
    """Randomly initialised torchvision COCO-layout Mask R-CNN (91 classes) and ImageNet ResNet-50 state dicts."""
    d = tmp_path_factory.mktemp("tv")
    torch.manual_seed(2)
    coco = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(coco.state_dict(), d / "coco.pth")
    torch.save(torchvision.models.resnet50().state_dict(), d / "resnet50.pth")
    torch.save(torchvision.models.resnet18().state_dict(), d / "resnet18.pth")
    return d, coco.state_dict()


def run(model, image):
    with torch.no_grad():
        return model([image])[0]


def test_round_trip_rebuilds_from_the_file_alone(tmp_path, tiny_model):
    cfg = ExperimentConfig(model=ModelConfig(**TINY))
    prov = {"fold": 2, "epoch": 7, "score": 0.31, "git_commit": "abc"}
    path = save_checkpoint(tmp_path / "m.pth", tiny_model, cfg, ["shsy5y", "astro", "cort"], prov)
    model, info = load_model(path)
    assert not model.training
    assert info.provenance == prov and info.class_names == ["shsy5y", "astro", "cort"] and not info.half
    assert info.model_config == cfg.model
    assert info.experiment["train"]["lr"] == cfg.train.lr
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    image = torch.rand(3, 64, 80)
    a, b = run(tiny_model, image), run(model, image)
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    assert read_checkpoint_info(path).provenance["epoch"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]  # no temporary files left


def test_half_checkpoint_is_smaller_and_loads_as_float32(tmp_path, tiny_model):
    full = save_checkpoint(tmp_path / "f.pth", tiny_model, ModelConfig(**TINY), ["a", "b", "c"], {})
    half = save_checkpoint(tmp_path / "h.pth", tiny_model, ModelConfig(**TINY), ["a", "b", "c"], {}, half=True)
    assert os.path.getsize(half) < 0.6 * os.path.getsize(full)
    model, info = load_model(half)
    assert info.half
    for k, v in model.state_dict().items():
        ref = tiny_model.state_dict()[k]
        assert v.dtype == ref.dtype, k
        if v.is_floating_point():
            torch.testing.assert_close(v, ref, rtol=1e-3, atol=1e-3)


def test_failed_save_keeps_the_previous_file(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "m.pth", tiny_model, ModelConfig(**TINY), ["a", "b", "c"], {"epoch": 1})
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(path, tiny_model, ModelConfig(**TINY), ["a", "b", "c"], {"epoch": 2, "bad": lambda: 0})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]


def test_load_errors(tmp_path, tiny_model):
    with pytest.raises(CellsegError, match="not found"):
        load_model(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(CellsegError, match="not a readable PyTorch checkpoint: not a file written by torch.save"):
        load_model(tmp_path / "junk.pth")
    torch.save(tiny_model.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CellsegError, match="not a cellseg checkpoint"):
        load_model(tmp_path / "plain.pth")


@pytest.mark.slow
def test_init_from_coco_reinitialises_only_class_heads(torchvision_files):
    d, coco_sd = torchvision_files
    torch.manual_seed(3)
    model = build_model(ModelConfig())
    fresh = {k: v.clone() for k, v in model.state_dict().items() if class_specific(k)}
    msg = load_init(model, d / "coco.pth")
    assert "re-initialised" in msg and "mask_fcn_logits" in msg
    own = model.state_dict()
    for k, v in coco_sd.items():
        if class_specific(k):
            assert own[k].shape != v.shape and torch.equal(own[k], fresh[k])
        elif not k.endswith("num_batches_tracked"):
            assert torch.equal(own[k], v), k
    assert own["roi_heads.box_predictor.cls_score.weight"].shape == (4, 1024)


def test_init_from_imagenet_resnet(torchvision_files):
    d, _ = torchvision_files
    r50 = torch.load(d / "resnet50.pth", weights_only=True)
    model = build_model(ModelConfig())
    load_init(model, d / "resnet50.pth")
    body = model.backbone.body.state_dict()
    assert torch.equal(body["layer3.2.conv2.weight"], r50["layer3.2.conv2.weight"])
    assert torch.equal(body["bn1.running_var"], r50["bn1.running_var"])


def test_init_from_own_checkpoint(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "m.pth", tiny_model, ModelConfig(**TINY), ["a", "b", "c"], {}, half=True)
    model = build_model(ModelConfig(**TINY))
    load_init(model, path)
    torch.testing.assert_close(
        model.state_dict()["backbone.fpn.layer_blocks.0.0.weight"],
        tiny_model.state_dict()["backbone.fpn.layer_blocks.0.0.weight"],
        rtol=1e-3,
        atol=1e-3,
    )


def test_init_mismatches_are_clear_errors(tmp_path, torchvision_files):
    d, _ = torchvision_files
    with pytest.raises(CellsegError, match=r"missing: .*unexpected: .*model.heads"):
        load_init(build_model(ModelConfig(heads="v2")), d / "coco.pth")
    with pytest.raises(CellsegError, match=r"ImageNet ResNet weights do not fit model.backbone .*shape mismatch"):
        load_init(build_model(ModelConfig()), d / "resnet18.pth")
    with pytest.raises(CellsegError, match="not found"):
        load_init(build_model(ModelConfig(**TINY)), tmp_path / "none.pth")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "odd.pth")
    with pytest.raises(CellsegError, match="unrecognised weights"):
        load_init(build_model(ModelConfig(**TINY)), tmp_path / "odd.pth")
