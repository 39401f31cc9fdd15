#!/usr/bin/env bash
# Compile-checks C++ sources alone (no link), with the flags setup.py uses: a quick check before
# the shared build. Usage: scripts/check_cpp.sh csrc/foo.cpp [...]
set -euo pipefail
cd "$(dirname "$0")/.."
inc=$(.venv/bin/python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
pyinc=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for f in "$@"; do
  g++ -std=c++20 -O1 -fopenmp -fsyntax-only -Wall $inc -I"$pyinc" -Icsrc "$f"
  echo "ok: $f"
done
