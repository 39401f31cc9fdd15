#!/usr/bin/env bash
# Sets up .venv with everything rlp-engine needs, on a fresh machine with only Python 3.10+.
# torch goes in first, its CPU build (scripts/install_torch.sh: pip's pick when that is a CPU wheel,
# else PyTorch's CPU index), and the extension is built against it with --no-build-isolation: an
# isolated build (or PyPI's Linux torch) would pull a multi-GB CUDA torch. RLP_TORCH overrides the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel ninja
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  source scripts/install_torch.sh
  install_torch "torch==${RLP_TORCH:-2.13.0}"
fi
# deepspeed: a source package, pure Python when DS_BUILD_OPS=0 (its CPU comm op is compiled on first
# use, ~1 min once, cached in ~/.cache/torch_extensions); its ZeRO-3 test runs on CPU with gloo.
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}
extras=${RLP_EXTRAS:-dev,train,deepspeed}
.venv/bin/python -m pip install -q --no-build-isolation -e ".[${extras}]"
# The real verl, TRL and OpenRLHF that rlp_engine.compat mimics, for tests/test_compat_*.py (~3 s,
# ~30 MB). --no-deps: their dependency lists pull ray, datasets/pyarrow, flash-attn, vllm-era
# transformers and deepspeed pins, none of which their loss modules use; the tests load those modules
# with stubs for the unrelated imports (tests/test_compat_peers.py). omegaconf is verl's config type,
# accelerate (+ psutil) an import of TRL's utils. verl's and OpenRLHF's wheels also install their test
# files as top-level `tests` and `scripts` packages in site-packages. Liger-Kernel (pure Python over
# triton) is what tests/test_fused_preference.py compares the fused DPO/SimPO ops with. RLP_PEERS=0
# skips this.
if [ "${RLP_PEERS:-1}" = 1 ]; then
  .venv/bin/python -m pip install -q --no-deps \
    verl==0.9.1 trl==1.12.0 openrlhf==0.11.2 omegaconf==2.4.0 accelerate==1.16.0 psutil liger-kernel==0.8.5
fi
