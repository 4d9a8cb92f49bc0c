"""The symmetric eigensolver of the exact `gram` polar: torch's LAPACK, or numpy's OpenBLAS where that is faster.

On a CPU thread of its own (a pool worker, or a process at one thread), torch's LAPACK is MKL, and MKL's
dsyevd on an AMD CPU takes 7.1 ms for a 256² float64 Gram where numpy's OpenBLAS takes 4.6 ms (5.9 against
4.7 ms for the Gram of a 256×1024 matrix; 24 such Grams on two one-thread workers: 77 against 64 ms, median of
7 interleaved rounds; benchmarks/optim_step.py --floor). On all threads MKL is the faster (3.6 against 4.4 ms),
and for eigenvalues alone MKL wins on the workers too (31 against 46 ms for the same 24: OpenBLAS's many small
BLAS-2 calls contend across threads), so `eigvalsh` stays on torch everywhere.

Rule (`openblas_eigh`): a float64 CPU matrix, solved on a thread where torch runs one thread, with no autograd,
goes to OpenBLAS when numpy's LAPACK is OpenBLAS with a per-thread thread count (`openblas_set_num_threads_local`,
OpenBLAS ≥ 0.3.27; the call runs on one thread and restores the caller's setting) and either
SPECSCOPE_EIGH=openblas, or SPECSCOPE_EIGH is unset/"auto" and the CPU is AMD with torch on MKL — the one
combination measured faster. SPECSCOPE_EIGH=torch keeps torch. Both solve the same LAPACK problem (dsyevd,
lower triangle); their results differ by rounding only.
"""
from __future__ import annotations

import ctypes
import functools
import os
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

ENV = "SPECSCOPE_EIGH"
CHOICES = ("auto", "torch", "openblas")


@functools.cache
def _numpy_openblas_threads() -> Callable[[int], int] | None:
    """numpy's OpenBLAS `openblas_set_num_threads_local` (sets the calling thread's count, returns the old one),
    or None where numpy's LAPACK is not an OpenBLAS that has it."""
    try:
        from threadpoolctl import threadpool_info
        with warnings.catch_warnings():  # its notes on OpenMP runtimes are not this lookup's business
            warnings.simplefilter("ignore")
            info = threadpool_info()
        numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
        lib = next((i["filepath"] for i in info if i.get("internal_api") == "openblas"
                    and os.path.dirname(i["filepath"]).startswith(os.path.join(numpy_dir, "numpy"))), None)
        if lib is None:
            return None
        fn = ctypes.CDLL(lib).openblas_set_num_threads_local
    except (ImportError, OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


@functools.cache
def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def choice() -> str:
    """SPECSCOPE_EIGH, checked: "auto" (unset), "torch" or "openblas"."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: must be one of {', '.join(CHOICES)} (unset means auto)")
    return value


def openblas_eigh(C: Tensor) -> bool:
    """Whether `eigh(C)` runs on numpy's OpenBLAS (the rule in the module docstring)."""
    if C.device.type != "cpu" or C.dtype != torch.float64 or (C.requires_grad and torch.is_grad_enabled()):
        return False
    mode = choice()
    if mode == "torch" or torch.get_num_threads() != 1:
        return False
    if _numpy_openblas_threads() is None:
        if mode == "openblas":
            raise ValueError(f"{ENV}=openblas: numpy's LAPACK here is not an OpenBLAS with openblas_set_num_threads_local "
                             f"(OpenBLAS >= 0.3.27, as numpy's PyPI wheels ship); unset {ENV} to use torch's")
        return False
    return mode == "openblas" or (_cpu_vendor() == "AuthenticAMD" and torch.backends.mkl.is_available())


def eigh(C: Tensor) -> tuple[Tensor, Tensor]:
    """torch.linalg.eigh(C) of a symmetric [..., n, n] from its lower triangle: (eigenvalues ascending, eigenvectors
    as columns), on numpy's OpenBLAS where `openblas_eigh(C)`."""
    if not openblas_eigh(C):
        return torch.linalg.eigh(C)
    set_threads = _numpy_openblas_threads()
    before = set_threads(1)
    try:
        lam, V = np.linalg.eigh(C.detach().numpy(force=True), UPLO="L")
    except np.linalg.LinAlgError as e:
        raise torch.linalg.LinAlgError(f"linalg.eigh (numpy's OpenBLAS): {e}") from None
    finally:
        set_threads(before)
    return torch.from_numpy(lam), torch.from_numpy(V)
