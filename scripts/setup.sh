#!/usr/bin/env bash
# Creates .venv (if needed) and installs ngtriton with its test extra.
# torch is installed first: with an NVIDIA GPU, the default (CUDA) build; without one,
# torch==2.13.0, which on the project's machines resolves to a CPU build kept on local disk. On
# other machines set TORCH_INDEX_URL to PyTorch's CPU wheel index to avoid a multi-GB CUDA
# download.
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
        python -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    fi
fi
# The extras with models and trainers nobody here wrote (Hugging Face transformers, Lightning,
# heavyball): their tests skip without them, so CI installs them.
python -m pip install -q -e ".[test,hf,lightning,bench]"
python -c "import torch, ngtriton; print(f'ngtriton {ngtriton.__version__} | torch {torch.__version__} | cuda {torch.cuda.is_available()}')"
