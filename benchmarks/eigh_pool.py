"""Batched symmetric eigensolves on the CPU: specscope's thread pool against torch's serial batch.

torch.linalg.eigvalsh / eigh solve a CPU batch one matrix after another, and LAPACK's tridiagonal
reduction barely uses a second core for n in the hundreds. `linalg.norms.eigvalsh_batched` splits the batch
over torch.get_num_threads() one-thread workers; the eigh row splits it the same way over `lapack.eigh`, the
eigendecomposition each exact `gram` job takes on those workers. This prints, per (n, batch), the time ratio
pool / serial (median [min–max] over interleaved rounds) and the largest eigenvalue difference between the two.

    .venv/bin/python benchmarks/eigh_pool.py --rounds 5
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, load_average, parse  # noqa: E402

from specscope.linalg import lapack  # noqa: E402
from specscope.linalg.norms import _spread_over_threads, eigvalsh_batched  # noqa: E402

CASES = ((64, 8), (128, 8), (256, 26), (512, 4), (768, 4))


def grams(n: int, batch: int) -> torch.Tensor:
    X = torch.randn(batch, 2 * n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    return X.mT @ X


def eigh_pooled(C: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of `lapack.eigh` on each matrix, the batch split over the one-thread workers (below
    POOL_MIN, where `eigvalsh_batched` solves serially, serially too)."""
    out = _spread_over_threads(lambda part: lapack.eigh(part)[0], C)
    return lapack.eigh(C)[0] if out is None else torch.cat(out).reshape(C.shape[:-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = parse(ap)
    torch.set_num_threads(a.threads)
    print(f"{load_average()}, torch {torch.__version__}, {a.threads} threads, float64")
    print(f"{'n':>5} {'batch':>5} {'op':>9} {'serial ms':>10} {'pool/serial':>20} {'max |Δλ|/λ_max':>15}")
    for n, batch in CASES:
        C = grams(n, batch)
        for op, pooled, serial in (("eigvalsh", eigvalsh_batched, torch.linalg.eigvalsh),
                                   ("eigh", eigh_pooled, lambda C: torch.linalg.eigh(C)[0])):
            t = interleaved({"serial": lambda: serial(C), "pool": lambda: pooled(C)}, "serial",
                            rounds=a.rounds, repeats=a.repeats)
            diff = ((pooled(C) - serial(C)).abs().max() / serial(C).abs().max()).item()
            print(f"{n:>5} {batch:>5} {op:>9} {t['serial'].ms:>10.1f} {t['pool'].ratio_text():>20} {diff:>15.1e}")


if __name__ == "__main__":
    main()
