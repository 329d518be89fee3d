#!/usr/bin/env bash
# The GPU check in one command (at most 8 minutes on an H100): set up .venv, run the GPU tests
# and the benchmarks of benchmarks/gpu_check.py, write benchmarks/results/<device>-<date>.{json,md}.
# Arguments go to gpu_check.py (--dry-run: the same on the CPU, tiny shapes, interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    bash scripts/setup.sh
fi
. .venv/bin/activate
exec timeout 480 python benchmarks/gpu_check.py "$@"
