"""Evidence 2: natural gradient on the natural-gradient blog post's logistic regression.

Setup of the post: two Gaussian blobs (unit covariance) at (−1,−1) (label 0) and (1,1) (label 1),
100 points each, shuffled, the first 150 kept for training; a linear model without bias,
p(t=1|x) = σ(wᵀx), w ~ N(0, 0.01² I); 5 iterations; the mean negative log-likelihood.

Rows (all full-batch, ``w ← w − α·direction``):

* ``gd``            direction = g                         (library: ``FisherOperator.gradient``)
* ``ng-exact``      direction = F⁻¹g, F = (1/N)Σ s(1−s) x xᵀ  (library: ``fisher="exact"``)
* ``ng-empirical``  direction = F_e⁻¹g, F_e = (1/N)Σ (s−t)² x xᵀ (library: ``fisher="empirical"``)
* ``ng-centred``    direction = C⁻¹g, C = np.cov of the per-example scores (s−t)x, i.e.
                    (1/(N−1))Σ (gᵢ−g)(gᵢ−g)ᵀ: what the post computes (numpy, here).

The library runs the ``bernoulli`` likelihood on ONE logit: that is exactly the post's model
(σ(wᵀx), 2 parameters, F invertible). ``categorical`` on two logits would be a different
model — 4 parameters, a softmax that is invariant to adding the same number to both logits, so a
singular F — and its natural gradient (minimum-norm) gives the same updates of the predicted
probabilities only at damping 0; one logit keeps the comparison with the post exact.

Run: ``PYTHONPATH=src python examples/evidence_logreg.py [--reps 100 --iters 5]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evidence_common import default_backend, print_table

from ngtriton import FisherOperator, natural_gradient

METHODS = ("gd", "ng-exact", "ng-empirical", "ng-centred")
CONFIGS = (("gd", 0.1), ("gd", 1.0), ("ng-exact", 0.1), ("ng-exact", 1.0),
           ("ng-empirical", 0.1), ("ng-empirical", 1.0), ("ng-centred", 0.1),
           ("ng-centred", 1.0))


def blobs(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, t, w0) of the post: 150 shuffled training points of two blobs, and the initial w."""
    rng = np.random.RandomState(seed)
    X = np.vstack([rng.randn(100, 2) - 1.0, rng.randn(100, 2) + 1.0])
    t = np.concatenate([np.zeros(100), np.ones(100)])
    perm = rng.permutation(200)[:150]
    w0 = rng.randn(2) * 0.01
    return X[perm], t[perm], w0


def run(method: str, lr: float, X: np.ndarray, t: np.ndarray, w0: np.ndarray,
        iters: int = 5, backend: str | None = None) -> np.ndarray:
    """Loss before the first step and after each of ``iters`` steps: shape (iters + 1,)."""
    backend = backend or default_backend()
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w0).reshape(1, 2))
    xs, ts = torch.from_numpy(X), torch.from_numpy(t).reshape(-1, 1)
    losses = []
    for it in range(iters + 1):
        op = FisherOperator(model, xs, "bernoulli", targets=ts, backend=backend)
        losses.append(float(op.loss()))
        if it == iters:
            break
        g = op.gradient()
        if method == "gd":
            step = g
        elif method in ("ng-exact", "ng-empirical"):
            (step,) = natural_gradient(model, xs, ts, likelihood="bernoulli",
                                       fisher=method[3:], damping=0.0, tol=1e-12,
                                       backend=backend)
            step = step.reshape(-1)
        elif method == "ng-centred":
            s = 1.0 / (1.0 + np.exp(-(X @ model.weight.detach().numpy().reshape(-1))))
            scores = (s - t)[:, None] * X                 # per-example ∇_w ℓᵢ
            step = torch.from_numpy(np.linalg.solve(np.cov(scores.T), g.numpy()))
        else:
            raise ValueError(method)
        with torch.no_grad():
            model.weight.sub_(lr * step.reshape(1, 2))
    return np.array(losses)


def experiment(reps: int = 100, iters: int = 5, configs=CONFIGS,
               backend: str | None = None) -> dict[tuple[str, float], np.ndarray]:
    """Loss curves, shape (reps, iters + 1), per (method, step size); same data and w0 per rep."""
    out = {c: np.empty((reps, iters + 1)) for c in configs}
    for r in range(reps):
        X, t, w0 = blobs(r)
        for c in configs:
            out[c][r] = run(c[0], c[1], X, t, w0, iters, backend)
    return out


def fisher_at_init(seed: int = 0) -> dict[str, np.ndarray]:
    """The three 2×2 matrices at w0 (to explain the rows)."""
    X, t, w0 = blobs(seed)
    s = 1.0 / (1.0 + np.exp(-(X @ w0)))
    scores = (s - t)[:, None] * X
    n = len(t)
    return {"exact": (X.T * (s * (1 - s))) @ X / n, "empirical": scores.T @ scores / n,
            "centred (np.cov)": np.cov(scores.T), "g": scores.mean(0)}


def main(reps: int = 100, iters: int = 5, backend: str | None = None) -> None:
    res = experiment(reps, iters, backend=backend)
    print(f"logistic regression, two blobs, N=150, {iters} iterations, {reps} repetitions "
          f"(float64, backend={backend or default_backend()!r})")
    headers = ["method", "step"] + [f"it{i}" for i in range(iters + 1)] + [
        f"loss after {iters} (mean ± std)", "monotone reps"]
    rows = []
    for (method, lr), L in res.items():
        mono = int((np.diff(L, axis=1) <= 1e-12).all(axis=1).sum())
        rows.append([method, f"{lr:g}"] + [f"{v:.4f}" for v in L.mean(0)]
                    + [f"{L[:, -1].mean():.4f} ± {L[:, -1].std():.4f}", f"{mono}/{reps}"])
    print_table(headers, rows)
    mats = fisher_at_init(0)
    print("\nAt w0 (repetition 0): g =", np.array2string(mats.pop("g"), precision=3))
    for name, M in mats.items():
        ev = np.linalg.eigvalsh(M)
        print(f"  {name:17s} = {np.array2string(M, precision=3).replace(chr(10), '')}"
              f"   eigenvalues {np.array2string(ev, precision=3)}")
    print("""
Why the rows differ:
* At w0 ≈ 0 every s = 1/2, so (s−t)² = 1/4 = s(1−s): the empirical and the exact Fisher are the
  SAME matrix at the first step (it1 agrees), ≈ (1/4)·E[xxᵀ] = (1/4)[[2,1],[1,2]], eigenvalues
  1/4 and 3/4, the large one along (1,1) — the direction of g ≈ −(1/2)(1,1). The first
  natural-gradient step is therefore g/0.66 ≈ 1.5·g here. Afterwards the exact F keeps weighting
  every point by s(1−s); the empirical F weights the well-classified points by (1−s)² < s(1−s)
  (and the misclassified ones by s² > s(1−s)): once most points are fitted it is the smaller
  matrix, its steps are longer, and at step 0.1 it moves faster than the exact Fisher.
* np.cov subtracts the mean score, which is g itself: C = (N/(N−1))(F_e − ggᵀ). At w0, ggᵀ takes
  ≈ 1/2 of the 3/4 along (1,1), so C ≈ (1/4)·I and the step along g is ≈ 3× (2.6× measured) the
  uncentred one. At step 0.1 that is the post's "twice as fast"; it is a larger effective step
  size along g, not a better direction (near the optimum g → 0 and C → F_e).
* At step 1 the exact-Fisher update is Fisher scoring (= Newton for the canonical logit link):
  it converges monotonically to the minimum; the empirical and centred variants reach the same
  minimum at step 1 but not always monotonically (the 'monotone reps' column). Gradient descent
  at step 1 is still far from it after 5 iterations.
""")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--backend", default=None)
    a = parser.parse_args()
    main(a.reps, a.iters, a.backend)
