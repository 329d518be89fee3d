"""Which path ``kernels/ops.py`` would take for one recorded ops call on a CUDA device, for
``bench_flops.py``: its own dispatch code runs with the kernels and references replaced by
stubs that report the choice."""

from __future__ import annotations

import types
from typing import Any

import torch
from flops_count import TRITON_OPS

# --- dispatch decisions -----------------------------------------------------------------------

class _Chosen(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _stub(what: str, **extra: Any) -> types.ModuleType:
    mod = types.ModuleType(f"stub_{what}")

    def chosen(*args, **kwargs):
        raise _Chosen(what)
    for name in (*TRITON_OPS, "attention_forward_reference", "attention_jvp_reference",
                 "attention_vjp_reference", "categorical_fvp", "bernoulli_fvp"):
        setattr(mod, name, chosen)
    for k, v in extra.items():
        setattr(mod, k, v)
    return mod


def _cuda_can_launch(*tensors: torch.Tensor | None,
                     dtypes: tuple[torch.dtype, ...] | None = None) -> bool:
    """``kernels._config.can_launch`` as on a CUDA device: one dtype among ``dtypes`` (default
    fp32/fp16/bf16, the kernels' on a GPU), one device."""
    ts = [t for t in tensors if t is not None]
    if not ts:
        return False
    allowed = (torch.float32, torch.float16, torch.bfloat16) if dtypes is None else dtypes
    dtype, device = ts[0].dtype, ts[0].device
    return dtype in allowed and all(t.dtype == dtype and t.device == device for t in ts)


def _real_attention() -> types.ModuleType | None:
    """The Triton attention module (None without triton), imported before any patching."""
    try:
        import ngtriton.kernels.attention as real
    except ImportError:
        return None
    return real


def _real_attention_backward() -> types.ModuleType | None:
    """The Triton attention-VJP module (None without triton), imported before any patching."""
    try:
        import ngtriton.kernels.attention_backward as real
    except ImportError:
        return None
    return real


def _head_limit(real: types.ModuleType | None, dtype: torch.dtype, precision: str,
                fn: str = "jvp_head_limit") -> int:
    """kernels.attention.jvp_head_limit (``fn="vjp_head_limit"``: kernels.attention_backward's)
    on a GPU (its interpreter branch switched off)."""
    if real is None:  # no triton: the same rule, from its docstring
        return 256 if dtype != torch.float32 else (64 if precision == "ieee" else 128)
    saved = real.INTERPRET
    real.INTERPRET = False
    try:
        return getattr(real, fn)(dtype, precision)
    finally:
        real.INTERPRET = saved


def _head_block(D: int) -> int:
    return max(16, 1 << max(D - 1, 0).bit_length())


def _cast(name: str, args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    """The call's floating tensors in ``dtype``; ``lse`` and ``rstd`` (fp32 statistics in a
    half-precision model) kept as they are."""
    keep = {"attention_jvp": (4,), "attention_vjp": (4,), "layernorm_jvp": (1,),
            "layernorm_vjp": (1,)}.get(name, ())

    def cast(i, a):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and i not in keep:
            return a.to(dtype)
        return a
    return tuple(cast(i, a) for i, a in enumerate(args)), {
        k: cast(-1, v) if k != "mask" or v is None or v.is_floating_point() else v
        for k, v in kwargs.items()}


def decide(call: dict[str, Any], dtype: torch.dtype, precision: str) -> str:
    """``"triton"`` or ``"torch"``: what kernels/ops.py's dispatch picks for this call on a
    CUDA device, with ``dtype`` operands and fp32 matmul ``precision``. ``attention_vjp``
    returning ``None`` (no kernel) is ``"torch"``: the step then runs torch's SDPA backward."""
    import ngtriton.kernels as K
    from ngtriton.kernels import _config
    from ngtriton.kernels import attention_reference as real_ar
    from ngtriton.kernels import ops as kops

    name = call["op"]
    args, kwargs = call["args"], call["kwargs"]
    if dtype != torch.float32:
        args, kwargs = _cast(name, args, kwargs, dtype)
    real, real_bwd = _real_attention(), _real_attention_backward()
    fake_attention = _stub("triton", jvp_head_limit=lambda dt, p: _head_limit(real, dt, p),
                           head_block=_head_block)
    fake_backward = _stub("triton", head_block=_head_block, vjp_head_limit=lambda dt, p:
                          _head_limit(real_bwd, dt, p, "vjp_head_limit"))
    fake_ar = _stub("torch", shapes_ok=real_ar.shapes_ok)
    patches = [(K, "linear", _stub("triton")), (K, "layernorm", _stub("triton")),
               (K, "attention", fake_attention), (K, "attention_backward", fake_backward),
               (K, "attention_reference", fake_ar),
               (K, "output", _stub("triton")), (kops, "_ref", _stub("torch")),
               (kops, "can_launch", _cuda_can_launch)]
    saved = [(obj, attr, getattr(obj, attr, None)) for obj, attr, _ in patches]
    saved_precision = _config._matmul_precision
    for obj, attr, new in patches:
        setattr(obj, attr, new)
    _config.set_matmul_precision(precision)
    try:
        returned = getattr(kops, name)(*args, **kwargs)
    except _Chosen as chosen:
        return chosen.what
    finally:
        for obj, attr, old in saved:
            if old is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)
        _config._matmul_precision = saved_precision
    if name == "attention_vjp" and returned is None:  # no kernel: torch's SDPA backward
        return "torch"
    raise RuntimeError(f"{name}: the dispatch chose neither a kernel nor the reference")
