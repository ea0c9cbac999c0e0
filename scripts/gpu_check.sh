#!/usr/bin/env bash
# GPU check: build on a GPU machine (torch + nvcc, no network), run the test suite there and
# print a short summary table. Usage: bash scripts/gpu_check.sh   (results also in $OUT if set)
#
# Status: no CUDA attention kernel exists yet (issues 3 and 4), so the CUDA-parameterised tests
# report "built without CUDA attention kernels" as their skip reason; this script proves the
# build and the CPU suite on that machine until then. Extend it with compute-sanitizer and the
# GPU benchmarks together with the kernels.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
export MAX_JOBS="${MAX_JOBS:-16}" FLASH_ATTN_EXT_CUDA=1 FLASH_ATTN_EXT_CUDA_ARCHS="${FLASH_ATTN_EXT_CUDA_ARCHS:-90}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1
build_rc=$?
t1=$(date +%s)
python3 -m pytest -q tests -rs -p no:cacheprovider > "$out/tests.log" 2>&1
test_rc=$?
t2=$(date +%s)

printf '\n| step | result | seconds |\n|---|---|---|\n'
printf '| build (sm_%s) | rc=%s | %s |\n' "$FLASH_ATTN_EXT_CUDA_ARCHS" "$build_rc" "$((t1 - t0))"
printf '| pytest | rc=%s: %s | %s |\n' "$test_rc" "$(tail -n 1 "$out/tests.log")" "$((t2 - t1))"
exit $(( build_rc || test_rc ))
