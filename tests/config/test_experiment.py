"""The typed experiment config: validation thresholds with the manifest's names, the former
``train.val_*`` keys loading with one deprecation line, and augmentation settings that do not
pull the augmentation code into the inference path."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cellseg.config.experiment import load_experiment
from cellseg.config.manifest import ClassThresholds
from cellseg.errors import CellsegError
from cellseg.paths import configs_dir


def test_validation_thresholds_use_the_manifest_names(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("train:\n  val_thresholds: {score: 0.3, mask_threshold: 0.4, nms_iou: 0.6, min_pixels: 9}\n")
    assert load_experiment(p).train.val_thresholds == ClassThresholds(0.3, 0.4, 0.6, 9)
    cfg = load_experiment(p, ["train.val_thresholds.min_pixels=20"])
    assert cfg.train.val_thresholds.min_pixels == 20 and cfg.train.val_thresholds.score == 0.3
    p.write_text("train:\n  val_thresholds: {score_thresh: 0.3}\n")
    with pytest.raises(CellsegError, match="train.val_thresholds.score_thresh"):
        load_experiment(p)


def test_former_val_keys_load_with_one_deprecation_line(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  epochs: 2\n  val_score_thresh: 0.3\n  val_mask_thresh: 0.4\n  val_min_pixels: 7\n")
    cfg = load_experiment(old)
    assert cfg.train.val_thresholds == ClassThresholds(score=0.3, mask_threshold=0.4, min_pixels=7)
    assert cfg.train.epochs == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(old) in err[0] and "deprecated" in err[0]
    assert "train.val_score_thresh -> train.val_thresholds.score" in err[0]
    # an override with a former name works too (a run's config.yaml resumed with an old command line)
    new = tmp_path / "new.yaml"
    new.write_text("train:\n  epochs: 2\n")
    assert load_experiment(new, ["train.val_mask_thresh=0.45"]).train.val_thresholds.mask_threshold == 0.45
    assert "train.val_mask_thresh -> train.val_thresholds.mask_threshold" in capsys.readouterr().err
    # both names for one value: an error, not a silent choice
    both = tmp_path / "both.yaml"
    both.write_text("train:\n  val_score_thresh: 0.3\n  val_thresholds: {score: 0.5}\n")
    with pytest.raises(CellsegError, match="val_score_thresh and train.val_thresholds.score both given"):
        load_experiment(both)


def test_time_limit_is_seconds_once_loaded(tmp_path):
    """``train.time_limit`` is parsed when the config loads: the typed config holds seconds (float)."""
    p = tmp_path / "exp.yaml"
    p.write_text("train:\n  time_limit: 11h30m\n")
    assert load_experiment(p).train.time_limit == 41400.0
    assert load_experiment(p, ["train.time_limit=45m"]).train.time_limit == 2700.0
    assert load_experiment(p, ["train.time_limit=90"]).train.time_limit == 90.0
    assert load_experiment(p, ["train.time_limit=null"]).train.time_limit is None
    assert type(load_experiment(p, ["train.time_limit=2h"]).train.time_limit) is float
    with pytest.raises(CellsegError, match="'train.time_limit=soon': train.time_limit: duration 'soon' not understood"):
        load_experiment(p, ["train.time_limit=soon"])
    p.write_text("train:\n  time_limit: [1]\n")
    with pytest.raises(CellsegError, match="train.time_limit: expected float, got list"):
        load_experiment(p)


def test_shipped_configs_state_their_reference_batch():
    """Every shipped config says which global batch its lr is set for (scaled to the actual one)."""
    for f in sorted(configs_dir().glob("*.yaml")):
        assert "reference_batch:" in f.read_text(), f.name
    assert load_experiment(configs_dir() / "maskrcnn_r50_fpn.yaml").train.reference_batch == 4  # 2 GPUs x 2


def test_shipped_configs_load_without_notices(capsys):
    for f in sorted(configs_dir().glob("*.yaml")):
        load_experiment(f)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_inference_path_does_not_import_augmentation():
    """Loading checkpoints (which store the experiment config) and predicting never imports
    cellseg.data.transforms (torchvision.transforms.v2 and the augmentation code)."""
    code = (
        "import sys\n"
        "import cellseg.inference.runner, cellseg.model.checkpoint, cellseg.config.experiment\n"
        "print(sorted(m for m in sys.modules if m in ('cellseg.data.transforms', 'cellseg.data.dataset')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
