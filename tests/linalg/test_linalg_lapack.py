"""The `gram` polar's eigensolver: which LAPACK solves (SPECSCOPE_EIGH and the one-thread rule), that numpy's
OpenBLAS and torch's give the same decomposition and the same polar factor, and that the caller's OpenBLAS
thread count survives a solve."""

import pytest
import torch

from specscope import linalg as L
from specscope.linalg import lapack, workers

needs_openblas = pytest.mark.skipif(lapack._numpy_openblas_threads() is None,
                                    reason="numpy's LAPACK here is not an OpenBLAS with per-thread thread counts")


def on_worker(fn, *args):
    """fn(*args) on a one-thread pool worker, where the `gram` backend runs its batched solves."""
    return workers.start(lambda a: fn(*a), [args])()[0]


def symmetric(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, rank or 2 * n, generator=g, dtype=torch.float64)
    return X @ X.T


@needs_openblas
def test_choice_follows_the_environment_and_the_thread(monkeypatch, two_threads):
    C = symmetric(64, 0)
    monkeypatch.setenv(lapack.ENV, "openblas")
    assert on_worker(lapack.openblas_eigh, C)
    assert not lapack.openblas_eigh(C), "a thread running torch on 2 threads keeps MKL/torch (faster there)"
    assert not on_worker(lapack.openblas_eigh, C.float()), "float32 is not routed (only float64 measured faster)"
    torch.set_num_threads(1)  # this thread at one thread, grad mode on (workers run under no_grad)
    assert lapack.openblas_eigh(C) and not lapack.openblas_eigh(C.clone().requires_grad_()), "autograd needs torch's"
    torch.set_num_threads(2)
    monkeypatch.setenv(lapack.ENV, "torch")
    assert not on_worker(lapack.openblas_eigh, C)
    monkeypatch.setenv(lapack.ENV, "auto")
    amd_mkl = lapack._cpu_vendor() == "AuthenticAMD" and torch.backends.mkl.is_available()
    assert on_worker(lapack.openblas_eigh, C) == amd_mkl


def test_a_misspelt_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(lapack.ENV, "mkl")
    with pytest.raises(ValueError, match=r"SPECSCOPE_EIGH='mkl'.*auto, torch, openblas"):
        lapack.choice()


def test_openblas_requested_where_numpy_has_none_names_the_fix(monkeypatch):
    monkeypatch.setenv(lapack.ENV, "openblas")
    monkeypatch.setattr(lapack, "_numpy_openblas_threads", lambda: None)
    with pytest.raises(ValueError, match="unset SPECSCOPE_EIGH"):
        on_worker(lapack.openblas_eigh, symmetric(8, 0))


@needs_openblas
@pytest.mark.parametrize("n, rank, batch", [(96, None, ()), (128, 9, ()), (40, None, (3,))])
def test_openblas_and_torch_give_the_same_decomposition(monkeypatch, n, rank, batch):
    C = torch.stack([symmetric(n, s, rank) for s in range(3)])[: batch[0]] if batch else symmetric(n, 1, rank)
    monkeypatch.setenv(lapack.ENV, "openblas")
    assert on_worker(lapack.openblas_eigh, C)
    lam, V = on_worker(lapack.eigh, torch.tril(C))  # the lower triangle is all it reads
    ref = torch.linalg.eigh(C)
    scale = ref.eigenvalues[..., -1:].abs()
    tol = 50 * n * torch.finfo(torch.float64).eps  # backward-stable solvers: |Δλ| ≤ c·n·eps·‖C‖₂
    assert lam.dtype == V.dtype == torch.float64 and V.shape == C.shape
    assert ((lam - ref.eigenvalues).abs() <= tol * scale).all()
    assert torch.allclose(V.mT @ V, torch.eye(n, dtype=torch.float64).expand_as(C), atol=tol)
    assert ((V * lam.unsqueeze(-2)) @ V.mT - C).abs().amax() <= tol * scale.amax()


@needs_openblas
def test_polar_gram_is_the_same_on_either_lapack(monkeypatch, two_threads):
    """A batch of rank-deficient float32 gradients: `gram` pools it (one-thread workers); both LAPACKs give
    polar(G) within float32 rounding of each other and of the float64 SVD reference, null space at 0."""
    g = torch.Generator().manual_seed(3)
    G = torch.randn(4, 256, 12, generator=g) @ torch.randn(4, 12, 300, generator=g)
    out = {}
    for mode in ("torch", "openblas"):
        monkeypatch.setenv(lapack.ENV, mode)
        out[mode] = L.polar(G, method="gram")
    ref = L.polar(G, method="svd")
    assert (out["openblas"] - out["torch"]).abs().max() < 1e-5
    assert (out["openblas"] - ref).abs().max() < 1e-5
    assert L.polar_error(G, out["openblas"], 1e-3).max() < 1e-4


@needs_openblas
def test_a_solve_restores_the_callers_openblas_thread_count(monkeypatch):
    monkeypatch.setenv(lapack.ENV, "openblas")
    set_threads = lapack._numpy_openblas_threads()

    def solve_with_count_set(C):
        before = set_threads(3)
        try:
            lapack.eigh(C)
            return set_threads(before)  # returns what the thread's count was after the solve
        finally:
            set_threads(before)

    assert on_worker(solve_with_count_set, symmetric(32, 0)) == 3
