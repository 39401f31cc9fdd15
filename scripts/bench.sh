#!/usr/bin/env bash
# Sets everything up and runs every op bench (CPU by default; pass --device cuda on a GPU machine).
# Each prints a table and appends its rows to bench/results.csv, the record bench/summarize.py reads
# (the scripts alone write outside the tree; --no-csv or --csv PATH here overrides the record).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# bench_ppo.py's baseline: TRL's PPOTrainer, whose last release is 1.12.0 (it left TRL in 1.13; 1.12
# needs no other torch or transformers). Offline, the install fails and bench_ppo.py skips that row.
if ! .venv/bin/python -c "import trl.experimental.ppo" 2>/dev/null; then
  .venv/bin/python -m pip install -q "trl==1.12.0" || echo "trl not installed: bench_ppo.py skips its TRL row"
fi
csv=(--csv bench/results.csv)
for a in "$@"; do
  case $a in --csv | --csv=* | --no-csv) csv=() ;; esac
done
for b in bench/bench_*.py; do
  TRL_EXPERIMENTAL_SILENCE=1 .venv/bin/python "$b" ${csv[@]+"${csv[@]}"} "$@"
done
