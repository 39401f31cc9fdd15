#!/usr/bin/env bash
# Installs the CPU build of torch into .venv (sourced by scripts/setup.sh; `bash
# scripts/install_torch.sh torch==2.13.0` runs it alone).
#
# pip's own choice is kept when it is a CPU build (this machine's local wheel, a configured CPU index,
# PyPI's macOS/Windows wheels): that path installs in seconds. Otherwise - PyPI's Linux torch is the
# CUDA build, multi-GB with its nvidia-* packages - or when that install fails, torch comes from
# PyTorch's CPU index (RLP_TORCH_INDEX overrides it). pip is asked first with
# `install --dry-run --report`, which resolves and reads the wheel's metadata without installing.
#
# TORCH_PIP and TORCH_PY are the pip command and the Python that reads pip's report
# (tests/test_install_torch.py stubs pip through them).
TORCH_PIP=${TORCH_PIP:-.venv/bin/python -m pip}
TORCH_PY=${TORCH_PY:-.venv/bin/python}
TORCH_CPU_INDEX=${RLP_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

# Exit 0 when pip's install report $1 picks a CPU torch: a local version label that is not cuXXX or
# rocmX.Y, and no nvidia-* requirement (the CUDA libraries PyPI's Linux wheel pulls).
torch_report_is_cpu() {
  "$TORCH_PY" - "$1" <<'PY'
import json, re, sys

picked = [i for i in json.load(open(sys.argv[1])).get("install", []) if i["metadata"]["name"].lower() == "torch"]
if len(picked) != 1:
    sys.exit(1)
meta = picked[0]["metadata"]
label = meta["version"].partition("+")[2]
cuda = re.match(r"(cu|rocm)\d", label) or any(
    re.match(r"nvidia-", req.strip().lower()) for req in meta.get("requires_dist") or []
)
print(f"torch {meta['version']} from {picked[0]['download_info']['url']}: {'CUDA' if cuda else 'CPU'} build")
sys.exit(1 if cuda else 0)
PY
}

# install_torch REQUIREMENT: pip's pick when it is a CPU build and installs, else the CPU index.
install_torch() {
  local req=$1 report ok=1
  report=$(mktemp)
  # --ignore-installed: report the wheel even when some torch is installed; --no-deps: torch alone
  if $TORCH_PIP install -q --dry-run --ignore-installed --no-deps --report "$report" "$req" >/dev/null 2>&1 \
    && torch_report_is_cpu "$report"; then
    $TORCH_PIP install -q "$req" && ok=0
  fi
  rm -f "$report"
  if [ "$ok" != 0 ]; then
    echo "installing $req from the CPU index $TORCH_CPU_INDEX"
    $TORCH_PIP install -q --index-url "$TORCH_CPU_INDEX" "$req"
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  cd "$(dirname "$0")/.."
  install_torch "${1:-torch==${RLP_TORCH:-2.13.0}}"
fi
