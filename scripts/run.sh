#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job: the RLP pipeline (SFT -> reward model
# -> PPO -> RLP-UML / RLP-SPG -> PPO) on its embedded default task, on CPU in a few minutes.
# The report lands in runs/default/report.md (override with --output-dir DIR; extra key=value
# arguments override config keys, e.g. `bash scripts/run.sh --output-dir runs/long ppo.steps=40`).
# --resume: running it again continues an interrupted run from its last checkpoint (a finished one is
# only evaluated again); remove runs/default to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rlp-engine train --output-dir runs/default --resume "$@"
