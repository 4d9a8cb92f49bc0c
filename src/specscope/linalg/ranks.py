"""Stable rank, the spectral advantage nr(G)/st(A), and the one-hot closed form."""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_tensor, work_dtype
from ._scale import pow2_scale
from .norms import spectral_norm
from .spectra import nuclear_rank, stable_rank_exact


def stable_rank(A: Tensor, *, method: str = "exact", iters: int | None = None, v0: Tensor | None = None) -> Tensor:
    """st(A) = ‖A‖_F² / ‖A‖_2², shape A.shape[:-2]. 1 ≤ st ≤ rank(A); st(0) := 0 (rank of the zero matrix).

    method="exact": float64 eigenvalues of the smaller Gram (exact to float64 round-off).
    method="power": ‖A‖_F² / σ̂_1² with σ̂_1 from `spectral_norm(A, v0, iters=iters)` (iters default 20; both
    options are the power method's: given with "exact" they are refused, not ignored); an estimator that
    over-estimates st by the relative factor (σ_1/σ̂_1)² ≈ 1 + O((σ_2/σ_1)^(2·iters)). Use spectral_norm
    directly to get the warm-start vector back.
    """
    A = check_tensor(A, "stable_rank", "A")
    if method == "exact":
        if iters is not None or v0 is not None:
            raise ValueError("stable_rank: iters and v0 apply to method='power'; method='exact' takes no start or "
                             "iteration count (drop them, or pass method='power')")
        return stable_rank_exact(A).to(work_dtype(A))
    if method == "power":
        A = A.to(work_dtype(A))
        A = A * pow2_scale(A)  # exact, and st does not depend on scale: ‖A‖_F² of 1e20-scale float32 would overflow
        try:
            sigma, _ = spectral_norm(A, v0, iters=20 if iters is None else iters)
        except ValueError as e:  # a bad iters or v0: named as the caller passed it
            raise ValueError(str(e).replace("spectral_norm:", "stable_rank(method='power'):", 1)) from None
        fro2 = A.square().sum((-2, -1))
        return torch.where(sigma > 0, fro2 / torch.where(sigma > 0, sigma, torch.ones_like(sigma)) ** 2, torch.zeros_like(fro2))
    raise ValueError(f"stable_rank: method must be 'exact' or 'power', got {method!r}")


def spectral_advantage(G: Tensor, A: Tensor) -> Tensor:
    """nr(G)/st(A) (both exact). > 1: the spectral step has the larger guaranteed one-step decrease
    (REFERENCE §3). G is a weight's gradient and A that weight's input, tokens × features: A's feature count is one
    of G's two sides (out × in as nn.Linear stores it, or in × out as GPT-2's Conv1D does). G = 0 gives 0; A = 0
    raises (no curvature, the ratio is undefined)."""
    G, A = check_tensor(G, "spectral_advantage", "G"), check_tensor(A, "spectral_advantage", "A")
    try:
        torch.broadcast_shapes(G.shape[:-2], A.shape[:-2])
    except RuntimeError:
        raise ValueError(f"spectral_advantage: the batch shapes of G {tuple(G.shape)} and A {tuple(A.shape)} do not "
                         "broadcast; pass one gradient per input matrix (or a single one of either)") from None
    if A.shape[-1] not in G.shape[-2:]:
        raise ValueError(f"spectral_advantage: A's {A.shape[-1]} features (its last dimension, A being tokens × features) "
                         f"match neither side of G {tuple(G.shape[-2:])}; pass the gradient of the weight whose input A is")
    st = stable_rank(A)
    if bool((st == 0).any()):
        raise ValueError("spectral_advantage: A is the zero matrix, so st(A) = 0 and nr(G)/st(A) is undefined; "
                         "check that the hook captured the layer's input")
    return nuclear_rank(G) / st


def onehot_stable_rank(token_ids: Tensor) -> Tensor:
    """st(X) of the one-hot matrix of `token_ids` = N / c_max, exactly (X has orthogonal columns, so
    XᵀX = diag(counts)). No one-hot matrix is built; works on any integer tensor (all entries are one
    sequence of N tokens, negative ids allowed). Returns a float64 scalar tensor."""
    if not isinstance(token_ids, Tensor):
        raise ValueError(f"onehot_stable_rank: token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
    if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
        raise ValueError(f"onehot_stable_rank: token_ids must be an integer tensor, got {token_ids.dtype}; use .long()")
    if token_ids.numel() == 0:
        raise ValueError("onehot_stable_rank: token_ids is empty; pass at least one token")
    _, counts = torch.unique(token_ids.reshape(-1), return_counts=True)
    return torch.tensor(token_ids.numel() / int(counts.max()), dtype=torch.float64)
