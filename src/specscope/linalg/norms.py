"""Spectral norm by warm-started power iteration, and Gram-matrix helpers for the probe.

The probe measures st(A) every few steps: ‖A‖_F² is a plain sum, σ_1 comes from a few power iterations
on the smaller side, warm-started from the previous step's vector (activations change slowly, so 1–3
iterations usually suffice once warm).
"""
from __future__ import annotations

import numbers
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from . import graphs, lapack, workers
from ._checks import as_list, autocast_off, unchanged_until_collected, check_gram_dtype, check_structure, check_tensor, check_tensors, smaller_gram, without_graph, work_dtype
from ._coefficients import LOWER_MIN, converging_schedule
from ._scale import gram_scale, pow2_scale


def _default_v0(batch: torch.Size, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # A private generator: measuring must not consume the global RNG stream (DESIGN: probe never alters RNG).
    g = torch.Generator().manual_seed(0)
    return torch.randn(*batch, k, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


@autocast_off
def spectral_norm(A: Tensor, v0: Tensor | None = None, *, iters: int = 20, tol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """σ_1(A) by power iteration on the smaller side; returns (sigma, v) with v the warm start for next time.

    Side: v lives in R^m (a left singular vector estimate, A Aᵀ side) when m ≤ n, else in R^n (a right
    singular vector, AᵀA side), i.e. v has shape [..., min(m, n)]. v0=None starts from a fixed
    pseudo-random vector (private generator, the global RNG is untouched).

    Estimator: sigma is a lower bound on σ_1; after k iterations its relative error is about
    (σ_2/σ_1)^(2k) (slower when σ_1 ≈ σ_2, and v may then be any vector of the top cluster, which still
    gives an accurate sigma). Stops early when every batch entry changed by less than tol (relative).
    A v0 exactly orthogonal to the top singular vector converges to the next one instead. Zero matrix:
    sigma = 0 and v is returned unchanged. A zero v0 (or batch entry of it) starts as v0=None does.
    Computed in float32 (float64 for float64 input).
    """
    A = check_tensor(A, "spectral_norm", "A")
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
        raise ValueError(f"spectral_norm: iters must be an int ≥ 1, got {iters!r}")
    iters = int(iters)
    if not isinstance(tol, numbers.Real) or isinstance(tol, bool) or not 0 <= tol < 1:
        raise ValueError(f"spectral_norm: tol must be a number in [0, 1) (relative change to stop at), got {tol!r}")
    dt = work_dtype(A)
    X = A.to(dt)
    scale = pow2_scale(X)  # exact: X·2^-e neither overflows nor underflows in the products below; σ is scaled back
    X = X * scale
    if X.shape[-2] > X.shape[-1]:
        X = X.mT  # now m ≤ n and v lives in R^m
    k = X.shape[-2]
    if v0 is None:
        v = _default_v0(X.shape[:-2], k, dt, X.device)
    else:
        v0 = check_tensor(v0, "spectral_norm", "v0", min_ndim=1)
        if v0.shape[-1] != k:
            raise ValueError(f"spectral_norm: v0 has length {v0.shape[-1]} but A {tuple(A.shape)} needs min(m, n) = {k}; "
                             f"pass the v returned by the previous call on a matrix of the same shape")
        try:
            v = v0.to(device=X.device, dtype=dt).expand(*X.shape[:-2], k).clone()
        except RuntimeError:
            raise ValueError(f"spectral_norm: v0 {tuple(v0.shape)} does not match A's batch {tuple(A.shape[:-2])}; pass one "
                             f"start of length {k} for all, or one per matrix ([*batch, {k}]: the v the previous call returned)") from None
        zero = v.norm(dim=-1, keepdim=True) == 0  # a zero start finds nothing: those entries start as v0=None does
        v = torch.where(zero, _default_v0(X.shape[:-2], k, dt, X.device), v)
    v = v / v.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(dt).tiny)
    sigma = torch.zeros(X.shape[:-2], dtype=dt, device=X.device)
    for _ in range(iters):
        u = (X.mT @ v.unsqueeze(-1)).squeeze(-1)        # Aᵀ v, in R^n
        w = (X @ u.unsqueeze(-1)).squeeze(-1)            # A Aᵀ v, in R^m
        new_sigma = u.norm(dim=-1)                       # ‖Aᵀ v‖ with ‖v‖ = 1
        wn = w.norm(dim=-1, keepdim=True)
        v = torch.where(wn > 0, w / wn.clamp(min=torch.finfo(dt).tiny), v)
        done = bool(((new_sigma - sigma).abs() <= tol * new_sigma).all())
        sigma = new_sigma
        if done:
            break
    # One more Rayleigh quotient with the final v (costs one matvec, tightens sigma).
    sigma = (X.mT @ v.unsqueeze(-1)).squeeze(-1).norm(dim=-1)
    return sigma / scale[..., 0, 0], v


@autocast_off
def gram(A: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The smaller-side Gram matrix: A Aᵀ if m ≤ n else AᵀA, shape [..., k, k] with k = min(m, n).

    Computed in `dtype` (default float32, or float64 for float64 input). Exact up to round-off; in
    float32 its small eigenvalues carry absolute error ~1e-7·‖A‖_2² (see nuclear_norm_from_gram)."""
    A = check_tensor(A, "gram", "A")
    dtype = work_dtype(A) if dtype is None else check_gram_dtype(dtype, "gram")
    C = smaller_gram(A.to(dtype))
    # A is finite (checked); its squares can leave dtype's range only where dtype is not wider (no read otherwise)
    if gram_scale(A, dtype) is not None and A.numel():
        info, top = torch.finfo(dtype), C.diagonal(dim1=-2, dim2=-1).amax()
        lost = "overflows" if not bool(torch.isfinite(C).all()) else "underflows" if 0 < A.abs().amax() and top < info.tiny / info.eps else ""
        if lost:  # underflow: squares below dtype's normal range kept fewer digits than eps (all zeros from ≈ 1e-23)
            wider = "pass dtype=torch.float64, or " if dtype != torch.float64 else "pass "
            raise ValueError(f"gram: A is finite but its Gram {lost} {str(dtype).removeprefix('torch.')} (largest entry "
                             f"{A.abs().max().item():.3g}); {wider}A scaled by a power of two (st(A) and nr(A) do not "
                             "depend on the scale)")
    return C


def _check_gram(C: Tensor, fn: str) -> Tensor:
    C = check_tensor(C, fn, "C")
    if C.shape[-1] != C.shape[-2]:
        raise ValueError(f"{fn}: C must be a square Gram matrix [..., k, k], got {tuple(C.shape)}; build it with linalg.gram(A)")
    if C.numel():
        scale = C.abs().amax(dim=(-2, -1))
        eps = torch.finfo(C.dtype).eps if C.is_floating_point() else 0.0
        tol = max(1e-4, 10 * eps)  # far above the rounding of a product in C's dtype
        if bool(((C - C.mT).abs().amax(dim=(-2, -1)) > tol * scale).any()):
            raise ValueError(f"{fn}: C is not symmetric, so it is no Gram matrix AᵀA; build it with linalg.gram(A)")
        if bool((C.diagonal(dim1=-2, dim2=-1) < 0).any()):
            raise ValueError(f"{fn}: C has a negative diagonal entry, so it is no Gram matrix AᵀA; build it with linalg.gram(A)")
    return C


def _gram_eigenvalues(lam: Tensor, Cd: Tensor, dtype: torch.dtype, fn: str) -> Tensor:
    """lam, the eigenvalues of C (ascending), once they show C is a Gram: they are ≥ 0 up to its dtype's rounding
    (≈ k·eps·tr); one far below that means C is no Gram."""
    tr = Cd.diagonal(dim1=-2, dim2=-1).sum(-1)
    if lam.numel() and bool((lam[..., 0] < -1e-3 * tr.clamp(min=0) - torch.finfo(dtype).tiny).any()):
        raise ValueError(f"{fn}: C has a negative eigenvalue well beyond rounding, so it is no Gram matrix AᵀA (which "
                         "is positive semidefinite); build it with linalg.gram(A)")
    return lam


def stable_rank_from_gram(C: Tensor) -> Tensor:
    """st(A) = tr(C)/λ_max(C) for C = gram(A). Exact given C (float64 eigvalsh); st of a zero C is 0.

    Well conditioned: a float32 C gives st to ~1e-6 relative."""
    C = _check_gram(C, "stable_rank_from_gram")
    Cd = C.double()
    lam = _gram_eigenvalues(torch.linalg.eigvalsh(Cd), Cd, C.dtype, "stable_rank_from_gram")
    top = lam[..., -1]
    tr = Cd.diagonal(dim1=-2, dim2=-1).sum(-1)
    out = torch.where(top > 0, tr / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(top))
    return out.to(work_dtype(C))


POOL_MIN = 256  # below it the pool was no faster (eigvalsh) or slower (eigh at 128²) than solving serially


def _spread_over_threads(fn, C: Tensor) -> list | None:
    """fn applied to a CPU batch [..., n, n] split into torch.get_num_threads() chunks, each solved on its own
    one-thread worker (LAPACK's symmetric eigensolver barely uses a second core for n in the hundreds, and
    torch solves a batch one matrix after another); None for a single matrix, n < POOL_MIN, one thread or
    another device. Each worker sets one thread for itself: a worker left at the process's thread count
    oversubscribes the cores and was slower than solving serially. Idle 2-core CPU, float64, two threads
    (benchmarks/eigh_pool.py, docs/linalg.md "Threads"): 0.5–0.8× the serial time from 256² up, ≈ 1× below."""
    threads = workers.count(C.device)
    if not threads or C.dim() < 3 or C.shape[:-2].numel() < 2 or C.shape[-1] < POOL_MIN:
        return None
    return list(workers.pool(threads).map(fn, C.reshape(-1, *C.shape[-2:]).chunk(threads)))


def eigvalsh_batched(C: Tensor) -> Tensor:
    """torch.linalg.eigvalsh of a batch [..., n, n], the matrices spread over the CPU threads (`lapack.eigvalsh`: on
    numpy's OpenBLAS where that is faster)."""
    out = _spread_over_threads(lapack.eigvalsh, C)
    return lapack.eigvalsh(C) if out is None else torch.cat(out).reshape(C.shape[:-1])


def sum_of_roots(lam: Tensor) -> Tensor:
    """Σ_i sqrt(λ_i) of a k × k Gram's float64 eigenvalues [..., k], those ≤ k·eps·λ_max set to 0: the eigensolver's
    own noise (backward stable to ~k·eps·λ_max), so a rank-r G sums r roots and nr(G) ≤ rank holds; each root below
    it was ~1e-8·σ_1 of noise (a rank-1 256 × 1024 G read ‖G‖_* 5e-7 high). Above it σ_i are resolved: σ of
    5e-7·σ_1 on a 256 × 4096 G are summed (1.0001275, as float64 SVD). NaN stays NaN."""
    cutoff = lam.shape[-1] * torch.finfo(torch.float64).eps * lam.amax(-1, keepdim=True)
    return lam.masked_fill(lam <= cutoff, 0).sqrt().sum(-1)


def _nuclear_norm_here(G: Tensor, dtype: torch.dtype) -> Tensor:
    p = gram_scale(G, dtype)  # a float64 G beyond 1e±154 is solved at unit scale (_scale.py)
    nuc = sum_of_roots(lapack.eigvalsh(lapack.lower_gram(G if p is None else G * p, dtype).double(), overwrite=True))
    return nuc if p is None else nuc / p.double().reshape(())


def _fro_nuclear_here(G: Tensor, dtype: torch.dtype) -> Tensor:
    """[‖G‖_F, ‖G‖_*] from one Gram (‖G‖_F² = its trace); both NaN for a G holding NaN/Inf."""
    p = gram_scale(G, dtype)
    C = lapack.lower_gram(G if p is None else G * p, dtype).double()
    fro2 = C.diagonal().sum()
    if not bool(torch.isfinite(fro2)):
        return torch.full((2,), float("nan"), dtype=torch.float64)
    out = torch.stack([fro2.clamp(min=0).sqrt(), sum_of_roots(lapack.eigvalsh(C, overwrite=True))])
    return out if p is None else out / p.double().reshape(())


def _pooled(mats: list[Tensor]) -> bool:
    """Whether these matrices' Grams go to the one-thread workers: a multi-thread CPU, ≥ 2 of size ≥ POOL_MIN."""
    return bool(mats) and bool(workers.count(mats[0].device)) and sum(min(G.shape[-2:]) >= POOL_MIN for G in mats) >= 2


def _costs(mats: list[Tensor]) -> list[float]:
    """Relative cost of a Gram and its eigenvalues: k²·(m + 4k) for a k × m (k ≤ m) matrix."""
    return [min(G.shape[-2:]) ** 2 * (max(G.shape[-2:]) + 4 * min(G.shape[-2:])) for G in mats]


NUCLEAR_METHODS = ("auto", "eigh", "polar")
NUCLEAR_TOL = 1e-4  # relative error bound of the "polar" route
NUCLEAR_TOL_MIN = 1e-12  # the finest bound it is asked for (float64's rounding limits what it can certify)


def check_nuclear_tol(tol, fn: str) -> None:
    """One ValueError for a `tol` of the nuclear norms that is not a number in [NUCLEAR_TOL_MIN, 1), on every route
    (a bad tol fails the same way on a CPU, where the default route ignores it, as on an accelerator)."""
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not NUCLEAR_TOL_MIN <= tol < 1:
        raise ValueError(f"{fn}: tol must be a number in [{NUCLEAR_TOL_MIN:g}, 1) (the 'polar' route's bound on the "
                         f"relative error of ‖G‖_*), got {tol!r}")


@without_graph
def nuclear_norms(mats: list[Tensor], dtype: torch.dtype = torch.float64, *, check: bool = True,
                  method: str = "auto", tol: float = NUCLEAR_TOL) -> Tensor:
    """‖G‖_* of each matrix of a list (any shapes) as a float64 vector.

    method "eigh": Σ sqrt(eig) of the smaller Gram formed in `dtype`, eigenvalues at the float64 eigensolver's noise
    floor (k·eps·λ_max, k the Gram's size) taken as zeros (`sum_of_roots`: a rank-r G sums r roots; float64: exact to
    ~1e-12 relative where no σ_i lies near sqrt(k·eps)·σ_1;
    see nuclear_norm_from_gram for float32). On a CPU with several threads and matrices of size ≥ POOL_MIN,
    each Gram is formed and solved as one job of the one-thread workers (`linalg.workers`, largest first);
    elsewhere Grams of equal size are stacked into one batched eigvalsh.
    method "polar": `nuclear_norms_polar` — matmuls only, within `tol` relative (proved bound).
    method "auto": "eigh" on the CPU, "polar" on an accelerator, where a batch of small eigendecompositions
    is one latency-bound solver call per matrix (cuSOLVER syevd for n > 32 in float64).
    `check=False` skips the NaN/Inf scan for callers that screened the input."""
    return nuclear_norms_later(mats, dtype, check=check, method=method, tol=tol)()


@without_graph
def nuclear_norms_later(mats: list[Tensor], dtype: torch.dtype = torch.float64, *, check: bool = True,
                        method: str = "auto", tol: float = NUCLEAR_TOL) -> Callable[[], Tensor]:
    """`nuclear_norms`, started now and collected by calling the returned function: where the Grams go to the
    one-thread workers, the caller goes on meanwhile (and can queue its own jobs behind them); elsewhere the
    norms are computed before this returns."""
    if method not in NUCLEAR_METHODS:
        raise ValueError(f"nuclear_norms: unknown method {method!r}; choose one of {NUCLEAR_METHODS}")
    check_nuclear_tol(tol, "nuclear_norms")
    check_gram_dtype(dtype, "nuclear_norms")
    # check=False skips the scan of the entries for NaN/Inf only: the structure is checked either way (no entry read)
    mats = check_tensors(mats, "nuclear_norms") if check else [
        check_structure(G, "nuclear_norms", f"mats[{i}]") for i, G in enumerate(as_list(mats, "nuclear_norms"))]
    if any(G.ndim != 2 for G in mats):
        i = next(i for i, G in enumerate(mats) if G.ndim != 2)
        raise ValueError(f"nuclear_norms: mats[{i}] has shape {tuple(mats[i].shape)}; pass 2-D matrices "
                         "(list(batch.unbind()) for a batch)")
    if not mats:
        empty = torch.zeros(0, dtype=torch.float64)
        return lambda: empty
    device = mats[0].device
    if method == "polar" or (method == "auto" and device.type != "cpu"):
        out = nuclear_norms_polar(mats, tol)
        return lambda: out
    sizes = [min(G.shape[-2:]) for G in mats]
    if _pooled(mats):
        wait = unchanged_until_collected(mats, "nuclear_norms_later", workers.start(partial(_nuclear_norm_here, dtype=dtype), mats, _costs(mats)))
        return lambda: torch.stack(wait())
    out = torch.empty(len(mats), dtype=torch.float64, device=device)
    by_shape: dict[tuple[int, int], list[int]] = {}  # (smaller side, larger side): one batched Gram per shape
    for i, (k, G) in enumerate(zip(sizes, mats)):
        by_shape.setdefault((k, max(G.shape[-2:])), []).append(i)
    by_size: dict[int, tuple[list[int], list[Tensor]]] = {}  # one batched eigvalsh per Gram size
    for (k, _), idx in by_shape.items():
        X = torch.stack([mats[i] if mats[i].shape[-2] <= mats[i].shape[-1] else mats[i].mT for i in idx])
        p = gram_scale(X, dtype)  # per matrix, where the Gram could leave dtype's range; undone on the norms
        got = by_size.setdefault(k, ([], [], []))
        got[0].extend(idx)
        got[1].append(lapack.lower_gram(X if p is None else X * p, dtype).double())
        got[2].append(torch.ones(len(idx), dtype=torch.float64, device=device) if p is None else p.double().reshape(-1))
    for idx, grams, scales in by_size.values():
        out[idx] = sum_of_roots(eigvalsh_batched(torch.cat(grams))) / torch.cat(scales)
    return lambda: out


@without_graph
def fro_nuclear_norms_later(mats: list[Tensor], dtype: torch.dtype = torch.float64, *, method: str = "auto",
                            tol: float = NUCLEAR_TOL) -> Callable[[], tuple[Tensor, Tensor]]:
    """(‖G‖_F, ‖G‖_*) of each matrix as two float64 vectors, started now and collected by calling the result
    (as `nuclear_norms_later`); a matrix holding NaN/Inf gets a non-finite ‖G‖_F (and ‖G‖_*), never an error.
    On the one-thread workers both come from the job's float64 Gram (‖G‖_F² is its trace); elsewhere ‖G‖_F
    is one float64 multi-tensor norm. Shapes, kinds and `method` are checked (nothing that reads an entry)."""
    if method not in NUCLEAR_METHODS:
        raise ValueError(f"fro_nuclear_norms_later: unknown method {method!r}; choose one of {NUCLEAR_METHODS}")
    check_nuclear_tol(tol, "fro_nuclear_norms_later")
    check_gram_dtype(dtype, "fro_nuclear_norms_later")
    mats = [check_structure(G, "fro_nuclear_norms_later", f"mats[{i}]") for i, G in enumerate(as_list(mats, "fro_nuclear_norms_later"))]
    if bad := [i for i, G in enumerate(mats) if G.ndim != 2]:
        raise ValueError(f"fro_nuclear_norms_later: mats[{bad[0]}] has shape {tuple(mats[bad[0]].shape)}; pass 2-D "
                         "matrices (list(batch.unbind()) for a batch)")
    if not mats:
        empty = torch.zeros(0, dtype=torch.float64)
        return lambda: (empty, empty)
    if _pooled(mats) and method != "polar":
        wait = unchanged_until_collected(mats, "fro_nuclear_norms_later",
                                         workers.start(partial(_fro_nuclear_here, dtype=dtype), mats, _costs(mats)))
        return lambda: tuple(torch.stack(wait()).unbind(-1))
    fro = _fro_norms(mats)
    finite = torch.isfinite(fro)
    ok = finite.tolist()
    # nuclear_norms rejects non-finite input: those matrices are solved as zeros and reported as NaN
    wait = nuclear_norms_later([G if good else torch.zeros_like(G) for G, good in zip(mats, ok)], dtype,
                               check=False, method=method, tol=tol)
    return lambda: (fro, torch.where(finite, wait().to(fro.device), torch.full_like(fro, float("nan"))))


def _fro_norms(mats: list[Tensor]) -> Tensor:
    """‖G‖_F of each matrix as a float64 vector, by one multi-tensor norm; a float64 matrix, whose squares can leave
    float64's range, at unit scale (`gram_scale`)."""
    fro = torch.stack(torch._foreach_norm(mats, 2, dtype=torch.float64))
    for i, G in enumerate(mats):
        if (p := gram_scale(G, torch.float64)) is not None:
            fro[i] = torch.linalg.vector_norm(G * p, dtype=torch.float64) / p.double().reshape(())
    return fro


POLAR_CHUNK = 2**25  # float64 elements of G stacked per batch (256 MiB; the iteration holds ≈ 3× that)
POLAR_GRAPH_MAX = 2**22  # with graphs.enabled(): a CUDA batch of at most this many elements replays as a graph (32 MiB float64)


def nuclear_norms_polar(mats: list[Tensor], tol: float = NUCLEAR_TOL) -> Tensor:
    """‖G‖_* = ‖G‖_F·⟨X₀, p(X₀)⟩ for X₀ = G/‖G‖_F, p a float64 quintic polar iteration (matmuls only),
    matrices of one shape batched (POLAR_CHUNK elements at a time); a float64 vector on G's device, no host
    synchronisation.

    The schedule (`_coefficients.converging_schedule`) maps every σ ∈ [ℓ, 1]·‖G‖_F, ℓ = tol/(2k), k the
    smaller side, to within tol/2 of 1 and every smaller σ into [0, 1]; so each σ_i ≥ ℓ‖G‖_F is counted
    within tol/2·σ_i and the rest lose at most k·ℓ‖G‖_F ≤ tol/2·‖G‖_* in all: |error| ≤ tol·‖G‖_*.
    The iteration runs on G itself, never on its Gram: squaring would put the σ ≈ ℓ·‖G‖_F that the bound
    needs (≈ 2e-7·‖G‖_F at k = 256) next to float64's rounding of the Gram. 13 steps for k = 256, tol = 1e-4.
    On CUDA, with SPECSCOPE_CUDA_GRAPHS=on (`graphs.enabled`), a batch of at most POLAR_GRAPH_MAX elements runs as a
    replayed CUDA graph."""
    check_nuclear_tol(tol, "nuclear_norms")
    if not mats:
        return torch.empty(0, dtype=torch.float64)
    groups: dict[tuple, list[int]] = {}
    for i, G in enumerate(mats):
        groups.setdefault((min(G.shape), max(G.shape)), []).append(i)
    if tol / (2 * (k := max(min(g) for g in groups))) < LOWER_MIN:
        raise ValueError(f"nuclear_norms: tol={tol:g} is finer than float64 certifies for a matrix whose smaller side is "
                         f"{k} on the 'polar' route (tol >= {2 * k * LOWER_MIN:.1e}); raise tol, or use method='eigh'")
    order, parts = [], []
    for (k, m), same in groups.items():
        per_chunk = max(1, POLAR_CHUNK // (k * m))  # float64 copies of a whole model's matrices would not fit
        for idx in (same[j : j + per_chunk] for j in range(0, len(same), per_chunk)):
            order += idx
            parts.append(_nuclear_norms_polar_batch([mats[i] for i in idx], k, tol))
    flat = torch.cat(parts)
    if order == sorted(order):
        return flat
    where = {i: j for j, i in enumerate(order)}  # back to the input order by views and one stack: an index list
    return torch.stack([flat[where[i]] for i in range(len(mats))])  # would be a host-to-device copy


def _nuclear_norms_polar_batch(mats: list[Tensor], k: int, tol: float) -> Tensor:
    """The polar route for matrices of one shape (smaller side k), as one batch."""
    S = torch.stack([G.mT if G.shape[-2] > G.shape[-1] else G for G in mats])  # [B, k, m]
    p = gram_scale(S, torch.float64)  # float64 beyond 1e±154, whose ‖G‖_F leaves float64's range: at unit scale
    if p is not None:
        S = S * p
    if S.is_cuda and S.numel() <= POLAR_GRAPH_MAX and graphs.enabled():
        out = _polar_sums_replayed(S, k, tol)
    else:
        out = _polar_sums(S.double(), k, tol)  # one cast, not one per matrix
    return out if p is None else out / p.double().reshape(-1)


def _polar_sums(X: Tensor, k: int, tol: float) -> Tensor:
    """‖X_b‖_* for each matrix of a float64 batch X [B, k, m], k ≤ m: the iteration of `nuclear_norms_polar`."""
    fro = torch.linalg.matrix_norm(X)
    X0 = X / torch.where(fro > 0, fro, torch.ones_like(fro))[:, None, None]  # polar(0) = 0: ‖0‖_* = 0
    X = X0
    for a, b, c in converging_schedule(tol / (2 * k), tol / 2):
        A = X @ X.mT
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)  # aX + (bA + cA²)X
    return fro * (X0 * X).sum((-2, -1))


_POLAR_GRAPHS: dict[tuple, tuple | None] = {}


def _polar_sums_replayed(S: Tensor, k: int, tol: float) -> Tensor:
    """`_polar_sums` of S (cast to float64 in the graph) as a CUDA graph (`graphs.capture`), captured on the first
    call per (shape, dtype, device, tol) and replayed after: one launch where the eager iteration makes ≈ 5 per
    step, ≈ 70 for k = 256 — on a small batch the host's launches, not the device's flops, are the cost. The graph
    keeps its input, output and workspace (≈ 4× the float64 batch) for the process; POLAR_GRAPH_MAX bounds that.
    The same kernels as `_polar_sums` (tests/test_cuda.py holds the two within 1e-12)."""
    key = (tuple(S.shape), S.dtype, S.device, k, tol)
    if key not in _POLAR_GRAPHS:
        static = S.clone()
        got = graphs.capture(lambda X: _polar_sums(X.double(), k, tol), static)
        _POLAR_GRAPHS[key] = None if got is None else (got[0], static, got[1])
    if _POLAR_GRAPHS[key] is None:  # capture is not supported here: the eager iteration
        return _polar_sums(S.double(), k, tol)
    graph, static, out = _POLAR_GRAPHS[key]
    static.copy_(S)
    graph.replay()
    return out.clone()  # the next replay overwrites `out`


def nuclear_norm_from_gram(C: Tensor) -> Tensor:
    """‖A‖_* = Σ sqrt(max(eig(C), 0)) for C = gram(A). Exact given C (float64 eigvalsh).

    Accuracy is that of C: a float32 C has eigenvalue errors ~1e-7·λ_max, so singular values below
    ~3e-4·σ_1 are unreliable and the sum is off by at most about k·3e-4·σ_1 (k = size of C)."""
    C = _check_gram(C, "nuclear_norm_from_gram")
    Cd = C.double()
    lam = _gram_eigenvalues(eigvalsh_batched(Cd), Cd, C.dtype, "nuclear_norm_from_gram")
    return lam.clamp(min=0).sqrt().sum(-1).to(work_dtype(C))
