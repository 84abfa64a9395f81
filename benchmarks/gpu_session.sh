#!/usr/bin/env bash
# The checks only a GPU can show, as one call on a lent GPU machine (about 8-10 minutes on an H100;
# the tests alone took over 2 minutes there):
#   1. the fast test suite and the GPU-marked tests, with CUDA visible (fp16 extraction, streamed search on the device);
#   2. bench_extract on the real model sizes: fp16 forward and pipeline throughput per model;
#   3. a rehearsal of the post-processing at 400,000 train images with --device cuda (device-resident / streamed search),
#      then its recognition track on this machine's CPU as the baseline (same store, same call).
# Logs and JSON go to $OUT (default /tmp/gpu_session). Each part has its own time limit, so one slow part
# cannot eat the others. Usage: bash benchmarks/gpu_session.sh [tests|extract|rehearse ...] (default: all four)
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
PARTS=${*:-tests extract rehearse rehearse_cpu}
REHEARSE_TRAIN=${REHEARSE_TRAIN:-400000}
EXTRACT_IMAGES=${EXTRACT_IMAGES:-512}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  nproc; free -g | head -2
  $PY -c "import sys,torch,timm,numpy;print('python',sys.version.split()[0],'torch',torch.__version__,'timm',timm.__version__,'numpy',numpy.__version__,'cuda',torch.cuda.is_available())"
  $PY -c "import faiss; print('faiss', faiss.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.log"

for part in $PARTS; do
  t0=$(date +%s); rc=none
  case $part in
    tests)
      timeout 240 $PY -m pytest -q -p no:cacheprovider -m "not slow or gpu" -rs > "$OUT/tests.log" 2>&1; rc=$?
      ;;
    extract)
      timeout 180 $PY -m benchmarks.bench_extract --preset full --images "$EXTRACT_IMAGES" --batch-size 32 \
        --repeat 1 ${EXTRACT_MODELS:+--models "$EXTRACT_MODELS"} --json "$OUT/extract.json" > "$OUT/extract.log" 2>&1; rc=$?
      ;;
    rehearse)
      rm -rf /tmp/gpu_rehearsal
      timeout 150 $PY -m kernel rehearse --out /tmp/gpu_rehearsal --train "$REHEARSE_TRAIN" --index 20000 \
        --test 5000 --bank 2000 --device "${REHEARSE_DEVICE:-cuda}" > "$OUT/rehearse.log" 2>&1; rc=$?
      cp /tmp/gpu_rehearsal/rehearsal_result.json "$OUT/rehearse.json" 2>/dev/null
      tail -30 /tmp/gpu_rehearsal/*.log > "$OUT/rehearse_children.log" 2>/dev/null
      ;;
    rehearse_cpu)  # the same store's recognition on this machine's CPU: the baseline for the GPU's time above
      timeout 120 $PY -m kernel rehearse --out /tmp/gpu_rehearsal --train "$REHEARSE_TRAIN" --index 20000 \
        --test 5000 --bank 2000 --device cpu --tracks recognition > "$OUT/rehearse_cpu.log" 2>&1; rc=$?
      cp /tmp/gpu_rehearsal/rehearsal_result.json "$OUT/rehearse_cpu.json" 2>/dev/null
      ;;
  esac
  echo "== $part: exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.log"
done
echo "===== summary"; cat "$OUT/env.log"; tail -5 "$OUT/tests.log" 2>/dev/null
tail -15 "$OUT/extract.log" 2>/dev/null; grep -hE "models:|error" "$OUT"/rehearse*.log 2>/dev/null
