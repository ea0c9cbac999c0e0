#!/usr/bin/env bash
# Compile every C++ source (syntax and templates only) and, when nvcc is there, every CUDA
# source (sm_90 object code, discarded) against another torch's headers, without linking, to
# keep the code building on torch 2.11 .. 2.15 while development pins 2.14.1. (The GPU
# machines have torch 2.11: a CUDA source that fails here would fail scripts/gpu_check.sh.)
# Usage: bash scripts/check_torch_headers.sh 2.11.0 2.15.0   (downloads each wheel once, ~1 GB)
#        bash scripts/check_torch_headers.sh 2.11.0 2.15.0 -- csrc/a.cpp csrc/b.cu   (only these)
set -euo pipefail
cd "$(dirname "$0")/.."
versions=() only=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; only=("$@"); break; fi
  versions+=("$1"); shift
done
sources() {  # $1: the ending (cpp or cu)
  if [ ${#only[@]} -gt 0 ]; then printf '%s\n' "${only[@]}" | grep "\.$1\$" || true
  else find csrc -name "*.$1" | sort; fi
}
cache="${TORCH_HEADERS_CACHE:-/tmp/torch_headers}"
py_inc="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
status=0
for version in "${versions[@]}"; do
  dir="$cache/$version"
  if [ ! -d "$dir/torch/include" ]; then
    mkdir -p "$dir"
    python3 -m pip download -q --no-deps --only-binary=:all: "torch==$version" -d "$dir/wheel"
    (cd "$dir" && unzip -q -o wheel/torch-*.whl 'torch/include/*')
  fi
  inc="$dir/torch/include"
  for src in $(sources cpp); do
    if g++ -std=c++20 -fsyntax-only -Wall -DPy_LIMITED_API=0x030A0000 -Icsrc -I"$inc" \
        -I"$inc/torch/csrc/api/include" -I"$py_inc" "$src"; then
      echo "torch $version: $src ok"
    else
      echo "torch $version: $src FAILED"; status=1
    fi
  done
  if command -v nvcc >/dev/null 2>&1; then
    for src in $(sources cu); do
      if nvcc -c -o /dev/null -std=c++20 --expt-relaxed-constexpr -DPy_LIMITED_API=0x030A0000 \
          -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
          -D__CUDA_NO_HALF2_OPERATORS__ -gencode arch=compute_90,code=sm_90 -Icsrc -I"$inc" \
          -I"$inc/torch/csrc/api/include" -I"$py_inc" "$src"; then
        echo "torch $version: $src ok"
      else
        echo "torch $version: $src FAILED"; status=1
      fi
    done
  fi
done
exit $status
