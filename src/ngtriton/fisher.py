"""The Fisher information of a network at its current parameters, as a matrix-free operator.

``F = (1/N) Σᵢ Jᵢᵀ F_R(zᵢ) Jᵢ = AᵀA`` with ``A = stackᵢ(Lᵢᵀ Jᵢ)/√N``: the model's forward runs
ONCE, when the operator is built; every product afterwards is one JVP, a small per-example
product with the output factor, and one VJP on the cached linearization.

The three Fisher types differ only in the per-example factor ``Lᵢ`` (the rows of ``A``):

* ``"exact"``: ``Lᵢ`` with ``Lᵢ Lᵢᵀ = F_R(zᵢ)``, the likelihood's own structured factor;
* ``"mc"``: ``Lᵢ = [s₁ … s_S]/√S`` with sᵢ the score at labels sampled from the model;
* ``"empirical"``: ``Lᵢ = ∇_z ℓ(yᵢ, zᵢ)``, the score at the observed labels.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .likelihoods import Bernoulli, Categorical, Likelihood, get_likelihood
from .linearize import ForwardRecord, Linearization, linearize, resolve_backend
from .linearize.rules import OutputEpilogue

FISHER_TYPES = ("exact", "mc", "empirical")

Vector = Tensor | Sequence[Tensor]


def _as_tuple(inputs: Any) -> tuple[Any, ...]:
    return tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)


def output_kernels(likelihood: Likelihood, backend: str) -> tuple[Any, Any, Any] | None:
    """The Triton output-Fisher kernels ``(F_R v, Lᵀ v, L u)`` for a built-in likelihood."""
    if backend != "triton":
        return None
    from .kernels import output as ko

    if type(likelihood) is Categorical:
        return ko.categorical_fvp, ko.categorical_factor_t, ko.categorical_factor
    if type(likelihood) is Bernoulli:
        return ko.bernoulli_fvp, ko.bernoulli_factor, ko.bernoulli_factor
    return None


def check_damping(damping: float) -> float:
    """Return ``damping`` as a float; ValueError naming it unless finite and ≥ 0."""
    try:
        value = float(damping)
    except (TypeError, ValueError):
        raise TypeError(f"damping: expected a number, got {type(damping).__name__}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"damping: expected a finite number ≥ 0, got {damping!r}")
    return value


def check_model_inputs(model: nn.Module, inputs: tuple[Any, ...]) -> list[Tensor]:
    """Trainable parameters of ``model``; errors name ``model`` or ``inputs`` if they do not fit."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no trainable parameters (none with requires_grad=True)")
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        raise ValueError(f"model: all trainable parameters must share one dtype, got {dtypes}")
    ref = params[0]
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):  # nor inside containers: a model may cast those itself
            continue
        if x.device != ref.device:
            raise ValueError(f"inputs[{i}]: on device {x.device}, the model is on {ref.device}")
        if x.dtype.is_floating_point and x.dtype != ref.dtype:
            raise ValueError(f"inputs[{i}]: dtype {x.dtype} does not match the model's {ref.dtype}")
    return params


def _rows(targets: Any, out_shape: torch.Size) -> Any:
    """Targets laid out like the model's outputs ``(..., m)``, or like them without the last
    dimension (class indices), flattened to rows as the outputs are; others as given (the
    likelihood then checks them against the rows ``(N, m)``)."""
    if isinstance(targets, Tensor) and len(out_shape) > 2:
        if targets.shape == out_shape:
            return targets.reshape(-1, out_shape[-1])
        if targets.shape == out_shape[:-1]:
            return targets.reshape(-1)
    return targets


class FisherOperator:
    """``F + λI`` of ``model`` on one batch, without ever forming it (see module docstring).

    Args:
        model: the network; its forward is run once, here, as ``model(*inputs)``.
        inputs: a tensor or a tuple of positional inputs (tensors, None, numbers, or
            tuples, lists and dicts of them).
        likelihood: ``"categorical"``, ``"gaussian"``, ``"bernoulli"`` or a
            :class:`~ngtriton.likelihoods.Likelihood`.
        targets: observed labels; needed for the gradient and for ``fisher="empirical"``.
        fisher: ``"exact"``, ``"mc"`` (sampled labels) or ``"empirical"`` (observed labels).
        damping: Tikhonov damping λ ≥ 0 added by :meth:`matvec` (``F + λI``).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"autograd"`` (see :func:`linearize`).
        mc_samples: labels drawn per example for ``fisher="mc"``.
        generator: a ``torch.Generator`` that makes the Monte-Carlo labels reproducible.
        record: a :class:`~ngtriton.linearize.ForwardRecord` of ``model(*inputs)`` run at the
            current parameters (e.g. for the loss); its Linear and activation outputs are reused
            instead of recomputed. The outputs are then the recorded ones: do not modify them.

    Vectors are flat tensors of length ``P`` (all trainable parameters, in
    ``model.parameters()`` order) or lists of tensors shaped like the parameters; products return
    the same kind they were given.
    """

    def __init__(self, model: nn.Module, inputs: Any, likelihood: str | Likelihood = "categorical",
                 *, targets: Tensor | None = None, fisher: str = "exact", damping: float = 0.0,
                 backend: str = "auto", mc_samples: int = 1,
                 generator: torch.Generator | None = None,
                 record: ForwardRecord | None = None) -> None:
        inputs = _as_tuple(inputs)
        params = check_model_inputs(model, inputs)
        self.likelihood = get_likelihood(likelihood)
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher: expected one of {list(FISHER_TYPES)}, got {fisher!r}")
        if fisher == "empirical" and targets is None:
            raise ValueError("targets: fisher='empirical' needs the observed targets")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples: expected an integer ≥ 1, got {mc_samples!r}")
        self.fisher = fisher
        self.damping = check_damping(damping)
        self._shapes = [p.shape for p in params]
        self._sizes = [p.numel() for p in params]
        self.num_params = sum(self._sizes)
        self.dtype, self.device = params[0].dtype, params[0].device

        self.backend = resolve_backend(backend, self.device)
        if record is not None and not isinstance(record, ForwardRecord):
            raise TypeError(f"record: expected a ForwardRecord, got {type(record).__name__}")
        self.linearization: Linearization = linearize(model, inputs, self.backend, record)
        self._kernels = output_kernels(self.likelihood, self.backend)
        out = self.linearization.outputs
        self._out_shape = out.shape
        outputs = out.reshape(-1, 1) if out.ndim == 1 else out.reshape(-1, out.shape[-1])
        if outputs.shape[0] == 0:
            raise ValueError("inputs: the batch is empty")
        self.outputs = outputs
        self.num_examples, self.num_outputs = outputs.shape
        self.targets = (None if targets is None else
                        self.likelihood.check_targets(outputs, _rows(targets, out.shape)))
        self._state = self.likelihood.fisher_state(outputs)
        self._scale = 1.0 / math.sqrt(self.num_examples)
        self._dense_factor: Tensor | None = None
        if fisher == "mc":
            try:
                samples = [self.likelihood.sample(outputs, generator) for _ in range(mc_samples)]
            except NotImplementedError as err:
                raise ValueError(f"fisher: 'mc' needs labels sampled from the likelihood ({err})"
                                 ) from None
            scores = [self.likelihood.output_grad(outputs, y) for y in samples]
            self._dense_factor = torch.stack(scores, dim=-1) / math.sqrt(mc_samples)
        elif fisher == "empirical":
            self._dense_factor = self.likelihood.output_grad(outputs, self.targets).unsqueeze(-1)
        self.factor_dim = (self._dense_factor.shape[-1] if self._dense_factor is not None
                           else self.likelihood.factor_dim(self.num_outputs))
        self.num_rows = self.num_examples * self.factor_dim
        self._gradient: Tensor | None = None
        self._gradient_factor: tuple[Tensor | None] | None = None

    # --- shapes and conversions -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    def flatten(self, tensors: Sequence[Tensor], name: str = "v") -> Tensor:
        """Concatenate tensors shaped like the parameters into one flat vector."""
        if len(tensors) != len(self._shapes):
            raise ValueError(f"{name}: expected {len(self._shapes)} tensors (one per parameter), "
                             f"got {len(tensors)}")
        for i, (t, shape) in enumerate(zip(tensors, self._shapes)):
            if not isinstance(t, Tensor) or t.shape != shape:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}[{i}]: expected shape {tuple(shape)}, got {got}")
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Split a flat vector into views shaped like the parameters."""
        return [c.view(s) for c, s in zip(flat.split(self._sizes), self._shapes)]

    def _as_flat(self, v: Vector, name: str = "v") -> tuple[Tensor, bool]:
        if isinstance(v, Tensor):
            if v.ndim != 1 or v.shape[0] != self.num_params:
                raise ValueError(f"{name}: expected a flat vector of length {self.num_params} or a "
                                 f"list of parameter-shaped tensors, got shape {tuple(v.shape)}")
            return v.to(self.dtype), True
        if isinstance(v, list | tuple):
            return self.flatten(v, name).to(self.dtype), False
        raise TypeError(f"{name}: expected a Tensor or a list of Tensors, got {type(v).__name__}")

    # --- the network's Jacobian and the output factor ----------------------------------------
    def _jvp(self, v: Tensor) -> Tensor:
        return self.linearization.jvp(self.unflatten(v)).reshape(self.outputs.shape)

    def _vjp(self, w: Tensor) -> Tensor:
        return self.flatten(self.linearization.vjp(w.reshape(self._out_shape)))

    def _fvp_outputs(self, u: Tensor) -> Tensor:
        if self._dense_factor is not None:
            return self._factor(self._factor_t(u))
        if self._kernels is not None:
            return self._kernels[0](self._state, u)
        return self.likelihood.fvp(self._state, u)

    def _factor_t(self, v: Tensor) -> Tensor:
        if self._dense_factor is not None:
            return torch.einsum("nmk,nm->nk", self._dense_factor, v)
        if self._kernels is not None:
            return self._kernels[1](self._state, v)
        return self.likelihood.factor_t(self._state, v)

    def _factor(self, u: Tensor) -> Tensor:
        if self._dense_factor is not None:
            return torch.einsum("nmk,nk->nm", self._dense_factor, u)
        if self._kernels is not None:
            return self._kernels[2](self._state, u)
        return self.likelihood.factor(self._state, u)

    @functools.cached_property
    def _epilogue(self) -> OutputEpilogue | None:
        """``F_R/N`` as an epilogue of the last Linear's JVP kernel, or None where that cannot be
        done (not the Triton backend and an exact categorical/bernoulli Fisher, or the outputs
        not written by a Linear): saves a pass over ``J v`` and a launch per product."""
        accepts = getattr(self.linearization, "accepts_epilogue", None)
        if self._kernels is None or self._dense_factor is not None or accepts is None:
            return None
        epilogue = OutputEpilogue(self.likelihood.name, self._state, 1.0 / self.num_examples)
        return epilogue if accepts(epilogue) else None

    # --- products on flat vectors (the solvers' interface) ------------------------------------
    def fisher_matvec(self, v: Tensor) -> Tensor:
        """``F v`` for a flat ``v`` (no damping)."""
        epilogue = self._epilogue
        if epilogue is not None:  # J v and F_R/N in one pass (see _epilogue)
            return self._vjp(self.linearization.jvp(self.unflatten(v), epilogue))
        u = self._jvp(v)
        return self._vjp(self._fvp_outputs(u) * (1.0 / self.num_examples))

    def damped_matvec(self, v: Tensor) -> Tensor:
        """``(F + λI) v`` for a flat ``v``."""
        out = self.fisher_matvec(v)
        return out.add_(v, alpha=self.damping) if self.damping else out

    def factor_matvec(self, v: Tensor) -> Tensor:
        """``A v``: flat length P → flat length R (= examples × factor columns)."""
        return (self._factor_t(self._jvp(v)) * self._scale).reshape(-1)

    def factor_rmatvec(self, u: Tensor) -> Tensor:
        """``Aᵀ u``: flat length R → flat length P."""
        u = u.reshape(self.num_examples, self.factor_dim)
        return self._vjp(self._factor(u) * self._scale)

    def _columns(self, fn: Any, M: Tensor) -> Tensor:
        """``fn`` applied to every column of ``M``: vmapped on the engine (its rules are plain
        torch ops; on the Triton backend the batched pass runs them through torch, cuBLAS on a
        GPU, since Triton kernels do not vmap), one column at a time otherwise."""
        if self.backend in ("torch", "triton"):
            with self._torch_products(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # in-place ops loop inside vmap
                try:
                    return torch.func.vmap(fn, in_dims=1, out_dims=1)(M)
                except RuntimeError:  # a fallback module that vmap cannot batch
                    pass
        return torch.stack([fn(c) for c in M.unbind(1)], dim=1)

    @contextlib.contextmanager
    def _torch_products(self) -> Iterator[None]:
        """Products through the torch engine ops and the likelihood's torch output factor."""
        with_ops = getattr(self.linearization, "with_ops", None)
        if self.backend != "triton" or with_ops is None:
            yield
            return
        from .linearize import ops_torch

        saved = self.linearization, self._kernels
        self.linearization, self._kernels = with_ops(ops_torch), None
        try:
            yield
        finally:
            self.linearization, self._kernels = saved

    def factor_matmat(self, V: Tensor) -> Tensor:
        """``A V`` for ``V`` of shape (P, c): batched when the linearization supports it."""
        batched = getattr(self.linearization, "jvp_batched", None)
        if batched is None:
            return self._columns(self.factor_matvec, V)
        cols = V.t()
        tangents = [c.reshape(cols.shape[0], *s) for c, s in
                    zip(cols.split(self._sizes, dim=1), self._shapes)]
        out = batched(tangents).reshape(cols.shape[0], *self.outputs.shape)
        rows = torch.stack([self._factor_t(o) for o in out.unbind(0)])
        return (rows * self._scale).reshape(cols.shape[0], -1).t()

    def factor_rmatmat(self, U: Tensor) -> Tensor:
        """``Aᵀ U`` for ``U`` of shape (R, c): batched when the linearization supports it."""
        batched = getattr(self.linearization, "vjp_batched", None)
        if batched is None:
            return self._columns(self.factor_rmatvec, U)
        cols = U.t().reshape(U.shape[1], self.num_examples, self.factor_dim)
        w = torch.stack([self._factor(c) for c in cols.unbind(0)]) * self._scale
        grads = batched(w.reshape(U.shape[1], *self._out_shape))
        return torch.cat([g.reshape(U.shape[1], -1) for g in grads], dim=1).t()

    # --- the public product API ----------------------------------------------------------------
    def matvec(self, v: Vector) -> Vector:
        """``(F + λI) v`` for a flat vector or a list of parameter-shaped tensors."""
        flat, is_flat = self._as_flat(v)
        out = self.damped_matvec(flat)
        return out if is_flat else self.unflatten(out)

    __matmul__ = matvec
    rmatvec = matvec  # F is symmetric

    def factor(self, v: Vector) -> Tensor:
        """``A v`` (length R) for a flat vector or a list of parameter-shaped tensors."""
        return self.factor_matvec(self._as_flat(v)[0])

    def factor_t(self, u: Tensor) -> Tensor:
        """``Aᵀ u`` as a flat vector, for ``u`` of length R (or shape (N, factor_dim))."""
        if not isinstance(u, Tensor) or u.numel() != self.num_rows:
            got = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise ValueError(f"u: expected {self.num_rows} values, got {got}")
        return self.factor_rmatvec(u.to(self.dtype).reshape(-1))

    def jvp(self, v: Vector) -> Tensor:
        """``J v``: the change of the outputs, shape (N, m), for a parameter direction ``v``."""
        return self._jvp(self._as_flat(v)[0])

    def vjp(self, w: Tensor) -> Tensor:
        """``Jᵀ w`` as a flat vector, for output cotangents ``w`` of shape (N, m)."""
        if not isinstance(w, Tensor) or w.numel() != self.outputs.numel():
            got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"w: expected {tuple(self.outputs.shape)} values, got {got}")
        return self._vjp(w.to(self.dtype).reshape(self.outputs.shape))

    def output_fvp(self, u: Tensor) -> Tensor:
        """``F_R u`` per example (this operator's Fisher type) for ``u`` of shape (N, m)."""
        if not isinstance(u, Tensor) or u.shape != self.outputs.shape:
            got = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise ValueError(f"u: expected shape {tuple(self.outputs.shape)}, got {got}")
        return self._fvp_outputs(u.to(self.dtype))

    # --- gradient and loss ---------------------------------------------------------------------
    def _require_targets(self) -> Tensor:
        if self.targets is None:
            raise ValueError("targets: the operator was built without targets; pass targets= "
                             "to compute the gradient or the loss")
        return self.targets

    def loss(self) -> Tensor:
        """The mean negative log-likelihood at the linearization point."""
        return self.likelihood.loss(self.outputs, self._require_targets())

    def gradient(self) -> Tensor:
        """``g = ∇_θ loss`` as a flat vector (computed once, then cached)."""
        if self._gradient is None:
            grad_z = self.likelihood.output_grad(self.outputs, self._require_targets())
            self._gradient = self._vjp(grad_z / self.num_examples)
        return self._gradient

    def gradient_factor(self) -> Tensor | None:
        """A flat ``b`` with ``Aᵀ b = g``, or None when there is none to trust.

        None for ``"mc"`` (g need not lie in range(Aᵀ)), and whenever the likelihood's b does not
        reproduce g to ``√eps`` (checked once with one VJP): a confidently wrong output has
        ``b ~ 1/√p`` beyond the dtype's range. Solvers then work with g itself.
        """
        targets = self._require_targets()
        if self.fisher == "mc":
            return None
        if self._gradient_factor is None:
            if self.fisher == "empirical":
                b = torch.full((self.num_rows,), self._scale, dtype=self.dtype,
                               device=self.device)
            else:
                b = self.likelihood.gradient_factor(self._state, self.outputs, targets)
                b = (b * self._scale).reshape(-1)
            g = self.gradient()
            gap = torch.linalg.vector_norm(self.factor_rmatvec(b) - g)
            bound = torch.finfo(self.dtype).eps ** 0.5 * torch.linalg.vector_norm(g)
            ok = bool(torch.isfinite(b).all()) and bool(gap <= bound)
            self._gradient_factor = (b if ok else None,)
        return self._gradient_factor[0]

    # --- dense and scipy views (small models, tests) ---------------------------------------------
    def to_dense(self) -> Tensor:
        """``F + λI`` as a dense (P, P) matrix: P products, for small models and tests."""
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        return torch.stack([self.damped_matvec(c) for c in eye.unbind(1)], dim=1)

    def factor_to_dense(self) -> Tensor:
        """The factor ``A`` as a dense (R, P) matrix."""
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        return self.factor_matmat(eye)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` for ``F + λI`` (float64 numpy in and out)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1))
            out = self.damped_matvec(v.to(dtype=self.dtype, device=self.device))
            return out.detach().to("cpu", torch.float64).numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, dtype=np.float64)

    def __repr__(self) -> str:
        return (f"FisherOperator(P={self.num_params}, N={self.num_examples}, "
                f"m={self.num_outputs}, likelihood={self.likelihood.name!r}, "
                f"fisher={self.fisher!r}, damping={self.damping:g})")
