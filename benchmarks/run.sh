#!/usr/bin/env bash
# One command for the benchmark suites (GPU or CPU): set up .venv, run, write benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python benchmarks/run.py "$@"
