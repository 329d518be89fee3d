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
from .linearize import (
    AutocastArg,
    ForwardRecord,
    Linearization,
    linearize,
    resolve_autocast,
    resolve_backend,
)
from .linearize.outputs import OutputSelector, check_selector
from .linearize.precision import check_autocast
from .linearize.rules import OutputEpilogue
from .losses import check_loss, likelihood_terms, loss_terms, loss_value

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
    scalar_tensor = isinstance(damping, Tensor) and damping.numel() == 1
    if isinstance(damping, bool) or not (isinstance(damping, int | float) or scalar_tensor):
        raise TypeError(f"damping: expected a number, got {type(damping).__name__}")
    try:
        value = float(damping)
    except OverflowError:
        raise ValueError(f"damping: {damping!r:.40} is too large for a float") from None
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


class FisherOperator:
    """``F + λI`` of ``model`` on one batch, without ever forming it (see module docstring).

    Args:
        model: the network; its forward is run once, here, as ``model(*inputs)``, with every
            dropout off and its buffers (BatchNorm statistics) left as they were.
        inputs: a tensor or a tuple of positional inputs (tensors, None, numbers, or
            tuples, lists and dicts of them).
        likelihood: ``"categorical"``, ``"gaussian"``, ``"bernoulli"`` or a
            :class:`~ngtriton.likelihoods.Likelihood`: the low-level interface, where the loss
            is the mean negative log-likelihood over the rows of the outputs ``(..., m)``
            (default ``"categorical"``). Not together with ``loss``.
        loss: a torch loss module (``nn.CrossEntropyLoss``, ``nn.MSELoss``,
            ``nn.BCEWithLogitsLoss``, ``nn.GaussianNLLLoss``) applied to the model's outputs
            as torch applies it: the Fisher is then the generalised Gauss–Newton matrix of
            exactly that loss, with its reduction, class layout, ``ignore_index`` and label
            smoothing (see :mod:`ngtriton.losses`); :meth:`gradient` is its gradient and
            :meth:`loss` its value. Configurations whose curvature this does not cover are
            refused, never approximated.
        targets: observed labels (for ``loss``: the loss's target, ``(target, var)`` for
            GaussianNLLLoss); needed for the gradient, for ``fisher="empirical"`` and for
            ``loss``.
        output: which tensor of the model's output to use when it returns a tuple, a dict or
            a Hugging Face ``ModelOutput``: a key or attribute name, a tuple index, or a
            callable taking the output. Default: the tensor itself, else ``"logits"``, else
            a tuple's first tensor.
        fisher: ``"exact"``, ``"mc"`` (sampled labels) or ``"empirical"`` (observed labels).
        damping: Tikhonov damping λ ≥ 0 added by :meth:`matvec` (``F + λI``). It is in the
            units of the loss: with ``loss=`` a summed loss has a Fisher R times the mean's, so
            the same λ damps it R times less.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"autograd"`` (see :func:`linearize`).
        mc_samples: labels drawn per example for ``fisher="mc"``.
        generator: a ``torch.Generator`` that makes the Monte-Carlo labels reproducible.
        record: a :class:`~ngtriton.linearize.ForwardRecord` of ``model(*inputs)`` run at the
            current parameters (e.g. for the loss); its Linear and activation outputs are reused
            instead of recomputed. The outputs are then the recorded ones: do not modify them.
        autocast: the precision of the model's forward and of ``J v``, ``Jᵀ u``: None (default)
            follows the ambient ``torch.autocast`` here (full precision outside one), False is
            full precision, ``torch.bfloat16``/``torch.float16`` run them under
            ``torch.autocast``; the outputs, the output Fisher and every vector this operator
            returns stay in the parameters' dtype (see ``docs/mixed_precision.md``).

    Vectors are flat tensors of length ``P`` (all trainable parameters, in
    ``model.parameters()`` order) or lists of tensors shaped like the parameters; products return
    the same kind they were given. Output-side tensors (:meth:`jvp`, :attr:`outputs`) are rows
    ``(R, m)``: the counted rows of the outputs, classes last.
    """

    def __init__(self, model: nn.Module, inputs: Any,
                 likelihood: str | Likelihood | None = None, *, loss: nn.Module | None = None,
                 targets: Any = None, output: OutputSelector = None, fisher: str = "exact",
                 damping: float = 0.0, backend: str = "auto", mc_samples: int = 1,
                 generator: torch.Generator | None = None,
                 record: ForwardRecord | None = None, autocast: AutocastArg = None) -> None:
        inputs = _as_tuple(inputs)
        params = check_model_inputs(model, inputs)
        check_autocast(autocast)
        if loss is not None and likelihood is not None:
            raise ValueError("loss: give loss= or likelihood=, not both (the loss decides the "
                             "likelihood)")
        if loss is not None:
            check_loss(loss)
            if targets is None:
                raise ValueError("targets: loss= needs the targets the loss is computed with")
        else:
            likelihood = get_likelihood("categorical" if likelihood is None else likelihood)
        output = check_selector(output)
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher: expected one of {list(FISHER_TYPES)}, got {fisher!r}")
        if fisher == "empirical" and targets is None:
            raise ValueError("targets: fisher='empirical' needs the observed targets")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or not \
                1 <= mc_samples < 2**31:
            raise ValueError(f"mc_samples: expected an integer in [1, 2³¹), got "
                             f"{mc_samples!r:.40}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        self.fisher = fisher
        self.damping = check_damping(damping)
        self._shapes = [p.shape for p in params]
        self._sizes = [p.numel() for p in params]
        self.num_params = sum(self._sizes)
        self.dtype, self.device = params[0].dtype, params[0].device

        self.backend = resolve_backend(backend, self.device)
        if record is not None and not isinstance(record, ForwardRecord):
            raise TypeError(f"record: expected a ForwardRecord, got {type(record).__name__}")
        self.autocast = resolve_autocast(autocast, self.device, self.dtype)
        self.linearization: Linearization = linearize(model, inputs, self.backend, record,
                                                      output, self.autocast or False)
        out = self.linearization.outputs
        if out.numel() == 0:
            raise ValueError("inputs: the batch is empty")
        self.loss_module = loss
        self._raw_targets = targets
        terms = (loss_terms(loss, out, targets) if loss is not None
                 else likelihood_terms(likelihood, out, targets))
        self.likelihood = terms.likelihood
        self._kernels = output_kernels(self.likelihood, self.backend)
        self._out_shape = out.shape
        self._in_dim1, self._keep = terms.classes_in_dim1, terms.keep
        self._flat_rows = terms.flat_rows
        self.num_outputs = terms.num_outputs
        self._all_rows = out.numel() // self.num_outputs
        outputs = self._to_rows(out)
        self.outputs = outputs
        self.num_examples = outputs.shape[0]
        self.targets = terms.targets
        self._weight = terms.weight
        self._state = self.likelihood.fisher_state(outputs)
        self._scale = math.sqrt(self._weight)
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

    # --- the outputs as rows --------------------------------------------------------------------
    def _to_rows(self, z: Tensor, lead: int = 0) -> Tensor:
        """Outputs (after ``lead`` batch dims) → the counted rows ``(R, m)``, classes last."""
        if self._in_dim1:
            z = z.movedim(lead + 1, -1)
        z = z.reshape(*z.shape[:lead], -1, self.num_outputs)
        return z if self._keep is None else z.index_select(lead, self._keep)

    def _from_rows(self, w: Tensor, lead: int = 0) -> Tensor:
        """The transpose of :meth:`_to_rows`: rows → outputs (zero in the rows not counted)."""
        front = w.shape[:lead]
        if self._keep is not None:
            full = w.new_zeros((*front, self._all_rows, self.num_outputs))
            w = full.index_copy_(lead, self._keep, w)
        if self._in_dim1:
            S = self._out_shape
            w = w.reshape(*front, S[0], *S[2:], S[1]).movedim(-1, lead + 1)
            return w.contiguous()
        return w.reshape(*front, *self._out_shape)

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
        return self._to_rows(self.linearization.jvp(self.unflatten(v)))

    def _vjp(self, w: Tensor) -> Tensor:
        return self.flatten(self.linearization.vjp(self._from_rows(w)))

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
        if (self._kernels is None or self._dense_factor is not None or accepts is None
                or self._in_dim1 or self._keep is not None):
            return None
        epilogue = OutputEpilogue(self.likelihood.name, self._state, self._weight)
        return epilogue if accepts(epilogue) else None

    # --- products on flat vectors (the solvers' interface) ------------------------------------
    def fisher_matvec(self, v: Tensor) -> Tensor:
        """``F v`` for a flat ``v`` (no damping)."""
        epilogue = self._epilogue
        if epilogue is not None:  # J v and F_R/N in one pass (see _epilogue)
            return self._vjp(self.linearization.jvp(self.unflatten(v), epilogue))
        u = self._jvp(v)
        return self._vjp(self._fvp_outputs(u) * self._weight)

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
        out = self._to_rows(batched(tangents).reshape(cols.shape[0], *self._out_shape), lead=1)
        rows = torch.stack([self._factor_t(o) for o in out.unbind(0)])
        return (rows * self._scale).reshape(cols.shape[0], -1).t()

    def factor_rmatmat(self, U: Tensor) -> Tensor:
        """``Aᵀ U`` for ``U`` of shape (R, c): batched when the linearization supports it."""
        batched = getattr(self.linearization, "vjp_batched", None)
        if batched is None:
            return self._columns(self.factor_rmatvec, U)
        cols = U.t().reshape(U.shape[1], self.num_examples, self.factor_dim)
        w = torch.stack([self._factor(c) for c in cols.unbind(0)]) * self._scale
        grads = batched(self._from_rows(w, lead=1))
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
        """The loss at the linearization point: ``loss(outputs, targets)`` for ``loss=``, else
        the mean negative log-likelihood over the rows."""
        targets = self._require_targets()
        if self.loss_module is not None:
            with torch.no_grad():
                return loss_value(self.loss_module, self.linearization.outputs,
                                  self._raw_targets, self._flat_rows)
        return self.likelihood.loss(self.outputs, targets)

    def gradient(self) -> Tensor:
        """``g = ∇_θ loss`` as a flat vector (computed once, then cached)."""
        if self._gradient is None:
            grad_z = self.likelihood.output_grad(self.outputs, self._require_targets())
            self._gradient = self._vjp(grad_z * self._weight)
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
