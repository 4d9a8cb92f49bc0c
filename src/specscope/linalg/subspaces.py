"""The nuclear-norm proximal step and principal angles between subspaces."""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_tensor, work_dtype
from ._scale import pow2_scale


def singular_value_soft_threshold(W: Tensor, tau: float | Tensor) -> Tensor:
    """prox_{τ‖·‖_*}(W) = U diag(max(σ_i − τ, 0)) Vᵀ. Exact (float64 SVD), returned in W's dtype.

    The ideal effect of Low-Rank Decay (REFERENCE §3). tau ≥ 0: a float, or a tensor broadcast against
    W.shape[:-2] (one threshold per batch entry)."""
    W = check_tensor(W, "singular_value_soft_threshold", "W")
    if (not isinstance(tau, Tensor) and (isinstance(tau, bool) or not isinstance(tau, (int, float)))) or (
            isinstance(tau, Tensor) and (tau.is_complex() or tau.dtype == torch.bool)):  # a complex one lost its imaginary part
        raise ValueError(f"singular_value_soft_threshold: tau must be a real number ≥ 0 or a real tensor of them, got {tau!r}")
    tau = torch.as_tensor(tau, dtype=torch.float64, device=W.device)
    if not bool(torch.isfinite(tau).all()) or bool((tau < 0).any()):
        raise ValueError(f"singular_value_soft_threshold: tau must be finite and ≥ 0, got {tau}")
    try:
        fits = torch.broadcast_shapes(tau.shape, W.shape[:-2]) == W.shape[:-2]
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"singular_value_soft_threshold: tau of shape {tuple(tau.shape)} does not broadcast against the batch "
                         f"shape {tuple(W.shape[:-2])} of W {tuple(W.shape)}; give a float or one threshold per batch entry")
    p = pow2_scale(W).double()  # the SVD of W·2^-e (exact; finite at any finite scale), the threshold scaled alike
    U, S, Vh = torch.linalg.svd(W.double() * p, full_matrices=False)
    S = (S - tau.unsqueeze(-1) * p[..., 0]).clamp(min=0)
    return ((U * S.unsqueeze(-2)) @ Vh / p).to(W.dtype)


def _orthonormal_basis(X: Tensor, name: str) -> Tensor:
    if X.shape[-1] > X.shape[-2]:  # QR would give a basis of the whole space, and angles of a subspace there is not
        raise ValueError(f"principal_angles: {name} {tuple(X.shape)} has more columns than rows, so its columns are "
                         f"linearly dependent; pass a basis of at most {X.shape[-2]} columns (e.g. the leading singular vectors)")
    Q, R = torch.linalg.qr(X.double() * pow2_scale(X).double())  # at unit scale (exact): QR of 1e308 overflows
    d = R.diagonal(dim1=-2, dim2=-1).abs()
    if bool((d <= max(X.shape[-2:]) * torch.finfo(torch.float64).eps * d.amax(-1, keepdim=True).clamp(min=1e-300)).any()):
        raise ValueError(f"principal_angles: the columns of {name} {tuple(X.shape)} are linearly dependent; "
                         f"pass a basis (e.g. the leading singular vectors) of the subspace")
    return Q


def principal_angles(U: Tensor, V: Tensor) -> Tensor:
    """Principal angles (radians, ascending, min(k_U, k_V) of them) between the column spaces of U [..., n, k_U]
    and V [..., n, k_V]. Exact (float64): inputs are orthonormalised by QR (their columns must be linearly
    independent, else ValueError); θ_i = atan2(sin_i, cos_i) with cos from svd(QᵤᵀQᵥ) and sin from
    svd(Qᵥ − QᵤQᵤᵀQᵥ), accurate for tiny and for near-π/2 angles alike (Björck–Golub)."""
    U = check_tensor(U, "principal_angles", "U")
    V = check_tensor(V, "principal_angles", "V")
    if U.shape[-2] != V.shape[-2]:
        raise ValueError(f"principal_angles: U {tuple(U.shape)} and V {tuple(V.shape)} must have the same number of rows")
    try:
        torch.broadcast_shapes(U.shape[:-2], V.shape[:-2])
    except RuntimeError:
        raise ValueError(f"principal_angles: the batch shapes of U {tuple(U.shape)} and V {tuple(V.shape)} do not broadcast; "
                         "pass one V per U (or a single one of either)") from None
    Qu, Qv = _orthonormal_basis(U, "U"), _orthonormal_basis(V, "V")
    if Qv.shape[-1] > Qu.shape[-1]:
        Qu, Qv = Qv, Qu                      # the angles are symmetric; make Qv the narrower one
    M = Qu.mT @ Qv
    cos = torch.linalg.svdvals(M)                             # descending
    sin = torch.linalg.svdvals(Qv - Qu @ M).flip(-1)          # ascending, paired with cos
    return torch.atan2(sin, cos).to(work_dtype(U))
