"""Helpers shared by the kernel tests: device, per-dtype tolerances, random inputs."""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# fp32: IEEE dot products with fp32 accumulation. fp16 / bf16: compared with an fp32 reference
# computed from the same (already rounded) low-precision inputs, so only the kernel's own rounding
# (operands of the dot, the output store) is measured.
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
}

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="needs CUDA (the Triton interpreter has no bfloat16)")

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=cuda_only)]


def randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float32,
          scale: float = 1.0) -> torch.Tensor:
    t = torch.randn(*shape, generator=gen, dtype=torch.float32) * scale
    return t.to(device=DEVICE, dtype=dtype)


def up(t: torch.Tensor | None) -> torch.Tensor | None:
    """fp32 copy of a (possibly low-precision) input, for the reference."""
    return None if t is None else t.float()


def assert_close(actual: torch.Tensor | None, expected: torch.Tensor | None, dtype: torch.dtype,
                 scale: float = 1.0) -> None:
    """Compare in fp32 with the tolerance of ``dtype``; ``atol`` is multiplied by ``scale``."""
    assert (actual is None) == (expected is None)
    if actual is None:
        return
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    tol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol["rtol"],
                               atol=tol["atol"] * scale)


def spy(monkeypatch: pytest.MonkeyPatch, targets: list[tuple[object, str]]) -> list[str]:
    """Wrap each ``(module, name)`` function so that its calls are appended, by name, to the
    returned list (in call order)."""
    calls: list[str] = []
    for mod, name in targets:
        orig = getattr(mod, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(*a, **k)

        monkeypatch.setattr(mod, name, wrapped)
    return calls


def attention_mask(kind: str, B: int, H: int, T: int, S: int, gen: torch.Generator,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    """An attention test mask: None, a key-padding mask (B, 1, 1, S) (``"bool_pad"``, or
    ``"add_pad"`` additive with -inf), or a full additive bias (B, H, T, S) (``"add_full"``).
    Batch 0 pads its last three keys; batch 1 its first key (which fully masks row 0 under
    causal)."""
    if kind == "none":
        return None
    keep = torch.ones(B, 1, 1, S, dtype=torch.bool)
    keep[0, ..., S - 3:] = False
    keep[1, ..., 0] = False
    if kind == "bool_pad":
        return keep.to(DEVICE)
    if kind == "add_pad":
        return torch.zeros(B, 1, 1, S, dtype=dtype).masked_fill(~keep, float("-inf")).to(DEVICE)
    if kind == "add_full":
        return torch.randn(B, H, T, S, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    raise ValueError(kind)


def sdpa_mask(mask: torch.Tensor | None, causal: bool, T: int, S: int) -> torch.Tensor | None:
    """The explicit mask torch's SDPA gets for ``mask`` under ``causal`` (it refuses attn_mask
    together with is_causal): the lower triangle folded in."""
    if not causal:
        return mask
    tri = torch.ones(T, S, dtype=torch.bool, device=DEVICE).tril()
    if mask is None:
        return tri
    if mask.dtype == torch.bool:
        return mask & tri
    return mask + torch.zeros(T, S, dtype=mask.dtype, device=DEVICE).masked_fill(~tri,
                                                                                 -float("inf"))
