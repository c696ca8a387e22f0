"""Shared builders for the inference tests: a tiny random-weight Mask R-CNN saved through the real
checkpoint code, a manifest around it, and small competition-layout folders with real PNGs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from cellseg.config.experiment import ModelConfig
from cellseg.config.manifest import (
    ClassThresholds,
    FusionConfig,
    Manifest,
    ModelEntry,
    PostprocessConfig,
    write_manifest,
)
from cellseg.io import write_gray
from cellseg.model.build import build_model
from cellseg.model.checkpoint import save_checkpoint


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(
        backbone="resnet18",
        norm="bn",
        fpn_channels=16,
        returned_layers=[2, 3],
        anchor_sizes=[[8], [16], [32]],
        aspect_ratios=[1.0],
        min_size=96,
        max_size=128,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=150,
        trainable_backbone_layers=5,
    )
    base.update(kw)
    return ModelConfig(**base)


def make_checkpoint(path: Path, seed: int = 0, **cfg) -> Path:
    """A random tiny model whose class logits are biased so that all three classes score ~0.3."""
    torch.manual_seed(seed)
    model = build_model(tiny_model_config(**cfg))
    with torch.no_grad():
        cls = model.roi_heads.box_predictor.cls_score
        cls.weight.mul_(0.01)
        cls.bias.copy_(torch.tensor([-2.0, 0.4 + 0.2 * seed, 0.0, -0.2]))
        # make the (random) mask logits positive in the middle of the box so masks are non-empty
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(1.0)
    model.eval()
    return save_checkpoint(path, model, tiny_model_config(**cfg), ["shsy5y", "astro", "cort"], {"test": True})


def make_manifest(
    folder: Path,
    n_models: int = 1,
    tta=("identity", "hflip", "vflip", "hvflip"),
    model_cfg: dict | None = None,
    **fusion,
) -> Path:
    """Checkpoints + manifest.yaml (loose thresholds so random models still keep detections).

    ``model_cfg``: ModelConfig fields over :func:`tiny_model_config`'s (e.g. benchmarks/gpu_check.py's sizes);
    the other keywords are FusionConfig fields."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n_models):
        make_checkpoint(folder / f"model{i}.pth", seed=i, **(model_cfg or {}))
        entries.append(ModelEntry(checkpoint=f"model{i}.pth", weight=1.0 + i))
    loose = ClassThresholds(score=0.05, mask_threshold=0.5, nms_iou=0.5, min_pixels=2)
    m = Manifest(
        name="tiny",
        models=entries,
        tta=list(tta),
        fusion=FusionConfig(
            detections_per_view=fusion.pop("detections_per_view", 60), model_score_thresh=0.01, **fusion
        ),
        classes={"shsy5y": loose, "astro": loose, "cort": loose},
        postprocess=PostprocessConfig(),
    )
    return write_manifest(m, folder / "manifest.yaml")


def blob_image(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
    """(H, W) uint8 grey: bright background with darker elliptic blobs (cell-ish, asymmetric)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    img = np.full((height, width), 150.0) + rng.normal(0, 4, (height, width))
    for _ in range(8):
        cy, cx = rng.uniform(8, height - 8), rng.uniform(8, width - 8)
        ry, rx = rng.uniform(3, 9), rng.uniform(3, 9)
        img[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] -= rng.uniform(30, 70)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_competition(root: Path, n_test: int = 3, height: int = 96, width: int = 128) -> Path:
    """A competition-layout folder: test/*.png + sample_submission.csv."""
    (root / "test").mkdir(parents=True, exist_ok=True)
    ids = [f"{i:012x}" for i in range(0xA0, 0xA0 + n_test)]
    for k, i in enumerate(ids):
        write_gray(root / "test" / f"{i}.png", blob_image(k, height, width))
    with open(root / "sample_submission.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "predicted"])
        for i in ids:
            w.writerow([i, ""])
    return root
