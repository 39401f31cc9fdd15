#!/usr/bin/env bash
# Compile-checks the CUDA sources with nvcc against the installed torch's headers, on a machine whose
# torch has no CUDA (the CPU wheel ships c10/cuda headers but not the generated cuda_cmake_macros.h,
# which a temporary stub supplies). Catches syntax and device-code errors; links and runs nothing.
# Usage: scripts/check_cuda.sh [csrc/cuda/foo.cu ...]   (default: every csrc/cuda/*.cu)
set -euo pipefail
cd "$(dirname "$0")/.."
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
tinc=$(.venv/bin/python -c "import os, torch; print(os.path.dirname(torch.__file__) + '/include')")
pyinc=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(csrc/cuda/*.cu)
for f in "${files[@]}"; do
  nvcc -std=c++20 -O3 -arch="${RLP_CUDA_ARCH:-sm_90}" -I"$stub" -I"$tinc" -I"$tinc/torch/csrc/api/include" \
    -I"$pyinc" -Icsrc -c "$f" -o "$stub/$(basename "$f").o"
  echo "ok: $f"
done
