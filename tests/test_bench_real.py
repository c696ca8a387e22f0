"""benchmarks/bench_real.py kept from rotting: one training step of a tiny demo model on the committed
Usiigaci fixture (set 31, MIT), scored at export's thresholds and, with ``--tune``, with thresholds tuned
on the training tiles (predict-raw + tune), as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cellseg.paths import repo_root

FIXTURE = Path(__file__).parent / "fixtures" / "usiigaci"
TINY = [
    "model.returned_layers=[1,2]",
    "model.anchor_sizes=[[8],[16],[32]]",
    "model.fpn_channels=16",
    "model.box_head_dim=32",
    "model.mask_head_convs=1",
    "train.num_workers=0",
    "augment.crop_size=[128,128]",
]


@pytest.mark.slow
def test_tune_scores_the_held_out_tiles_with_thresholds_tuned_on_the_training_tiles(tmp_path: Path) -> None:
    work = tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(repo_root() / "benchmarks" / "bench_real.py"), "--src", str(FIXTURE),
           "--work", str(work), "--train-sets", "31-31", "--test-sets", "31-31", "--steps", "1", "--scale", "1.0",
           "--train-tile", "64x96",
           "--baseline", "none", "--tune", "--adapt-bn", "--set", *TINY]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    # the fixture's 128 x 192 crop is one held-out tile, scored with export's thresholds and with the
    # tuned ones; --train-tile cuts its training copy into four overlapping 64 x 96 tiles, trained and
    # tuned on
    assert summary["trained"]["tiles"] == 1
    assert summary["tuned_on_train"]["tiles"] == 1
    assert summary["tune_seconds"] > 0
    assert [r["iou"] for r in summary["trained"]["per_threshold"]][::9] == [0.5, 0.95]
    assert "by IoU threshold: 0.50 " in res.stdout
    cached = sorted(p.stem for p in (work / "cache-train").glob("*.npz"))  # predict-raw cached each
    assert cached == ["set31_r0c0", "set31_r0c96", "set31_r64c0", "set31_r64c96"], cached
    assert json.loads((work / "usi-train" / "cellseg-import.json").read_text())["tile"] == [64, 96]
    assert (work / "weights-tuned" / "manifest.yaml").is_file()
    assert (work / "report-tuned" / "summary.json").is_file()
    assert "tuned on the training tiles: " in res.stdout
    assert "ratio n/a (0 at export's thresholds)" in res.stdout  # one step of the tiny model scores 0
    # --adapt-bn: the export with BatchNorm statistics of the training tiles, scored on the held-out ones
    assert summary["adapted"]["tiles"] == 1
    adapted = yaml.safe_load((work / "weights-adapted" / "manifest.yaml").read_text())
    assert adapted["models"][0]["provenance"]["adapted"]["images"] == 4  # the four training tiles
    assert "BatchNorm statistics of the training tiles: " in res.stdout
    assert summary["tuned_over_trained"] is None


def test_a_training_import_with_another_tile_size_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A work folder reused with another ``--train-tile`` must not train on the old tiles."""
    monkeypatch.syspath_prepend(str(repo_root() / "benchmarks"))
    import bench_real

    out = tmp_path / "usi-train"
    whole = bench_real._import(FIXTURE, out, "31-31", "astro")
    assert whole["tile"] == [520, 704] and whole["tiles"] == 1
    cut = bench_real._import(FIXTURE, out, "31-31", "astro", (64, 96))
    assert cut["tile"] == [64, 96] and cut["tiles"] == 4
    assert len(list((out / "train").glob("*.png"))) == 4
    stamp = (out / "cellseg-import.json").stat().st_mtime_ns
    assert bench_real._import(FIXTURE, out, "31-31", "astro", (64, 96)) == cut  # the same size: kept, not redone
    assert (out / "cellseg-import.json").stat().st_mtime_ns == stamp
