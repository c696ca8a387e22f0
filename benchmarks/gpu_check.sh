#!/usr/bin/env bash
# One prepared GPU run, <= 8 minutes on one H200 (Python 3.12, torch 2.11, no package registry):
#
#   OUT=DIR bash benchmarks/gpu_check.sh               # on the GPU machine, in the repo root
#   OUT=DIR bash benchmarks/gpu_check.sh --cpu-smoke   # every stage on the CPU with tiny sizes (a test runs it)
#   bash benchmarks/gpu_check.sh --prepare-wheels      # here, with the package registry: .whl/ for that machine
#
# Stages (each timed, its output appended to $OUT/gpu_check.log; a failed stage is recorded and the next
# one still runs; exit 1 if any failed):
#   env      versions, GPU, nvidia-smi
#   synth    `cellseg synth --seed 11 --train-images 40 --test-images 20` (its densest pair: 937 cells)
#   train    R50-FPN (configs/maskrcnn_r50_fpn.yaml) at batch 2, AMP on and off: s/step, img/s, peak
#            torch.cuda.max_memory_allocated, the densest pair included (benchmarks/gpu_check.py train)
#   memory   benchmarks/bench_train_memory.py --device cuda (dense / sparse peak)
#   nccl     the training collectives through a real NCCL group (benchmarks/gpu_check.py nccl)
#   ddp      `cellseg train` through one epoch end + one validation: 2 processes (torchrun) when two GPUs
#            are visible, else 1 process (the nccl stage covers the collectives then)
#   predict  20 test images with 1 and with 4 TTA views: s/image, forward vs the rest
#   dry-run  `cellseg dry-run` of the demo model on 20 train images: the score
# $OUT gets gpu_check.log, gpu_check.json (every stage's figures) and summary.txt; the data and
# run folders stay in $WORK (default /tmp/gpu_check_work).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
case "${1:-}" in
  "") ;;
  --cpu-smoke) MODE=smoke ;;
  --prepare-wheels) MODE=wheels ;;
  *) echo "usage: OUT=DIR bash benchmarks/gpu_check.sh [--cpu-smoke | --prepare-wheels]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}

if [ "$MODE" = wheels ]; then  # pycocotools is the one package of ours the GPU machine's image lacks
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pycocotools
  echo "wheels in .whl/ (git-ignored): name .whl in the device run's carry"
  exit 0
fi

OUT=${OUT:-$PWD/out/gpu_check}
WORK=${WORK:-/tmp/gpu_check_work}
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.txt
: > "$LOG"
: > "$SUMMARY"
if [ "$MODE" = gpu ] && compgen -G ".whl/*.whl" > /dev/null; then  # the GPU machine only: never in --cpu-smoke
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ "$MODE" = smoke ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  SMOKE=--smoke
  GPUS=0
else
  SMOKE=
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
fi
FAILED=0

stage() {  # stage NAME TIME_LIMIT_S COMMAND...: run, time and record one stage
  local name=$1 limit=$2 rc=0 t0 t1 status
  shift 2
  echo "===== $name: $*" >> "$LOG"
  t0=$(date +%s.%N)
  if declare -F "$1" > /dev/null; then  # a function below: it puts $LIMIT on its own commands
    LIMIT=$limit "$@" >> "$LOG" 2>&1 || rc=$?
  else
    timeout "$limit" "$@" >> "$LOG" 2>&1 || rc=$?
  fi
  t1=$(date +%s.%N)
  if [ "$rc" -eq 0 ]; then
    status=ok
  elif [ "$rc" -eq 124 ]; then
    status="FAILED (over ${limit}s)"
  else
    status="FAILED (exit $rc)"
  fi
  if [ "$rc" -ne 0 ]; then FAILED=$((FAILED + 1)); fi
  printf '%-8s %-28s %7s s\n' "$name" "$status" "$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }")" | tee -a "$SUMMARY"
}

DATA=$WORK/data
if [ "$MODE" = smoke ]; then
  SYNTH=(--train-images 6 --test-images 2 --semi-images 0 --workers 1)
  TRAIN_TINY=(model.returned_layers=[1,2] "model.anchor_sizes=[[8],[16],[32]]" model.fpn_channels=16
    model.box_head_dim=32 model.mask_head_convs=1 model.input_scale=0.5 train.num_workers=0 train.threads=1
    data.folds=3 train.max_steps=1 train.val_max_images=1 train.val_thresholds.score=0.0 augment.crop_size=[128,128])
  N_IMAGES=2
  MEMORY=(--tiny)
else
  SYNTH=(--train-images 40 --test-images 20)
  TRAIN_TINY=(train.val_max_images=4)
  N_IMAGES=20
  MEMORY=(--device cuda)
fi
TRAIN=(train --config configs/demo.yaml --data "$DATA" --fold 0 --out "$WORK/ddp" --quiet train.epochs=1 "${TRAIN_TINY[@]}")

# The stage functions run in `cmd || rc=$?` context, where set -e is off: each failure returns explicitly.
env_stage() {
  timeout "$LIMIT" "$PY" benchmarks/gpu_check.py env --out "$WORK" || return
  if command -v nvidia-smi > /dev/null; then nvidia-smi || return; fi
}
ddp_stage() {
  if [ "$GPUS" -ge 2 ] || [ "$MODE" = smoke ]; then  # smoke: 2 CPU processes on gloo
    timeout "$LIMIT" "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m cellseg "${TRAIN[@]}" || return
  else
    timeout "$LIMIT" "$PY" -m cellseg "${TRAIN[@]}" || return
  fi
  test -f "$WORK/ddp/last.pth" || return
  grep -q val_score "$WORK/ddp/metrics.csv" || return  # the epoch ended with a validation
  tail -n 2 "$WORK/ddp/metrics.csv"
}

stage env 60 env_stage
stage synth 90 "$PY" -m cellseg synth --out "$DATA" --seed 11 "${SYNTH[@]}"
stage train 150 "$PY" benchmarks/gpu_check.py train --out "$WORK" --data "$DATA" $SMOKE
stage memory 120 "$PY" benchmarks/bench_train_memory.py "${MEMORY[@]}"
stage nccl 60 "$PY" benchmarks/gpu_check.py nccl --out "$WORK"
stage ddp 150 ddp_stage
stage predict 120 "$PY" benchmarks/gpu_check.py predict --out "$WORK" --data "$DATA" --images "$N_IMAGES" $SMOKE
WEIGHTS=weights/demo/manifest.yaml
if [ "$MODE" = smoke ]; then WEIGHTS=$WORK/tiny/manifest.yaml; fi
stage dry-run 90 "$PY" -m cellseg dry-run --data "$DATA" --weights "$WEIGHTS" --images "$N_IMAGES" \
  --report "$WORK/dry-run" --no-progress

"$PY" - "$WORK" "$OUT/gpu_check.json" "$SUMMARY" <<'PYEOF' || echo "could not merge the stages' figures" | tee -a "$SUMMARY"
import json, sys
from pathlib import Path
work, out, summary = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
merged = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
if (work / "dry-run" / "summary.json").is_file():
    merged["dry_run"] = json.loads((work / "dry-run" / "summary.json").read_text())
merged["stages"] = summary.read_text().splitlines()
out.write_text(json.dumps(merged, indent=1, default=str))
print(json.dumps({k: v for k, v in merged.items() if k != "stages"}, indent=1, default=str))
PYEOF
echo "gpu_check ($MODE): $FAILED stage(s) failed; $OUT/gpu_check.log, $OUT/gpu_check.json" | tee -a "$SUMMARY"
[ "$FAILED" -eq 0 ]
