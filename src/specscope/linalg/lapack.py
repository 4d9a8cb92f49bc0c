"""The symmetric eigensolver and the float64 Grams of the exact routes: torch's, or numpy's OpenBLAS called
directly where that is faster.

On a CPU thread of its own (a pool worker, or a process at one thread), torch's LAPACK is MKL. The exact routes do
three things with a float64 Gram: form it, take its eigenvalues, take its eigendecomposition. Measured on two
machines (docs/linalg.md "Which LAPACK"; `benchmarks/lapack_choice.py` retakes it on any machine):
- the Gram: numpy's OpenBLAS `cblas_dsyrk` (one triangle: half a product's multiply-adds, where torch's blocked
  `lower_gram` does 5/8) is the faster on both — on an AMD EPYC the Grams of 26 GPT d=256 gradients took 23
  against 28 ms on the two workers; on an Intel Xeon (AVX-512, AMX) one 256×1024 Gram 0.89× and one 768×3072
  Gram 0.92× torch's time (2026-12-05 12:10 UTC);
- the eigenvalues and eigendecomposition (`LAPACKE_dsyevd`): OpenBLAS is the faster on the AMD EPYC (26
  eigenvalue solves 24.5 against MKL's 31 ms on the workers, 24 eigendecompositions 65 against 81), MKL on the
  Intel Xeon (a 256² Gram's eigenvalues 1.17×, its eigendecomposition 1.15× MKL's time on OpenBLAS; a 768²
  Gram's eigenvalues 0.98×, a tie).
numpy's own `np.linalg.eigvalsh` is no way there: two workers calling it wait on each other and take the serial
time (each job's CPU time 0.5–0.63 of its wall time), which is why the calls go through ctypes.

Rule (`on_openblas(x, work)`): a float64 CPU tensor, on a thread where torch runs one thread, with no autograd, goes to
numpy's OpenBLAS when that OpenBLAS has a per-thread thread count (`openblas_set_num_threads_local`, OpenBLAS ≥
0.3.27; a call runs on one thread and restores the caller's setting) and the two routines, and either
SPECSCOPE_EIGH=openblas, or SPECSCOPE_EIGH is unset/"auto", torch is on MKL (the case measured) and the work is a
Gram, or an eigensolve on an AMD CPU. SPECSCOPE_EIGH=torch keeps torch for both. Both libraries solve the same
LAPACK problem (dsyevd, lower triangle) and form the same Gram; their results differ by rounding only.
"""
from __future__ import annotations

import ctypes
import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from specscope import settings

from ._checks import lower_gram as torch_lower_gram
from ._cpu import cpu_vendor

ENV = "SPECSCOPE_EIGH"


@functools.cache
def _numpy_openblas_path() -> str | None:
    """The file of numpy's OpenBLAS, found through threadpoolctl; None where numpy's LAPACK is something else."""
    try:
        from threadpoolctl import threadpool_info
        with warnings.catch_warnings():  # its notes on OpenMP runtimes are not this lookup's business
            warnings.simplefilter("ignore")
            info = threadpool_info()
    except ImportError:
        return None
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    return next((i["filepath"] for i in info if i.get("internal_api") == "openblas"
                 and os.path.dirname(i["filepath"]).startswith(os.path.join(numpy_dir, "numpy"))), None)


@functools.cache
def _numpy_openblas_threads() -> Callable[[int], int] | None:
    """numpy's OpenBLAS `openblas_set_num_threads_local` (sets the calling thread's count, returns the old one),
    or None where numpy's LAPACK is not an OpenBLAS that has it."""
    path = _numpy_openblas_path()
    try:
        fn = ctypes.CDLL(path).openblas_set_num_threads_local if path else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


@dataclass(frozen=True)
class _OpenBLAS:
    syevd: Callable  # LAPACKE_dsyevd(layout, jobz, uplo, n, a, lda, w) -> info
    syrk: Callable   # cblas_dsyrk(order, uplo, trans, n, k, alpha, a, lda, beta, c, ldc)


def _symbol(lib: ctypes.CDLL, name: str) -> tuple[Callable, type] | None:
    """`name` as numpy's OpenBLAS builds spell it: scipy-openblas prefixes "scipy_", ILP64 builds suffix "64_"."""
    for prefix in ("scipy_", ""):
        for suffix, int_t in (("64_", ctypes.c_int64), ("", ctypes.c_int)):
            fn = getattr(lib, prefix + name + suffix, None)
            if fn is not None:
                return fn, int_t
    return None


@functools.cache
def _openblas() -> _OpenBLAS | None:
    """ctypes bindings of numpy's OpenBLAS (a call releases Python's lock), or None where any piece is missing."""
    path = _numpy_openblas_path()
    if path is None or _numpy_openblas_threads() is None:
        return None
    lib = ctypes.CDLL(path)
    found = [_symbol(lib, "LAPACKE_dsyevd"), _symbol(lib, "cblas_dsyrk")]
    if None in found or found[0][1] is not found[1][1]:
        return None
    (syevd, int_t), (syrk, _) = found  # int_t: int64 in numpy's ILP64 builds (symbols ending "64_"), else int32
    p, c = ctypes.c_void_p, ctypes.c_int
    syevd.argtypes, syevd.restype = [c, ctypes.c_char, ctypes.c_char, int_t, p, int_t, p], int_t
    syrk.argtypes = [c, c, c, int_t, int_t, ctypes.c_double, p, int_t, ctypes.c_double, p, int_t]
    syrk.restype = None
    return _OpenBLAS(syevd, syrk)


_cpu_vendor = cpu_vendor  # a module global: tests stand in other vendors


def choice() -> str:
    """SPECSCOPE_EIGH, checked: "auto" (unset), "torch" or "openblas"."""
    return settings.read(ENV)


WORK = ("gram", "eigen")


def on_openblas(x: Tensor, work: str = "eigen") -> bool:
    """Whether `work` — "gram", forming x's Gram, or "eigen", an eigensolve of x — runs on numpy's OpenBLAS (the
    rule in the module docstring)."""
    if work not in WORK:
        raise ValueError(f"on_openblas: work must be one of {WORK}, got {work!r}")
    if x.device.type != "cpu" or x.dtype != torch.float64 or (x.requires_grad and torch.is_grad_enabled()):
        return False
    mode = choice()
    if mode == "torch" or torch.get_num_threads() != 1:
        return False
    if _openblas() is None:
        if mode == "openblas":
            raise ValueError(f"{ENV}=openblas: numpy's LAPACK here is not an OpenBLAS with openblas_set_num_threads_local "
                             f"(OpenBLAS >= 0.3.27, as numpy's PyPI wheels ship); unset {ENV} to use torch's")
        return False
    if mode == "openblas":
        return True
    return torch.backends.mkl.is_available() and (work == "gram" or _cpu_vendor() == "AuthenticAMD")


def _one_thread(call: Callable[[], object]) -> object:
    """call() with numpy's OpenBLAS at one thread on this thread, the thread's own count restored after."""
    set_threads = _numpy_openblas_threads()
    before = set_threads(1)
    try:
        return call()
    finally:
        set_threads(before)


def lower_gram(x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """The smaller Gram of x [..., m, n] in `dtype`: its lower triangle and diagonal are right (what eigvalsh and eigh
    read, UPLO="L"); above the diagonal OpenBLAS leaves zeros, torch's blocked route whatever its blocks hold. On
    OpenBLAS's dsyrk where `on_openblas(x.to(dtype), "gram")` (one triangle's multiply-adds), else torch's
    `_checks.lower_gram`; the two agree to rounding on the lower triangle."""
    X = x.to(dtype)
    if not on_openblas(X, "gram"):
        return torch_lower_gram(X)
    lib = _openblas()
    rows = X.shape[-2] <= X.shape[-1]  # the smaller Gram: X Xᵀ, else XᵀX (a square X: X Xᵀ, which polar's eigh needs)
    flipped = not X.is_contiguous() and X.mT.is_contiguous()  # a transposed view, read without a copy as S = Xᵀ
    S = (X.mT if flipped else X).contiguous()
    m, n = S.shape[-2:]
    trans = 111 if rows != flipped else 112  # CblasNoTrans: S Sᵀ; CblasTrans: SᵀS (= X Xᵀ when S = Xᵀ)
    k = m if trans == 111 else n
    C = S.new_zeros(*S.shape[:-2], k, k)

    def run() -> None:
        for Si, Ci in zip(S.reshape(-1, m, n), C.view(-1, k, k)):
            # CblasRowMajor, CblasLower: row-major lower triangle, as torch reads it
            lib.syrk(101, 122, trans, k, n if trans == 111 else m, 1.0, Si.data_ptr(), n, 0.0, Ci.data_ptr(), k)

    _one_thread(run)
    return C


def _syevd(C: Tensor, vectors: bool, overwrite: bool) -> tuple[Tensor, Tensor]:
    """LAPACKE_dsyevd on each matrix of a float64 batch, reading its row-major lower triangle (the column-major
    upper one, so nothing is transposed); with vectors, the eigenvectors overwrite the copy (as its rows)."""
    lib = _openblas()
    n = C.shape[-1]
    A = C if overwrite and C.is_contiguous() else C.clone(memory_format=torch.contiguous_format)
    w = torch.empty(C.shape[:-1], dtype=torch.float64)
    jobz = b"V" if vectors else b"N"

    def run() -> list[int]:
        return [lib.syevd(102, jobz, b"U", n, Ai.data_ptr(), n, wi.data_ptr())
                for Ai, wi in zip(A.view(-1, n, n), w.view(-1, n))]

    info = next((i for i in _one_thread(run) if i != 0), 0)
    fn = "linalg.eigh" if vectors else "linalg.eigvalsh"
    if info == -1010:  # LAPACK_WORK_MEMORY_ERROR: LAPACKE could not allocate the workspace
        raise MemoryError(f"{fn} (numpy's OpenBLAS dsyevd): no memory for the workspace of a {n}² solve; "
                          f"free memory, or set {ENV}=torch")
    if info < 0:
        raise RuntimeError(f"{fn} (numpy's OpenBLAS dsyevd): argument {-info} rejected (info={info}); "
                           f"set {ENV}=torch and report this")
    if info > 0:
        raise torch.linalg.LinAlgError(f"{fn} (numpy's OpenBLAS dsyevd): the solver did not converge (info={info}): "
                                       "the input is ill-conditioned or has too many repeated eigenvalues")
    return w, A.mT


def eigvalsh(C: Tensor, *, overwrite: bool = False) -> Tensor:
    """torch.linalg.eigvalsh(C) of a symmetric [..., n, n] from its lower triangle (ascending), on numpy's OpenBLAS
    where `on_openblas(C)`; `overwrite=True` lets that solve work in C itself (a Gram its caller just made).
    Non-finite input goes to torch, whose error it raises."""
    if not on_openblas(C) or not bool(torch.isfinite(C).all()):
        return torch.linalg.eigvalsh(C)
    return _syevd(C, vectors=False, overwrite=overwrite)[0]


def eigh(C: Tensor, *, overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """torch.linalg.eigh(C) of a symmetric [..., n, n] from its lower triangle: (eigenvalues ascending, eigenvectors
    as columns), on numpy's OpenBLAS where `on_openblas(C)`, `overwrite` as in `eigvalsh`. Non-finite input goes to
    torch."""
    if not on_openblas(C) or not bool(torch.isfinite(C).all()):
        return torch.linalg.eigh(C)
    return _syevd(C, vectors=True, overwrite=overwrite)
