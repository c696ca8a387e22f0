"""Helpers for running the Kaggle kernels (kernel/*.py) as real subprocesses in tests."""

from __future__ import annotations

import os


def bare_env(**extra: str) -> dict[str, str]:
    """The environment for the ``bare_python`` fixture's interpreter: no PYTHONPATH (a checkout's src/
    on it would make cellseg importable without the wheel) and no CELLSEG_KAGGLE_ROOT."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CELLSEG_KAGGLE_ROOT")}
    env.update(extra)
    return env
