#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite on CPU (Triton kernels through
# TRITON_INTERPRET=1). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -n "${RLP_TEST_WORKERS:-2}" tests "$@"
