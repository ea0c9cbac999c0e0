#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer (issue 9; .ci/run runs
# this after the main tests). Builds a separate CPU-only library (-O1 -g, every UB report fatal)
# into build/sanitize/, puts it beside a copy of the Python package, and runs the kernel tests
# against it with the sanitizer runtime preloaded into the (uninstrumented) Python.
#   bash scripts/sanitize_cpu.sh [extra pytest args]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export MAX_JOBS="${MAX_JOBS:-2}"

start=$(date +%s)
mkdir -p build/sanitize
FLASH_ATTN_EXT_SANITIZE=1 python3 setup.py build_ext --build-temp build/sanitize/temp \
  --build-lib build/sanitize/lib > build/sanitize/build.log 2>&1 || { tail -n 50 build/sanitize/build.log; exit 1; }
echo "sanitizer build took $(( $(date +%s) - start )) s"

pkg="$root/build/sanitize/pkg"
rm -rf "$pkg" && mkdir -p "$pkg"
cp -r flash_attn_ext "$pkg/"
rm -f "$pkg"/flash_attn_ext/_C*.so
find "$pkg" -name __pycache__ -type d -prune -exec rm -rf {} +
cp build/sanitize/lib/flash_attn_ext/_C*.so "$pkg/flash_attn_ext/"

# Python is not built with ASan: its runtime must be loaded first. libstdc++ too, or ASan's
# __cxa_throw interceptor finds no real __cxa_throw and aborts on the first C++ exception.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1"  # CPython and torch keep memory alive at exit
export UBSAN_OPTIONS="print_stacktrace=1"
tests=(ops/test_attention_forward.py ops/test_attention_backward.py ops/test_attention_kvcache.py
       ops/test_kv_cache_append.py ops/test_paged_kv_cache.py ops/test_varlen.py ops/test_merge_attention_states.py
       ops/test_opcheck_compile.py features/test_extreme_values.py features/test_softcap.py features/test_alibi.py
       features/test_dropout.py features/test_properties.py features/test_concurrency.py
       features/test_bad_input_catalogue.py features/test_errors.py features/test_kernel_config.py
       features/test_sinks.py features/test_bias_gradients.py features/test_quantized_kv_cache.py
       api/test_flash_attn_kvcache_args.py)
cd "$pkg"  # first on sys.path: `import flash_attn_ext` is the sanitized build
python3 - <<'PY'
import flash_attn_ext, os
so = os.path.join(os.path.dirname(flash_attn_ext.__file__), "_C.abi3.so")
assert flash_attn_ext.__file__.startswith(os.getcwd()), flash_attn_ext.__file__
assert b"__asan_report" in open(so, "rb").read(), "not the sanitized build"
print("sanitized build:", so)
PY
python3 -m pytest -q -p no:cacheprovider -k "not cuda" "${tests[@]/#/$root/tests/}" "$@"
