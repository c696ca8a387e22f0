"""Detectron2's anchors and proposal decoding stay float32 under AMP training, as at inference."""

from __future__ import annotations

import torch
from torchvision.models.detection.image_list import ImageList

from cellseg.config.experiment import ModelConfig
from cellseg.detectron2.modeling import D2AnchorGenerator
from cellseg.model.build import build_model
from helpers import TINY


def _anchors(dtype: torch.dtype) -> torch.Tensor:
    """Anchors of a 3-level generator with non-integer sizes for features of ``dtype``."""
    gen = D2AnchorGenerator(((8,), (16,), (32,)), ((0.5, 1.0, 2.0),) * 3, [4, 8, 16])
    images = ImageList(torch.zeros(1, 3, 600, 800, dtype=dtype), [(600, 800)])
    features = [torch.zeros(1, 4, 600 // s, 800 // s, dtype=dtype) for s in (4, 8, 16)]
    return gen(images, features)[0]


def test_anchors_stay_float32_for_half_features():
    """fp16 / bf16 features (AMP training) get the float32 anchors of float32 features: in half
    precision the non-integer anchors (w = sqrt(64 / 0.5) = 11.31...) far from the origin would round."""
    want = _anchors(torch.float32)
    assert want.dtype == torch.float32 and not torch.equal(want, want.round())
    for dtype in (torch.float16, torch.bfloat16):
        got = _anchors(dtype)
        assert got.dtype == torch.float32
        assert torch.equal(got, want)


def test_rpn_decodes_proposals_in_float32_under_autocast():
    """The Detectron2 RPN's box coder turns half deltas and float32 anchors into float32 proposals,
    equal to decoding the same deltas in float32 (torchvision's coder would cast the anchors to half)."""
    cfg = ModelConfig(**{**TINY, "input_scale": 0.0, "min_size": 64, "max_size": 96, "detectron2_inference": True})
    coder = build_model(cfg).rpn.box_coder
    g = torch.Generator().manual_seed(0)
    anchors = torch.rand(500, 2, generator=g) * 1700
    anchors = torch.cat([anchors, anchors + 5 + torch.rand(500, 2, generator=g) * 40], 1) + 0.3
    deltas = (torch.randn(500, 4, generator=g) * 0.2).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = coder.decode(deltas, [anchors])
    assert got.dtype == torch.float32
    want = coder.decode(deltas.float(), [anchors])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
