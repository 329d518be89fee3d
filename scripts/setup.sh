#!/usr/bin/env bash
# Creates .venv (if needed) and installs ngtriton with its test extra.
# Without an NVIDIA GPU it installs the CPU build of torch first, so that pip does not pull a
# multi-GB CUDA build; with one, pip resolves the default (CUDA) torch and triton.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        python -m pip install -q torch
    else
        python -m pip install -q "torch==2.13.0"
    fi
fi
python -m pip install -q -e ".[test]"
python -c "import torch, ngtriton; print(f'ngtriton {ngtriton.__version__} | torch {torch.__version__} | cuda {torch.cuda.is_available()}')"
