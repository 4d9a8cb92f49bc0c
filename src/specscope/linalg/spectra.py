"""Rank measures computed from the singular values (exact, float64 internally).

All of them use the eigenvalues of the smaller Gram matrix in float64: σ_i² = eig(X Xᵀ) (or XᵀX),
with eigenvalues ≤ max(m, n)·eps·λ_1 (σ_i ≲ sqrt(max(m, n)·eps)·σ_1: 1e-7 at 256, 1e-6 at 4096) set to 0. That is exact
up to float64 round-off (absolute error ~1e-16·σ_1² on each σ_i²), 1e-5 relative or better for these quantities, except
where much of ‖G‖_* lies in singular values near that cut-off: 255 of 9e-7·σ_1 beside σ_1 = 1 in a 256×4096 matrix
leave ‖G‖_* 2.3e-4 low and nr(G) 4.6e-4 (`nuclear_norms`, whose cut-off is min(m, n)·eps·λ_1, keeps them).

Zero matrix convention: every rank measure of an all-zero matrix is 0 (its rank), never NaN.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_tensor, smaller_gram, work_dtype
from ._scale import pow2_scale


def _sq_singular_values(x: Tensor) -> Tensor:
    """σ_i² of x·2^-e descending, shape [..., min(m, n)], float64, from eigvalsh of the smaller Gram; 2^-e (`_scale`)
    puts max|x| in [1, 2), so a float64 x beyond 1e±154 keeps its spectrum (every caller takes a ratio but
    `nuclear_norm`, which undoes the scale).

    Eigenvalues ≤ max(m, n)·eps·λ_1 are round-off of exact zeros (the Gram's own error is ~eps·λ_1) and
    are set to 0, so a rank-r matrix has exactly r nonzero σ_i² and the bounds nr, st ≤ rank hold."""
    x = x.double()
    lam = torch.linalg.eigvalsh(smaller_gram(x * pow2_scale(x))).flip(-1)
    cutoff = max(x.shape[-2:]) * torch.finfo(torch.float64).eps * lam[..., :1]
    return torch.where(lam > cutoff, lam, torch.zeros_like(lam))


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num/den with 0/0 := 0 (zero-matrix convention)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def singular_values(M: Tensor) -> Tensor:
    """Singular values of M, descending, shape [..., min(m, n)]. Exact (float64 SVD), returned in float32
    (float64 for float64 input)."""
    M = check_tensor(M, "singular_values", "M")
    return torch.linalg.svdvals(M.double()).to(work_dtype(M))


def stable_rank_exact(A: Tensor) -> Tensor:
    s2 = _sq_singular_values(A)
    return _safe_div(s2.sum(-1), s2[..., 0])


def nuclear_rank(G: Tensor) -> Tensor:
    """nr(G) = ‖G‖_*² / ‖G‖_F² = (Σσ)²/Σσ². Exact: eigenvalues of the smaller Gram in float64.

    1 ≤ nr ≤ rank(G); nr(0) := 0. Shape: G.shape[:-2]."""
    G = check_tensor(G, "nuclear_rank", "G")
    s2 = _sq_singular_values(G)
    return _safe_div(s2.sqrt().sum(-1) ** 2, s2.sum(-1)).to(work_dtype(G))


def nuclear_norm(G: Tensor) -> Tensor:
    """‖G‖_* = Σσ_i = Σ sqrt(eig(GᵀG)). Exact (float64 eigvalsh of the smaller Gram, eigenvalues clamped at 0)."""
    G = check_tensor(G, "nuclear_norm", "G")
    return (_sq_singular_values(G).sqrt().sum(-1) / pow2_scale(G.double())[..., 0, 0]).to(work_dtype(G))


def entropy_rank(M: Tensor) -> Tensor:
    """Roy–Vetterli effective rank exp(−Σ p_i log p_i), p_i = σ_i/Σσ_j. Exact (float64). 1 ≤ value ≤ rank;
    entropy_rank(0) := 0."""
    M = check_tensor(M, "entropy_rank", "M")
    s = _sq_singular_values(M).sqrt()
    p = _safe_div(s, s.sum(-1, keepdim=True))
    h = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1)
    return torch.where(s[..., 0] > 0, h.exp(), torch.zeros_like(h)).to(work_dtype(M))


def participation_ratio(M: Tensor) -> Tensor:
    """(Σσ²)²/Σσ⁴. Exact (float64). 1 ≤ value ≤ rank; participation_ratio(0) := 0."""
    M = check_tensor(M, "participation_ratio", "M")
    s2 = _sq_singular_values(M)
    return _safe_div(s2.sum(-1) ** 2, (s2**2).sum(-1)).to(work_dtype(M))


def energy_rank(M: Tensor, q: float = 0.9) -> Tensor:
    """Smallest k with Σ_{i≤k} σ_i² ≥ q·Σσ² (int64). Exact (float64); a relative slack of 1e-12 absorbs
    round-off when q·Σσ² equals a partial sum. energy_rank(0) := 0."""
    M = check_tensor(M, "energy_rank", "M")
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q <= 1.0:
        raise ValueError(f"energy_rank: q must be a number in (0, 1] (the share of Σσ² to reach), got {q!r}")
    s2 = _sq_singular_values(M)
    total = s2.sum(-1, keepdim=True)
    reached = s2.cumsum(-1) >= q * total * (1 - 1e-12)
    k = (~reached).sum(-1) + 1
    return torch.where(total[..., 0] > 0, k, torch.zeros_like(k))
