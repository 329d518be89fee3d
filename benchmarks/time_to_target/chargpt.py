"""A small nanoGPT-style character model and its data: bytes of Python's standard library.

The model returns logits flattened to ``(B·T, vocab)``: one row per position, so NGD's
categorical likelihood (and ``F.cross_entropy``) sees every position as one example and the
mean cross-entropy over rows is the loss.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 256


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP (4×)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(self.act(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    """Byte-level GPT: tied token embedding / output head, learned positions, no dropout."""

    def __init__(self, context: int = 64, d: int = 128, heads: int = 4, layers: int = 4,
                 vocab: int = VOCAB) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d: {d} is not divisible by heads={heads}")
        self.vocab = vocab
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.apply(self._init)
        for block in self.blocks:  # nanoGPT's scaled init of the residual projections
            for lin in (block.proj, block.out):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.tok.weight).reshape(-1, self.vocab)


def stdlib_bytes(n_bytes: int) -> tuple[Tensor, dict[str, object]]:
    """The first ``n_bytes`` of the standard library's ``.py`` sources, concatenated in sorted
    order of their relative paths (site-/dist-packages left out), as a uint8 tensor, with a
    description (path, files used, sha256) for the results."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((f for f in root.rglob("*.py")
                    if not {"site-packages", "dist-packages"} & set(f.relative_to(root).parts)),
                   key=lambda f: f.relative_to(root).as_posix())
    chunks: list[bytes] = []
    total = used = 0
    for f in files:
        if total >= n_bytes:
            break
        try:
            blob = f.read_bytes() + b"\n"
        except OSError:
            continue
        chunks.append(blob)
        total += len(blob)
        used += 1
    data = b"".join(chunks)[:n_bytes]
    if len(data) < n_bytes:
        raise ValueError(f"n_bytes: the standard library at {root} has only {len(data)} bytes "
                         f"of .py sources, asked for {n_bytes}")
    info = {"stdlib": str(root), "files": used, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), info


def sample_batch(data: Tensor, batch: int, context: int, gen: torch.Generator
                 ) -> tuple[Tensor, Tensor]:
    """``batch`` windows of ``context`` bytes at offsets drawn from ``gen``: (inputs, next
    bytes), both ``(batch, context)`` long tensors."""
    off = torch.randint(0, data.numel() - context - 1, (batch, 1), generator=gen)
    idx = off + torch.arange(context + 1)
    win = data[idx].long()
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()
