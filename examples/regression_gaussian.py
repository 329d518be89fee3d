"""Regression with a Gaussian likelihood: NGD on ½‖y − f(x)‖² (unit-variance Gaussian mean).

The loss the closure computes must be the mean negative log-likelihood of the chosen likelihood:
for ``likelihood="gaussian"`` that is ``0.5 * ((pred - y) ** 2).sum(-1).mean()`` (MSE × m/2).

    python examples/regression_gaussian.py [steps]
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from ngtriton import NGD


def main(steps: int = 50, n: int = 256) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.linspace(-3, 3, n).unsqueeze(1)
    y = torch.sin(2 * x) + 0.3 * x + 0.05 * torch.randn_like(x)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 1))
    opt = NGD(model, likelihood="gaussian")

    def closure():
        opt.zero_grad()
        loss = 0.5 * (model(x) - y).pow(2).sum(-1).mean()
        loss.backward()
        return loss

    first = math.nan
    for i in range(steps):
        loss = float(opt.step(closure).detach())
        first = loss if i == 0 else first
    with torch.no_grad():
        final = float(0.5 * (model(x) - y).pow(2).sum(-1).mean())
    s = opt.last_stats
    print(f"gaussian regression: loss {first:.4f} -> {final:.5f} in {steps} steps "
          f"(damping {s.next_damping:.2g}, last solve {s.iterations} iterations)")
    return {"initial": first, "final": final}


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
