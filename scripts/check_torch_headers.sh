#!/usr/bin/env bash
# Compile every C++ source against another torch's headers (syntax and templates only, no
# link), to keep the code building on torch 2.11 .. 2.15 while development pins 2.14.1.
# Usage: bash scripts/check_torch_headers.sh 2.11.0 2.15.0   (downloads each wheel once, ~1 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${TORCH_HEADERS_CACHE:-/tmp/torch_headers}"
py_inc="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
status=0
for version in "$@"; do
  dir="$cache/$version"
  if [ ! -d "$dir/torch/include" ]; then
    mkdir -p "$dir"
    python3 -m pip download -q --no-deps --only-binary=:all: "torch==$version" -d "$dir/wheel"
    (cd "$dir" && unzip -q -o wheel/torch-*.whl 'torch/include/*')
  fi
  inc="$dir/torch/include"
  for src in $(find csrc -name '*.cpp' | sort); do
    if g++ -std=c++20 -fsyntax-only -Wall -DPy_LIMITED_API=0x030A0000 -Icsrc -I"$inc" \
        -I"$inc/torch/csrc/api/include" -I"$py_inc" "$src"; then
      echo "torch $version: $src ok"
    else
      echo "torch $version: $src FAILED"; status=1
    fi
  done
done
exit $status
