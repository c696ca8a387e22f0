#!/usr/bin/env python
"""Upload the bundle, push the kernels (inference and training), submit, fetch: ``python tools/push.py --help``.

The logic lives in ``cellseg.kaggle.push`` (dataset / kernel / submit / all) and
``cellseg.kaggle.push_train`` (train / fetch); docs/KAGGLE.md explains every step.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:
    import cellseg  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

from cellseg.kaggle.push import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(repo=REPO))
