#!/usr/bin/env bash
# GPU check on a machine that has torch and nvcc but no network, in two phases that each fit
# one device command (at most 8 minutes, the sum of the step limits below; an issue's whole
# device budget is 15 minutes, machine start included):
#
#   bash scripts/gpu_check.sh check   # build, every CUDA test (slow sweep included), then the
#                                     # small cases under compute-sanitizer memcheck, racecheck,
#                                     # initcheck and synccheck (<= 470 s of limits)
#   bash scripts/gpu_check.sh bench   # build (a no-op on the same machine: build/pip-temp-cuda
#                                     # is kept), the GPU benchmarks (<= 460 s of limits)
#
# Run `bench` right after `check` (a warm machine keeps the build; a fresh one rebuilds inside
# the build step's limit). Each phase prints a table of its steps last; logs and CSVs go to
# $OUT (or /tmp/gpu_check). The exit code is non-zero when any step failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
phase="${1:-check}"
case "$phase" in check | bench) ;; *) echo "usage: $0 check|bench" >&2; exit 2 ;; esac
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
export MAX_JOBS="${MAX_JOBS:-16}" FLASH_ATTN_EXT_CUDA=1 FLASH_ATTN_EXT_CUDA_ARCHS="${FLASH_ATTN_EXT_CUDA_ARCHS:-90}"
export FLASH_ATTN_EXT_CUDA_KERNELS=1 PYTHONUNBUFFERED=1  # use the CUDA kernels (see flash_attn_ext/_ops.py)
py="${PYTHON:-python3}"  # PYTHON: another interpreter (a stub, to dry-run this script)

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /'
} | tee "$out/gpu_$phase.txt"

summary="$out/summary_$phase.md"
step() {  # step NAME LIMIT_S CMD...: runs CMD with a time limit, logs to $out/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "(timed out after $limit s)" >> "$out/$name.log"
  printf '| %s | rc=%s | %s / %s | %s |\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" \
    "$(grep -v '^\s*$' "$out/$name.log" | tail -n 1 | cut -c1-110)" >> "$summary"
  echo "[$name] rc=$rc"
  return $rc
}
printf '| step | result | seconds / limit | last line |\n|---|---|---|---|\n' > "$summary"
finish() { echo; cat "$summary"; ! grep -q "rc=[1-9]" "$summary"; exit $?; }

# One build per machine: pip reuses build/pip-temp-cuda (setup.py), so the second phase's build
# step only relinks when nothing changed.
if ! step build 200 $py -m pip install --no-build-isolation --no-deps -e .; then
  tail -30 "$out/build.log"
  finish
fi

if [ "$phase" = check ]; then
  step tests_cuda 120 $py -m pytest -q tests -k cuda -m "slow or not slow" -rs -p no:cacheprovider --maxfail=25 \
    --continue-on-collection-errors
  tail -n 25 "$out/tests_cuda.log"
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [ -x "$cs" ]; then
    # Each tool over the same small cases (scripts/cuda_small_cases.py: every kernel, the
    # double-buffered prefetch and the unmasked fast path included); the sanitizers slow kernels
    # down 10-100x, hence the small shapes.
    for tool_limit in memcheck:40 racecheck:60 initcheck:25 synccheck:25; do
      step "${tool_limit%:*}" "${tool_limit#*:}" "$cs" --tool "${tool_limit%:*}" --error-exitcode 1 \
        $py scripts/cuda_small_cases.py
    done
  else
    echo "| sanitizer | not found | 0 | compute-sanitizer is not installed |" >> "$summary"
  fi
else
  step bench 140 $py benchmarks/bench_attention_cuda.py --quick --csv "$out/bench_cuda.csv"
  cat "$out/bench.log"
  step bench_decode 70 $py benchmarks/bench_decode.py --device cuda --seq 8192 32768 131072 --batch 1 8 \
    --dtypes bfloat16 --csv "$out/bench_decode.csv"
  cat "$out/bench_decode.log"
  step bench_varlen 50 $py benchmarks/bench_varlen.py --device cuda --lengths 8192 512 3000 128 6000 1024 \
    --dtypes bfloat16 --dim 128 --csv "$out/bench_varlen.csv"
  cat "$out/bench_varlen.log"
fi
finish
