"""Coefficient schedules (a, b, c) of the odd quintic polar iteration X ← aX + (bA + cA²)X, A = XXᵀ."""
from __future__ import annotations

import functools

KELLER_COEFFICIENTS = (3.4445, -4.775, 2.0315)

# Degree-5 Polar Express schedule for an initial lower bound ℓ = 1e-3 (arXiv 2505.16932, Algorithm 1).
# Every polynomial but the last is deflated by a 1.01 safety factor, p(x/1.01), so round-off cannot push
# a singular value past the interval the next polynomial was optimised on; the last one is the
# cubically convergent fixed-point map 15/8 x − 10/8 x³ + 3/8 x⁵, repeated for extra steps.
_PE_RAW = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
POLAR_EXPRESS_COEFFICIENTS = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _PE_RAW[:-1]] + [_PE_RAW[-1]]


def _solve4(M: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for the 4×4 Remez system (no dependency at import)."""
    A = [row[:] + [r] for row, r in zip(M, rhs)]
    n = len(A)
    for i in range(n):
        p = max(range(i, n), key=lambda r: abs(A[r][i]))
        A[i], A[p] = A[p], A[i]
        for r in range(i + 1, n):
            f = A[r][i] / A[i][i]
            A[r] = [x - f * y for x, y in zip(A[r], A[i])]
    x = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (A[i][n] - sum(A[i][j] * x[j] for j in range(i + 1, n))) / A[i][i]
    return x


def _critical_points(a: float, b: float, c: float) -> list[float]:
    """Positive x with p'(x) = a + 3bx² + 5cx⁴ = 0, ascending."""
    disc = 9 * b * b - 20 * a * c
    if c == 0 or disc < 0:
        return []
    ys = sorted(((-3 * b - disc**0.5) / (10 * c), (-3 * b + disc**0.5) / (10 * c)))
    return [y**0.5 for y in ys if y > 0]


def minimax_quintic(lo: float, hi: float, iters: int = 100) -> tuple[tuple[float, float, float], float]:
    """The odd quintic p(x) = ax + bx³ + cx⁵ that minimises E = max |1 − p(x)| over [lo, hi], and E.

    Remez exchange on the alternation points lo < q₁ < q₂ < hi (p = 1 − E, 1 + E, 1 − E, 1 + E there;
    q₁, q₂ the critical points of p), the construction of Polar Express (arXiv 2505.16932, §4). p maps
    [lo, hi] into [1 − E, 1 + E] and is increasing on [0, q₁], so it maps [0, lo] into [0, 1 − E]."""
    xs = [lo, (3 * lo + hi) / 4, (lo + 3 * hi) / 4, hi]
    for _ in range(iters):
        a, b, c, E = _solve4([[x, x**3, x**5, (-1) ** j] for j, x in enumerate(xs)], [1.0] * 4)
        q = _critical_points(a, b, c)
        if len(q) != 2 or not lo < q[0] < q[1] < hi:
            break
        new = [lo, q[0], q[1], hi]
        done = max(abs(u - v) for u, v in zip(new, xs)) <= 1e-15 * hi
        xs = new
        if done:
            break
    p = lambda x: a * x + b * x**3 + c * x**5  # noqa: E731
    return (a, b, c), max(abs(1 - p(x)) for x in [lo, hi, *_critical_points(a, b, c)] if lo <= x <= hi)


LOWER_MIN, TOL_MIN = 1e-15, 1e-14  # below these the Remez solve and the cubic map stall at float64's rounding
MAX_STEPS = 100


@functools.lru_cache(maxsize=64)  # ≈ 2 ms of Remez in Python per schedule: once per (lower, tol)
def converging_schedule(lower: float, tol: float) -> tuple[tuple[float, float, float], ...]:
    """Quintic steps that take every σ in [lower, 1] to within `tol` of 1 (exact interval arithmetic).

    Minimax polynomials (`minimax_quintic`) on the current interval [ℓ, u] while E > 1e-3, then the
    cubically convergent 15/8 x − 10/8 x³ + 3/8 x⁵ (increasing everywhere: [ℓ, u] ↦ [p(ℓ), p(u)]). Every
    σ below `lower` ends in [0, 1]: each polynomial is increasing below its interval. Deterministic, so the
    same (lower, tol) gives the same schedule."""
    if not LOWER_MIN <= lower < 1 or not TOL_MIN <= tol < 1:
        raise ValueError(f"converging_schedule: need {LOWER_MIN:g} <= lower < 1 and {TOL_MIN:g} <= tol < 1 (float64 "
                         f"arithmetic resolves no finer), got {lower}, {tol}")
    lo, hi, out = lower, 1.0, []
    while True:
        if len(out) == MAX_STEPS:  # a safety net: every (lower, tol) in range takes < 40 steps
            raise ValueError(f"converging_schedule: no schedule of {MAX_STEPS} steps reaches tol={tol} from lower={lower}")
        if max(1 - lo, hi - 1) > 1e-3:
            abc, E = minimax_quintic(lo, hi)
            lo, hi = 1 - E, 1 + E
        else:
            abc = (15 / 8, -10 / 8, 3 / 8)
            p = lambda x: (15 * x - 10 * x**3 + 3 * x**5) / 8  # noqa: E731
            lo, hi = p(lo), p(hi)
        out.append(abc)
        if max(1 - lo, hi - 1) <= tol:
            return tuple(out)
