#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job: the RLP pipeline (SFT -> reward model
# -> PPO -> RLP-UML / RLP-SPG -> PPO) on its embedded default task, on CPU in a few minutes.
# The report lands in runs/default/report.md (override with --output-dir DIR; extra key=value
# arguments override config keys, e.g. `bash scripts/run.sh ppo.steps=40`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rlp-engine train --output-dir runs/default "$@"
