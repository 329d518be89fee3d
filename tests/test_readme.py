"""The README's quickstart code runs as written (with a two-batch loader supplied)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    torch.manual_seed(0)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    scope: dict = {"loader": [(x, y), (x, y)]}
    exec(blocks[0], scope)
    opt = scope["opt"]
    assert opt.steps == 2 and any(h["accepted"] for h in opt.history)
    exec(blocks[1], scope)
    assert scope["res"].converged and len(scope["direction"]) == 4
