#!/usr/bin/env bash
# Sets up .venv with everything rlp-engine needs, on a fresh machine with only Python 3.10+.
# torch goes in first and the extension is built against it with --no-build-isolation: an isolated
# build (or an unpinned torch) would pull a multi-GB CUDA torch. RLP_TORCH overrides the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel ninja
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${RLP_TORCH:-2.13.0}"
fi
extras=${RLP_EXTRAS:-dev,train}
.venv/bin/python -m pip install -q --no-build-isolation -e ".[${extras}]"
