"""Validation during training runs the inference pipeline: a checkpoint's validation score is what
``cellseg dry-run`` gives for that checkpoint on the same images with the same thresholds."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cellseg.cli import main
from cellseg.config.experiment import ExperimentConfig, TrainConfig, upgrade_keys
from cellseg.config.loader import from_dict
from cellseg.config.manifest import ClassThresholds, ModelEntry, write_manifest
from cellseg.data.folds import holdout_split
from cellseg.data.truth import read_train_csv
from cellseg.errors import CellsegError
from cellseg.model.checkpoint import read_checkpoint_info
from cellseg.paths import demo_manifest
from cellseg.training.engine import LOSS_NAMES, train_one_epoch, validation_manifest
from cellseg.training.loop import train

DEMO_MODEL = demo_manifest().parent / "model.pth"


def demo_experiment(**train_fields) -> ExperimentConfig:
    """The committed demo model's own experiment config (so its weights load as the init), made cheap:
    one optimiser step, no loader workers, fewer RPN proposals, native input scale."""
    raw = upgrade_keys(read_checkpoint_info(DEMO_MODEL).experiment, str(DEMO_MODEL), notice=lambda _: None)
    cfg = from_dict(ExperimentConfig, raw)
    cfg.model = dataclasses.replace(cfg.model, rpn_pre_nms_top_n_test=600, rpn_post_nms_top_n_test=300, input_scale=1.0)
    cfg.train = dataclasses.replace(
        cfg.train,
        epochs=1,
        max_steps=1,
        lr=1e-4,
        warmup_iters=0,
        num_workers=0,
        val_every=1,
        val_max_images=0,
        **train_fields,
    )
    cfg.data = dataclasses.replace(cfg.data, folds=4, fold_seed=0, type_repeat={})
    return cfg


@pytest.mark.slow
def test_validation_score_equals_dry_run_of_the_checkpoint(synth_dir, tmp_path):
    """Fine-tune the demo model one step on the synthetic fold 0, validating on its hold-out; then
    dry-run best.pth on that fold with validation's thresholds. Both run in this process, with the
    demo config's one torch thread (``train.threads``), so the scores must agree to the last bit."""
    cfg = demo_experiment(val_thresholds=ClassThresholds(score=0.4, mask_threshold=0.45, nms_iou=0.4, min_pixels=20))
    res = train(cfg, synth_dir, fold=0, init=DEMO_MODEL, out=tmp_path / "run", progress=False)
    info = read_checkpoint_info(tmp_path / "run" / "best.pth")
    val_score = info.provenance["score"]
    assert val_score == res.best_score and val_score > 0.1  # the demo model finds cells: a real comparison

    # the same thresholds as a weights manifest around the checkpoint, and dry-run on the same fold
    manifest = dataclasses.replace(validation_manifest(cfg), models=[ModelEntry("best.pth")])
    path = write_manifest(manifest, tmp_path / "run" / "validation.yaml")
    report = tmp_path / "dry"
    args = ["dry-run", "--data", str(synth_dir), "--weights", str(path), "--fold", "0", "-k", "4", "--seed", "0"]
    assert main([*args, "--report", str(report), "--device", "cpu", "--no-progress"]) == 0
    summary = json.loads((report / "summary.json").read_text())
    hold_ids = holdout_split(read_train_csv(synth_dir / "train.csv"), 0, 4, 0)[1]
    assert summary["images"] == len(hold_ids) >= 2
    assert summary["score"] == pytest.approx(val_score, abs=1e-12)
    validated = {ct: s for ct, s in info.provenance["per_class"].items() if s is not None}
    assert summary["per_class"] == pytest.approx(validated, abs=1e-12)


def test_validation_manifest_is_val_thresholds_for_every_type():
    cfg = ExperimentConfig()
    th = dataclasses.replace(cfg.train.val_thresholds, score=0.3, min_pixels=12)
    cfg.train = dataclasses.replace(cfg.train, val_thresholds=th)
    cfg.model = dataclasses.replace(cfg.model, box_detections_per_img=2000)
    m = validation_manifest(cfg)
    assert m.tta == ["identity"] and m.models == []
    assert {ct: m.thresholds(ct) for ct in ("shsy5y", "astro", "cort")} == {
        ct: th for ct in ("shsy5y", "astro", "cort")
    }
    assert m.fusion.detections_per_view == 2000  # the model's own cap (dense LIVECell images)
    m.classes["astro"].score = 0.9  # each type gets its own copy
    assert m.thresholds("cort").score == 0.3 and th.score == 0.3


class _LossModel(torch.nn.Module):
    """Returns fixed loss terms (the second one non-finite at step ``bad_at``) through a real parameter."""

    def __init__(self, bad_at: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls, self.bad_at = 0, bad_at

    def forward(self, images, targets):
        self.calls += 1
        second = float("nan") if self.calls == self.bad_at else 0.25
        return {"loss_a": self.w * 0.5, "loss_b": self.w * second}


def test_train_one_epoch_means_and_a_non_finite_loss_named_by_term():
    def run(model: torch.nn.Module, steps: int):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        loader = [([torch.zeros(3, 4, 4)], [{}])] * steps
        return train_one_epoch(
            model, loader, opt, sched, torch.amp.GradScaler("cuda", enabled=False), torch.device("cpu"),
            TrainConfig(), epoch=0, step=0, total_steps=steps, steps_per_epoch=steps, use_amp=False,
            log=lambda m: None, progress=False,
        )  # fmt: skip

    stats = run(_LossModel(bad_at=0), 3)
    assert stats.steps == 3 and stats.step == 3 and not stats.stopped
    assert stats.means == pytest.approx({"loss_a": 0.5, "loss_b": 0.25, "loss": 0.75})
    with pytest.raises(CellsegError, match=r"loss is nan at step 1 \(epoch 1\): loss_a=0\.5, loss_b=nan"):
        run(_LossModel(bad_at=2), 3)


class _TwoTermModel(torch.nn.Module):
    """loss_mask = 0.5 * a and loss_classifier = 0.25 * b, through two real parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(()))
        self.b = torch.nn.Parameter(torch.ones(()))

    def forward(self, images, targets):
        return {"loss_mask": self.a * 0.5, "loss_classifier": self.b * 0.25}


def test_loss_weights_reach_the_optimiser_and_the_logged_terms_stay_unweighted():
    assert {"loss_mask", "loss_classifier"} <= set(LOSS_NAMES)
    model = _TwoTermModel()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tc = TrainConfig(loss_weights={"loss_mask": 0.0, "loss_classifier": 2.0}, grad_clip=0.0)
    stats = train_one_epoch(
        model, [([torch.zeros(3, 4, 4)], [{}])], opt, sched, torch.amp.GradScaler("cuda", enabled=False),
        torch.device("cpu"), tc, epoch=0, step=0, total_steps=1, steps_per_epoch=1, use_amp=False,
        log=lambda m: None, progress=False,
    )  # fmt: skip
    assert model.a.item() == 1.0  # weight 0: no gradient reaches the mask term's parameter
    assert model.b.item() == pytest.approx(1.0 - 2.0 * 0.25)  # weight 2: twice the step
    # the terms as the model gave them; the total is the weighted 0 * 0.5 + 2 * 0.25 (unweighted: 0.75)
    assert stats.means == pytest.approx({"loss_mask": 0.5, "loss_classifier": 0.25, "loss": 0.5})
