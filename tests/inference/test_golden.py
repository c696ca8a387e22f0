"""The redesign's fixed point: ``cellseg predict`` with the committed demo model on a fixed synthetic
test folder writes, byte for byte, the submission.csv recorded before the package was regrouped
(tests/fixtures/golden_submission.csv.gz; 12 images, 1297 instances)."""

from __future__ import annotations

import gzip
from pathlib import Path

from cellseg.cli import main
from cellseg.data import synth
from cellseg.paths import demo_manifest

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden_submission.csv.gz"


def test_demo_predict_matches_the_golden_submission(tmp_path, monkeypatch):
    data = tmp_path / "data"
    # the test folder of `cellseg synth --seed 20261130 --train-images 0 --test-images 12`: its 200 semi
    # images draw from the same random stream first (names, types), so they are planned as there, but
    # only the 12 test images are rendered (each image's pixels come from its own seed)
    render = synth._job
    rendered = []

    def test_images_only(task):
        if Path(task[2]).parent.name != "test":
            return [], [], 0
        rendered.append(task[2])
        return render(task)

    monkeypatch.setattr(synth, "_job", test_images_only)
    synth.generate(data, train_images=0, test_images=12, semi_images=200, seed=20261130, progress=False, workers=1)
    assert len(rendered) == 12 and sorted(p.name for p in (data / "test").iterdir()) == sorted(
        Path(p).name for p in rendered
    )
    out = tmp_path / "submission.csv"
    assert main(["predict", "--data", str(data), "--weights", str(demo_manifest()), "--out", str(out)]) == 0
    want = gzip.decompress(GOLDEN.read_bytes())
    got = out.read_bytes()
    assert got.count(b"\n") == want.count(b"\n")
    assert got == want
