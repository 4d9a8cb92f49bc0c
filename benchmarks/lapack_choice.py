"""Which LAPACK the exact routes should use on this CPU: torch's (MKL) against numpy's OpenBLAS through ctypes.

    .venv/bin/python benchmarks/lapack_choice.py [--rounds 5] [--repeats 5]

The three things the exact routes do with a float64 Gram (src/specscope/linalg/lapack.py): form it, take its
eigenvalues (the probe's nr(G), `nuclear_norms`) and take its eigendecomposition (`polar(…, "gram")`, the exact
optimizers), timed on one thread as the one-thread workers run them, for the Grams of a GPT d=256 gradient
(256×1024) and of a d=768 one (768×3072). Then the workers' real batches, two jobs side by side: the Grams and
eigenvalues of the 26 gradients of a 4-layer d=256 GPT (the probe's nr(G)), and the Gram and eigendecomposition of
the 24 hidden matrices of the same model (`Muon(polar="gram")`). Each row: OpenBLAS's time over torch's in the same
round (benchmarks/_timing.interleaved), median [min–max] over the rounds; below 1 OpenBLAS is faster; "auto" is
the route SPECSCOPE_EIGH=auto takes on this machine (a Gram and an eigensolve may go to different libraries), which
the last line names. Two more rows per size put another OpenBLAS driver in the OpenBLAS column, against torch's
dsyevd: the eigenvalues by the two-stage reduction (`dsyevd_2stage`), and the eigendecomposition by the MRRR
algorithm (`dsyevr`, the other standard driver for all eigenvectors).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, load_average, parse, with_env  # noqa: E402

from specscope.linalg import lapack, workers  # noqa: E402

SHAPES = {"256×1024": (256, 1024), "768×3072": (768, 3072)}
PROBE_GRADIENTS = [(256, 256)] * 18 + [(256, 1024)] * 4 + [(1024, 256)] * 4  # GPT d=256, 4 layers, vocab 256
HIDDEN = ([(256, 256)] * 4 + [(1024, 256), (256, 1024)]) * 4


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def arms(fn):
    """fn on torch's LAPACK, on numpy's OpenBLAS, and as SPECSCOPE_EIGH=auto routes it on this machine."""
    return {name: with_env(fn, SPECSCOPE_EIGH=name) for name in ("torch", "openblas", "auto")}


def one_thread_rows(rounds: int, repeats: int) -> list[tuple[str, object]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (m, n) in SHAPES.items():
        X = torch.randn(m, n, generator=gen, dtype=torch.float64)
        C = lapack.lower_gram(X)
        work = {f"the Gram of a {name}": lambda X=X: lapack.lower_gram(X),
                f"its eigenvalues ({m}²)": lambda C=C: lapack.eigvalsh(C),
                f"its eigendecomposition ({m}²)": lambda C=C: lapack.eigh(C)}
        for what, fn in work.items():
            rows.append((f"{what}, one thread", interleaved(arms(fn), "torch", rounds=rounds, repeats=repeats)))
        if two_stage := _two_stage_eigvalsh():
            candidates = arms(lambda C=C: lapack.eigvalsh(C))
            candidates["openblas"] = lambda C=C: two_stage(C)
            rows.append((f"its eigenvalues ({m}²), OpenBLAS's two-stage reduction (dsyevd_2stage), one thread",
                         interleaved(candidates, "torch", rounds=rounds, repeats=repeats)))
        if mrrr := _mrrr_eigh():
            candidates = arms(lambda C=C: lapack.eigh(C))
            candidates["openblas"] = lambda C=C: mrrr(C)
            rows.append((f"its eigendecomposition ({m}²), OpenBLAS's MRRR (dsyevr), one thread",
                         interleaved(candidates, "torch", rounds=rounds, repeats=repeats)))
    return rows


def _two_stage_eigvalsh():
    """Eigenvalues by numpy's OpenBLAS `LAPACKE_dsyevd_2stage` (LAPACK ≥ 3.7: the matrix reduced to a band by
    blocked products, then the band to a tridiagonal one; eigenvalues only), at one thread; None where it is
    missing. MKL in torch exports no two-stage routine, so the row compares it with torch's one-stage dsyevd."""
    import ctypes

    path = lapack._numpy_openblas_path()
    found = lapack._symbol(ctypes.CDLL(path), "LAPACKE_dsyevd_2stage") if path else None
    if found is None or lapack._numpy_openblas_threads() is None:
        return None
    fn, int_t = found
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_char, ctypes.c_char, int_t, ctypes.c_void_p, int_t,
                               ctypes.c_void_p], int_t

    def eigvalsh(C: torch.Tensor) -> torch.Tensor:
        A, n = C.clone(memory_format=torch.contiguous_format), C.shape[-1]
        w = torch.empty(n, dtype=torch.float64)
        info = lapack._one_thread(lambda: fn(102, b"N", b"U", n, A.data_ptr(), n, w.data_ptr()))
        if info != 0:
            raise RuntimeError(f"LAPACKE_dsyevd_2stage returned info={info}")
        return w

    return eigvalsh


def _mrrr_eigh():
    """(eigenvalues, eigenvectors as columns) by numpy's OpenBLAS `LAPACKE_dsyevr` (tridiagonal reduction, then
    the eigenvectors by multiple relatively robust representations instead of divide and conquer), at one thread;
    None where it is missing. Reads the lower triangle as `lapack.eigh` does."""
    import ctypes

    path = lapack._numpy_openblas_path()
    found = lapack._symbol(ctypes.CDLL(path), "LAPACKE_dsyevr") if path else None
    if found is None or lapack._numpy_openblas_threads() is None:
        return None
    fn, int_t = found
    fn.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, ctypes.c_char, int_t, ctypes.c_void_p, int_t,
                   ctypes.c_double, ctypes.c_double, int_t, int_t, ctypes.c_double, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, int_t, ctypes.c_void_p]
    fn.restype = int_t
    index = torch.int64 if ctypes.sizeof(int_t) == 8 else torch.int32

    def eigh(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        A, n = C.clone(memory_format=torch.contiguous_format), C.shape[-1]
        w, Z = torch.empty(n, dtype=torch.float64), torch.empty(n, n, dtype=torch.float64)
        found, support = torch.zeros(1, dtype=index), torch.empty(2 * n, dtype=index)
        info = lapack._one_thread(lambda: fn(102, b"V", b"A", b"U", n, A.data_ptr(), n, 0.0, 0.0, 0, 0, 0.0,
                                             found.data_ptr(), w.data_ptr(), Z.data_ptr(), n, support.data_ptr()))
        if info != 0 or int(found) != n:
            raise RuntimeError(f"LAPACKE_dsyevr returned info={info} with {int(found)} of {n} eigenpairs")
        return w, Z.mT  # column-major (LAPACK_COL_MAJOR = 102), as `lapack._syevd` calls it

    return eigh


def _nuclear_job(G: torch.Tensor) -> torch.Tensor:
    return lapack.eigvalsh(lapack.lower_gram(G if G.shape[0] <= G.shape[1] else G.mT), overwrite=True)


def _polar_job(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lapack.eigh(lapack.lower_gram(G if G.shape[0] <= G.shape[1] else G.mT), overwrite=True)


def worker_rows(rounds: int, repeats: int) -> list[tuple[str, object]]:
    gen = torch.Generator().manual_seed(1)
    rows = []
    for what, job, shapes in (("26 Grams + eigenvalues (the probe's nr(G))", _nuclear_job, PROBE_GRADIENTS),
                              ("24 Grams + eigendecompositions (Muon polar=gram)", _polar_job, HIDDEN)):
        mats = [torch.randn(m, n, generator=gen) for m, n in shapes]  # float32, as gradients are
        fn = lambda job=job, mats=mats: workers.start(job, mats, [G.numel() for G in mats])()  # noqa: E731
        rows.append((f"{what}, two workers", interleaved(arms(fn), "torch", rounds=rounds, repeats=repeats)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    args = parse(ap)
    if lapack._openblas() is None:
        raise SystemExit("numpy's LAPACK here is not an OpenBLAS with openblas_set_num_threads_local: nothing to compare")
    print(f"{cpu_model()} ({lapack._cpu_vendor() or 'vendor unknown'}), torch {torch.__version__} "
          f"(MKL: {torch.backends.mkl.is_available()}), {load_average()} at start\n")
    print("| work | torch ms | OpenBLAS ms | OpenBLAS / torch | auto / torch |\n|---|---:|---:|---:|---:|")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = one_thread_rows(args.rounds, args.repeats)
    finally:
        torch.set_num_threads(torch_threads)
    if workers.count(torch.device("cpu")):
        rows += worker_rows(args.rounds, args.repeats)
    for label, t in rows:
        print(f"| {label} | {t['torch'].ms:.2f} | {t['openblas'].ms:.2f} | {t['openblas'].ratio_text()} | {t['auto'].ratio_text()} |")
    probe = torch.zeros(2, 2, dtype=torch.float64)
    torch.set_num_threads(1)
    try:
        picks = {w: "OpenBLAS" if with_env(lambda w=w: lapack.on_openblas(probe, w), SPECSCOPE_EIGH="auto")() else "torch"
                 for w in lapack.WORK}
    finally:
        torch.set_num_threads(torch_threads)
    print(f"\n{args.rounds} interleaved rounds of {args.repeats} calls each; ratios median [min–max] over the rounds. "
          f"On this machine's one-thread threads SPECSCOPE_EIGH=auto forms Grams on {picks['gram']} and solves "
          f"eigenproblems on {picks['eigen']} (src/specscope/linalg/lapack.py `on_openblas`).")


if __name__ == "__main__":
    main()
