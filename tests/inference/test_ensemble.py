"""``cellseg.inference.ensemble``: the per-image path (forward -> vote -> fusion -> post-processing), on a
model in memory (training validation) and on checkpoints."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cellseg.config.experiment import ModelConfig
from cellseg.config.manifest import ClassThresholds, FusionConfig, Manifest, ModelEntry, load_manifest
from cellseg.data.masks import label_image
from cellseg.inference.ensemble import Ensemble, vote_cell_type
from cellseg.inference.forward import LoadedModel, RawView, label_map_for
from cellseg.model.build import build_model
from helpers import TINY
from inference_helpers import blob_image, make_manifest

H, W = 120, 160
CPU = torch.device("cpu")


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


def test_vote_is_score_weighted():
    labels = np.array([1, 1, 1, 2])
    scores = np.array([0.1, 0.1, 0.1, 0.9])
    assert vote_cell_type(labels, scores) == "astro"  # one confident astro beats three weak shsy5y
    assert vote_cell_type(labels, scores, weights=np.array([5, 5, 5, 1.0])) == "shsy5y"
    assert vote_cell_type(np.array([3]), np.array([0.2])) == "cort"
    assert vote_cell_type(np.zeros(0, int), np.zeros(0)) == "shsy5y"


def test_vote_min_score_ignores_a_swarm_of_weak_fragments():
    """An astro image as the small demo model sees it: 40 confident astro cells, 400 weak shsy5y-
    labelled fragments whose summed score is larger. Only confident detections vote."""
    labels = np.array([2] * 40 + [1] * 400)
    scores = np.array([0.8] * 40 + [0.1] * 400)
    assert vote_cell_type(labels, scores) == "shsy5y"
    assert vote_cell_type(labels, scores, min_score=0.5) == "astro"
    # nothing clears min_score: every detection votes (no silent default type)
    assert vote_cell_type(np.array([1, 3, 3]), np.array([0.2, 0.3, 0.3]), min_score=0.5) == "cort"


def test_the_manifest_vote_threshold_decides_the_cell_type_and_its_thresholds():
    loaded = [LoadedModel(model=None, weight=1.0, label_map=label_map_for(None, 4))]
    confident = Ensemble(_manifest(0.5), loaded, CPU).finish((H, W), _raw())
    assert confident.cell_type == "astro"
    assert len(confident.crops) == 6 and (confident.scores >= 0.5).all()
    every = Ensemble(_manifest(0.0), loaded, CPU).finish((H, W), _raw())
    assert every.cell_type == "shsy5y"  # the fragments outvote the cells when every detection votes
    # a type given by the caller (unlabeled images named by type) skips the vote
    assert Ensemble(_manifest(0.0), loaded, CPU).finish((H, W), _raw(), cell_type="cort").cell_type == "cort"


def test_in_memory_model_runs_the_pipeline_on_a_copy():
    """Training validation runs the model being trained through the pipeline: non-overlapping crops,
    and the model itself keeps its mode, its inference settings and its state_dict keys."""
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY)
    model = build_model(cfg).train()
    keys = list(model.state_dict())
    before = (model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img)
    postprocess_fn = model.transform.postprocess
    manifest = dataclasses.replace(_manifest(0.5), fusion=FusionConfig(model_score_thresh=0.0))
    manifest.classes = {ct: ClassThresholds(score=0.0, mask_threshold=0.5, nms_iou=0.9) for ct in manifest.classes}
    ens = Ensemble.in_memory(model, cfg, manifest, CPU)
    image = (np.random.default_rng(0).random((48, 64)) * 255).astype(np.uint8)
    res = ens.predict(image)
    assert len(res.crops) > 0 and len(res.scores) == len(res.crops)
    assert label_image(res.crops, 48, 64)[1] == 0  # no pixel claimed twice
    assert all(c.area > 0 and c.top >= 0 and c.left >= 0 for c in res.crops)
    assert model.training and list(model.state_dict()) == keys and model.transform.postprocess == postprocess_fn
    assert (model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img) == before
    assert ens.models[0].model is not model and ens.models[0].paste_shift == manifest.fusion.paste_shift


@pytest.mark.slow
def test_predict_applies_the_given_cell_type_and_strictness(tmp_path):
    """Pseudo-labelling's call: the caller's cell type replaces the vote, and the strictness callback's
    higher score bar is the one applied (the normal bar keeps detections under it)."""
    path = make_manifest(tmp_path / "w", n_models=2, tta=("identity", "hflip"), detections_per_view=40)
    m = load_manifest(path)
    ens = Ensemble.load(m, CPU)
    image = blob_image(1)
    normal = ens.predict(image)
    bar = float(normal.scores.min() + normal.scores.max()) / 2
    assert len(normal.crops) > 0 and (normal.scores < bar).any()  # the raised bar has something to drop
    forced = next(t for t in ("cort", "astro") if t != normal.cell_type)
    strict = ens.predict(image, forced, strictness=lambda th: dataclasses.replace(th, score=bar))
    assert strict.cell_type == forced
    assert len(strict.crops) > 0 and len(strict.scores) == len(strict.crops) and (strict.scores >= bar).all()
