#!/usr/bin/env bash
# cellseg on the oldest torch/torchvision it supports (pyproject.toml: torch>=2.4, torchvision>=0.19):
# Kaggle's image lags ours, so both kernels must run there (docs/KAGGLE.md, "Versions").
#
#   bash tools/oldtorch_venv.sh            # make .venv-oldtorch/ (once), then both stages:
#                                          #   predict: tests/kaggle/test_kernel.py (the submission kernel)
#                                          #   train:   2 training steps of every config (tools/train_every_config.py)
#   STAGES=predict bash tools/oldtorch_venv.sh     # one stage only (STAGES=train likewise)
#   TORCH=2.5.1 VISION=0.20.1 VENV=/tmp/venv-tv020 bash tools/oldtorch_venv.sh
#
# Makes a second venv (.venv-oldtorch/, git-ignored) from the package registry: that torch, its matching
# torchvision, the dependencies of pyproject.toml and pytest. The default torch wheel pulls its CUDA
# libraries (a few GB, once). CI does not run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.4.1}
VISION=${VISION:-0.19.1}
PY=${PY:-python3.11}
VENV=${VENV:-.venv-oldtorch}
STAGES=${STAGES:-predict train}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH')" 2>/dev/null; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install --quiet "torch==$TORCH" "torchvision==$VISION" \
    numpy scipy pandas pillow pyyaml tqdm matplotlib scikit-learn pycocotools pytest
fi
# cellseg from this checkout, as an editable install would (a .pth line, not PYTHONPATH: the kernel test's
# bare venv must not see cellseg, and it inherits the environment but not this venv's .pth files)
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$PWD/src" > "$SITE/cellseg_checkout.pth"
"$VENV/bin/python" -c "import torch, torchvision, numpy; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'numpy', numpy.__version__)"

for stage in $STAGES; do
  case $stage in
    predict)  # the submission kernel, end to end, from a bare venv beside this one
      env -u PYTHONPATH OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
        tests/kaggle/test_kernel.py "$@"
      ;;
    train)  # two optimiser steps of every shipped config (and of the augmentations none turns on)
      env -u PYTHONPATH OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" tools/train_every_config.py
      ;;
    *) echo "oldtorch_venv.sh: unknown stage '$stage' (predict, train)" >&2; exit 2 ;;
  esac
done
