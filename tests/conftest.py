"""Shared fixtures.

``synth_dir``: one small synthetic competition folder per test session (cellseg.data.synth, seed 123):
12 train images (6 cort, 3 shsy5y, 3 astro), 3 test, 3 train_semi_supervised, train.csv,
sample_submission.csv. Read-only: copy it before changing anything.

``tiny_data``: one 9-image training folder per test module (train_helpers.make_tiny_data).
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cellseg.data.synth import generate

    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, train_images=12, test_images=3, semi_images=3, seed=123, progress=False, workers=1)
    return out


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train_helpers import make_tiny_data

    return make_tiny_data(tmp_path_factory.mktemp("tiny") / "data")
