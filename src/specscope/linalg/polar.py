"""Polar factor polar(G) = U Vᵀ (thin SVD G = U S Vᵀ; zero singular values map to 0) and its backends.

Backends (see docs/linalg.md for the measured speed/accuracy table behind `auto`):
- "svd": exact reference (float64 SVD).
- "gram": (G Gᵀ)^{-1/2} G via float64 eigh of the smaller Gram (linalg/lapack.py); exact down to a documented cutoff.
- "newton_schulz": odd quintic iteration X ← aX + (bA + cA²)X, A = XXᵀ (Keller Jordan's Muon).
- "polar_express": the same iteration with per-step minimax coefficients (Amsel et al., arXiv 2505.16932).
- "gram_newton_schulz": row-sum-scaled start, then the iteration on the small Gram (linalg/gram_ns.py).
- "auto": picks one of the above by shape and requested tolerance.

Every backend treats singular values below the input's own precision (σ_i ≤ rcond·σ_1, `default_rcond`)
as zero: the exact ones map them to exactly 0, the estimators to ≈ p'(0)·σ_i.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from ._checks import (MAX_STEPS as MAX_NS_STEPS, as_list, unchanged_until_collected, check_kernel_options, check_structure, check_tensor, check_tensors,
                      smaller_gram, without_graph, work_dtype)
from ._coefficients import KELLER_COEFFICIENTS, POLAR_EXPRESS_COEFFICIENTS
from ._scale import gram_scale, in_safe_range, needs_scaling, pow2_scale, safe_low, scaled_to
from . import lapack, workers
from .devices import iteration_dtype
from .gram_ns import GRAM_NS_COEFFICIENTS, gram_newton_schulz
from .norms import POOL_MIN

METHODS = ("auto", "svd", "gram", "newton_schulz", "polar_express", "gram_newton_schulz")


def default_rcond(dtype: torch.dtype, m: int, n: int) -> float:
    """The relative cut-off below which σ_i/σ_1 is rounding noise of a [m, n] matrix stored in `dtype`.

    float32/float64: max(m, n)·eps (numpy.linalg.matrix_rank's rule; covers the rounding of the products
    that made the matrix). float16/bfloat16: eps — max(m, n)·eps would exceed 1 from 128 columns on,
    while rounding a rank-r matrix to 16 bits leaves noise singular values of only 0.03–0.1·eps·σ_1
    (measured for 37×91 … 768×3072, r = 2, 8)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"default_rcond: dtype must be a floating torch.dtype (the matrix's storage), got {dtype!r}")
    eps = torch.finfo(dtype).eps
    return eps if torch.finfo(dtype).bits <= 16 else max(m, n) * eps


def _real(x) -> bool:
    """A real number, numpy's included; not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _coefficient_schedule(coefficients, steps: int) -> list[tuple[float, float, float]]:
    """A single (a, b, c) is repeated; a per-step list is used in order, its last entry repeated."""
    if steps < 1:
        raise ValueError(f"polar: ns_steps must be ≥ 1, got {steps}")
    if len(coefficients) == 3 and all(_real(c) for c in coefficients):
        if not all(math.isfinite(c) for c in coefficients):
            raise ValueError(f"polar: ns_coefficients must be finite numbers, got {coefficients!r}")
        return [tuple(float(c) for c in coefficients)] * steps
    try:
        sched = [tuple(float(c) for c in abc) for abc in coefficients]
    except (TypeError, ValueError):
        sched = []
    if not sched or any(len(abc) != 3 for abc in sched):
        raise ValueError(f"polar: ns_coefficients must be (a, b, c) or a non-empty list of (a, b, c) triples, got {coefficients!r}")
    if not all(math.isfinite(c) for abc in sched for c in abc):
        raise ValueError(f"polar: ns_coefficients must be finite numbers, got {coefficients!r}")
    return [sched[min(k, len(sched) - 1)] for k in range(steps)]


def _odd_quintic_iteration(G: Tensor, schedule: Sequence[tuple[float, float, float]], eps: float,
                           dtype: torch.dtype, norm_scale: float) -> Tensor:
    """X₀ = G/max(norm_scale·‖G‖_F, eps) (so σ ≤ 1; torch.optim.Muon's clamp, not + eps, which shrinks a
    small gradient's update), wide orientation; X ← aX + (bA + cA²)X, A = XXᵀ."""
    tall = G.shape[-2] > G.shape[-1]
    X = (G.mT if tall else G).to(dtype)
    norm = None if needs_scaling(X) else X.norm(dim=(-2, -1), keepdim=True)
    if norm is not None and in_safe_range(norm, safe_low(dtype)):  # a CPU reads it for free: unscaled, as torch.optim.Muon
        X = X / (norm * norm_scale).clamp(min=eps)
    else:  # ‖X‖_F would leave dtype's range (or an accelerator, which does not look): at unit scale, exactly
        p = pow2_scale(G)
        X = scaled_to(G.mT if tall else G, p, dtype)
        floor = (p * eps).to(dtype)  # in G's dtype: a float64 G's factor (up to 2^1022) is beyond bfloat16's range
        if eps == 0:  # and G = 0: 0/tiny = 0, not 0/0
            floor.clamp_(min=torch.finfo(dtype).tiny)
        X = X / torch.maximum(X.norm(dim=(-2, -1), keepdim=True) * norm_scale, floor)
    batch = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])
    if X.shape[0] == 1:  # one matrix: 2-D addmm is ~15 % faster than a batch-of-one baddbmm on CPU (measured)
        X = _quintic_2d(X[0], schedule).unsqueeze(0)
    else:  # several same-shape matrices: one fused baddbmm per product for the whole batch
        for a, b, c in schedule:
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)   # bA + cA²
            X = torch.baddbmm(X, B, X, beta=a)            # aX + BX
    X = X.reshape(*batch, *X.shape[-2:])
    return X.mT if tall else X


def _quintic_2d(X: Tensor, schedule: Sequence[tuple[float, float, float]]) -> Tensor:
    for a, b, c in schedule:
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)   # bA + cA²
        X = torch.addmm(X, B, X, beta=a)            # aX + BX
    return X


def newton_schulz(G: Tensor, ns_steps: int = 5, ns_coefficients=KELLER_COEFFICIENTS, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Newton–Schulz estimate of polar(G) (estimator). Frobenius-normalised start, tall inputs transposed.

    With Keller's (3.4445, −4.775, 2.0315) × 5 the singular values land in roughly [0.7, 1.2] rather
    than at 1, so |u_iᵀPv_i − 1| is ~0.3 at 0.1·σ_1 and ~1 at 1e-3·σ_1 (docs/linalg.md). Zero singular
    values stay exactly 0 (the iteration is an odd polynomial). Unchecked for NaN/Inf (`polar` checks)."""
    G = check_structure(G, "newton_schulz", "G")
    _check_steps("newton_schulz", ns_steps)
    check_kernel_options("newton_schulz", eps=eps, dtype=dtype, steps=ns_steps)
    return _odd_quintic_iteration(G, _coefficient_schedule(ns_coefficients, ns_steps), eps, dtype, 1.0)


def polar_express(G: Tensor, ns_steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None) -> Tensor:
    """Polar Express estimate of polar(G) (estimator): start X₀ = G/(1.01‖G‖_F), then the per-step
    minimax schedule POLAR_EXPRESS_COEFFICIENTS (steps past 8 repeat the last, cubically convergent map).
    Same cost per step as Newton–Schulz, much smaller error for small singular values (docs/linalg.md).
    Computed and returned in `dtype`, default `iteration_dtype(G.device)` (bfloat16 where the device multiplies it
    in hardware, else float32). Unchecked for NaN/Inf (`polar` checks)."""
    G = check_structure(G, "polar_express", "G")
    dtype = iteration_dtype(G.device) if dtype is None else dtype
    _check_steps("polar_express", ns_steps)
    check_kernel_options("polar_express", eps=eps, dtype=dtype, steps=ns_steps)
    return _odd_quintic_iteration(G, _coefficient_schedule(POLAR_EXPRESS_COEFFICIENTS, ns_steps), eps, dtype, 1.01)


def _check_steps(fn: str, ns_steps) -> None:
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, numbers.Integral):  # numpy's ints too
        raise ValueError(f"{fn}: ns_steps must be an integer in 1..{MAX_NS_STEPS}, got {ns_steps!r}")


def _wide(G: Tensor) -> tuple[Tensor, bool]:
    tall = G.shape[-2] > G.shape[-1]
    return (G.mT if tall else G), tall


def _polar_gram_with_nuclear(G: Tensor, dtype: torch.dtype, rcond: float) -> tuple[Tensor, Tensor]:
    """P = V diag(λ^{-1/2}) Vᵀ X for X Xᵀ = V diag(λ) Vᵀ; ‖G‖_* = Σ sqrt(λ⁺).

    λ_i ≤ max(rcond², max(m,n)·eps_dtype)·λ_1 map to 0: σ_i ≤ rcond·σ_1 is below the input's precision,
    and σ_i ≲ sqrt(max(m,n)·eps_dtype)·σ_1 (≈ 1e-7 in float64) is below what the Gram resolves.
    Only the Gram and its eigh need `dtype` (float64): squaring the matrix squares its condition number.
    The two products that apply C^{-1/2} run in float32 for float32-or-narrower input: each row of VᵀX is
    σ_i·v_iᵀ with absolute error ~eps32·σ_1, so u_iᵀPv_i is off by ~eps32·σ_1/σ_i (3e-6 at 1e-3·σ_1, measured)."""
    X, tall = _wide(G)
    p = gram_scale(X, dtype)  # a float64 G beyond 1e±154: solved at unit scale (_scale.py); P does not depend on it
    if p is not None:
        X = X * p
    lam, V = lapack.eigh(lapack.lower_gram(X, dtype), overwrite=True)  # eigh reads the lower triangle
    lam = lam.clamp(min=0)
    cutoff = max(rcond**2, max(X.shape[-2:]) * torch.finfo(dtype).eps) * lam[..., -1:]
    keep = lam > cutoff
    inv_sqrt = torch.where(keep, lam.clamp(min=torch.finfo(dtype).tiny).rsqrt(), torch.zeros_like(lam))
    apply = torch.float64 if G.dtype == dtype == torch.float64 else torch.float32
    V, Xa = V.to(apply), X.to(apply)
    if apply == torch.float32 and _apply_unsafe(X, lam):  # σ_i or 1/σ_i beyond float32's range
        q = pow2_scale(X)  # exact: the products see X·2^-e, and 1/σ_i becomes 1/(σ_i·2^-e)
        Xa, inv_sqrt = scaled_to(X, q, apply), inv_sqrt / q.to(inv_sqrt.dtype)[..., 0]
    P = V @ (inv_sqrt.to(apply).unsqueeze(-1) * (V.mT @ Xa))  # VᵀX first: its rows are σ_i·v_iᵀ
    nuclear = torch.where(keep, lam, torch.zeros_like(lam)).sqrt().sum(-1)  # = ⟨G, P⟩
    if p is not None:
        nuclear = nuclear / p.to(nuclear.dtype)[..., 0, 0]
    return (P.mT if tall else P), nuclear


# σ_1² where the float32 products of P = V diag(1/σ) VᵀX stay in range: the kept σ_i ≥ 1e-7·σ_1 (the Gram's
# resolution) and their reciprocals are normal float32 numbers for σ_1 in [2^-50, 2^50]
APPLY_SAFE = (2.0**-100, 2.0**100)


def _apply_unsafe(X: Tensor, lam: Tensor) -> bool:
    """Whether the float32 products that apply C^{-1/2} to X need X at unit scale: σ_1 outside APPLY_SAFE (a
    gradient of 1e-30 or 1e30, whose σ_i or 1/σ_i would underflow or overflow float32). Read on the host on a CPU
    (free there); an accelerator scales without looking, as the estimators do (_scale.needs_scaling)."""
    if needs_scaling(X):
        return True
    lo, hi = torch.aminmax(lam[..., -1])
    return not (APPLY_SAFE[0] <= lo.item() and hi.item() <= APPLY_SAFE[1])


def _gram_job(G: Tensor, dtype: torch.dtype, rcond: float, nuclear_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """One worker job: `_polar_gram_with_nuclear` with the results already in the caller's dtypes."""
    P, nuclear = _polar_gram_with_nuclear(G, dtype, rcond)
    return P.to(G.dtype), nuclear.to(nuclear_dtype)


def _pooled(G: Tensor) -> bool:
    """Whether G's `gram` solve goes to the one-thread workers: a multi-thread CPU and a smaller side ≥ POOL_MIN.

    LAPACK's eigh barely uses a second core at these sizes; whole jobs (Gram, eigh, both products) side by
    side, one per core, keep both cores busy through the products too (docs/linalg.md "Threads")."""
    return bool(workers.count(G.device)) and min(G.shape[-2:]) >= POOL_MIN


def _gram_batch(G: Tensor, dtype: torch.dtype, rcond: float) -> tuple[Tensor, Tensor]:
    """`_polar_gram_with_nuclear` of a batch in G's dtype (norms float32, float64 for float64 G): a batch of
    ≥ 2 pooled matrices as one job per matrix; a single matrix on the calling thread, which has all the
    threads for its products."""
    out = work_dtype(G)
    X = G.reshape(-1, *G.shape[-2:])
    if not _pooled(G) or X.shape[0] < 2:
        return _gram_job(G, dtype, rcond, out)
    P, nuclear = zip(*workers.start(partial(_gram_job, dtype=dtype, rcond=rcond, nuclear_dtype=out), X.unbind(0))())
    return torch.stack(P).reshape(G.shape), torch.stack(nuclear).reshape(G.shape[:-2])


def _polar_svd_with_nuclear(G: Tensor, dtype: torch.dtype, rcond: float) -> tuple[Tensor, Tensor]:
    """P = U Vᵀ over σ_i > max(rcond, max(m,n)·eps_dtype)·σ_1 from the thin SVD; ‖G‖_* = Σσ over those (float64).

    The SVD sees G·2^-e (largest entry in [1, 2), _scale.py): exact, so P is the unit-scale one at any finite scale,
    where G's own σ_1 would overflow `dtype` (1e308 in float64, 3e38 cast to float32) or its σ underflow."""
    p = pow2_scale(G)
    U, S, Vh = torch.linalg.svd(scaled_to(G, p, dtype), full_matrices=False)
    cutoff = max(rcond, max(G.shape[-2:]) * torch.finfo(dtype).eps) * S[..., :1]
    keep = (S > cutoff).to(dtype)
    nuclear = (S * keep).sum(-1, dtype=torch.float64) / p.to(torch.float64)[..., 0, 0]
    return (U * keep.unsqueeze(-2)) @ Vh, nuclear


# polar_error at 0.1·σ_1 of the fast backend (gram_newton_schulz, bf16, 4 steps) on GPT-block gradients
# (docs/linalg.md: 0.010 at d=768, 0.018 at d=256), rounded up: a requested tol at or above this is met
# by the fast backend.
FAST_BACKEND_ERROR = 0.15  # above the fast backend's worst measured error at 0.1·σ_1, 0.11 (docs/linalg.md)


def _auto_method(G: Tensor, tol: float | None, dtype: torch.dtype | None = None) -> str:
    """Selection rule (measured on CPU, docs/linalg.md):
    - min(m, n) ≤ 32: "gram" — an exact eigh of a ≤ 32×32 Gram costs less than the iterations' overhead.
    - no tol, or tol ≥ FAST_BACKEND_ERROR: "gram_newton_schulz" (a scalar start from AOL's bound + 4
      steps in `iteration_dtype(G.device)`, Gram-side on rectangles) — below torch.optim.Muon's step time with
      less error at 0.1·σ_1.
    - tol < FAST_BACKEND_ERROR: "gram" (float64 Gram + eigh): ≤ 1e-5 error down to 1e-3·σ_1, any shape.
    tol is the polar_error you can accept for singular values ≥ 0.1·σ_1. The rule is the same on CUDA
    (the fast backend is matmul-only and batched; on an H200 it is 0.74 / 0.80× a Muon step at d=256 / 768,
    polar_express ×5 0.63: docs/performance-record.md "On one NVIDIA H200").
    A `dtype` the exact backends do not compute in (bfloat16, float16) keeps a small matrix on the estimator.
    """
    fast_ok = tol is None or tol >= FAST_BACKEND_ERROR
    if min(G.shape[-2:]) <= 32 and (dtype is None or dtype in EXACT_DTYPES or not fast_ok):
        return "gram"
    if fast_ok:
        return "gram_newton_schulz"
    return "gram"


@without_graph
def polar(G: Tensor, method: str = "auto", *, ns_steps: int | None = None, ns_coefficients=KELLER_COEFFICIENTS,
          eps: float = 1e-7, tol: float | None = None, dtype: torch.dtype | None = None,
          rcond: float | None = None, restart: int | None = None) -> Tensor:
    """polar(G) = U Vᵀ for G = U S Vᵀ (thin SVD), batched over [..., m, n]; singular values at or below the
    input's precision (σ_i ≤ rcond·σ_1, default `default_rcond(G.dtype, m, n)`) map to 0, polar(0) = 0.
    Returned in G's dtype (float32 for integer input).

    method:
      "svd"           exact reference (float64 SVD unless `dtype`).
      "gram"          exact up to conditioning: (GGᵀ)^{-1/2}G via float64 eigh of the smaller Gram; also
                      zeroes σ_i ≲ 1e-7·σ_1 that a float64 Gram cannot resolve; for non-float64 G the two
                      final products run in float32 (error ~eps32·σ_1/σ_i).
      "newton_schulz" estimator: ns_steps (default 5) quintic steps with ns_coefficients ((a,b,c), or a
                      per-step list of triples whose last entry repeats), Frobenius-normalised start,
                      computed in `dtype` (default bfloat16 like torch.optim.Muon).
      "polar_express" estimator: per-step minimax coefficients, start G/(1.01‖G‖_F), ns_steps (default 5),
                      computed in `dtype` (default `iteration_dtype(G.device)`: bfloat16 where the device
                      multiplies it in hardware, float32 elsewhere; linalg/devices.py).
      "gram_newton_schulz" estimator: start G/sqrt(max row sum of |GGᵀ|), then ns_steps (default 4) Polar
                      Express steps 3…; on the small Gram for aspect ratio ≥ 2 and ≥ 128 rows
                      (`restart`: rebuild the Gram from X at that step), `dtype` as polar_express's
                      (linalg/gram_ns.py).
      "auto"          see `_auto_method`: no tol -> gram_newton_schulz; tol < 0.15 -> gram; min(m,n) ≤ 32 -> gram.
    The estimators map σ below the input's precision to ≈ p'(0)·σ (small, not exactly 0), and divide G by
    max(scale, eps) as torch.optim.Muon does: below a scale of eps the result shrinks with G (eps=0: U Vᵀ at any
    scale). A finite G whose norm or Gram would overflow or underflow its dtype is computed at unit scale, exactly
    (docs/linalg.md "Scale"). Accuracy of each backend on GPT-block gradients is tabulated in docs/linalg.md.
    """
    G = check_tensor(G, "polar", "G")
    if method not in METHODS:
        raise ValueError(f"polar: unknown method {method!r}; choose one of {METHODS}")
    _check_options("polar", method, ns_steps=ns_steps, ns_coefficients=ns_coefficients, eps=eps, tol=tol, dtype=dtype,
                   rcond=rcond, restart=restart)
    if method == "auto":
        method = _auto_method(G, tol, dtype)
        _check_auto_choice("polar", method, G, tol, dtype, rcond, ns_steps, restart)
    if rcond is None:
        rcond = default_rcond(G.dtype, *G.shape[-2:])
    if method == "svd":
        P, _ = _polar_svd_with_nuclear(G, dtype or torch.float64, rcond)
    elif method == "gram":
        P, _ = _gram_batch(G, dtype or torch.float64, rcond)
    elif method == "newton_schulz":
        P = newton_schulz(G, 5 if ns_steps is None else ns_steps, ns_coefficients, eps, dtype or torch.bfloat16)
    elif method == "polar_express":
        P = polar_express(G, 5 if ns_steps is None else ns_steps, eps, dtype)
    else:
        schedule = _coefficient_schedule(GRAM_NS_COEFFICIENTS, len(GRAM_NS_COEFFICIENTS) if ns_steps is None else ns_steps)
        P = gram_newton_schulz(G, schedule, restart=restart, eps=eps, dtype=dtype)
    return P.to(G.dtype)


EXACT_DTYPES = (torch.float32, torch.float64)  # what SVD and eigh compute in
ITERATIVE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _check_options(fn: str, method: str, *, ns_steps=None, ns_coefficients=KELLER_COEFFICIENTS, eps=1e-7, tol=None,
                   dtype=None, rcond=None, restart=None) -> None:
    """One ValueError naming the first option of `polar` that is out of range or that `method` would ignore
    (`auto`'s choice is checked per matrix by `_check_auto_choice`)."""
    def number(x) -> bool:
        return _real(x) and math.isfinite(x)

    if ns_steps is not None and (isinstance(ns_steps, bool) or not isinstance(ns_steps, numbers.Integral)
                                 or not 1 <= ns_steps <= MAX_NS_STEPS):
        raise ValueError(f"{fn}: ns_steps must be an integer in 1..{MAX_NS_STEPS} (or None for the method's default), "
                         f"got {ns_steps!r}")
    if not number(eps) or eps < 0:
        raise ValueError(f"{fn}: eps must be a finite number ≥ 0, got {eps!r}")
    if tol is not None and (not number(tol) or tol <= 0):
        raise ValueError(f"{fn}: tol must be a finite number > 0 (or None), got {tol!r}")
    if tol is not None and method != "auto":
        raise ValueError(f"{fn}: tol chooses the backend of method='auto'; method={method!r} does not read it (drop "
                         "tol, or use method='auto')")
    if method == "newton_schulz":
        _coefficient_schedule(ns_coefficients, 1)  # a malformed or non-finite one: its ValueError
    elif not _default_coefficients(ns_coefficients):
        own = " (it runs its own per-step minimax schedule)" if method in ("polar_express", "gram_newton_schulz") else ""
        raise ValueError(f"{fn}: ns_coefficients apply to method='newton_schulz'; {method!r} does not read them{own}: "
                         "drop ns_coefficients, or use method='newton_schulz'")
    exact = method in ("svd", "gram")
    if exact and eps != 1e-7:
        raise ValueError(f"{fn}: eps clamps the scale an iterative method divides G by; {method!r} is exact and does not "
                         "read it (drop eps; rcond sets which singular values map to 0)")
    if exact and ns_steps is not None:
        raise ValueError(f"{fn}: ns_steps applies to the iterative methods; {method!r} is exact (drop ns_steps)")
    if rcond is not None:
        if not number(rcond) or not 0 <= rcond < 1:
            raise ValueError(f"{fn}: rcond must be a number in [0, 1) (σ_i ≤ rcond·σ_1 map to 0), got {rcond!r}")
        if not exact and method != "auto":
            raise ValueError(f"{fn}: rcond applies to the exact methods 'svd' and 'gram'; {method!r} maps σ below the "
                             "input's precision to ≈ p'(0)·σ and has no cut-off (drop rcond, or use method='gram')")
    if dtype is not None:
        allowed = EXACT_DTYPES if exact else ITERATIVE_DTYPES
        if dtype not in allowed:
            raise ValueError(f"{fn}: dtype={dtype} is not one {method!r} computes in; use one of "
                             + ", ".join(str(d).removeprefix("torch.") for d in allowed))
    _check_restart(fn, method, ns_steps, restart)


def _default_coefficients(coefficients) -> bool:
    """Whether `ns_coefficients` is the default (a caller may pass it explicitly with any method)."""
    try:
        return tuple(float(c) for c in coefficients) == KELLER_COEFFICIENTS
    except (TypeError, ValueError):
        return False


def _check_restart(fn: str, method: str, ns_steps, restart) -> None:
    """restart belongs to gram_newton_schulz: given to a method that would ignore it, or out of range, one ValueError."""
    if restart is None:
        return
    if method not in ("gram_newton_schulz", "auto"):
        raise ValueError(f"{fn}: restart applies to method='gram_newton_schulz' only, not {method!r} (drop restart)")
    if isinstance(restart, bool) or not isinstance(restart, numbers.Integral) or restart < 1:
        raise ValueError(f"{fn}: restart must be an int ≥ 1 (the step that rebuilds the Gram) or None, got {restart!r}")
    steps = len(GRAM_NS_COEFFICIENTS) if ns_steps is None else ns_steps
    if restart >= steps:
        raise ValueError(f"{fn}: restart={restart} is out of range for {steps} steps (it rebuilds the Gram before step "
                         f"`restart`, counted from 0: 1..{steps - 1}); lower it or raise ns_steps")


def _check_auto_choice(fn: str, method: str, G: Tensor, tol, dtype, rcond, ns_steps=None, restart=None) -> None:
    """What the backend `auto` chose for G accepts; an option it would ignore, or a dtype it cannot compute in, is
    one ValueError naming the tol and shape that chose it."""
    why = f"method='auto' chose {method!r} here (tol={tol}, shape {tuple(G.shape[-2:])})"
    if method == "gram" and dtype is not None and dtype not in EXACT_DTYPES:
        raise ValueError(f"{fn}: tol={tol} asks for the exact backend 'gram', which computes in float32 or float64, "
                         f"not dtype={dtype}; drop dtype, or raise tol to ≥ {FAST_BACKEND_ERROR} for the bfloat16 estimator")
    if method == "gram" and ns_steps is not None:
        raise ValueError(f"{fn}: ns_steps applies to the iterative methods; {why}, which is exact: drop ns_steps, or "
                         "pass method='gram_newton_schulz'")
    if restart is not None and method != "gram_newton_schulz":
        raise ValueError(f"{fn}: restart applies to 'gram_newton_schulz'; {why}: drop restart, or pass "
                         "method='gram_newton_schulz'")
    _check_options(fn, method, dtype=dtype, rcond=rcond)


@without_graph
def polar_with_nuclear_norm(G: Tensor, method: str = "gram", *, dtype: torch.dtype | None = None,
                            rcond: float | None = None) -> tuple[Tensor, Tensor]:
    """(polar(G), ‖G‖_*) from one decomposition, so an optimizer gets nr(G) at no extra cost.

    method "gram" (float64 eigh of the smaller Gram) or "svd" (float64 SVD); both exact as in `polar`,
    with the same cut-off `rcond`. The norm has shape G.shape[:-2], float32 (float64 for float64 input): a ‖G‖_*
    beyond float32's range (a float32 G of entries ≈ 1e37) reads inf there, while P is exact; pass float64 input, or
    take G at unit scale as the optimizers do (`optim._common.unit_polar_with_nuclear_norm`)."""
    G = check_tensor(G, "polar_with_nuclear_norm", "G")
    _check_exact_method(method, "polar_with_nuclear_norm")
    _check_options("polar_with_nuclear_norm", method, dtype=dtype, rcond=rcond)
    if rcond is None:
        rcond = default_rcond(G.dtype, *G.shape[-2:])
    if method == "gram":
        return _gram_batch(G, dtype or torch.float64, rcond)
    P, nuc = _polar_svd_with_nuclear(G, dtype or torch.float64, rcond)
    return P.to(G.dtype), nuc.to(work_dtype(G))


def _check_exact_method(method: str, fn: str) -> None:
    if method not in ("gram", "svd"):
        raise ValueError(f"{fn}: method must be 'gram' or 'svd', got {method!r}")


@without_graph
def polar_later(mats: Sequence[Tensor], method: str = "auto", *, ns_steps: int | None = None,
                ns_coefficients=KELLER_COEFFICIENTS, eps: float = 1e-7, tol: float | None = None,
                dtype: torch.dtype | None = None, rcond: float | None = None, restart: int | None = None,
                check: bool = True) -> Callable[[], list[Tensor]]:
    """`polar` of each tensor of a list (any shapes; an item may itself be a batch [..., m, n]), started now
    and collected by calling the result: a list of polar factors in order. Keyword arguments as `polar`;
    bad input raises here, before anything starts (`check=False` skips the NaN/Inf scan of the items that
    go to the workers, for callers that screened them).

    On a multi-thread CPU every item that `gram` solves with a smaller side ≥ 256 is one job — Gram, eigh,
    both products — on the one-thread workers (linalg/workers.py), costliest first, and this returns at
    once: the items of every shape share the cores (the optimizers' steps start all their matrices this way;
    docs/linalg.md "Threads"). Every other item is computed now, one `polar` call per item."""
    now = partial(polar, method=method, ns_steps=ns_steps, ns_coefficients=ns_coefficients, eps=eps, tol=tol,
                  dtype=dtype, rcond=rcond, restart=restart)
    options = dict(ns_steps=ns_steps, ns_coefficients=ns_coefficients, eps=eps, tol=tol, dtype=dtype, rcond=rcond,
                   restart=restart)
    return _started(mats, "polar_later", now, method, options, nuclear=False, check=check)


@without_graph
def polar_with_nuclear_norm_later(mats: Sequence[Tensor], method: str = "gram", *, dtype: torch.dtype | None = None,
                                  rcond: float | None = None, check: bool = True) -> Callable[[], list[tuple[Tensor, Tensor]]]:
    """`polar_with_nuclear_norm` of each tensor of a list, started now and collected by calling the result (a
    list of (polar factor, ‖·‖_*) in order); "gram" items go to the workers as in `polar_later`."""
    _check_exact_method(method, "polar_with_nuclear_norm_later")
    return _started(mats, "polar_with_nuclear_norm_later",
                    lambda G: polar_with_nuclear_norm(G, method, dtype=dtype, rcond=rcond),
                    method, dict(dtype=dtype, rcond=rcond), nuclear=True, check=check)


def _started(mats: Sequence[Tensor], fn: str, now: Callable, method: str, options: dict, nuclear: bool,
             check: bool) -> Callable[[], list]:
    """Check every item and every option (as `polar` would, for the pooled items too), compute the ones not pooled
    now (`_pooled`), queue the pooled `gram` ones."""
    mats = check_tensors(mats, fn) if check else [check_structure(G, fn, f"mats[{i}]")  # no entry read
                                                 for i, G in enumerate(as_list(mats, fn, "mats"))]
    if method not in METHODS:
        raise ValueError(f"{fn}: unknown method {method!r}; choose one of {METHODS}")
    _check_options(fn, method, **options)
    tol, dtype, rcond = options.get("tol"), options.get("dtype"), options.get("rcond")
    chosen = [_auto_method(G, tol, dtype) if method == "auto" else method for G in mats]
    if method == "auto":  # every item's backend accepts the options before any item starts
        for c, G in zip(chosen, mats):
            _check_auto_choice(fn, c, G, tol, dtype, rcond, options.get("ns_steps"), options.get("restart"))
    gram = [c == "gram" and _pooled(G) for c, G in zip(chosen, mats)]
    pooled = [i for i, g in enumerate(gram) if g]
    jobs = [partial(_gram_job, G=mats[i], dtype=dtype or torch.float64, nuclear_dtype=work_dtype(mats[i]),
                    rcond=default_rcond(mats[i].dtype, *mats[i].shape[-2:]) if rcond is None else rcond)
            for i in pooled]
    done = {i: now(G) for i, G in enumerate(mats) if not gram[i]}  # first: beside busy workers it would stall
    wait = unchanged_until_collected([G if g else None for G, g in zip(mats, gram)], fn, workers.start(
        lambda job: job(), jobs, [mats[i].numel() * min(mats[i].shape[-2:]) for i in pooled]))

    def collect() -> list:
        done.update(zip(pooled, wait() if nuclear else [P for P, _ in wait()]))
        return [done[i] for i in range(len(mats))]

    return collect


def polar_error(G: Tensor, P: Tensor, rel_threshold: float = 0.1) -> Tensor:
    """max |u_iᵀ P v_i − 1| over the singular triplets of G with σ_i ≥ rel_threshold·σ_1 (float64 SVD).

    Exact evaluation of how far P is from polar(G) on the directions that matter; 0 when G = 0 (no
    triplets). Shape: the broadcast batch shape of G and P, float64. The SVD is of G at unit scale (exact: its
    singular vectors do not change), so a finite G of any magnitude is scored."""
    G = check_tensor(G, "polar_error", "G")
    P = check_tensor(P, "polar_error", "P")
    if not _real(rel_threshold) or not 0 < rel_threshold <= 1:
        raise ValueError(f"polar_error: rel_threshold must be a number in (0, 1] (σ_i ≥ rel_threshold·σ_1 are "
                         f"scored), got {rel_threshold!r}")
    if P.shape[-2:] != G.shape[-2:]:
        raise ValueError(f"polar_error: P {tuple(P.shape)} and G {tuple(G.shape)} must have the same matrix shape")
    try:
        torch.broadcast_shapes(P.shape[:-2], G.shape[:-2])
    except RuntimeError:
        raise ValueError(f"polar_error: the batch shapes of P {tuple(P.shape)} and G {tuple(G.shape)} do not broadcast; "
                         "pass one P per G") from None
    U, S, Vh = torch.linalg.svd(scaled_to(G, pow2_scale(G), torch.float64), full_matrices=False)
    diag = (U * (P.double() @ Vh.mT)).sum(-2)           # u_iᵀ P v_i for every i
    mask = (S >= rel_threshold * S[..., :1]) & (S[..., :1] > 0)
    return torch.where(mask, (diag - 1).abs(), torch.zeros_like(diag)).amax(-1)


def orthogonality_error(P: Tensor) -> Tensor:
    """‖P Pᵀ − I‖_2 on the smaller side (= max_i |σ_i(P)² − 1|), float64. 0 for an exact polar factor of a
    full-rank G; 1 when polar(G) correctly maps a zero singular value to 0."""
    P = check_tensor(P, "orthogonality_error", "P")
    C = smaller_gram(P.double())
    eye = torch.eye(C.shape[-1], dtype=C.dtype, device=C.device)
    return torch.linalg.matrix_norm(C - eye, ord=2)
