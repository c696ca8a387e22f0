"""``cellseg.inference.pipeline``: the per-image pipeline after the forward pass (vote -> fusion -> post-processing)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cellseg.inference.forward import LoadedModel, RawView, label_map_for
from cellseg.inference.pipeline import finish_image
from cellseg.model.manifest import ClassThresholds, FusionConfig, Manifest, ModelEntry

H, W = 120, 160


def _raw() -> list[RawView]:
    """One view: 6 confident astro cells (label 2) on a grid and 120 weak label-1 fragments whose
    summed score (120 x 0.1 = 12) beats the astro sum (6 x 0.9 = 5.4)."""
    boxes, scores, labels = [], [], []
    for k in range(6):
        y, x = 10 + 50 * (k // 3), 10 + 50 * (k % 3)
        boxes.append([x, y, x + 30, y + 30]), scores.append(0.9), labels.append(2)
    rng = np.random.default_rng(0)
    for _ in range(120):
        y, x = rng.uniform(0, H - 6), rng.uniform(0, W - 6)
        boxes.append([x, y, x + 5, y + 5]), scores.append(0.1), labels.append(1)
    n = len(scores)
    return [
        RawView(
            torch.tensor(boxes, dtype=torch.float32),
            torch.tensor(scores),
            torch.tensor(labels),
            torch.full((n, 28, 28), 0.9),
            model=0,
            view="identity",
        )
    ]


def _manifest(vote_min_score: float) -> Manifest:
    th = ClassThresholds(score=0.5, mask_threshold=0.5, nms_iou=0.3, min_pixels=0)
    return Manifest(
        name="t",
        models=[ModelEntry("m.pth")],
        tta=["identity"],
        fusion=dataclasses.replace(FusionConfig(), vote_min_score=vote_min_score),
        classes={"shsy5y": th, "astro": th, "cort": th},
    )


def test_the_manifest_vote_threshold_decides_the_cell_type_and_its_thresholds():
    loaded = [LoadedModel(model=None, weight=1.0, label_map=label_map_for(None, 4))]
    confident = finish_image((H, W), _raw(), loaded, ["identity"], _manifest(0.5))
    assert confident.cell_type == "astro"
    assert len(confident.crops) == 6 and (confident.scores >= 0.5).all()
    every = finish_image((H, W), _raw(), loaded, ["identity"], _manifest(0.0))
    assert every.cell_type == "shsy5y"  # the fragments outvote the cells when every detection votes
    # a type given by the caller (unlabeled images named by type) skips the vote
    assert finish_image((H, W), _raw(), loaded, ["identity"], _manifest(0.0), cell_type="cort").cell_type == "cort"
