"""Gram Newton–Schulz from a row-sum-scaled start: the fast polar estimator behind `polar(method="gram_newton_schulz")`.

An odd quintic step X ← aX + (bA + cA²)X with A = XXᵀ is X ← h(A)X, h(A) = aI + bA + cA². Every iterate
is therefore Q·X₀ for an m×m matrix Q, and for a wide m×n start (m < n) the iteration can run on the small
Gram R = XXᵀ alone (Gram Newton–Schulz):

    H = aI + bR + cR²,   Q ← H Q,   R ← H R H          (all m×m)

with one n-sized product at the start (R₀ = X₀X₀ᵀ) and one at the end (Q X₀). A step costs 4m³ instead of
2m²n + m³, so the Gram side pays from aspect ratio ≈ 2 on (a d×4d MLP matrix: 21 instead of 36 units of
d³·2 flops for four steps). In bfloat16, R drifts from XXᵀ as steps multiply its rounding error; a
`restart` rebuilds X = QX₀ and R = XXᵀ from scratch at the given step (needed for schedules longer than
four steps, measured below).

Start: X₀ = G/sqrt(max_i Σ_j |GGᵀ|_ij). The row sums of |R| bound λ_max(R) (Gershgorin), so ‖X₀‖₂ ≤ 1 with
a σ_1 about 2.7× larger than the Frobenius start G/‖G‖_F on a gradient-like spectrum, so the schedule
can start at Polar Express's third polynomial: four steps instead of five. The scaled Gram comes free,
so the first step reuses it. This
is the bound of AOL preconditioning (Turbo-Muon, Boissin et al. 2025, arXiv 2512.04632) taken as one
scalar: AOL's per-row scaling diag(s)G changes the target (polar(DG) ≠ polar(G)), which on rank-2 37×91
float32 inputs left an error of 0.3–0.7 against polar(G) (measured; `aol=True` keeps that variant).

Everything is batched over leading dims, stays on G's device, and has no host synchronisation.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import check_kernel_options, check_structure
from ._scale import in_safe_range, needs_scaling, pow2_scale, safe_low, scaled_to
from ._coefficients import POLAR_EXPRESS_COEFFICIENTS
from .devices import iteration_dtype

# Four steps: Polar Express's steps 3–6 (arXiv 2505.16932, ℓ = 1e-3 schedule with the 1.01 safety
# deflation). With the row-sum start this reaches error 0.01–0.02 at 0.1·σ_1 on gradients (≤ 0.03 on low-rank inputs, ≤ 0.11 where one σ dominates: docs/linalg.md) and maps σ ≲ 1e-3·σ_1 — the
# bfloat16 rounding noise of a low-rank input (≈ 0.1·eps_bf16·σ_1) — to ≲ 0.06 (docs/linalg.md).
GRAM_NS_COEFFICIENTS = tuple(POLAR_EXPRESS_COEFFICIENTS[2:6])

# Aspect ratio max(m,n)/min(m,n) from which the Gram-side iteration is cheaper than the X-side one
# (four steps: 2r + 15 vs 8r + 4 units of m³·2 flops, equal at r ≈ 1.8), and the smallest side it is
# used from: a bf16 Gram of a few rows carries absolute eigenvalue error ≈ eps_bf16·λ_1, i.e. garbage
# below ≈ 0.06·σ_1, which gave a rank-1 13×2 float32 input a null-space weight of 0.8 (measured); from
# 128 rows the rounding averages out (rank-4 128×512: ≤ 0.05, tested). Below, the X-side iteration.
GRAM_SIDE_MIN_ASPECT = 2.0
GRAM_SIDE_MIN_ROWS = 128


def row_sums(R: Tensor) -> Tensor:
    """Σ_j |R_ij| per row, in float32 or wider (a float32 1-norm: 2× slower on CPU)."""
    return R.abs().sum(-1, dtype=torch.promote_types(R.dtype, torch.float32))


def rowsum_scale(X: Tensor, R: Tensor, eps: float, aol: bool = False, sums: Tensor | None = None,
                 floor2: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(sX, s²R) with s = 1/max(sqrt(max_i Σ_j |R_ij|), eps), so ‖sX‖₂ ≤ 1 for R = XXᵀ (eps as torch.optim.Muon
    clamps ‖G‖_F: a small gradient's scale is not shrunk); with aol=True the per-row (diag(s)X, diag(s) R diag(s)),
    s_i = 1/max(sqrt(Σ_j |R_ij|), eps) (AOL; changes the polar target). `sums`: `_sums(R, aol)` where already known;
    `floor2`: eps² per matrix in place of eps (a scaled start's (eps·2^-e)², broadcast against the sums)."""
    s = _sums(R, aol) if sums is None else sums
    if floor2 is None:  # 1/max(sqrt(·), eps)
        s = s.clamp(min=eps * eps).rsqrt()
    elif torch.finfo(floor2.dtype).max <= torch.finfo(s.dtype).max:  # float32/bfloat16/float16 G: the floor fits the sums'
        s = torch.maximum(s, floor2).rsqrt()  # dtype exactly: promoted to it inside the one kernel
    else:  # float64 G iterated in float32: in s's dtype, as unscaled (the same bits); where eps·2^-e leaves that
        f = floor2.to(s.dtype)  # dtype, the floor wins, taken in its own
        s = torch.where(torch.isfinite(f), torch.maximum(s, f).rsqrt(), floor2.rsqrt().to(s.dtype))
    s = s.to(X.dtype).unsqueeze(-1)
    return X * s, R * s * s.mT if aol else R * (s * s)


def _sums(R: Tensor, aol: bool) -> Tensor:
    """What the start's scale divides by: every row sum of |R| (aol), or their largest per matrix ([..., 1])."""
    rows = row_sums(R)
    return rows if aol else rows.amax(-1, keepdim=True)


def _scaled_start(G: Tensor, dtype: torch.dtype, eps: float) -> tuple[Tensor, Tensor]:
    """(G·2^-e in `dtype`, (eps·2^-e)² per matrix [..., 1]): the start and its clamp at unit scale, where G's Gram
    would overflow or underflow (_scale.py); G·2^-e is exact, so the result is the unscaled one's."""
    p = pow2_scale(G)
    # (eps·p)² in the wider of G's and the working dtype (a zero matrix's huge p: ∞ or huge, so its start is 0·0, not
    # 0·∞); eps = 0: at least the working dtype's tiny, whose 1/sqrt fits that dtype (float64's would overflow
    # bfloat16: 0·∞), held in a dtype that has it (float16 G rounds float32's tiny to 0: 1/sqrt(0) = ∞, 0·∞ = NaN)
    floor2 = (p.squeeze(-1).to(torch.promote_types(G.dtype, dtype)) * eps).square_()
    return scaled_to(G, p, dtype), floor2 if eps > 0 else floor2.clamp_(min=torch.finfo(dtype).tiny)


def _fma(C: Tensor, A: Tensor, B: Tensor, beta: float, alpha: float = 1.0) -> Tensor:
    """beta·C + alpha·A@B: 2-D addmm for one matrix (~15 % faster than a batch-of-one baddbmm on CPU,
    measured), one fused baddbmm for a batch."""
    fma = torch.addmm if C.ndim == 2 else torch.baddbmm
    return fma(C, A, B, beta=beta, alpha=alpha)


def _h(R: Tensor, a: float, b: float, c: float) -> Tensor:
    """aI + bR + cR² (one fused product)."""
    H = _fma(R, R, R, beta=b, alpha=c)
    H.diagonal(dim1=-2, dim2=-1).add_(a)
    return H


def _x_side(X: Tensor, A: Tensor, schedule: Sequence[tuple[float, float, float]]) -> Tensor:
    """X ← aX + (bA + cA²)X with A = XXᵀ; the first A is given (the scaling computed it)."""
    for k, (a, b, c) in enumerate(schedule):
        if k:
            A = X @ X.mT
        X = _fma(X, _fma(A, A, A, beta=b, alpha=c), X, beta=a)
    return X


def _gram_side(X: Tensor, R: Tensor, schedule: Sequence[tuple[float, float, float]], restart: int | None) -> Tensor:
    """The same iteration on the m×m Gram: Q ← HQ, R ← HRH; X = QX₀ at the end (and at `restart`)."""
    Q = None
    last = len(schedule) - 1
    for k, (a, b, c) in enumerate(schedule):
        if k == restart and Q is not None:
            X = Q @ X
            R, Q = X @ X.mT, None
        H = _h(R, a, b, c)
        Q = H if Q is None else H @ Q
        if k < last and k + 1 != restart:
            R = H @ R @ H
    return Q @ X


def _wide_flat(X: Tensor) -> tuple[Tensor, torch.Size]:
    """X [..., m, n] as wide matrices (m ≤ n), one matrix as 2-D, several as [b, m, n]; and the batch shape."""
    if X.shape[-2] > X.shape[-1]:
        X = X.mT
    batch = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])
    return (X[0] if X.shape[0] == 1 else X), batch


def gram_newton_schulz(G: Tensor, schedule: Sequence[tuple[float, float, float]] = GRAM_NS_COEFFICIENTS, *,
                       restart: int | None = None, eps: float = 1e-7, dtype: torch.dtype | None = None,
                       aol: bool = False) -> Tensor:
    """Row-sum-scaled quintic iteration in `dtype` (default `iteration_dtype(G.device)`: bfloat16 where the device
    multiplies it in hardware, float32 elsewhere); Gram-side for aspect ratio ≥ 2 (from 128 rows), X-side
    otherwise.

    G: [..., m, n]. Returns [..., m, n] in `dtype`. Zero rows/columns and zero singular values stay 0.
    restart=None rebuilds the Gram at step 2 for schedules longer than four steps and never for four or
    fewer. Measured at 0.1·σ_1 on a gradient-like 768×3072 matrix in bf16: six steps 0.043 without a
    restart, 0.005 with; five 0.013 vs 0.0045; four 0.0065 vs 0.0037 (not worth two n-sized products).
    """
    G = check_structure(G, "gram_newton_schulz", "G")  # shape and kind only: NaN/Inf is `polar`'s check
    dtype = iteration_dtype(G.device) if dtype is None else dtype
    check_kernel_options("gram_newton_schulz", eps=eps, dtype=dtype, steps=len(schedule), restart=restart, schedule=schedule)
    if restart is None and len(schedule) > 4:
        restart = 2
    tall = G.shape[-2] > G.shape[-1]
    X, floor2 = _scaled_start(G, dtype, eps) if needs_scaling(G) else (G.to(dtype), None)
    while True:  # on a CPU: unscaled, then scaled where the Gram left dtype's range (read on the host: free there)
        X, batch = _wide_flat(X)
        R = X @ X.mT
        sums = _sums(R, aol)
        if floor2 is not None or in_safe_range(sums, safe_low(dtype)):
            break
        X, floor2 = _scaled_start(G, dtype, eps)
    if floor2 is not None:
        floor2 = floor2.reshape(-1, 1) if X.ndim == 3 else floor2.reshape(1)
    X, R = rowsum_scale(X, R, eps, aol, sums, floor2)
    if X.shape[-1] >= GRAM_SIDE_MIN_ASPECT * X.shape[-2] and X.shape[-2] >= GRAM_SIDE_MIN_ROWS:
        X = _gram_side(X, R, schedule, restart)
    else:
        X = _x_side(X, R, schedule)
    X = X.reshape(*batch, *X.shape[-2:])
    return X.mT if tall else X
