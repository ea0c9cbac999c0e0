#!/usr/bin/env bash
# The project's formatters: ruff (Python: format + lint, config in pyproject.toml) and
# clang-format (C++ / CUDA: .clang-format). `--check` changes nothing and fails on any difference
# (.ci/run runs it); without it, formats in place. Versions pinned in requirements-dev.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
cpp=$(git ls-files -co --exclude-standard -- 'csrc/*' 'tests/native/cpp/*' 'examples/cpp/*' |
      grep -E '\.(cpp|h|cu|cuh)$')
if [[ "${1:-}" == "--check" ]]; then
  ruff format --check .
  ruff check .
  # shellcheck disable=SC2086
  clang-format --dry-run --Werror $cpp
  echo "format: clean"
else
  ruff format .
  ruff check --fix .
  # shellcheck disable=SC2086
  clang-format -i $cpp
fi
