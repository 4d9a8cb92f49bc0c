"""Polar backends vs one torch.optim.Muon step on the hidden matrices of one GPT block.

Not a test: prints a table of median times, the ratio to the Muon baseline timed in the same run
(median and min–max over interleaved rounds, benchmarks/_timing.py; the load average at start is
printed) and each backend's error max|u_iᵀPv_i − 1| over singular triplets with σ_i ≥ 0.1·σ_1 and
≥ 1e-3·σ_1.

Test matrices ("gradient-like"): G = U diag(σ) Vᵀ with Haar-random orthonormal U, V (float64 QR of a
Gaussian) and a geometric spectrum σ_i = 10^(−6·(i−1)/(k−1)), i.e. from σ_1 = 1 down to 1e-6: half of
the singular values lie below 1e-3·σ_1, ‖G‖_F/σ_1 ≈ 5 at d = 768, like a trained layer's gradient with a
few strong directions and a long tail. They are stored in float32 (the gradient dtype).

Each backend gets the matrices the way its fastest API takes them: the iterative ones and `polar(…, "gram")`
one batch per shape (four d×d, one d×4d, one 4d×d, in turn); the "six at once" rows the block's six matrices as
one list (`polar_later`, which the exact optimizers use: on a multi-thread CPU every matrix is one job on the
one-thread workers, all shapes side by side). "bf16" / "fp32" in a label fix the iteration's dtype; "(= auto)" is
what `polar` picks for speed, in `linalg.iteration_dtype` of the device (printed at start).

    .venv/bin/python benchmarks/polar.py --dims 256 768 --rounds 3 --repeats 3   (add --device cuda on a GPU)
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, load_average, parse, with_env  # noqa: E402

from specscope.linalg import gram_newton_schulz, iteration_dtype, polar, polar_error, polar_later  # noqa: E402


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


BF16, FP32 = torch.bfloat16, torch.float32
BACKENDS = {
    # label: (method, kwargs)
    "svd": ("svd", {}),
    "gram (= auto tol=1e-4)": ("gram", {}),
    "gram, torch's eigh": (lambda G: with_env(lambda: polar(G, "gram"), SPECSCOPE_EIGH="torch")(), {}),  # SPECSCOPE_EIGH=torch (linalg/lapack.py)
    "newton_schulz bf16 ×5": ("newton_schulz", {}),
    "polar_express bf16 ×5": ("polar_express", {"dtype": BF16}),
    "polar_express fp32 ×5": ("polar_express", {"dtype": FP32}),
    "polar_express fp32 ×10": ("polar_express", {"dtype": FP32, "ns_steps": 10}),
    # no dtype: linalg.iteration_dtype of the device (bfloat16 where it multiplies bfloat16 in hardware, else float32)
    "gram_newton_schulz ×4 (= auto)": ("gram_newton_schulz", {}),
    "gram_newton_schulz bf16 ×4": ("gram_newton_schulz", {"dtype": BF16}),
    "gram_newton_schulz fp32 ×4": ("gram_newton_schulz", {"dtype": FP32}),
    "gram_newton_schulz bf16 ×4, restart 2": ("gram_newton_schulz", {"dtype": BF16, "restart": 2}),
    "gram_newton_schulz bf16 ×4, AOL rows": (lambda G: gram_newton_schulz(G, aol=True, dtype=BF16).to(G.dtype), {}),
}
# backends given the block's six matrices as one list (`polar_later`, as the exact optimizers call it): on a
# multi-thread CPU every matrix is one job on the one-thread workers, all shapes at once
WHOLE = {
    "gram, six at once (polar_later)": lambda mats: polar_later(mats, "gram")(),
    "gram, six at once, torch's eigh": lambda mats: with_env(lambda: polar_later(mats, "gram")(), SPECSCOPE_EIGH="torch")(),
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


def _polar_all(groups: list[torch.Tensor], method, kw: dict) -> list[torch.Tensor]:
    """Every same-shape batch through a backend name (with kwargs) or a kernel function."""
    return [method(Gb) if callable(method) else polar(Gb, method, **kw) for Gb in groups]


def run(d: int, rounds: int, repeats: int, backends: list[str], seed: int, device: str) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    mats = [gradient_like(m, n, gen).to(device) for m, n in block_shapes(d)]
    groups = group_by_shape(mats)
    muon_step, muon_dirs = muon_baseline(mats)

    def errors(Ps: list[torch.Tensor]) -> tuple[float, float]:
        e1 = max(float(polar_error(G, P, 0.1)) for G, P in zip(mats, Ps))
        e3 = max(float(polar_error(G, P, 1e-3)) for G, P in zip(mats, Ps))
        return e1, e3

    base = "torch.optim.Muon step"
    calls = {base: muon_step}
    for label in backends:
        if label in WHOLE:
            calls[label] = lambda fn=WHOLE[label]: fn(mats)
            continue
        method, kw = BACKENDS[label]
        calls[label] = lambda method=method, kw=kw: _polar_all(groups, method, kw)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    print(f"d={d}:", file=sys.stderr, flush=True)
    timings = interleaved(calls, base, rounds=rounds, repeats=repeats, sync=sync)

    rows = [dict(d=d, backend=base, timing=timings[base], err=errors(muon_dirs))]
    for label in backends:
        if label in WHOLE:
            rows.append(dict(d=d, backend=label, timing=timings[label], err=errors(WHOLE[label](mats))))
            continue
        method, kw = BACKENDS[label]
        per_group = [P.unbind(0) for P in _polar_all(groups, method, kw)]
        by_shape = {tuple(Gb.shape[1:]): list(Ps) for Gb, Ps in zip(groups, per_group)}
        ordered = [by_shape[tuple(G.shape)].pop(0) for G in mats]
        rows.append(dict(d=d, backend=label, timing=timings[label], err=errors(ordered)))
    return rows


def print_table(rows: list[dict]) -> None:
    header = ["d", "backend", "median ms", "× torch Muon", "err σ≥0.1σ₁", "err σ≥1e-3σ₁"]
    cells = [[str(r["d"]), r["backend"], f"{r['timing'].ms:.1f}", r["timing"].ratio_text(),
              f"{r['err'][0]:.2e}", f"{r['err'][1]:.2e}"] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
        table = Table(title="polar backends on one GPT block (4 d×d, d×4d, 4d×d)")
        for h in header:
            table.add_column(h, justify="left" if h == "backend" else "right")
        for c in cells:
            table.add_row(*c)
        Console(width=160).print(table)
    except ImportError:
        print(" | ".join(header))
        for c in cells:
            print(" | ".join(c))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 768])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ratios: median and min–max over them)")
    ap.add_argument("--repeats", type=int, default=3, help="calls per candidate per round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", nargs="+", default=[*BACKENDS, *WHOLE], choices=[*BACKENDS, *WHOLE])
    args = parse(ap)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, {load_average()} at start; "
          f"iterations in {str(iteration_dtype(args.device)).removeprefix('torch.')} by default (linalg.iteration_dtype)")
    rows = [r for d in args.dims for r in run(d, args.rounds, args.repeats, args.backends, args.seed, args.device)]
    print_table(rows)


if __name__ == "__main__":
    main()
