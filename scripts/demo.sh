#!/usr/bin/env bash
# Sets up .venv and runs the main demo: NGD vs Adam vs SGD on scikit-learn's digits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m ngtriton.demo "$@"
