"""Drop-in swap from Adam to NGD on a classification task (sklearn digits, MLP).

The only changes to an Adam training loop: build ``ngtriton.NGD(model)`` instead of
``torch.optim.Adam(model.parameters(), ...)`` and hand the forward/backward to ``step`` as a
closure (exactly as for ``torch.optim.LBFGS``).

    python examples/adam_to_ngd.py [epochs]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from ngtriton import NGD
from ngtriton.demo import evaluate, load_digits_data, make_mlp


def main(epochs: int = 3, batch_size: int = 256, use_ngd: bool = True) -> dict[str, float]:
    data = load_digits_data()
    model = make_mlp()
    # Before: opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    opt = NGD(model) if use_ngd else torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    n = data.x_train.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            x, y = data.x_train[idx], data.y_train[idx]

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)  # Adam accepts the closure too
    loss, acc = evaluate(model, data)
    print(f"{type(opt).__name__}: {epochs} epochs, training loss {loss:.4f}, "
          f"test accuracy {100 * acc:.1f}%")
    return {"loss": loss, "accuracy": acc}


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3, use_ngd=False)
