"""Mask R-CNN builder: torchvision-compatible layouts, config options, the fixed-scale transform."""

from __future__ import annotations

import pytest
import torch
import torchvision

from cellseg.config.experiment import ExperimentConfig, ModelConfig, load_experiment
from cellseg.config.loader import from_dict
from cellseg.errors import CellsegError
from cellseg.model.build import build_model, class_specific, count_parameters
from helpers import TINY


def shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}


@pytest.mark.slow
@pytest.mark.parametrize(
    "heads, reference",
    [
        ("v1", torchvision.models.detection.maskrcnn_resnet50_fpn),
        ("v2", torchvision.models.detection.maskrcnn_resnet50_fpn_v2),
    ],
)
def test_r50_layout_matches_torchvision(heads, reference):
    """Same parameter names and shapes as torchvision's builders, so their checkpoints load."""
    ours = build_model(ModelConfig(heads=heads))
    ref = reference(weights=None, weights_backbone=None, num_classes=4)
    assert shapes(ours.state_dict()) == shapes(ref.state_dict())


@pytest.mark.slow
def test_config_files_build():
    """Every shipped config loads and builds (cheaply: no R50 forward)."""
    from cellseg.paths import configs_dir

    files = sorted(configs_dir().glob("*.yaml"))
    assert {"demo.yaml", "maskrcnn_r50_fpn.yaml", "maskrcnn_r50_fpn_v2.yaml"} <= {f.name for f in files}
    for f in files:
        cfg = load_experiment(f)
        model = build_model(cfg.model)
        assert model.roi_heads.detections_per_img == cfg.model.box_detections_per_img
        assert model.roi_heads.box_predictor.cls_score.out_features == len(cfg.model.class_names) + 1  # + background
        assert len(model.rpn.anchor_generator.sizes) == len(cfg.model.returned_layers) + 1


def test_cell_tuned_settings_reach_the_model():
    cfg = ModelConfig(**TINY)
    cfg.box_detections_per_img, cfg.rpn_pre_nms_top_n_test, cfg.aspect_ratios = 777, 1234, [0.25, 1.0, 4.0]
    m = build_model(cfg)
    assert m.roi_heads.detections_per_img == 777
    assert m.rpn._pre_nms_top_n["testing"] == 1234
    assert m.rpn.anchor_generator.sizes == ((8,), (16,), (32,))
    assert m.rpn.head.cls_logits.out_channels == 3
    assert m.backbone.out_channels == 16
    assert m.roi_heads.box_head.fc6.out_features == 32
    total, trainable = count_parameters(m)
    assert total == trainable  # trainable_backbone_layers=5


def test_frozen_stages_and_norms():
    cfg = ModelConfig(backbone="resnet18", norm="frozen_bn", trainable_backbone_layers=2, fpn_channels=32)
    body = build_model(cfg).backbone.body
    grads = {n.split(".")[0]: p.requires_grad for n, p in body.named_parameters()}
    assert grads == {"conv1": False, "layer1": False, "layer2": False, "layer3": True, "layer4": True}
    assert isinstance(body.bn1, torchvision.ops.FrozenBatchNorm2d)
    gn = build_model(ModelConfig(backbone="resnet18", norm="gn", fpn_channels=32)).backbone.body
    assert isinstance(gn.bn1, torch.nn.GroupNorm)


def test_slim_backbone_blocks():
    m = build_model(ModelConfig(**TINY))
    assert [len(getattr(m.backbone.body, f"layer{i}")) for i in (1, 2)] == [1, 1]
    assert "layer3" not in dict(m.backbone.body.named_children())  # not returned -> not computed


@pytest.mark.parametrize(
    "change, message",
    [
        ({"anchor_sizes": [[8], [16]]}, "anchor_sizes has 2 levels but the FPN has 3"),
        ({"class_names": ["a"]}, "class_names has 1 names"),
        ({"backbone": "vgg16"}, "unknown ResNet"),
        ({"returned_layers": [2, 1], "anchor_sizes": [[8], [16], [32]]}, "returned_layers must be increasing"),
        ({"trainable_backbone_layers": 7}, "must be 0-5"),
    ],
)
def test_bad_model_configs_are_clear_errors(change, message):
    with pytest.raises(CellsegError, match=message):
        build_model(ModelConfig(**{**TINY, **change}))


def test_unknown_key_names_the_path(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("model:\n  anchor_size: [[8]]\n")
    with pytest.raises(CellsegError, match="model.anchor_size"):
        load_experiment(p)
    with pytest.raises(CellsegError, match="train.lr: expected float"):
        from_dict(ExperimentConfig, {"train": {"lr": "fast"}})


def test_train_forward_and_eval_output():
    torch.manual_seed(0)
    m = build_model(ModelConfig(**TINY))
    image = torch.rand(3, 64, 80)
    masks = torch.zeros(2, 64, 80, dtype=torch.uint8)
    masks[0, 10:20, 10:22] = 1
    masks[1, 30:44, 40:50] = 1
    target = {
        "boxes": torch.tensor([[10, 10, 22, 20], [40, 30, 50, 44]], dtype=torch.float32),
        "labels": torch.tensor([1, 3]),
        "masks": masks,
    }
    m.train()
    losses = m([image], [target])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert m.roi_heads.mask_predictor.mask_fcn_logits.weight.grad is not None
    m.eval()
    with torch.no_grad():
        out = m([image])[0]
    assert out["masks"].shape[1:] == (1, 64, 80)  # pasted back at the input size
    assert out["boxes"].shape[0] <= 50


def test_scaled_transform_scales_image_masks_boxes():
    m = build_model(ModelConfig(**{**TINY, "input_scale": 2.0}))
    masks = torch.zeros(1, 30, 40, dtype=torch.uint8)
    masks[0, 5:15, 10:20] = 1
    target = {"boxes": torch.tensor([[10.0, 5.0, 20.0, 15.0]]), "labels": torch.tensor([2]), "masks": masks}
    m.transform.train()
    images, targets = m.transform([torch.rand(3, 30, 40)], [target])
    assert images.image_sizes == [(60, 80)]
    assert targets[0]["boxes"].tolist() == [[20.0, 10.0, 40.0, 30.0]]
    # masks stay uint8 at the source resolution: cellseg.model.targets projects them from there
    assert targets[0]["masks"] is masks and targets[0]["masks"].shape == (1, 30, 40)
    # torchvision-style min_size resizing when input_scale is 0
    m0 = build_model(ModelConfig(**{**TINY, "input_scale": 0.0, "min_size": 90, "max_size": 1000}))
    m0.transform.eval()
    assert m0.transform([torch.rand(3, 30, 40)])[0].image_sizes == [(90, 120)]


def test_class_specific_keys():
    assert class_specific("roi_heads.box_predictor.cls_score.weight")
    assert class_specific("roi_heads.mask_predictor.mask_fcn_logits.bias")
    assert not class_specific("roi_heads.mask_predictor.conv5_mask.weight")


def test_parts_are_chosen_at_build_and_never_retyped():
    """No module of src/cellseg assigns ``__class__`` or binds methods onto instances (MethodType): a
    part's class is the one build_model constructed."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src" / "cellseg"
    found = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            if any(isinstance(t, ast.Attribute) and t.attr == "__class__" for t in targets):
                found.append(f"{path.name}:{node.lineno} __class__ =")
            if isinstance(node, ast.Attribute) and node.attr == "MethodType":
                found.append(f"{path.name}:{node.lineno} MethodType")
    assert not found


@pytest.mark.parametrize("d2", [False, True])
def test_training_targets_only_when_built_for_training(d2):
    from cellseg.detectron2 import modeling
    from cellseg.model import parts

    cfg = ModelConfig(**{**TINY, "input_scale": 0.0, "min_size": 64, "max_size": 96, "detectron2_inference": d2})
    if d2:
        want = (modeling.D2RPN, modeling.D2RoIHeads, modeling.D2Transform)
    else:
        want = (parts.RPN, parts.MaskRoIHeads, parts.RCNNTransform)
    for training in (True, False):
        m = build_model(cfg, training_targets=training)
        assert (type(m.rpn), type(m.roi_heads), type(m.transform)) == want
        assert (m.rpn.anchor_matching is not None) == training
        assert (m.roi_heads.training_forward is not None) == training
        assert m.transform.keep_source_masks == training


def test_frozen_bn_computes_in_its_inputs_dtype():
    """Under CPU bf16 autocast the backbone's frozen BN keeps a bf16 input bf16 (torchvision's returns
    float32), with float32's values to bf16 precision; in float32 it is torchvision's bit for bit."""
    from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBN

    from cellseg.model.build import norm_layer

    torch.manual_seed(0)
    bn = norm_layer("frozen_bn")(16)
    bn.weight.uniform_(0.5, 2.0)
    bn.bias.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 16, 9, 11)
    reference = TorchvisionFrozenBN(16)
    reference.load_state_dict(bn.state_dict())
    assert torch.equal(bn(x), reference(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bn(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(x.to(torch.bfloat16).float()), rtol=2e-2, atol=2e-2)

    # in a built backbone: the output of every frozen BN of a trainable stage is saved in bf16
    body = build_model(ModelConfig(**{**TINY, "norm": "frozen_bn"})).backbone.body
    dtypes = []
    for m in body.modules():
        if isinstance(m, TorchvisionFrozenBN):
            m.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        body(torch.rand(1, 3, 64, 64))
    assert dtypes and set(dtypes) == {torch.bfloat16}
