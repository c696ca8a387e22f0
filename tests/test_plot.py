"""cellseg.plot: real PNGs written and read back (size, not blank, legends by their artists and their
pixels), the dry-run overlay's hatching, curves.png without a hold-out, show-aug's default config."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cellseg import plot
from cellseg.cli import main
from cellseg.commands.show_aug import DEFAULT_CONFIG, default_config, load_augment
from cellseg.paths import configs_dir

GREEN = np.array(plot.TRUTH_RGB)
MAGENTA = np.array(plot.PRED_RGB)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im).astype(int)


def near(px: np.ndarray, rgb: np.ndarray, tol: int = 40) -> np.ndarray:
    """(..., 3) -> (...) bool: pixels within ``tol`` of ``rgb`` in every channel."""
    return (np.abs(px - rgb) <= tol).all(axis=-1)


def three_cells(h: int = 60, w: int = 80) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image and label images: cell 1 predicted well (IoU 0.8), truth cell 2 missed, prediction 2 a false positive."""
    image = np.full((h, w), 90, np.uint8)
    truth = np.zeros((h, w), np.int32)
    pred = np.zeros((h, w), np.int32)
    truth[5:25, 5:25] = 1
    pred[5:25, 5:21] = 1  # IoU 16/20 = 0.8 with truth 1
    truth[35:55, 5:25] = 2  # no prediction there
    pred[35:55, 50:70] = 2  # no truth there
    return image, truth, pred


def test_overlay_contours_and_hatching_of_unmatched_cells():
    image, truth, pred = three_cells()
    rgb = plot.overlay(image, truth, pred)
    assert plot.contour(truth).sum() == 2 * 76  # two 20x20 squares: their rings
    assert tuple(rgb[5, 10]) == plot.PRED_RGB  # a shared edge: predictions are drawn on top
    assert tuple(rgb[15, 24]) == plot.TRUTH_RGB and tuple(rgb[15, 20]) == plot.PRED_RGB
    r, c = np.indices(truth.shape)
    inside = lambda lab, k: (lab == k) & ~plot.contour(lab)  # noqa: E731
    # the matched cell's interior stays grey: no hatching
    assert (rgb[inside(truth, 1) & inside(pred, 1)] == 90).all()
    # missed truth: green "\" lines every HATCH_PERIOD px, grey between
    miss = inside(truth, 2)
    on = miss & ((r - c) % plot.HATCH_PERIOD == 0)
    assert on.sum() > 20 and (rgb[on] == GREEN).all() and (rgb[miss & ~on] == 90).all()
    # false positive: magenta "/" lines
    fp = inside(pred, 2)
    on = fp & ((r + c) % plot.HATCH_PERIOD == 0)
    assert on.sum() > 20 and (rgb[on] == MAGENTA).all() and (rgb[fp & ~on] == 90).all()
    # without hatching only contours are coloured
    plain = plot.overlay(image, truth, pred, hatch=False)
    assert (plain[miss] == 90).all() and (plain[fp] == 90).all()


def test_dry_run_overlay_png_has_a_legend(tmp_path):
    image, truth, pred = three_cells(120, 200)
    fig = plot.overlay_figure(image, truth, pred, title="abc  cort  score 0.333")
    legend = fig.legends[0]
    texts = [t.get_text() for t in legend.get_texts()]
    assert any("truth" in t for t in texts) and any("prediction" in t for t in texts)
    assert any("missed" in t for t in texts) and any("false positive" in t for t in texts)
    hatches = {h.get_hatch() for h in legend.legend_handles}
    assert {"\\\\\\", "///"} <= hatches  # the hatching is explained, in both directions
    path = plot.save_overlay(tmp_path / "o" / "00_abc.png", image, truth, pred, "abc  cort  score 0.333")
    px = read_png(path)
    assert px.shape == (120 + plot.LEGEND_PX, plot.LEGEND_MIN_WIDTH, 3)  # narrow image: the legend still fits
    # the image part is the overlay, pixel for pixel
    assert (px[:120, :200] == plot.overlay(image, truth, pred)).all(axis=-1).mean() > 0.99
    strip = px[120:]
    assert strip.std() > 10  # text and swatches, not a blank strip
    assert near(strip, GREEN).sum() > 20 and near(strip, MAGENTA).sum() > 20  # the colour swatches


def test_curves_without_holdout_say_so_without_a_legend_warning(tmp_path):
    history = [{"epoch": e, "loss": 1.0 / e, "loss_mask": 0.5 / e, "lr": 0.01} for e in (1, 2, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found" would raise here
        fig = plot.curves_figure(history)
        path = plot.training_curves(history, tmp_path / "curves.png")
    ax_loss, ax_val = fig.axes
    assert ax_val.get_legend() is None and not ax_val.lines
    assert plot.NO_HOLDOUT in [t.get_text() for t in ax_val.texts]
    assert ax_loss.get_legend() is not None and len(ax_loss.lines) == 2
    px = read_png(path)
    assert px.shape == (360, 990, 3) and px.std() > 10


def test_curves_with_holdout_plot_the_scores(tmp_path):
    history = [{"epoch": 1, "loss": 1.0, "val_score": np.nan}, {"epoch": 2, "loss": 0.5, "val_score": 0.3}]
    history[0]["val_score"] = 0.2
    fig = plot.curves_figure(history)
    ax_val = fig.axes[1]
    assert [t.get_text() for t in ax_val.get_legend().get_texts()] == ["score"]
    assert plot.NO_HOLDOUT not in [t.get_text() for t in ax_val.texts]
    assert list(ax_val.lines[0].get_ydata()) == [0.2, 0.3]


def test_score_by_class_png(tmp_path):
    path = plot.score_by_class({"astro": 0.2, "cort": 0.4, "shsy5y": 0.1}, {"astro": 1, "cort": 2}, tmp_path / "s.png")
    px = read_png(path)
    assert px.shape == (320, 500, 3) and px.std() > 10


def test_show_aug_draws_the_default_training_config_and_says_so(synth_dir, tmp_path, capsys):
    path, source = default_config()
    assert path == configs_dir() / DEFAULT_CONFIG and f"configs/{DEFAULT_CONFIG}" in source
    want = yaml.safe_load(path.read_text())["augment"]
    got = load_augment(path, [])
    assert got.scale_range == tuple(want["scale_range"]) != (1.0, 1.0)  # the config's, not AugmentConfig()'s
    out = tmp_path / "grid.png"
    ids = sorted(p.stem for p in (synth_dir / "train").glob("*.png"))[:1]
    assert main(["show-aug", "--data", str(synth_dir), "-n", "1", "--out", str(out), "--ids", *ids]) == 0
    printed = capsys.readouterr().out
    assert f"augmentation: configs/{DEFAULT_CONFIG}" in printed
    px = read_png(out)
    assert px.shape[0] > 300 and px.shape[1] > 300 and (np.ptp(px, axis=-1) > 100).sum() > 50  # coloured contours


def test_nothing_but_plot_imports_matplotlib():
    src = Path(plot.__file__).parent
    users = sorted(
        str(p.relative_to(src)) for p in src.rglob("*.py") if "matplotlib" in p.read_text() and p.name != "plot.py"
    )
    assert users == []


@pytest.mark.slow
def test_kernel_path_imports_neither_matplotlib_nor_sklearn():
    code = "import sys, cellseg.inference.runner; print(sorted({'matplotlib', 'sklearn'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
