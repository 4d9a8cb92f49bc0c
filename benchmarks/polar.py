"""Polar backends vs one torch.optim.Muon step on the hidden matrices of one GPT block.

Not a test: prints a table of median times, ratio to the Muon baseline (measured in the same run) and
each backend's error max|u_iᵀPv_i − 1| over singular triplets with σ_i ≥ 0.1·σ_1 and ≥ 1e-3·σ_1.

Test matrices ("gradient-like"): G = U diag(σ) Vᵀ with Haar-random orthonormal U, V (float64 QR of a
Gaussian) and a geometric spectrum σ_i = 10^(−6·(i−1)/(k−1)), i.e. from σ_1 = 1 down to 1e-6: half of
the singular values lie below 1e-3·σ_1, ‖G‖_F/σ_1 ≈ 5 at d = 768, like a trained layer's gradient with a
few strong directions and a long tail. They are stored in float32 (the gradient dtype).

    .venv/bin/python benchmarks/polar.py --dims 256 768 --repeats 7
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from specscope.linalg import polar, polar_error


def block_shapes(d: int) -> list[tuple[int, int]]:
    """Hidden matrices of one GPT block: Q, K, V, O (d×d), MLP up (4d×d as nn.Linear weight), down (d×4d)."""
    return [(d, d)] * 4 + [(d, 4 * d), (4 * d, d)]


def gradient_like(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -6, k, dtype=torch.float64)
    return ((U * s) @ V.mT).float()


def group_by_shape(mats: list[torch.Tensor]) -> list[torch.Tensor]:
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for M in mats:
        groups.setdefault(tuple(M.shape), []).append(M)
    return [torch.stack(g) for g in groups.values()]


BACKENDS = {
    # label: (method, kwargs)
    "svd": ("svd", {}),
    "gram": ("gram", {}),
    "newton_schulz bf16 ×5": ("newton_schulz", {}),
    "polar_express bf16 ×5": ("polar_express", {}),
    "polar_express fp32 ×10": ("polar_express", {"dtype": torch.float32, "ns_steps": 10}),
    "auto": ("auto", {}),
    "auto tol=1e-4": ("auto", {"tol": 1e-4}),
}


def muon_baseline(mats: list[torch.Tensor]):
    """(step function, update directions) for torch.optim.Muon with the matrices as .grad."""
    params = [torch.nn.Parameter(torch.zeros_like(G)) for G in mats]
    for p, G in zip(params, mats):
        p.grad = G.clone()
    opt = torch.optim.Muon(params, lr=1.0, weight_decay=0.0)
    opt.step()  # first step from zero parameters: p = −adjusted_lr · NS(g), the update direction
    # torch scales the update by sqrt(max(1, rows/cols)) ("original" adjust_lr_fn); undo it
    directions = [-p.detach().clone() / math.sqrt(max(1.0, p.shape[0] / p.shape[1])) for p in params]
    return opt.step, directions


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run(d: int, repeats: int, backends: list[str], seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    mats = [gradient_like(m, n, gen) for m, n in block_shapes(d)]
    groups = group_by_shape(mats)
    muon_step, muon_dirs = muon_baseline(mats)

    def errors(Ps: list[torch.Tensor]) -> tuple[float, float]:
        e1 = max(float(polar_error(G, P, 0.1)) for G, P in zip(mats, Ps))
        e3 = max(float(polar_error(G, P, 1e-3)) for G, P in zip(mats, Ps))
        return e1, e3

    calls = {"torch.optim.Muon step": muon_step}
    for label in backends:
        method, kw = BACKENDS[label]
        calls[label] = (lambda method=method, kw=kw: [polar(Gb, method, **kw) for Gb in groups])
    times: dict[str, list[float]] = {k: [] for k in calls}
    for fn in calls.values():
        fn()  # warm-up
    for _ in range(repeats):  # interleave the backends so machine load hits all of them alike
        for label, fn in calls.items():
            times[label] += timed(fn, 1)

    base = statistics.median(times["torch.optim.Muon step"])
    rows = [dict(d=d, backend="torch.optim.Muon step", ms=base * 1e3, ratio=1.0, err=errors(muon_dirs))]
    for label in backends:
        method, kw = BACKENDS[label]
        Ps = [P for Gb in groups for P in polar(Gb, method, **kw).unbind(0)]
        shapes = [G.shape for Gb in groups for G in Gb.unbind(0)]
        by_shape = {tuple(s): [] for s in shapes}
        for s, P in zip(shapes, Ps):
            by_shape[tuple(s)].append(P)
        ordered = [by_shape[tuple(G.shape)].pop(0) for G in mats]
        med = statistics.median(times[label])
        rows.append(dict(d=d, backend=label, ms=med * 1e3, ratio=med / base, err=errors(ordered)))
    return rows


def print_table(rows: list[dict]) -> None:
    header = ["d", "backend", "median ms", "× Muon", "err σ≥0.1σ₁", "err σ≥1e-3σ₁"]
    cells = [[str(r["d"]), r["backend"], f"{r['ms']:.1f}", f"{r['ratio']:.2f}", f"{r['err'][0]:.2e}", f"{r['err'][1]:.2e}"]
             for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
        table = Table(title="polar backends on one GPT block (4 d×d, d×4d, 4d×d)")
        for h in header:
            table.add_column(h, justify="left" if h == "backend" else "right")
        for c in cells:
            table.add_row(*c)
        Console().print(table)
    except ImportError:
        print(" | ".join(header))
        for c in cells:
            print(" | ".join(c))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 768])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    rows = [r for d in args.dims for r in run(d, args.repeats, args.backends, args.seed)]
    print_table(rows)


if __name__ == "__main__":
    main()
