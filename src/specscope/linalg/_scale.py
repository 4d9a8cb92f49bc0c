"""Scaling by a power of two: exact in floating point, so a matrix whose norm, Gram or products would overflow
or underflow its dtype is computed at unit scale instead, with the same bits as at a safe scale.

Gradients of 1e18 or 1e-30 are finite float32 numbers, but ‖G‖_F² and G Gᵀ are not (float32 and bfloat16
reach 3.4e38 and resolve 1.2e-38); float64 inputs meet the same wall beyond ≈ 1e±154.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# A norm or Gram row sum in [SAFE_LOW, ∞) was computed without underflow of the entries that matter
SAFE_LOW = 2.0**-60


# each dtype's exponent bits, read through an integer view of the same width
_EXPONENT = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
             torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}


def pow2_scale(X: Tensor, dim: tuple[int, ...] | list[int] = (-2, -1)) -> Tensor:
    """2^-e per matrix of X [..., m, n] (shape [..., 1, 1], X's dtype), 2^e the power of two at or below max|X|, so
    that X·2^-e has its largest entry in [1, 2); multiplying by it rounds nothing. A zero matrix gets its dtype's
    largest safe factor (it stays 0). Four kernels: max|X|, a clamp, its exponent bits (an integer view: no frexp,
    which some accelerators lack for 16-bit types) and their reciprocal, a power of two and so exact. `dim`: the
    axes one factor covers (the matrix's by default; e.g. all but the token axis for one factor per token)."""
    amax = torch.linalg.vector_norm(X, float("inf"), dim=tuple(dim), keepdim=True).clamp_(min=torch.finfo(X.dtype).tiny)
    as_int, mask = _EXPONENT[X.dtype]
    return (amax.view(as_int) & mask).view(X.dtype).reciprocal_()


def gram_scale(G: Tensor, gram_dtype: torch.dtype) -> Tensor | None:
    """pow2_scale(G) where a Gram of G in `gram_dtype` could leave that dtype's range (G's dtype as wide as it:
    float64 G, or a float32 Gram of float32 G), else None: squares of float32 entries always fit a float64 Gram,
    so the probe's float64 Grams of float32 gradients are formed unscaled."""
    wide = 2 * math.frexp(torch.finfo(G.dtype).max)[1] > math.frexp(torch.finfo(gram_dtype).max)[1]
    return pow2_scale(G) if wide else None


def scaled_to(G: Tensor, p: Tensor, dtype: torch.dtype) -> Tensor:
    """G·p in `dtype`: scaled in G's dtype where `dtype` has the narrower range (float64 to bfloat16), else after the
    conversion (one pass over the smaller tensor). Either way the same bits: scaling by 2^k commutes with rounding."""
    if torch.finfo(G.dtype).max > torch.finfo(dtype).max:
        return (G * p).to(dtype)
    return G.to(dtype) * p.to(dtype)


def safe_low(dtype: torch.dtype) -> float:
    """The smallest Gram row sum a Gram formed in `dtype` is used unscaled from: SAFE_LOW, or for float16 — normal
    from 2^-14 only, largest 65504 — 2^-8: below it the Gram's products were subnormal, and the start's scale
    1/sum, formed in float16, overflows (a 1e-4 gradient's polar was all NaN)."""
    return 2.0**-8 if dtype == torch.float16 else SAFE_LOW


def in_safe_range(v: Tensor, low: float = SAFE_LOW) -> bool:
    """Whether every value (a norm, or a Gram's largest row sum, per matrix) is finite and ≥ `low`: the unscaled
    computation was exact to its dtype's rounding. Reads two numbers on the host: call it on a CPU only."""
    lo, hi = torch.aminmax(v)
    return lo.item() >= low and hi.item() < math.inf  # (NaN fails both)


def needs_scaling(X: Tensor) -> bool:
    """Whether the estimators scale X first without looking: on an accelerator, where reading a norm on the host
    would synchronise (scaling costs one reduction and one product there); on a CPU they compute unscaled and
    redo the start scaled only when `in_safe_range` says the unscaled one lost range."""
    return X.device.type != "cpu"
