"""Float32 eigendecomposition routes to an accurate polar factor, against the float64 `gram` backend.

Not a test, and not a backend: the record of why `polar(method="gram")` keeps a float64 eigh. On this
CPU a float32 eigh of a 768² Gram costs about half a float64 one, but it resolves λ only down to
≈ eps32·λ_1, i.e. σ ≈ 3.5e-4·σ_1, so used once ("one pass") it is far off at 1e-3·σ_1. The deflated route
repairs that: after the float32 eigh (λ, Q) of C = XXᵀ, the rows of Y = QᵀX with λ < τ·λ_max (τ = 1e4·eps32)
are re-solved from their own Gram, recursively, until they fall below the input's precision; then
polar(X) = Q diag(1/‖y_i‖) Y (row norms: Rayleigh quotients without cancellation). Each level resolves
1.5 decades of σ, so how much it re-solves depends on the spectrum. Prints, per spectrum and shape, the
time ratio to `gram` (median [min–max] over interleaved rounds) and each route's polar_error at
σ ≥ 1e-3·σ_1.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/polar_float32_eigh.py --dim 768 --rounds 3 --repeats 2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, load_average, parse  # noqa: E402

from specscope.linalg import default_rcond, gram, polar, polar_error  # noqa: E402

TAU = 1e4 * torch.finfo(torch.float32).eps


def one_pass(G: torch.Tensor) -> torch.Tensor:
    """(XXᵀ)^{-1/2}X from one float32 eigh (eigenvalues below rcond²·λ_1 dropped)."""
    X = G.float()
    lam, Q = torch.linalg.eigh(gram(X))
    keep = lam > default_rcond(X.dtype, *X.shape[-2:]) ** 2 * lam[..., -1:]
    inv = torch.where(keep, lam.clamp(min=1e-30).rsqrt(), torch.zeros_like(lam))
    return Q @ (inv.unsqueeze(-1) * (Q.mT @ X))


def _levels(X: torch.Tensor, floor: torch.Tensor | None, rcond: float):
    """(Q, Y), X = QY, Q orthogonal, rows of Y orthogonal relative to their own norms."""
    lam, Q = torch.linalg.eigh(gram(X))
    Y = Q.mT @ X
    floor = rcond * lam[..., -1:].clamp(min=0).sqrt() if floor is None else floor
    k = int((lam < TAU * lam[..., -1:]).sum(-1).max())
    if k == 0 or not bool((Y[..., :k, :].norm(dim=-1) > floor).any()):
        return Q, Y
    Q2, Y2 = _levels(Y[..., :k, :], floor, rcond)
    return torch.cat([Q[..., :k] @ Q2, Q[..., k:]], -1), torch.cat([Y2, Y[..., k:, :]], -2)


def deflated(G: torch.Tensor) -> torch.Tensor:
    X = G.float()
    rcond = default_rcond(X.dtype, *X.shape[-2:])
    Q, Y = _levels(X, None, rcond)
    d = Y.norm(dim=-1)
    keep = d > rcond * d.amax(-1, keepdim=True)
    return (Q * torch.where(keep, 1 / d.clamp(min=1e-30), torch.zeros_like(d)).unsqueeze(-2)) @ Y


def spectra(k: int) -> dict[str, torch.Tensor]:
    i = torch.arange(1, k + 1, dtype=torch.float64)
    return {"geometric 1…1e-6 (benchmarks/polar.py)": torch.logspace(0, -6, k, dtype=torch.float64),
            "power law i^-1": 1 / i, "power law i^-1/2": i ** -0.5,
            "geometric 1…0.1": torch.logspace(0, -1, k, dtype=torch.float64)}


def matrices(m: int, n: int, s: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    U, _ = torch.linalg.qr(torch.randn(batch, m, s.numel(), generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(batch, n, s.numel(), generator=gen, dtype=torch.float64))
    return ((U * s) @ V.mT).float()


def cases(d: int, batch: int, seed: int = 0):
    """(spectrum name, m, n, a batch of float32 matrices) for every spectrum at d×d and d×4d."""
    gen = torch.Generator().manual_seed(seed)
    for name, s in spectra(d).items():
        for m, n in ((d, d), (d, 4 * d)):
            yield name, m, n, matrices(m, n, s, batch, gen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    args = parse(ap)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {load_average()} at start")
    print("| spectrum | shape | float32 eigh, one pass: × gram, err | deflated: × gram, err | gram err |")
    print("|---|---|---|---|---|")
    for name, m, n, G in cases(args.dim, args.batch):
        routes = {"gram": lambda: polar(G, "gram"), "one pass": lambda: one_pass(G), "deflated": lambda: deflated(G)}
        t = interleaved(routes, "gram", rounds=args.rounds, repeats=args.repeats)
        err = {k: float(polar_error(G, f(), 1e-3).max()) for k, f in routes.items()}
        print(f"| {name} | {m}×{n} | {t['one pass'].ratio_text()}, {err['one pass']:.1e} | "
              f"{t['deflated'].ratio_text()}, {err['deflated']:.1e} | {err['gram']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
