#!/usr/bin/env bash
# cellseg on the oldest torch/torchvision it supports: Kaggle's image lags ours, so the kernels must
# run there. Two floors (docs/KAGGLE.md, "Versions"):
#   predict (inference, the submission kernel): torch 2.4.1 / torchvision 0.19.1 (pyproject.toml)
#   train (cellseg train, the training kernel): torch 2.6.0 / torchvision 0.21.0 -- the custom
#     augmentations use torchvision's public make_params/transform hooks and v2.query_size, which
#     0.19 lacks (0.20 added query_size, 0.21 the hooks); kernel/train.py refuses an older torchvision.
#
#   bash tools/oldtorch_venv.sh            # both venvs (once), the kernel test on the inference floor,
#                                          # then 2 training steps of every config on the training floor
#   STAGES=predict bash tools/oldtorch_venv.sh    # only the inference floor (STAGES=train: only training)
#   TORCH=2.4.1 VISION=0.19.1 TRAIN_TORCH=2.6.0 TRAIN_VISION=0.21.0 bash tools/oldtorch_venv.sh
#
# Each venv (.venv-oldtorch/, .venv-oldtorch-train/, git-ignored) comes from the package registry:
# that torch, its matching torchvision, the dependencies of pyproject.toml and pytest. The default
# torch wheel pulls its CUDA libraries (a few GB, once per venv). CI does not run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.4.1}
VISION=${VISION:-0.19.1}
TRAIN_TORCH=${TRAIN_TORCH:-2.6.0}
TRAIN_VISION=${TRAIN_VISION:-0.21.0}
PY=${PY:-python3.11}
VENV=${VENV:-.venv-oldtorch}
TRAIN_VENV=${TRAIN_VENV:-.venv-oldtorch-train}
STAGES=${STAGES:-predict train}

# make_venv DIR TORCH VISION: create DIR with that torch/torchvision unless it already has that torch
make_venv() {
  local venv=$1 torch=$2 vision=$3
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch')" 2>/dev/null; then
    "$PY" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
    "$venv/bin/python" -m pip install --quiet "torch==$torch" "torchvision==$vision" \
      numpy scipy pandas pillow pyyaml tqdm matplotlib scikit-learn pycocotools pytest
  fi
  # cellseg from this checkout, as an editable install would (a .pth line, not PYTHONPATH: the kernel
  # test's bare venv must not see cellseg, and it inherits the environment but not this venv's .pth files)
  local site
  site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$PWD/src" > "$site/cellseg_checkout.pth"
  "$venv/bin/python" -c "import torch, torchvision, numpy; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'numpy', numpy.__version__)"
}

for stage in $STAGES; do
  case $stage in
    predict)  # the submission kernel, end to end, in a bare venv beside this one
      make_venv "$VENV" "$TORCH" "$VISION"
      env -u PYTHONPATH OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
        tests/kaggle/test_kernel.py "$@"
      ;;
    train)  # two optimiser steps of every shipped config
      make_venv "$TRAIN_VENV" "$TRAIN_TORCH" "$TRAIN_VISION"
      env -u PYTHONPATH OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$TRAIN_VENV/bin/python" tools/train_every_config.py
      ;;
    *) echo "oldtorch_venv.sh: unknown stage '$stage' (predict, train)" >&2; exit 2 ;;
  esac
done
