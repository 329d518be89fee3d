"""Output likelihoods r(y | z): their loss, output gradient, Fisher F_R and its factor L.

Everything here works on outputs flattened to ``(N, m)``: N examples (all leading dimensions of
the model's output), m outputs each. The loss is the mean over examples of the per-example
negative log-likelihood ``ℓᵢ``, summed over the m outputs where they are independent.

The factor ``L`` (m × k per example) satisfies ``F_R = L Lᵀ``; the Fisher of the network is then
``F = AᵀA`` with ``A = stackᵢ(Lᵢᵀ Jᵢ)/√N`` (DESIGN.md §1.4). A likelihood also provides ``b``
with ``L b = ∇_z ℓ`` so that the gradient is ``g = Aᵀ (b/√N)``: that is what LSMR and the
sample-space (dual) solve need.

A user's own likelihood subclasses :class:`Likelihood` and implements :meth:`loss_per_example`
and :meth:`factor_matrix` (the dense per-example factor); everything else has a default built from
those two (correct, but slower than a structured override). :meth:`sample` is needed only for the
Monte-Carlo Fisher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Exponent cap for 1/√p in the gradient factor: keeps b finite for confidently wrong outputs.
_MAX_HALF_LOG = 80.0


class Likelihood:
    """Base class and protocol for an output likelihood (see the module docstring).

    ``state`` is whatever :meth:`fisher_state` returns for the outputs (probabilities, say):
    computed once per linearization and reused by every product.
    """

    name = "custom"

    # --- what a user's likelihood must implement -------------------------------------------
    def loss_per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Negative log-likelihood of each example, shape ``(N,)``."""
        raise NotImplementedError

    def factor_matrix(self, state: Tensor) -> Tensor:
        """Dense per-example factor ``L`` with ``F_R = L Lᵀ``, shape ``(N, m, k)``."""
        raise NotImplementedError

    # --- defaults built from the two above; structured likelihoods override them ------------
    def check_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Validate ``targets`` for outputs ``(N, m)``; return them shaped for this likelihood."""
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets: expected a torch.Tensor, got {type(targets).__name__}")
        return targets

    def fisher_state(self, outputs: Tensor) -> Tensor:
        """What the Fisher products need from the outputs (default: the outputs themselves)."""
        return outputs.detach()

    def factor_dim(self, m: int) -> int:
        """Number of columns k of the per-example factor for m outputs."""
        return m

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean negative log-likelihood over the examples."""
        return self.loss_per_example(outputs, targets).mean()

    def output_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``∇_z ℓᵢ`` for each example (not divided by N), shape ``(N, m)``."""
        z = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.loss_per_example(z, targets).sum(), z)
        return grad

    def fvp(self, state: Tensor, v: Tensor) -> Tensor:
        """``F_R v`` per example."""
        return self.factor(state, self.factor_t(state, v))

    def factor_t(self, state: Tensor, v: Tensor) -> Tensor:
        """``Lᵀ v`` per example: ``(N, m) → (N, k)``."""
        return torch.einsum("nmk,nm->nk", self.factor_matrix(state), v)

    def factor(self, state: Tensor, u: Tensor) -> Tensor:
        """``L u`` per example: ``(N, k) → (N, m)``."""
        return torch.einsum("nmk,nk->nm", self.factor_matrix(state), u)

    def gradient_factor(self, state: Tensor, outputs: Tensor, targets: Tensor) -> Tensor:
        """A ``b`` with ``L b = ∇_z ℓ`` per example, shape ``(N, k)`` (least squares by default)."""
        L = self.factor_matrix(state)
        grad = self.output_grad(outputs, targets)
        return torch.linalg.lstsq(L, grad.unsqueeze(-1)).solution.squeeze(-1)

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Targets drawn from ``r(· | z)``: needed for ``fisher="mc"``."""
        raise NotImplementedError(f"likelihood {self.name!r} cannot sample targets")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Categorical(Likelihood):
    """Softmax cross-entropy on logits; targets are class indices of shape ``(N,)``, or class
    probabilities of shape ``(N, m)`` (rows summing to 1: soft or label-smoothed targets).

    ``F_R = diag(p) − p pᵀ`` (rank m−1), factor ``L = diag(√p) − p √pᵀ``; probability targets
    change only the gradient ``p − t``.
    """

    name = "categorical"

    def check_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        targets = super().check_targets(outputs, targets)
        n, m = outputs.shape
        if targets.dtype.is_floating_point and targets.shape == (n, m):
            return self._check_probabilities(outputs, targets)
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise ValueError("targets: the categorical likelihood takes integer class indices "
                             f"(N,) or class probabilities (N, m) = {(n, m)}, got dtype "
                             f"{targets.dtype} and shape {tuple(targets.shape)}")
        if targets.shape != (n,):
            raise ValueError(f"targets: expected {n} class indices (one per example, shaped "
                             f"like the outputs without their last, class dimension), got "
                             f"shape {tuple(targets.shape)}")
        if n and (int(targets.min()) < 0 or int(targets.max()) >= m):
            raise ValueError(f"targets: class indices must lie in [0, {m - 1}] for {m} outputs, "
                             f"got range [{int(targets.min())}, {int(targets.max())}]")
        return targets.to(outputs.device)

    @staticmethod
    def _check_probabilities(outputs: Tensor, targets: Tensor) -> Tensor:
        t = targets.to(device=outputs.device, dtype=outputs.dtype)
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
            raise ValueError("targets: class probabilities must lie in [0, 1], got range "
                             f"[{float(t.min()):g}, {float(t.max()):g}]")
        gap = float((t.sum(-1) - 1).abs().max()) if t.numel() else 0.0
        if gap > 64 * torch.finfo(t.dtype).eps * t.shape[-1]:
            # the Hessian in the logits is (Σ t)(diag p − ppᵀ): refused, not rescaled
            raise ValueError(f"targets: class probabilities must sum to 1 over the classes "
                             f"(off by up to {gap:.3g})")
        return t

    def loss_per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def fisher_state(self, outputs: Tensor) -> Tensor:
        if outputs.shape[-1] < 2:
            raise ValueError("likelihood: 'categorical' needs at least 2 outputs (class logits) "
                             "per example; over one logit the softmax is constant and the "
                             "Fisher zero. For one logit per example use 'bernoulli'")
        return torch.softmax(outputs.detach(), dim=-1)

    def output_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        grad = torch.softmax(outputs.detach(), dim=-1)
        if targets.dtype.is_floating_point:  # class probabilities
            return grad.sub_(targets)
        grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1
        return grad

    def factor_matrix(self, state: Tensor) -> Tensor:
        root = state.sqrt()
        return torch.diag_embed(root) - state.unsqueeze(-1) * root.unsqueeze(-2)

    def fvp(self, state: Tensor, v: Tensor) -> Tensor:
        return state * (v - (state * v).sum(-1, keepdim=True))

    def factor_t(self, state: Tensor, v: Tensor) -> Tensor:
        return state.sqrt() * (v - (state * v).sum(-1, keepdim=True))

    def factor(self, state: Tensor, u: Tensor) -> Tensor:
        root = state.sqrt()
        return root * u - state * (root * u).sum(-1, keepdim=True)

    def gradient_factor(self, state: Tensor, outputs: Tensor, targets: Tensor) -> Tensor:
        # b = (p − e_y)/√p = √p − e_y/√p_y; 1/√p_y from log p_y so it does not underflow first.
        b = state.sqrt()
        if targets.dtype.is_floating_point:  # b = √p − t/√p (Σ t = 1), 1/√p from log p
            log_p = torch.log_softmax(outputs.detach(), dim=-1)
            return b.sub_(targets * torch.exp((-0.5 * log_p).clamp(max=_MAX_HALF_LOG)))
        rows = torch.arange(b.shape[0], device=b.device)
        log_py = torch.log_softmax(outputs.detach(), dim=-1)[rows, targets]
        b[rows, targets] -= torch.exp((-0.5 * log_py).clamp(max=_MAX_HALF_LOG))
        return b

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        probs = torch.softmax(outputs.detach().double(), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Independent(Likelihood):
    """Independent outputs with floating-point targets shaped like the outputs."""

    def check_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        targets = super().check_targets(outputs, targets)
        if not targets.dtype.is_floating_point:
            raise ValueError(f"targets: the {self.name} likelihood takes floating-point targets, "
                             f"got dtype {targets.dtype}")
        n, m = outputs.shape
        if targets.shape != (n, m) and not (m == 1 and targets.shape == (n,)):
            raise ValueError(f"targets: expected the shape of the outputs {(n, m)}, got shape "
                             f"{tuple(targets.shape)}")
        return targets.reshape(outputs.shape).to(device=outputs.device, dtype=outputs.dtype)


class Gaussian(_Independent):
    """Gaussian with mean z and unit variance: ``ℓ = ½‖y − z‖²``; ``F_R = I``, ``L = I``."""

    name = "gaussian"

    def loss_per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (outputs - targets).pow(2).sum(-1)

    def output_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return outputs.detach() - targets

    def factor_matrix(self, state: Tensor) -> Tensor:
        n, m = state.shape
        return torch.eye(m, dtype=state.dtype, device=state.device).expand(n, m, m)

    def fvp(self, state: Tensor, v: Tensor) -> Tensor:
        return v

    def factor_t(self, state: Tensor, v: Tensor) -> Tensor:
        return v

    def factor(self, state: Tensor, u: Tensor) -> Tensor:
        return u

    def gradient_factor(self, state: Tensor, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.output_grad(outputs, targets)

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype,
                            device=outputs.device)
        return outputs.detach() + noise


class GaussianPrecision(Gaussian):
    """Gaussian with mean z and a fixed precision per output (``1/var``, data, not a model
    output): ``ℓ = ½ Σ_j (prec_j (y_j − z_j)² − log prec_j)``; ``F_R = diag(prec)``.

    Bound to the precision of the rows it is used on, shape ``(N, m)`` (GaussianNLLLoss).
    """

    name = "gaussian_precision"

    def __init__(self, precision: Tensor) -> None:
        self.precision = precision.detach()

    def _prec(self, outputs: Tensor) -> Tensor:
        if self.precision.shape != outputs.shape:
            raise ValueError(f"outputs: expected shape {tuple(self.precision.shape)} (the "
                             f"precision's), got {tuple(outputs.shape)}")
        return self.precision

    def loss_per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        prec = self._prec(outputs)
        return 0.5 * (prec * (outputs - targets).pow(2) - prec.log()).sum(-1)

    def fisher_state(self, outputs: Tensor) -> Tensor:
        return self._prec(outputs)

    def output_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return (outputs.detach() - targets) * self._prec(outputs)

    def factor_matrix(self, state: Tensor) -> Tensor:
        return torch.diag_embed(state.sqrt())

    def fvp(self, state: Tensor, v: Tensor) -> Tensor:
        return state * v

    def factor_t(self, state: Tensor, v: Tensor) -> Tensor:
        return state.sqrt() * v

    factor = factor_t

    def gradient_factor(self, state: Tensor, outputs: Tensor, targets: Tensor) -> Tensor:
        return (outputs.detach() - targets) * state.sqrt()

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype,
                            device=outputs.device)
        return outputs.detach() + noise * self._prec(outputs).rsqrt()

    def __repr__(self) -> str:
        return f"GaussianPrecision(shape={tuple(self.precision.shape)})"


class Bernoulli(_Independent):
    """Independent Bernoulli outputs on logits (BCE-with-logits summed over outputs).

    Targets are probabilities in [0, 1] shaped like the outputs; ``F_R = diag(s(1−s))``.
    """

    name = "bernoulli"

    def check_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if isinstance(targets, Tensor) and not targets.dtype.is_floating_point:
            targets = targets.to(outputs.dtype)
        targets = super().check_targets(outputs, targets)
        if targets.numel() and (float(targets.min()) < 0 or float(targets.max()) > 1):
            raise ValueError("targets: the bernoulli likelihood takes values in [0, 1], got range "
                             f"[{float(targets.min()):g}, {float(targets.max()):g}]")
        return targets

    def loss_per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(outputs, targets, reduction="none").sum(-1)

    def fisher_state(self, outputs: Tensor) -> Tensor:
        return torch.sigmoid(outputs.detach())

    def output_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.sigmoid(outputs.detach()) - targets

    def factor_matrix(self, state: Tensor) -> Tensor:
        return torch.diag_embed((state * (1 - state)).sqrt())

    def fvp(self, state: Tensor, v: Tensor) -> Tensor:
        return state * (1 - state) * v

    def factor_t(self, state: Tensor, v: Tensor) -> Tensor:
        return (state * (1 - state)).sqrt() * v

    factor = factor_t

    def gradient_factor(self, state: Tensor, outputs: Tensor, targets: Tensor) -> Tensor:
        z = outputs.detach()
        half_log_var = 0.5 * (F.logsigmoid(z) + F.logsigmoid(-z))  # log √(s(1−s))
        return (state - targets) * torch.exp((-half_log_var).clamp(max=_MAX_HALF_LOG))

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        probs = torch.sigmoid(outputs.detach())
        return torch.bernoulli(probs, generator=generator)


LIKELIHOODS: dict[str, type[Likelihood]] = {
    "categorical": Categorical,
    "gaussian": Gaussian,
    "bernoulli": Bernoulli,
}


def get_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """Resolve a likelihood name or instance; ValueError naming ``likelihood`` otherwise."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str) and likelihood in LIKELIHOODS:
        return LIKELIHOODS[likelihood]()
    raise ValueError(f"likelihood: expected one of {sorted(LIKELIHOODS)} or a "
                     f"ngtriton.Likelihood instance, got {likelihood!r}")

