#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite on CPU (Triton kernels through
# TRITON_INTERPRET=1). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One OpenMP thread per pytest worker: two workers on two cores already fill the machine, and an
# oversubscribed OpenMP region spins waiting for descheduled threads. tests/test_threads.py runs the
# threaded kernels explicitly.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m pytest -n "${RLP_TEST_WORKERS:-2}" tests "$@"
