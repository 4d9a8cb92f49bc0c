"""A rational (Zolotarev) route to an accurate polar factor, against the float64 `gram` backend.

Not a test, and not a backend: the record of why `polar(method="gram")` keeps its float64 eigh at d = 256.
Zolotarev's best rational approximation of sign(x) on [l, 1] (Nakatsukasa & Freund 2016) composed twice
maps every σ in [l·α, α] to 1 within 1e-4 with two terms per step. Each term is one shifted inverse of the
float64 Gram (Cholesky, then its inverse), so the route is all matrix products and Cholesky factorisations:

    G = XXᵀ (the smaller side), α² = ‖G‖_F ≥ σ_1², t = λ/α²
    step 1: H_1 = h_1(G/α²),  h(t) = s·∏_j (t + c_2j)/(t + c_2j−1) = s·(1 + Σ_j a_j/(t + c_2j−1))
    step 2: H_2 = h_2(T),     T = (G/α²)·H_1²   (the Gram of the first iterate; everything commutes)
    polar(X) ≈ H_1·H_2·X/α

with l = 1e-3·k^(−1/4) (α ≤ k^(1/4)·σ_1 for rank k, so 1e-3·σ_1 is inside the band). Prints, per spectrum
and shape, the time ratio to `gram` (median [min–max] over interleaved rounds) and each route's polar_error
at σ ≥ 1e-3·σ_1. Needs scipy (the elliptic functions of the coefficients; it comes with scikit-learn).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/polar_rational.py --dim 256 --rounds 5 --repeats 3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.special import ellipj, ellipk

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, load_average, parse  # noqa: E402
from polar_float32_eigh import cases  # noqa: E402

from specscope.linalg import gram, polar, polar_error  # noqa: E402


def zolotarev(low: float, r: int) -> tuple[float, np.ndarray, np.ndarray, float]:
    """(s, a, c_odd, low'): x·h(x²) with h(t) = s·(1 + Σ a_j/(t + c_odd_j)) is Zolotarev's sign approximant of
    type (2r+1, 2r) on [low, 1], scaled so its maximum there is 1; low' is its minimum there (the next step's)."""
    m = 1 - low * low
    sn, cn, _, _ = ellipj(np.arange(1, 2 * r + 1) * ellipk(m) / (2 * r + 1), m)
    c = low * low * sn ** 2 / cn ** 2
    odd, even = c[0::2], c[1::2]  # denominators c_1, c_3, …; numerators c_2, c_4, …
    a = np.array([np.prod(even - cj) / np.prod([oi - cj for oi in odd if oi != cj]) for cj in odd])
    x = np.geomspace(low, 1, 20001)
    f = x * (1 + sum(aj / (x * x + cj) for aj, cj in zip(a, odd)))
    return 1 / f.max(), a, odd, f.min() / f.max()


def h_of(T: torch.Tensor, s: float, a: np.ndarray, odd: np.ndarray) -> torch.Tensor:
    """s·(I + Σ_j a_j (T + c_j I)^{-1}) for a symmetric positive semidefinite T (one Cholesky per term)."""
    eye = torch.eye(T.shape[-1], dtype=T.dtype)
    out = eye.expand_as(T).clone()
    for aj, cj in zip(a.tolist(), odd.tolist()):
        out += aj * torch.cholesky_inverse(torch.linalg.cholesky(T + cj * eye))
    return s * out


def rational_polar(G: torch.Tensor, terms: tuple[int, int] = (2, 2)) -> torch.Tensor:
    X = G.double()
    wide = X.shape[-2] <= X.shape[-1]
    X = X if wide else X.mT
    C = gram(X)
    k = C.shape[-1]
    alpha2 = torch.linalg.matrix_norm(C).clamp(min=1e-300)[..., None, None]
    T1 = C / alpha2
    s1, a1, c1, l2 = zolotarev(1e-3 * k ** -0.25, terms[0])
    H1 = h_of(T1, s1, a1, c1)
    s2, a2, c2, _ = zolotarev(l2, terms[1])
    H2 = h_of(T1 @ H1 @ H1, s2, a2, c2)
    P = ((H1 @ H2).float() @ X.float()) / alpha2.sqrt().float()
    return P if wide else P.mT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = parse(ap)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {load_average()} at start")
    print("| spectrum | shape | rational (2, 2): × gram | rational err | gram err |")
    print("|---|---|---|---|---|")
    for name, m, n, G in cases(args.dim, args.batch):
        routes = {"gram": lambda: polar(G, "gram"), "rational": lambda: rational_polar(G)}
        t = interleaved(routes, "gram", rounds=args.rounds, repeats=args.repeats)
        err = {k: float(polar_error(G, f(), 1e-3).max()) for k, f in routes.items()}
        print(f"| {name} | {m}×{n} | {t['rational'].ratio_text()} | {err['rational']:.1e} | {err['gram']:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
