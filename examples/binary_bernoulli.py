"""Binary classification with a Bernoulli likelihood (one logit, BCE-with-logits), two moons.

    python examples/binary_bernoulli.py [steps]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from ngtriton import NGD


def two_moons(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=gen) * torch.pi
    label = torch.randint(0, 2, (n,), generator=gen).float()
    x = torch.stack([torch.cos(t), torch.sin(t)], 1)
    x = torch.where(label[:, None] > 0, torch.stack([1 - x[:, 0], 0.5 - x[:, 1]], 1), x)
    return x + 0.1 * torch.randn(n, 2, generator=gen), label.unsqueeze(1)


def main(steps: int = 40, n: int = 512) -> dict[str, float]:
    torch.manual_seed(0)
    x, y = two_moons(n)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 1))
    opt = NGD(model, likelihood="bernoulli")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    with torch.no_grad():
        logits = model(x)
        loss = float(F.binary_cross_entropy_with_logits(logits, y))
        acc = float(((logits > 0).float() == y).float().mean())
    print(f"two moons, bernoulli: loss {loss:.4f}, training accuracy {100 * acc:.1f}% "
          f"after {steps} steps")
    return {"loss": loss, "accuracy": acc}


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
