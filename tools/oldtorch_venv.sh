#!/usr/bin/env bash
# The kernel test against the oldest torch/torchvision the inference path supports (pyproject.toml:
# torch>=2.4, torchvision>=0.19): Kaggle's image lags ours, so the kernel must run there.
#
#   bash tools/oldtorch_venv.sh            # make .venv-oldtorch/ (once) and run tests/kaggle/test_kernel.py
#   TORCH=2.4.1 VISION=0.19.1 bash tools/oldtorch_venv.sh
#
# Makes a second venv (.venv-oldtorch/, git-ignored) from the package registry: that torch, its matching
# torchvision, the inference dependencies of pyproject.toml and pytest. The default torch wheel pulls
# its CUDA libraries (a few GB, once). CI does not run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.4.1}
VISION=${VISION:-0.19.1}
PY=${PY:-python3.11}
VENV=${VENV:-.venv-oldtorch}

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
env -u PYTHONPATH OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/kaggle/test_kernel.py "$@"
