"""Checkpoint and resume NGD bit-identically.

``opt.state_dict()`` carries the damping, the step counters, the warm-start vectors, the
generator of the curvature subsample and the history; it loads with
``torch.load(..., weights_only=True)``. The resumed run equals the uninterrupted one bit for bit.

    python examples/checkpoint_resume.py [steps]
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.nn.functional as F

from ngtriton import NGD
from ngtriton.demo import load_digits_data, make_mlp

OPTIONS = {"warm_start": True, "curvature_fraction": 0.5}


def batches(data, steps: int, batch_size: int = 128):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, data.x_train.shape[0], (batch_size,), generator=gen)
        yield data.x_train[idx], data.y_train[idx]


def train(model, opt, stream) -> None:
    for x, y in stream:
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)


def main(steps: int = 8, path: str | None = None) -> dict[str, object]:
    data = load_digits_data()
    half = steps // 2
    # Uninterrupted run.
    model = make_mlp()
    opt = NGD(model, **OPTIONS)
    train(model, opt, batches(data, steps))
    # Interrupted run: half the steps, checkpoint, fresh objects, load, the other half.
    model_a = make_mlp()
    opt_a = NGD(model_a, **OPTIONS)
    stream = batches(data, steps)
    train(model_a, opt_a, (next(stream) for _ in range(half)))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = path or os.path.join(tmp, "ngd.pt")
        torch.save({"model": model_a.state_dict(), "optimizer": opt_a.state_dict()}, ckpt)
        state = torch.load(ckpt, weights_only=True)
    model_b = make_mlp(seed=1)  # different init: everything must come from the checkpoint
    model_b.load_state_dict(state["model"])
    opt_b = NGD(model_b, **OPTIONS)
    opt_b.load_state_dict(state["optimizer"])
    train(model_b, opt_b, stream)
    identical = all(torch.equal(p, q) for p, q in zip(model.parameters(), model_b.parameters()))
    print(f"resumed after {half} of {steps} steps: parameters bit-identical to the "
          f"uninterrupted run: {identical}; damping {opt_b.damping:.3g} vs {opt.damping:.3g}")
    return {"identical": identical, "model": model, "resumed": model_b,
            "damping": (opt.damping, opt_b.damping)}


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
