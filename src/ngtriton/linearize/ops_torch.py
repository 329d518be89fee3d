"""The torch backend of the engine's primitives (the CPU backend, and ``with_ops`` for
products that ``torch.func.vmap`` batches).

The Linear and LayerNorm primitives are the kernels' own torch references
(:mod:`ngtriton.kernels.reference`), attention's are in
:mod:`ngtriton.kernels.attention_reference`: one definition each, which the Triton kernels are
tested against and fall back to. Every function takes 2-D activations ``(rows, features)``
except attention's ``(B, H, T, D)``.
"""

from __future__ import annotations

from torch import Tensor

from ..kernels.reference import (
    layernorm_jvp,
    layernorm_vjp,
    linear_jvp,
    linear_jvp_fvp,
    linear_vjp,
)

__all__ = ["attention_forward", "attention_jvp", "layernorm_jvp", "layernorm_vjp",
           "linear_jvp", "linear_jvp_fvp", "linear_vjp"]


def attention_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                      causal: bool = False, mask: Tensor | None = None
                      ) -> tuple[Tensor, Tensor]:
    """``(o, lse)`` of attention ``softmax(scale · q kᵀ + mask) v`` (torch, chunked over the
    queries); see :mod:`ngtriton.kernels.attention_reference`."""
    from ..kernels.attention_reference import attention_forward_reference

    return attention_forward_reference(q, k, v, scale=scale, causal=causal, mask=mask)


def attention_jvp(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dq: Tensor | None,
                  dk: Tensor | None, dv: Tensor | None, *, scale: float | None = None,
                  causal: bool = False, mask: Tensor | None = None) -> Tensor:
    """Tangent of attention along ``(dq, dk, dv)`` from the forward's ``o`` and ``lse``;
    see :mod:`ngtriton.kernels.attention_reference`."""
    from ..kernels.attention_reference import attention_jvp_reference

    return attention_jvp_reference(q, k, v, o, lse, dq, dk, dv, scale=scale, causal=causal,
                                   mask=mask)
