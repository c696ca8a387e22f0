"""Numbers checked when they are loaded: manifest thresholds, experiment keys, command-line options.
NaN and inf are refused everywhere with one line naming the key and its allowed range; a bad
manifest can be neither used nor shipped (tune, export --thresholds-from). Rows of docs/BAD_INPUT.md."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bad_input_helpers import REPO, assert_one_line_error, cli_inproc, leftovers, usage_error
from cellseg.io import write_gray
from helpers import train_rows, write_train_csv
from inference_helpers import make_competition, make_manifest

DEMO = REPO / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_manifest(tmp_path_factory.mktemp("w") / "tiny", n_models=1, tta=("identity",), detections_per_view=30)


@pytest.fixture
def data(tmp_path) -> Path:
    root = make_competition(tmp_path / "data", n_test=1, height=40, width=48)
    m = np.zeros((40, 48), bool)
    m[5:10, 5:10] = True
    rows = []
    for k, i in enumerate(("t1", "t2")):
        rows += train_rows(i, "cort", [m], sample_id=f"s{k}")
        write_gray(root / "train" / f"{i}.png", np.full((40, 48), 120, np.uint8))
    write_train_csv(root / "train.csv", rows)
    return root


def edited(tiny: Path, tmp_path: Path, edit) -> Path:
    """A copy of the tiny ensemble with its manifest.yaml's mapping changed by ``edit``."""
    w = tmp_path / "bad"
    shutil.copytree(tiny.parent, w)
    data = yaml.safe_load((w / "manifest.yaml").read_text())
    edit(data)
    (w / "manifest.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return w / "manifest.yaml"


def set_class(key, value):
    def edit(d):
        d["classes"]["cort"][key] = value

    return edit


def set_key(section, key, value):
    def edit(d):
        if section == "models":
            d["models"][0][key] = value
        else:
            d[section][key] = value

    return edit


# (edit, key named, range named)
BAD_MANIFESTS = {
    "mask_threshold .nan": (set_class("mask_threshold", float("nan")), "classes.cort.mask_threshold", "[0, 1]"),
    "score 5.0": (set_class("score", 5.0), "classes.cort.score", "[0, 1]"),
    "score .inf": (set_class("score", float("inf")), "classes.cort.score", "NaN and inf"),
    "nms_iou 0": (set_class("nms_iou", 0.0), "classes.cort.nms_iou", "(0, 1]"),
    "min_pixels -1": (set_class("min_pixels", -1), "classes.cort.min_pixels", ">= 0"),
    "model weight 0": (set_key("models", "weight", 0.0), "models[0].weight", "> 0"),
    "model weight -inf": (set_key("models", "weight", float("-inf")), "models[0].weight", "> 0"),
    "fusion.model_score_thresh 2": (
        set_key("fusion", "model_score_thresh", 2.0),
        "fusion.model_score_thresh",
        "[0, 1]",
    ),
    "postprocess.max_lost_fraction .nan": (
        set_key("postprocess", "max_lost_fraction", float("nan")),
        "postprocess.max_lost_fraction",
        "[0, 1]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_a_manifest_value_out_of_range_stops_predict(case, tiny, data, tmp_path, capsys):
    edit, key, allowed = BAD_MANIFESTS[case]
    manifest = edited(tiny, tmp_path, edit)
    out = tmp_path / "sub.csv"
    res = cli_inproc(capsys, "predict", "--data", data, "--weights", manifest, "--out", out, "--no-progress")
    assert_one_line_error(res, "manifest.yaml", key, allowed)
    assert not out.exists() and "loaded" not in res.err


def test_export_never_copies_a_bad_template(tiny, tmp_path, capsys):
    for edit, key in (
        (set_class("mask_threshold", float("nan")), "mask_threshold"),
        (set_class("score", 5.0), "score"),
    ):
        template = edited(tiny, tmp_path / key, edit)
        out = tmp_path / f"new-{key}"
        res = cli_inproc(capsys, "export", tiny.parent / "model0.pth", "--out", out, "--thresholds-from", template)
        assert_one_line_error(res, f"classes.cort.{key}", "[0, 1]")
        assert not out.exists()


def test_tune_refuses_grids_outside_the_ranges_and_a_non_finite_min_gain(tiny, data, tmp_path, capsys):
    common = ("tune", "--cache", tmp_path / "cache", "--truth", data / "train.csv", "--weights", tiny)
    before = tiny.read_bytes()
    for flag, value, words in (
        ("--score", "0.5,1.5", ("--score", "1.5", "[0, 1]")),
        ("--mask-threshold", "-2", ("--mask-threshold", "-2", "[0, 1]")),
        ("--nms-iou", "0", ("--nms-iou", "0", "(0, 1]")),
        ("--min-pixels", "-1", ("--min-pixels", "-1", ">= 0")),
        ("--score", ",", ("--score", "no candidate value")),
    ):
        assert_one_line_error(cli_inproc(capsys, *common, flag, value), *words)
    usage_error(cli_inproc(capsys, *common, "--min-gain", "nan"), "--min-gain", "finite")
    usage_error(cli_inproc(capsys, *common, "--folds", "0"), "--folds", ">= 1")
    assert tiny.read_bytes() == before
    assert not (tmp_path / "cache").exists()


# experiment keys: a line naming the key (and the override) and the range, before any training
BAD_OVERRIDES = {
    "train.lr=-1": ("train.lr", "> 0"),
    "train.lr=.nan": ("train.lr", "NaN and inf"),
    "train.batch_size=0": ("train.batch_size", ">= 1"),
    "train.epochs=0": ("train.epochs", ">= 1"),
    "train.momentum=1.5": ("train.momentum", "[0, 1]"),
    "train.time_limit=.inf": ("train.time_limit", "NaN and inf"),
    "train.val_thresholds.score=2": ("train.val_thresholds.score", "[0, 1]"),
    "data.folds=1": ("data.folds", ">= 2"),
    "augment.hflip=1.5": ("augment.hflip", "[0, 1]"),
    "train.loss_weights={loss_mask: -1}": ("train.loss_weights.loss_mask", ">= 0"),
    "model.mask_loss=dice": ("model.mask_loss", "'bce+dice'"),
}


@pytest.mark.parametrize("override", list(BAD_OVERRIDES))
def test_experiment_values_out_of_range_are_one_line(override, data, tmp_path, capsys):
    key, allowed = BAD_OVERRIDES[override]
    run = tmp_path / "run"
    res = cli_inproc(capsys, "train", "--config", DEMO, "--data", data, "--out", run, override)
    assert_one_line_error(res, f"command-line override {override!r}", key, allowed)
    assert not run.exists()


def test_an_unknown_loss_weight_is_refused_before_training(data, tmp_path, capsys):
    run = tmp_path / "run"
    res = cli_inproc(
        capsys, "train", "--config", DEMO, "--data", data, "--out", run, "train.loss_weights={loss_msk: 2}"
    )
    assert_one_line_error(res, "train.loss_weights", "'loss_msk'", "loss_mask")
    assert not run.exists()


def test_a_non_finite_value_in_the_config_file_names_the_file(data, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["train"]["weight_decay"] = float("inf")
    bad.write_text(yaml.safe_dump(cfg))
    res = cli_inproc(capsys, "train", "--config", bad, "--data", data, "--out", tmp_path / "run")
    assert_one_line_error(res, "bad.yaml", "train.weight_decay", "NaN and inf")


def test_show_aug_set_out_of_range(data, tmp_path, capsys):
    res = cli_inproc(capsys, "show-aug", "--data", data, "--set", "copy_paste_p=2", "--out", tmp_path / "g.png")
    assert_one_line_error(res, "augment.copy_paste_p", "[0, 1]")
    assert not (tmp_path / "g.png").exists()


# ------------------------------------------------------------------ --device and other options

DEVICE_COMMANDS = {
    "predict": ("--data", "{data}", "--weights", "{w}"),
    "dry-run": ("--data", "{data}", "--weights", "{w}"),
    "predict-raw": ("--data", "{data}", "--weights", "{w}", "--out", "{tmp}/c"),
    "pseudo-label": ("--data", "{data}", "--weights", "{w}", "--out", "{tmp}/p.csv"),
    "demo": ("--out", "{tmp}/d"),
}


@pytest.mark.parametrize("command", list(DEVICE_COMMANDS))
@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU"])
def test_every_command_takes_one_device_list(command, device, tiny, data, tmp_path, capsys):
    fill = {"data": data, "w": tiny, "tmp": tmp_path}
    res = cli_inproc(capsys, command, *[a.format(**fill) for a in DEVICE_COMMANDS[command]], "--device", device)
    usage_error(res, "--device", f"invalid device {device!r}", "auto, cpu, cuda, cuda:N")
    assert leftovers(tmp_path) == ["data"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_predict_raw_without_the_gpu_asked_for_leaves_no_stamped_cache(tiny, data, tmp_path, capsys):
    cache = tmp_path / "cache"
    res = cli_inproc(capsys, "predict-raw", "--data", data, "--weights", tiny, "--out", cache, "--device", "cuda:0")
    assert_one_line_error(res, "no CUDA GPU")
    assert not cache.exists()


@pytest.mark.parametrize("command", ["pseudo-label", "predict-raw", "dry-run"])
def test_images_0_is_refused(command, tiny, data, tmp_path, capsys):
    out = ("--report" if command == "dry-run" else "--out", tmp_path / ("o.csv" if command == "pseudo-label" else "o"))
    res = cli_inproc(capsys, command, "--data", data, "--weights", tiny, *out, "--images", "0")
    usage_error(res, "--images", "must be >= 1, got 0")
    assert leftovers(tmp_path) == ["data"]


def test_pseudo_label_non_finite_margins(tiny, data, tmp_path, capsys):
    for flag in ("--score-margin", "--min-pixels-factor"):
        res = cli_inproc(
            capsys, "pseudo-label", "--data", data, "--weights", tiny, "--out", tmp_path / "p.csv", flag, "nan"
        )
        usage_error(res, flag, "finite")


def test_export_bad_tta_and_weights_leave_the_old_folder_as_it_was(tiny, tmp_path, capsys):
    out = tmp_path / "w"
    shutil.copytree(tiny.parent, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ckpt = tiny.parent / "model0.pth"
    for tta, words in (("", ("names no view",)), (",", ("names no view",)), ("identity,identity", ("given twice",))):
        res = cli_inproc(capsys, "export", ckpt, "--out", out, "--force", "--tta", tta)
        assert_one_line_error(res, "--tta", *words)
    for bad in ("nan", "0", "-1", "inf"):
        usage_error(
            cli_inproc(capsys, "export", ckpt, "--out", out, "--force", "--model-weights", bad), "--model-weights"
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == ["w"]
    # without --force into a new folder: nothing half-made
    res = cli_inproc(capsys, "export", ckpt, "--out", tmp_path / "new", "--tta", "identity,identity")
    assert res.code == 2 and not (tmp_path / "new").exists()


def test_export_force_keeps_tunes_versions_and_replaces_the_rest(tiny, tmp_path, capsys):
    out = tmp_path / "w"
    shutil.copytree(tiny.parent, out)
    (out / "manifest.v1.yaml").write_text("kept\n")
    res = cli_inproc(capsys, "export", tiny.parent / "model0.pth", "--out", out, "--force", "--tta", "identity,vflip")
    assert res.code == 0, res.err
    assert sorted(p.name for p in out.iterdir()) == ["manifest.v1.yaml", "manifest.yaml", "model.pth"]
    assert (out / "manifest.v1.yaml").read_text() == "kept\n"
    assert yaml.safe_load((out / "manifest.yaml").read_text())["tta"] == ["identity", "vflip"]
    assert leftovers(tmp_path) == ["w"]


def test_export_into_a_folder_of_other_files_is_refused_even_with_force(tiny, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    res = cli_inproc(capsys, "export", tiny.parent / "model0.pth", "--out", out, "--force")
    assert_one_line_error(res, "is not an earlier export")
    assert leftovers(out) == ["thesis.tex"]
