"""The fixed point of every refactor: ``cellseg predict`` with the committed demo model on a fixed
synthetic test folder writes, byte for byte, the recorded submission.csv
(tests/fixtures/golden_submission.csv.gz). Re-recorded only when the demo weights or the synthetic
generator change on purpose, in a commit of its own that says why."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from cellseg.cli import main
from cellseg.data import synth
from cellseg.paths import demo_manifest

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden_submission.csv.gz"


def golden_inputs(data: Path) -> None:
    """The test folder of ``cellseg synth --seed 20261130 --train-images 0 --test-images 12 --semi-images 0``."""
    synth.generate(data, train_images=0, test_images=12, semi_images=0, seed=20261130, progress=False, workers=1)


@pytest.mark.slow
def test_demo_predict_matches_the_golden_submission(tmp_path):
    data = tmp_path / "data"
    golden_inputs(data)
    assert len(list((data / "test").iterdir())) == 12
    out = tmp_path / "submission.csv"
    # one intra-op thread, as recorded: a different split of the convolutions' sums can move a mask
    # probability across its threshold (seen: one pixel of one instance, 1 vs 2 threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["predict", "--data", str(data), "--weights", str(demo_manifest()), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    want = gzip.decompress(GOLDEN.read_bytes())
    got = out.read_bytes()
    assert got.count(b"\n") == want.count(b"\n")
    assert got == want
