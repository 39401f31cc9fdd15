#!/usr/bin/env bash
# Rebuilds rlp_engine._C in place (serialised with a lock: several people may build in one tree).
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/rlp_engine_build.lock .venv/bin/python setup.py -q build_ext --inplace
