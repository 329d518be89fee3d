"""Time to target: NGD against AdamW, Muon and SOAP on the optimizer's clock (issue 19).

Run from the repository root (``benchmarks`` is a namespace package, importable because
``python -m`` puts the current directory on ``sys.path``)::

    python -m benchmarks.time_to_target                # all problems, default budgets and seeds
    python -m benchmarks.time_to_target --quick        # CI-sized
    python -m benchmarks.time_to_target --problems digits --seeds 1 \\
        --ngd-config 'NGD warm={"warm_start": true}'    # add or override one NGD setting

Modules: :mod:`.problems` (digits MLP, digits autoencoder, the data of the char-GPT),
:mod:`.chargpt` (the GPT model), :mod:`.contenders` (the optimizers, NGD's configurations in one
dict), :mod:`.runner` (one timed run), :mod:`.report` (JSON, markdown summary, PNGs).
"""

import os

import torch

if not torch.cuda.is_available():  # before ngtriton is imported: Triton's interpreter on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
