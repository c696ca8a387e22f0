"""The redesign's fixed point: ``cellseg predict`` with the committed demo model on a fixed synthetic
test folder writes, byte for byte, the submission.csv recorded before the package was regrouped
(tests/fixtures/golden_submission.csv.gz; 12 images, 1297 instances)."""

from __future__ import annotations

import gzip
from pathlib import Path

from cellseg.cli import main
from cellseg.data.synth import generate
from cellseg.paths import demo_manifest

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden_submission.csv.gz"


def test_demo_predict_matches_the_golden_submission(tmp_path):
    data = tmp_path / "data"
    # exactly `cellseg synth --seed 20261130 --train-images 0 --test-images 12` (its 200 semi images included:
    # they come first from the same random stream, so the test images depend on them)
    generate(data, train_images=0, test_images=12, semi_images=200, seed=20261130, progress=False, workers=1)
    out = tmp_path / "submission.csv"
    assert main(["predict", "--data", str(data), "--weights", str(demo_manifest()), "--out", str(out)]) == 0
    want = gzip.decompress(GOLDEN.read_bytes())
    got = out.read_bytes()
    assert got.count(b"\n") == want.count(b"\n")
    assert got == want
