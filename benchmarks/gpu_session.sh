#!/usr/bin/env bash
# The checks only a GPU can show, as one call on a lent GPU machine (about 8 minutes on an H200):
#   tests     the whole suite (slow tests and training included) with CUDA visible, in parallel, each test
#             with its own time limit (pytest-timeout) so one hang cannot eat the session;
#   train     benchmarks.bench_train: training images/s of the tiny step, CPU fp32 against CUDA fp16 and bf16;
#   extract   benchmarks.bench_extract on the real model sizes: fp16 forward and pipeline throughput per model;
#   post      benchmarks.bench_device_postprocess at 400,000 train images: recognition with the database
#             resident on the GPU, streamed to it, and on this machine's CPU (same store, same call);
#   profile   python -m kernel profile --device cuda: ms/image, best batch size and measured efficiency per model.
# Device time is short (15 minutes a session, the start included): the first H200 call ran every part and
# each reached its limit; give the parts time by running fewer of them per call.
# Output (at most 8 files come back from a lent machine): $OUT/session.log (environment, every part's exit
# status and time, the tail of its log), $OUT/tests.log, and one JSON per measurement. Each part has its own
# time limit, so one slow part cannot eat the others.
# Usage: bash benchmarks/gpu_session.sh [tests|train|extract|post|profile ...] (default: all, in that order);
# TEST_ARGS overrides the test selection (e.g. "tests/test_train_gpu.py" for a rerun of one file).
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
PARTS=${*:-tests train extract post profile}
LOGS=/tmp/gpu_session_logs
mkdir -p "$LOGS"
LOG="$OUT/session.log"

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  echo "cpus $(nproc)"; free -g | head -2
  $PY -c "import sys,torch,timm,numpy,pandas;print('python',sys.version.split()[0],'torch',torch.__version__,'timm',timm.__version__,'numpy',numpy.__version__,'pandas',pandas.__version__,'cuda',torch.cuda.is_available(),'nccl',torch.distributed.is_nccl_available())"
  $PY -c "import xdist, pytest_timeout; print('pytest-xdist and pytest-timeout present')" 2>&1 | tail -1
} 2>&1 | tee "$LOG"

part_log() { echo "--- $1 (last ${2:-25} lines)"; tail -n "${2:-25}" "$LOGS/$1.log"; }

for part in $PARTS; do
  t0=$(date +%s); rc=none
  case $part in
    tests)
      # -n N processes share the GPU (each its own CUDA context, well inside 140 GB) and the cores: each gets
      # cores/N threads. With torch's default (every core in every process: 256 threads on 16 cores) the
      # subprocess tests ran past their limits on the H200 machine.
      export OMP_NUM_THREADS=$(( $(nproc) / ${TEST_PROCS:-8} > 0 ? $(nproc) / ${TEST_PROCS:-8} : 1 ))
      timeout -s INT -k 15 ${TESTS_LIMIT:-240} $PY -m pytest -v -p no:cacheprovider -n ${TEST_PROCS:-8} --timeout 100 -rfEs --durations 25 \
        ${TEST_ARGS:-} > "$OUT/tests.log" 2>&1; rc=$?
      ;;
    train)
      timeout 60 $PY -m benchmarks.bench_train --runs cpu:fp32 cuda:fp16 cuda:bf16 \
        --json "$OUT/train.json" > "$LOGS/train.log" 2>&1; rc=$?
      ;;
    extract)
      timeout 90 $PY -m benchmarks.bench_extract --preset full --images 512 --batch-size 32 --repeat 1 \
        --json "$OUT/extract.json" > "$LOGS/extract.log" 2>&1; rc=$?
      ;;
    post)
      timeout 110 $PY -m benchmarks.bench_device_postprocess --train 400000 --index 20000 --test 5000 --bank 2000 \
        --root /tmp/gpu_post --json "$OUT/postprocess.json" > "$LOGS/post.log" 2>&1; rc=$?
      ;;
    profile)
      timeout 70 $PY -m kernel profile --device cuda --batch-sizes 8,16,32,64,128 --iters 5 \
        --json "$OUT/profile.json" > "$LOGS/profile.log" 2>&1; rc=$?
      ;;
    *) echo "unknown part $part"; continue ;;
  esac
  echo "== $part: exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
  [ "$part" = tests ] || part_log "$part" 40 >> "$LOG"
done
echo "===== summary" | tee -a "$LOG"
grep "^== " "$LOG"
tail -25 "$OUT/tests.log" 2>/dev/null
