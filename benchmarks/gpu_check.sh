#!/usr/bin/env bash
# One prepared GPU run that answers every GPU question, within its own deadline (<= 540 s).
#
# On the GPU machine, as ONE device call (the `run` tool; Python 3.12, torch 2.11, torchvision 0.26 there,
# no package registry), after `bash benchmarks/gpu_check.sh --prepare-wheels` here has filled .whl/:
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# Its $OUT/gpu_check.json, gpu_check.log and summary.txt come back. Elsewhere:
#
#   OUT=DIR bash benchmarks/gpu_check.sh               # on a GPU machine, in the repo root
#   OUT=DIR bash benchmarks/gpu_check.sh --cpu-smoke   # every stage on the CPU with tiny sizes (a test runs it)
#   bash benchmarks/gpu_check.sh --prepare-wheels      # here, with the package registry: .whl/ for that machine
#
# Time: the whole run ends within GPU_CHECK_DEADLINE_S (default and most 540 s, from the script's start).
# A stage runs under min(its own limit, the time left); one whose minimum no longer fits is SKIPPED and
# recorded. gpu_check.json is rewritten after every stage (a kill keeps the stages done), and each Python
# stage rewrites its own figures as it goes (a stage killed at its limit keeps what it measured).
# The data are generated once (synth) and every later stage reuses them.
#
# Stages, most wanted first (each timed, its output appended to $OUT/gpu_check.log; a failed stage is
# recorded and the next one still runs; exit 1 if any failed):
#   env            versions, GPU, the device probe, nvidia-smi
#   synth          `cellseg synth --seed 11 --train-images 40 --test-images 20` (its densest pair: 937 cells)
#   memory         the shipped R50 recipe (AMP, batch 2, densest pair, scale jitter 1.25) capped at 15 GiB:
#                  memory.t4_fit, memory.max_reserved_bytes
#   train          train.frozen_bn_keeps_half; R50 steps at batch 2, AMP on and off: s/step, img/s, peak
#   predict        the demo model on 20 test images with 1 and 4 views; its own views under a time budget
#                  (predict.shipped.time_budget_decisions); a forced OOM retried (predict.oom_retry.same_result)
#   r50_inference  a random R50, 4 views x 1000 detections: r50_inference.seconds_per_image, projected to
#                  240 images x 5 models; cudnn.benchmark / channels_last compared (r50_inference.options)
#   nccl           the training collectives through a real NCCL group (benchmarks/gpu_check.py nccl)
#   ddp            `cellseg train` through one epoch end + one validation: 2 processes (torchrun) when two
#                  GPUs are visible, else 1 process (the nccl stage covers the collectives then)
#   dry-run        `cellseg dry-run` of the demo model on 20 train images: the score
#   trainmem       benchmarks/bench_train_memory.py (dense / sparse peak)
# The data and run folders stay in $WORK (default /tmp/gpu_check_work).
set -euo pipefail
START=$(date +%s)
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

DEADLINE_S=${GPU_CHECK_DEADLINE_S:-540}
if [ "$DEADLINE_S" -gt 540 ]; then DEADLINE_S=540; fi
RESERVE=10  # the last merge, and the 5 s a timed-out stage gets between TERM and KILL
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
SKIPPED=0

merge() {  # gpu_check.json from every stage's figures so far (a failed merge is logged, never fatal)
  "$PY" benchmarks/gpu_check.py merge --out "$WORK" --json "$OUT/gpu_check.json" --summary "$SUMMARY" \
    --deadline "$DEADLINE_S" --started "$START" >> "$LOG" 2>&1 || echo "could not merge the stages' figures" >> "$LOG"
}

stage() {  # stage NAME TIME_LIMIT_S MIN_S COMMAND...: run (if MIN_S fits the time left), time and record one stage
  local name=$1 limit=$2 min=$3 rc=0 t0 t1 status left
  shift 3
  left=$((DEADLINE_S - ($(date +%s) - START) - RESERVE))
  if [ "$left" -lt "$min" ]; then
    SKIPPED=$((SKIPPED + 1))
    printf '%-13s %-28s %7s s\n' "$name" "SKIPPED (${left}s left < ${min}s)" "0.0" | tee -a "$SUMMARY"
    return  # no merge: nothing new was measured, and the final merge records the skip
  fi
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  echo "===== $name (limit ${limit}s): $*" >> "$LOG"
  t0=$(date +%s.%N)
  if declare -F "$1" > /dev/null; then  # a function below: it puts $LIMIT on its own commands
    LIMIT=$limit "$@" >> "$LOG" 2>&1 || rc=$?
  else
    timeout -k 5 "$limit" "$@" >> "$LOG" 2>&1 || rc=$?
  fi
  t1=$(date +%s.%N)
  if [ "$rc" -eq 0 ]; then
    status=ok
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="FAILED (over ${limit}s)"
  else
    status="FAILED (exit $rc)"
  fi
  if [ "$rc" -ne 0 ]; then FAILED=$((FAILED + 1)); fi
  printf '%-13s %-28s %7s s\n' "$name" "$status" "$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }")" | tee -a "$SUMMARY"
  merge
}

DATA=$WORK/data
if [ "$MODE" = smoke ]; then
  SYNTH=(--train-images 6 --test-images 2 --semi-images 0 --workers 1)
  TRAIN_TINY=(model.returned_layers=[1,2] "model.anchor_sizes=[[8],[16],[32]]" model.fpn_channels=16
    model.box_head_dim=32 model.mask_head_convs=1 model.input_scale=0.5 train.num_workers=0 train.threads=1
    data.folds=3 train.max_steps=1 train.val_max_images=1 train.val_thresholds.score=0.0 augment.crop_size=[128,128])
  N_IMAGES=2
  R50_IMAGES=1
  MEMORY=(--tiny)
else
  SYNTH=(--train-images 40 --test-images 20)
  TRAIN_TINY=(train.val_max_images=4)
  N_IMAGES=20
  R50_IMAGES=6
  MEMORY=(--device cuda)
fi
TRAIN=(train --config configs/demo.yaml --data "$DATA" --fold 0 --out "$WORK/ddp" --quiet train.epochs=1 "${TRAIN_TINY[@]}")
CHECK=("$PY" benchmarks/gpu_check.py)

# The stage functions run in `cmd || rc=$?` context, where set -e is off: each failure returns explicitly.
env_stage() {
  timeout -k 5 "$LIMIT" "${CHECK[@]}" env --out "$WORK" || return
  if command -v nvidia-smi > /dev/null; then nvidia-smi || return; fi
}
ddp_stage() {
  if [ "$GPUS" -ge 2 ] || [ "$MODE" = smoke ]; then  # smoke: 2 CPU processes on gloo
    timeout -k 5 "$LIMIT" "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m cellseg "${TRAIN[@]}" || return
  else
    timeout -k 5 "$LIMIT" "$PY" -m cellseg "${TRAIN[@]}" || return
  fi
  test -f "$WORK/ddp/last.pth" || return
  grep -q val_score "$WORK/ddp/metrics.csv" || return  # the epoch ended with a validation
  tail -n 2 "$WORK/ddp/metrics.csv"
}
WEIGHTS=weights/demo/manifest.yaml
if [ "$MODE" = smoke ]; then WEIGHTS=$WORK/tiny/manifest.yaml; fi  # written by the predict stage

merge
#     name          limit min  command
stage env            40   10  env_stage
stage synth          60   20  "$PY" -m cellseg synth --out "$DATA" --seed 11 "${SYNTH[@]}"
stage memory         90   30  "${CHECK[@]}" memory --out "$WORK" --data "$DATA" $SMOKE
stage train         120   40  "${CHECK[@]}" train --out "$WORK" --data "$DATA" $SMOKE
stage predict       120   40  "${CHECK[@]}" predict --out "$WORK" --data "$DATA" --images "$N_IMAGES" $SMOKE
stage r50_inference 120   40  "${CHECK[@]}" r50_inference --out "$WORK" --data "$DATA" --images "$R50_IMAGES" $SMOKE
stage nccl           40   10  "${CHECK[@]}" nccl --out "$WORK"
stage ddp           120   40  ddp_stage
stage dry-run        60   20  "$PY" -m cellseg dry-run --data "$DATA" --weights "$WEIGHTS" --images "$N_IMAGES" \
  --report "$WORK/dry-run" --no-progress
stage trainmem      120   30  "$PY" benchmarks/bench_train_memory.py "${MEMORY[@]}"

echo "gpu_check ($MODE): $FAILED stage(s) failed, $SKIPPED skipped, $(($(date +%s) - START))s of ${DEADLINE_S}s;" \
  "$OUT/gpu_check.log, $OUT/gpu_check.json" | tee -a "$SUMMARY"
merge
[ "$FAILED" -eq 0 ]
