#!/usr/bin/env bash
# The prepared GPU check, for the first session that gets an H100/H200 (budget: 8 minutes of device
# time, steps in priority order, each under its own limit and the whole under GPU_CHECK_BUDGET):
#   env        the device, torch/triton versions (read-only nvidia-smi query)
#   import     rlp_engine importable without a build (rlp_engine/kernels: a symlink to kernels/)
#   aot        bench/triton_aot.py on the device's own triton (fused LM-head kernels, sm_90; needs no
#              GPU, so the dry run runs it too): compare with the CPU machine's table in bench/RESULTS.md
#   pytest     the gpu-marked tests (pytest -m gpu, in the files that have the marker)
#   fused      bench/bench_fused_linear.py N=16384 H=4096 V=131072 bf16, with the cuBLAS matmul of the
#              same shape (and Liger when importable: see --wheels); then fp32 with IEEE vs tf32
#              operands (N=4096) and a small N=512 (the SM-count splits)
#   losses     bench/bench_losses.py, PPO policy + value + KL at 4.2M tokens (512 x 8192)
#   gae        bench/bench_gae.py, 4.2M tokens (512 x 8192)
#   logprobs   bench/bench_logprobs.py (its GPU defaults: N=8192 V=131072 bf16)
#   ppo        bench/bench_ppo.py --device cuda (TRL row when TRL is importable)
#   build      the extension with its CUDA kernels (pip install -e .), then the CUDA GAE test
# Every step's output goes to $OUTDIR/<step>.log; $OUTDIR/summary.md gets a row per step and the
# bench tables; the rows the benches append to bench/results.csv are copied to $OUTDIR/results_new.csv
# (the device machine's work tree does not come back: only $OUT does).
#
# Usage: scripts/gpu_check.sh [--dry-run] [--wheels DIR]
#   --dry-run    on any machine (CPU here): every step wired and printed, nothing that needs a GPU run;
#                checks that each bench flag exists (--help), that pytest collects the gpu tests, and
#                that the package imports from the checkout.
#   --wheels DIR pip-install the wheels in DIR first (--no-index --no-deps), e.g. liger-kernel, trl.
# Environment: PYTHON (default: .venv/bin/python when its torch has CUDA, else python3),
#   GPU_CHECK_OUT (default: $OUT/gpu_check on the device machine, else a new temporary directory),
#   GPU_CHECK_BUDGET seconds (default 480).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS=${2:?--wheels needs a directory}; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ] && { [ $DRY = 1 ] || .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }; then
  PY=$ROOT/.venv/bin/python
else
  PY=$(command -v python3)
fi
if [ -n "${GPU_CHECK_OUT:-}" ]; then OUTDIR=$GPU_CHECK_OUT
elif [ -n "${OUT:-}" ]; then OUTDIR=$OUT/gpu_check
else OUTDIR=$(mktemp -d /tmp/gpu_check.XXXXXX)
fi
mkdir -p "$OUTDIR"
BUDGET=${GPU_CHECK_BUDGET:-480}
START=$SECONDS
SUMMARY=$OUTDIR/summary.md
FAILED=0
export PY ROOT OUTDIR TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
CSV=bench/results.csv
CSV_LINES=$( [ -f $CSV ] && wc -l < $CSV || echo 0 )
unset TRITON_INTERPRET  # the real kernels, not the interpreter

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  [ $DRY = 1 ] && echo "DRY RUN: nothing that needs a GPU was run." && echo
  echo "| step | status | seconds | command |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

record() {  # step status seconds command
  echo "| $1 | $2 | $3 | \`$4\` |" >> "$SUMMARY"
  echo "gpu_check: $1: $2 (${3}s)"
}

# step NAME LIMIT_S NEEDS_GPU(0/1) CMD...: runs CMD under min(LIMIT_S, what is left of the budget),
# output to $OUTDIR/NAME.log. Dry run: a GPU step is printed and skipped.
step() {
  local name=$1 limit=$2 gpu=$3
  shift 3
  local cmd="$*" left=$((BUDGET - (SECONDS - START)))
  echo "== $name: $cmd"
  if [ $DRY = 1 ] && [ "$gpu" = 1 ]; then
    record "$name" "skipped (dry run: needs a GPU)" 0 "$cmd"
    return 0
  fi
  if [ "$gpu" = 1 ] && [ $HAS_CUDA = 0 ]; then
    record "$name" "FAILED: no CUDA device (use --dry-run here)" 0 "$cmd"
    FAILED=1
    return 0
  fi
  if [ $left -lt 15 ]; then
    record "$name" "skipped: out of budget" 0 "$cmd"
    return 0
  fi
  local t=$((limit < left ? limit : left)) s=$SECONDS rc
  if declare -F "$1" > /dev/null; then  # a shell function: timeout runs programs only
    timeout -k 10 "$t" bash -c "$(declare -f "$1"); $*" > "$OUTDIR/$name.log" 2>&1
  else
    timeout -k 10 "$t" "$@" > "$OUTDIR/$name.log" 2>&1
  fi
  rc=$?
  local took=$((SECONDS - s)) status="ok"
  if [ $rc = 124 ] || [ $rc = 137 ]; then status="TIMEOUT after ${t}s"; FAILED=1
  elif [ $rc != 0 ]; then status="FAILED rc=$rc"; FAILED=1
  fi
  record "$name" "$status" "$took" "$cmd"
  tail -n 25 "$OUTDIR/$name.log" | sed 's/^/    /'
  return 0
}

# Dry run: each bench flag that a step passes must exist (argparse lists it in --help).
check_flags() {  # script flag...
  local script=$1 help
  shift
  if ! help=$("$PY" "$script" --help 2>&1); then
    record "flags $script" "FAILED: --help failed" 0 "$PY $script --help"
    FAILED=1
    return
  fi
  for f in "$@"; do
    if ! grep -q -- "$f\b" <<< "$help"; then
      record "flags $script" "FAILED: no flag $f" 0 "$PY $script --help"
      FAILED=1
      return
    fi
  done
  record "flags $script" "ok: $*" 0 "$PY $script --help"
}

# --- env -------------------------------------------------------------------------------------
env_report() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" - <<'EOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", p.total_memory >> 30, "GiB")
for mod in ("liger_kernel", "trl", "pytest", "transformers"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except ImportError as e:
        print(mod, "not importable:", e)
EOF
}
step env 30 0 env_report

if [ -n "$WHEELS" ]; then
  step wheels 60 0 "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
fi

# --- import: the package without a build --------------------------------------------------------
# rlp_engine/kernels is a committed symlink to the top-level kernels/, so a plain checkout (the device
# machine's copy) imports the Triton paths from the repo root before (and without) the extension build.
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
step import 30 0 "$PY" -c "import rlp_engine.kernels, rlp_engine.ops, rlp_engine; print(rlp_engine.__file__)"

# --- the checks, most valuable first ----------------------------------------------------------
GPU_TESTS=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')
if [ $DRY = 1 ]; then
  check_flags bench/triton_aot.py --json --only --arch --no-cuda
  check_flags bench/bench_fused_linear.py --device --n --hidden --vocab --dtype --fp32-precision
  check_flags bench/bench_losses.py --device --B --T
  check_flags bench/bench_gae.py --device --B --T --mask-mode
  check_flags bench/bench_logprobs.py --device
  check_flags bench/bench_ppo.py --device --sizes
  # shellcheck disable=SC2086
  step pytest-collect 120 0 "$PY" -m pytest -p no:cacheprovider --collect-only -q -m gpu $GPU_TESTS
fi
step aot 120 0 "$PY" bench/triton_aot.py --only fused_linear --arch 90 --no-cuda --json "$OUTDIR/aot_device.json"
# shellcheck disable=SC2086
step pytest 120 1 "$PY" -m pytest -p no:cacheprovider -q -m gpu $GPU_TESTS
step fused 90 1 "$PY" bench/bench_fused_linear.py --device cuda --n 16384 --hidden 4096 --vocab 131072
# the predictions of bench/NOTES.md: tf32 operands for fp32 models (3-5x over IEEE fp32) and vocab
# splits from the SM count at small N (1.8-2x on the forward at N <= 1024)
step fused-fp32-ieee 45 1 "$PY" bench/bench_fused_linear.py --device cuda --n 4096 --hidden 4096 --vocab 131072 \
  --dtype fp32 --fp32-precision ieee
step fused-fp32-tf32 45 1 "$PY" bench/bench_fused_linear.py --device cuda --n 4096 --hidden 4096 --vocab 131072 \
  --dtype fp32 --fp32-precision tf32
step fused-small-n 30 1 "$PY" bench/bench_fused_linear.py --device cuda --n 512 --hidden 4096 --vocab 131072
step losses 45 1 "$PY" bench/bench_losses.py --device cuda --B 512 --T 8192
step gae 60 1 "$PY" bench/bench_gae.py --device cuda --B 512 --T 8192 --mask-mode carry
step logprobs 45 1 "$PY" bench/bench_logprobs.py --device cuda
step ppo 120 1 "$PY" bench/bench_ppo.py --device cuda --sizes default,large

# --- last: the extension's CUDA build (minutes of nvcc) and its CUDA GAE kernel ------------------
build_and_test_cuda() {
  env -u PYTHONPATH MAX_JOBS="$(nproc)" "$PY" -m pip install -q --no-build-isolation --no-deps -e . &&
    env -u PYTHONPATH "$PY" -m pytest -p no:cacheprovider -q -m gpu tests/test_gae.py -k cuda_kernel_of_the_extension
}
step build 240 1 build_and_test_cuda

# --- results ------------------------------------------------------------------------------------
{
  echo
  echo "Budget ${BUDGET}s, used $((SECONDS - START))s. Logs: $OUTDIR/<step>.log."
  for s in fused fused-fp32-ieee fused-fp32-tf32 fused-small-n losses gae logprobs ppo; do
    [ -f "$OUTDIR/$s.log" ] || continue
    echo
    echo "### $s"
    echo '```'
    tail -n 30 "$OUTDIR/$s.log"
    echo '```'
  done
} >> "$SUMMARY"
if [ $DRY = 0 ] && [ -f $CSV ]; then  # the header, then the rows this run's benches appended
  { head -n 1 $CSV; tail -n +$((CSV_LINES + 1)) $CSV; } > "$OUTDIR/results_new.csv"
fi
echo "gpu_check: summary in $SUMMARY"
exit $FAILED
