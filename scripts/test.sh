#!/usr/bin/env bash
# Sets up .venv and runs the test suite (Triton kernels in the interpreter when there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    export TRITON_INTERPRET=1
fi
ruff check src tests benchmarks examples
# Long checks are marked slow: `bash scripts/test.sh -m slow` runs them (a later -m wins).
python -m pytest -q -p no:cacheprovider -m "not slow" "$@"
