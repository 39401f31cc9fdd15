#!/usr/bin/env bash
# Sets everything up and runs every op bench (CPU by default; pass --device cuda on a GPU machine).
# Each prints a table and appends its rows to bench/results.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for b in bench/bench_*.py; do
  .venv/bin/python "$b" "$@"
done
