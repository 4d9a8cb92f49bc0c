"""The exact routes' Grams and eigensolver: which library computes them (SPECSCOPE_EIGH and the one-thread rule),
that numpy's OpenBLAS and torch's give the same Gram, eigenvalues, decomposition and polar factor, that two
workers solve side by side, and that the caller's OpenBLAS thread count survives a solve."""

import time

import pytest
import torch

from specscope import linalg as L
from specscope.linalg import lapack, workers

needs_openblas = pytest.mark.skipif(lapack._openblas() is None,
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
    assert on_worker(lapack.on_openblas, C)
    assert not lapack.on_openblas(C), "a thread running torch on 2 threads keeps MKL/torch (faster there)"
    assert not on_worker(lapack.on_openblas, C.float()), "float32 is not routed (only float64 measured faster)"
    torch.set_num_threads(1)  # this thread at one thread, grad mode on (workers run under no_grad)
    assert lapack.on_openblas(C) and not lapack.on_openblas(C.clone().requires_grad_()), "autograd needs torch's"
    torch.set_num_threads(2)
    monkeypatch.setenv(lapack.ENV, "torch")
    assert not on_worker(lapack.on_openblas, C)
    assert not on_worker(lapack.on_openblas, C, "gram")
    monkeypatch.setenv(lapack.ENV, "auto")
    mkl = torch.backends.mkl.is_available()
    assert on_worker(lapack.on_openblas, C) == (mkl and lapack._cpu_vendor() == "AuthenticAMD"), "eigensolves: AMD only"
    assert on_worker(lapack.on_openblas, C, "gram") == mkl, "Grams: OpenBLAS's dsyrk beside MKL on either vendor"
    for vendor, eigen in (("AuthenticAMD", True), ("GenuineIntel", False)):
        monkeypatch.setattr(lapack, "_cpu_vendor", lambda v=vendor: v)
        assert on_worker(lapack.on_openblas, C) == (mkl and eigen) and on_worker(lapack.on_openblas, C, "gram") == mkl
    with pytest.raises(ValueError, match="work must be one of"):
        lapack.on_openblas(C, "svd")


def test_a_misspelt_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(lapack.ENV, "mkl")
    with pytest.raises(ValueError, match=r"SPECSCOPE_EIGH='mkl'.*auto, torch, openblas"):
        lapack.choice()


def test_openblas_requested_where_numpy_has_none_names_the_fix(monkeypatch):
    monkeypatch.setenv(lapack.ENV, "openblas")
    monkeypatch.setattr(lapack, "_openblas", lambda: None)
    with pytest.raises(ValueError, match="unset SPECSCOPE_EIGH"):
        on_worker(lapack.on_openblas, symmetric(8, 0))


@needs_openblas
@pytest.mark.parametrize("n, rank, batch", [(96, None, ()), (128, 9, ()), (40, None, (3,))])
def test_openblas_and_torch_give_the_same_decomposition(monkeypatch, n, rank, batch):
    C = torch.stack([symmetric(n, s, rank) for s in range(3)])[: batch[0]] if batch else symmetric(n, 1, rank)
    monkeypatch.setenv(lapack.ENV, "openblas")
    assert on_worker(lapack.on_openblas, C)
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


@needs_openblas
@pytest.mark.parametrize("shape", [(96, 300), (300, 96), (4, 70, 50), (1, 1)])
def test_openblas_gram_is_torchs_lower_triangle(monkeypatch, shape):
    """dsyrk's Gram equals torch's float64 one on the lower triangle and diagonal, zero above, for wide, tall,
    batched and transposed (not contiguous) input; float32 input is Gram'd in float64."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(*shape, generator=g)
    X64 = X.double()
    ref = torch.tril(X64 @ X64.mT if shape[-2] <= shape[-1] else X64.mT @ X64)
    monkeypatch.setenv(lapack.ENV, "openblas")
    for x in (X, X.mT.contiguous().mT):
        C = on_worker(lapack.lower_gram, x)
        assert C.dtype == torch.float64 and C.shape == ref.shape
        assert torch.allclose(C, ref, rtol=1e-13, atol=1e-12 * ref.abs().max().item())
        assert (C.triu(1) == 0).all()


@needs_openblas
@pytest.mark.parametrize("n, rank, batch", [(96, None, ()), (128, 9, ()), (40, None, (3,))])
def test_openblas_eigenvalues_are_torchs_and_leave_the_input_alone(monkeypatch, n, rank, batch):
    C = torch.stack([symmetric(n, s, rank) for s in range(3)])[: batch[0]] if batch else symmetric(n, 2, rank)
    monkeypatch.setenv(lapack.ENV, "openblas")
    lower = torch.tril(C)
    kept = lower.clone()
    lam = on_worker(lapack.eigvalsh, lower)
    ref = torch.linalg.eigvalsh(C)
    tol = 50 * n * torch.finfo(torch.float64).eps * ref[..., -1:].abs()
    assert lam.shape == ref.shape and ((lam - ref).abs() <= tol).all()
    assert torch.equal(lower, kept), "without overwrite=True the caller's matrix is untouched"
    assert ((on_worker(lambda M: lapack.eigvalsh(M, overwrite=True), lower.clone()) - ref).abs() <= tol).all()


def _lapack_choice_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "lapack_choice.py"
    spec = importlib.util.spec_from_file_location("lapack_choice", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("driver", ["dsyevd_2stage", "dsyevr"])
def test_the_benchmarks_other_drivers_solve_the_same_problem(driver):
    """benchmarks/lapack_choice.py times OpenBLAS's two-stage eigenvalues and its MRRR eigendecomposition against
    torch's solves: each must read the same lower triangle and return torch's eigenvalues (and, for MRRR,
    orthonormal eigenvectors as columns that rebuild the matrix), or its row compares different work."""
    bench = _lapack_choice_benchmark()
    solve = bench._two_stage_eigvalsh() if driver == "dsyevd_2stage" else bench._mrrr_eigh()
    if solve is None:
        pytest.skip(f"numpy's OpenBLAS here has no LAPACKE_{driver}")
    eps = torch.finfo(torch.float64).eps
    for n, rank in ((96, None), (130, 7)):
        C = symmetric(n, 3, rank)
        lower = torch.tril(C)
        ref = torch.linalg.eigvalsh(C)
        tol = 50 * n * eps * ref[-1].abs()
        w, Z = (solve(lower), None) if driver == "dsyevd_2stage" else solve(lower)
        assert ((w - ref).abs() <= tol).all()
        if Z is not None:
            assert ((Z.mT @ Z - torch.eye(n, dtype=Z.dtype)).abs() <= 50 * n * eps).all()
            assert (((Z * w) @ Z.mT - C).abs() <= tol).all()
        assert torch.equal(lower, torch.tril(C)), "the caller's matrix is untouched"


@needs_openblas
def test_non_finite_input_gets_torchs_error(monkeypatch):
    monkeypatch.setenv(lapack.ENV, "openblas")
    C = symmetric(16, 0)
    C[3, 2] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError):
        on_worker(lapack.eigvalsh, C)


@needs_openblas
@pytest.mark.serial  # a second pytest worker beside it would hold the core it needs
def test_two_workers_solve_side_by_side(monkeypatch, two_threads):
    """The reason the calls go through ctypes, not numpy: two workers calling np.linalg.eigvalsh wait on each
    other (each job's CPU time is 0.5–0.63 of its wall time, measured), so they take the serial time. Here two jobs
    of three solves run at once: the two threads' CPU time together exceeds the pair's wall time by ≥ 20 % in at
    least one of eight rounds, which solves taken one at a time cannot do (their sum is at most the wall time).
    Each round is paired with two jobs of float64 products, which run side by side: where those never get two
    cores either, another process holds them, and the test cannot tell and skips."""
    monkeypatch.setenv(lapack.ENV, "openblas")
    C = symmetric(500, 4)
    products = C.clone()

    def timed(work):
        def job(_):
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in range(3):
                work()
            return time.thread_time() - cpu, time.perf_counter() - wall
        return job

    def cores_busy(work) -> float:
        (cpu_a, wall_a), (cpu_b, wall_b) = workers.start(timed(work), [0, 1])()
        return (cpu_a + cpu_b) / max(wall_a, wall_b)

    cores_busy(lambda: lapack.eigvalsh(C))  # warms the workers
    solves, control = [], []
    for _ in range(8):
        solves.append(cores_busy(lambda: lapack.eigvalsh(C)))
        control.append(cores_busy(lambda: products @ products))
        if solves[-1] >= 1.2:
            return
    if max(control) < 1.2:
        pytest.skip(f"the machine never gave two cores to two jobs (products: {[round(b, 2) for b in control]})")
    pytest.fail(f"solves: cores busy {[round(b, 2) for b in solves]}, products beside them "
                f"{[round(b, 2) for b in control]}")


@needs_openblas
@pytest.mark.parametrize("info, error, says", [(-1010, MemoryError, "no memory for the workspace"),
                                               (-4, RuntimeError, "argument 4 rejected"),
                                               (3, torch.linalg.LinAlgError, "did not converge")])
def test_a_failed_solve_is_one_clear_error(monkeypatch, info, error, says):
    """What LAPACKE reports (its workspace allocation failing, a rejected argument, no convergence) becomes one
    error naming it and the way out, never a silent wrong eigenvalue."""
    monkeypatch.setenv(lapack.ENV, "openblas")
    real = lapack._openblas()
    monkeypatch.setattr(lapack, "_openblas", lambda: lapack._OpenBLAS(lambda *args: info, real.syrk))
    with pytest.raises(error, match=says):
        on_worker(lapack.eigvalsh, symmetric(8, 0))


@pytest.mark.parametrize("shape", [(2, 2), (64, 64), (3, 7), (7, 3)])
def test_the_gram_of_a_transposed_square_view_is_its_own_not_the_other_sides(shape):
    """lower_gram read a transposed view through its contiguous storage and formed that matrix's smaller Gram: for a
    square view the other side's (XᵀX for X Xᵀ), so polar(G.mT, "gram") of a float64 G was no orthogonal matrix
    (its error 0.48 on a 2×2)."""
    G = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for X in (G, G.mT):
        want = X @ X.mT if X.shape[-2] <= X.shape[-1] else X.mT @ X
        torch.testing.assert_close(lapack.lower_gram(X).tril(), want.tril(), rtol=0, atol=1e-12)
        torch.testing.assert_close(L.polar(X, "gram"), L.polar(X, "svd"), rtol=0, atol=1e-10)
        P, nuc = L.polar_with_nuclear_norm(X, "gram")
        torch.testing.assert_close(P, L.polar(X, "svd"), rtol=0, atol=1e-10)
