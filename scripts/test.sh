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
# DeepSpeed compiles its CPU comm op (deepspeed_shm_comm) the first time a process group starts;
# build it once here (about 45 s, cached in ~/.cache/torch_extensions) rather than inside the
# multi-process tests' time limits, where two tests would compile it at once on a loaded machine.
if .venv/bin/python -c "import deepspeed" 2>/dev/null; then
  DS_ACCELERATOR=cpu .venv/bin/python -c "from deepspeed.accelerator import get_accelerator as a; \
a().create_op_builder('ShareMemCommBuilder').load()" >/dev/null 2>&1 \
    || echo "deepspeed_shm_comm did not build here; the DeepSpeed tests will try again"
fi
.venv/bin/python -m pytest -n "${RLP_TEST_WORKERS:-2}" tests "$@"
