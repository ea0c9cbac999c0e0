#!/usr/bin/env bash
# GPU check, one call on a GPU machine that has torch and nvcc but no network: build the
# extension, run every CUDA test (the device-parameterised suite, the slow sweep included, and
# tests/ops/test_cuda_kernels.py), run every CUDA kernel under compute-sanitizer memcheck and
# racecheck, run the GPU benchmark, and print a short table last. Logs go to $OUT (or
# /tmp/gpu_check). Designed to finish well inside 8 minutes on an H200.
#
#   bash scripts/gpu_check.sh            # everything
#   SKIP_BENCH=1 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
export MAX_JOBS="${MAX_JOBS:-16}" FLASH_ATTN_EXT_CUDA=1 FLASH_ATTN_EXT_CUDA_ARCHS="${FLASH_ATTN_EXT_CUDA_ARCHS:-90}"
export FLASH_ATTN_EXT_CUDA_KERNELS=1 PYTHONUNBUFFERED=1  # use the CUDA kernels (see flash_attn_ext/_ops.py)
py=python3

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /' | tee -a "$out/gpu.txt"

step() {  # step NAME TIMEOUT CMD...: runs CMD with a time limit, logs to $out/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  printf '| %s | rc=%s | %s | %s |\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" \
    "$(grep -v '^\s*$' "$out/$name.log" | tail -n 1 | cut -c1-110)" >> "$out/summary.md"
  echo "[$name] rc=$rc"
  return $rc
}
printf '| step | result | seconds | last line |\n|---|---|---|---|\n' > "$out/summary.md"

step build 300 $py -m pip install --no-build-isolation --no-deps -e . || { cat "$out/build.log" | tail -30; cat "$out/summary.md"; exit 1; }
step tests_cuda 240 $py -m pytest -q tests -k cuda -m "slow or not slow" -rs -p no:cacheprovider --maxfail=25 --continue-on-collection-errors
tail -n 25 "$out/tests_cuda.log"
if command -v compute-sanitizer >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  step memcheck 120 "$cs" --tool memcheck --error-exitcode 1 $py scripts/cuda_small_cases.py
  step racecheck 120 "$cs" --tool racecheck --error-exitcode 1 $py scripts/cuda_small_cases.py
else
  echo "| sanitizer | not found | 0 | compute-sanitizer is not installed |" >> "$out/summary.md"
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  step bench 200 $py benchmarks/bench_attention_cuda.py --quick --csv "$out/bench_cuda.csv"
  cat "$out/bench.log"
  step bench_decode 120 $py benchmarks/bench_decode.py --device cuda --seq 8192 32768 131072 --batch 1 8 \
    --dtypes bfloat16 --csv "$out/bench_decode.csv"
  cat "$out/bench_decode.log"
  step bench_varlen 90 $py benchmarks/bench_varlen.py --device cuda --lengths 8192 512 3000 128 6000 1024 \
    --dtypes bfloat16 --dim 128 --csv "$out/bench_varlen.csv"
  cat "$out/bench_varlen.log"
fi
echo
cat "$out/summary.md"
! grep -q "rc=[1-9]" "$out/summary.md"
