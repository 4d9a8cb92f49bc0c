"""Streaming statistics of a weight's input matrix A and exact spectra of its gradient G.

A is never copied (except by the opt-in `exact` reference): each micro-batch's rows are reduced inside
the Monitor's watch (probe.watch) to a few small tensors that add over micro-batches and over ranks,
or — a wide input seen once in a step on one process — held (autograd saved it anyway) until the step ends —

- `power`: ‖A‖_F² and Z = AᵀA V for a warm-started orthonormal block V (n × b). One pass gives
  VᵀCV and ZᵀZ = VᵀC²V for C = AᵀA, and max over y in span(V) of yᵀC²y / yᵀCy is a lower bound on
  σ_1(A)² (so st is never underestimated) that is tight once V holds the top eigenvector. V is
  refined by `iters` subspace iterations on the step's first micro-batch and carried to the next step.
- `gram` (default): st = trace(C)/λ_max(C), C = AᵀA. Narrow inputs, micro-batches and ranks: C (n × n)
  summed, λ_max certified by a Cholesky test (exact up to float32 rounding of C; a CPU's Grams of at most
  DIRECT_MAX rows take float64 eigvalsh itself, cheaper there than the iterations); weights that share an
  input share its Gram. Wide inputs: C applied as Aᵀ(A·), λ_max by block Krylov with an a-posteriori error estimate
  (`krylov_top`), never forming C. Solves are batched by shape.
- `exact`: keeps the rows and takes a float64 SVD — a reference for tests and benchmarks.
- `closed_form` (embeddings): token counts; st of the one-hot matrix is N / c_max (REFERENCE §1).
"""

from __future__ import annotations

from typing import Callable

import torch

from specscope.errors import SpecscopeError
from specscope.probe import distributed as D

from specscope import linalg as L
from specscope.linalg import fro_nuclear_norms_later, graphs, workers
from specscope.linalg._scale import pow2_scale


def _orth(Z: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of Z (deterministic Householder QR)."""
    return torch.linalg.qr(Z)[0]


def _initial_block(n: int, b: int, device: torch.device) -> torch.Tensor:
    """A fixed pseudo-random start block from a private generator: the global RNG stream is untouched."""
    g = torch.Generator().manual_seed(n * 1_000_003 + b)
    return _orth(torch.randn(n, b, generator=g)).to(device)


def max_rayleigh_ratio(VCV: torch.Tensor, ZZ: torch.Tensor, made_in: torch.dtype | None = None) -> torch.Tensor:
    """max over y = Vx of yᵀC²y / yᵀCy from VᵀCV and VᵀC²V: a lower bound on λ_max(C), exact on span(V).

    Directions of span(V) with yᵀCy below 1e3·eps of the largest (eps of `made_in`, the dtype C·V was computed in,
    by default the products': float32 ones carry rounding noise there) are dropped: their ratios are noise over
    noise, and on a rank-1 input one read 4–16× λ_max (st < 1). Dropping directions keeps it a lower bound."""
    rel = max(1e-12, 1e3 * torch.finfo(made_in or VCV.dtype).eps)
    VCV, ZZ = VCV.double(), ZZ.double()
    d, W = torch.linalg.eigh((VCV + VCV.mT) / 2)
    keep = d > d[-1].clamp_min(0) * rel
    if not bool(keep.any()):
        return torch.zeros((), dtype=torch.float64, device=VCV.device)
    T = W[:, keep] / d[keep].sqrt()
    M = T.mT @ ZZ @ T
    return torch.linalg.eigvalsh((M + M.mT) / 2)[-1]


def max_rayleigh_ratios(VCV: torch.Tensor, ZZ: torch.Tensor, made_in: torch.dtype | None = None) -> torch.Tensor:
    """`max_rayleigh_ratio` of each matrix of a batch [..., b, b], by batched solves: the dropped directions' columns
    are zeroed instead of removed, which leaves the largest ratio (the Rayleigh matrix stays positive semidefinite);
    0 where no direction is kept."""
    rel = max(1e-12, 1e3 * torch.finfo(made_in or VCV.dtype).eps)
    VCV, ZZ = VCV.double(), ZZ.double()
    d, W = torch.linalg.eigh((VCV + VCV.mT) / 2)
    keep = d > d[..., -1:].clamp_min(0) * rel
    T = W * torch.where(keep, d.clamp_min(torch.finfo(d.dtype).tiny).rsqrt(), torch.zeros_like(d)).unsqueeze(-2)
    M = T.mT @ ZZ @ T
    return torch.linalg.eigvalsh((M + M.mT) / 2)[..., -1]


class PowerStats:
    """st(A) by one-pass block power iteration, warm-started from the previous measured step."""

    estimator = "power"

    def __init__(self, n: int, block: int = 4, iters: int = 1):
        self.n, self.block, self.iters = n, min(block, n), iters
        self.V: torch.Tensor | None = None
        self.reset()

    def reset(self, refine: bool = True) -> None:
        """Start a step; refine=False skips the first-micro-batch refinement (the block is already warm
        from the immediately preceding step, and this step's pass is itself one more iteration)."""
        self.fro2: torch.Tensor | None = None
        self.Z: torch.Tensor | None = None
        self.rows = 0
        self.refine = refine

    def add(self, A: torch.Tensor) -> None:
        A = A.float()
        cold = self.V is None
        if cold:
            self.V = _initial_block(self.n, self.block, A.device)
        V = self.V = self.V.to(A.device)
        if self.Z is None:  # first micro-batch of the step: refine the warm block on it
            for _ in range(self.iters if self.refine or cold else 0):
                (Z,) = D.all_reduce_sum([A.mT @ (A @ V)])
                Q = _orth(Z)
                V = torch.where(torch.isfinite(Q).all(), Q, V)  # a NaN batch must not poison the warm state
            self.V = V
            self.fro2, self.Z = A.new_zeros(()), torch.zeros_like(V)
        flat = A.reshape(-1)
        self.fro2 += flat @ flat  # ‖A‖_F² without a squared copy of A
        self.Z += A.mT @ (A @ V)
        self.rows += A.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.fro2, self.Z]

    def set_tensors(self, ts: list[torch.Tensor]) -> None:
        self.fro2, self.Z = ts

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖A‖_F², σ_1² estimate) as 0-d tensors; carries the improved block to the next step."""
        fro2 = self.fro2.double()
        if not (bool(torch.isfinite(self.Z).all()) and bool(torch.isfinite(fro2))):
            return fro2 * float("nan"), fro2 * float("nan")  # reported as non-finite; V is kept
        # the n × block products in float64: ZᵀZ of a finite float32 Z overflows float32 (inputs near 1e12)
        V, Z = self.V.double(), self.Z.double()
        lam = torch.minimum(max_rayleigh_ratio(V.mT @ Z, Z.mT @ Z, self.Z.dtype), fro2)  # σ₁² ≤ ‖A‖_F²
        if bool(self.Z.abs().sum() > 0):
            self.V = _orth(self.Z)
        return fro2, lam

    def state(self) -> dict:
        return {"V": None if self.V is None else self.V.detach().cpu()}

    def load_state(self, s: dict) -> None:
        self.V = s.get("V")


class Deferred:
    """A held input kept as the recipe for its rows rather than the rows: a convolution's patches, prod(k) times its
    input, are built when the step's solves read them (`rows_of`, one run of `_solved` at a time) instead of living
    from the forward pass to the end of the step — on a 6-layer, 64-channel 3×3 conv net (batch 64 at 32×32) a
    measured step held 1.06 GB more than an unprobed one that way. `source` is the tensor the rows are read from
    (its version counter shows a later in-place change); `make(source)` builds them."""

    def __init__(self, make: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device, source: torch.Tensor,
                 groups_make: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None):
        self.make, self.shape, self.dtype, self.device, self.source = make, torch.Size(shape), dtype, device, source
        self.groups_make = groups_make  # (source, g0, g1) -> the rows of groups g0..g1-1 alone (a grouped convolution's)

    def on(self, source: torch.Tensor) -> "Deferred":
        """The same recipe read from another tensor of the source's contents (a copy)."""
        return Deferred(self.make, self.shape, self.dtype, self.device, source, self.groups_make)

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.dtype.itemsize


def rows_of(A: "torch.Tensor | Deferred") -> torch.Tensor:
    """The rows of an input, built now if they were deferred."""
    return A.make(A.source.detach()) if isinstance(A, Deferred) else A


def group_rows(A: "torch.Tensor | Deferred", groups: int, g0: int, g1: int) -> torch.Tensor:
    """Rows of groups g0..g1-1 of a group-major input of `groups` groups: built for those groups alone where deferred."""
    if isinstance(A, Deferred) and A.groups_make is not None:
        return A.groups_make(A.source.detach(), g0, g1)
    rows = A.shape[0] // groups
    return rows_of(A)[g0 * rows : g1 * rows]


def group_deferred(A: "torch.Tensor | Deferred", groups: int, g: int) -> "torch.Tensor | Deferred":
    """Group g's rows of a group-major input, deferred where the input is."""
    if isinstance(A, Deferred) and A.groups_make is not None:
        make = A.groups_make
        return Deferred(lambda x: make(x, g, g + 1), (A.shape[0] // groups, A.shape[1]), A.dtype, A.device, A.source)
    return group_rows(A, groups, g, g + 1)


def kept(A: "torch.Tensor | Deferred", source: torch.Tensor | None):
    """(A, source) for an input held to the step's end, copied first when the source is outside autograd (data, or a
    buffer the loop refills for the next micro-batch — `buf.copy_(next)`, pinned host buffers, a CUDA-graph loop's
    static input), which nothing stops from changing once this micro-batch's backward has run. A tensor autograd
    tracks is held as it is: changing it in place after its product is the error `GramStats` names."""
    if source is None or source.grad_fn is not None or source.requires_grad or getattr(source, "_specscope_kept", False):
        return A, source
    copy = source.detach().clone() if isinstance(A, Deferred) else A.clone()
    copy._specscope_kept = True  # a grouped input's groups share the one copy
    return (A.on(copy) if isinstance(A, Deferred) else copy), copy


GROUP_CHUNK_BYTES = 2 << 20  # a grouped conv's patches are built and multiplied this many bytes of groups at a time


class GramStats:
    """st(A) from the feature-side Gram C = AᵀA (n × n, so it adds over micro-batches and ranks).

    Weights that multiply the same activation (q, k, v; up and gate) share one C per micro-batch: the
    Monitor computes it once and hands it to each (`shared`). trace(C) = ‖A‖_F²; λ_max(C) comes from
    `top_eigenvalues`, certified to within `CERTIFIED` relative error (so st(A) is too), batched by size.

    Wide inputs (n ≥ IMPLICIT_MIN) seen once per step on one process never become a Gram: forming AᵀA costs
    2·rows·n² flops, far more than the step's own product with W when n is 4·d. Their A is held until the
    end of the step and λ_max is found by `krylov_top` with C applied as Aᵀ(A·), checked a posteriori to
    within `VERIFIED`; the rare unverified ones, a second micro-batch, or more than one rank fall back to C.
    """

    estimator = "gram"

    def __init__(self, n: int):
        self.n = n
        self.V: torch.Tensor | None = None  # warm start of the top eigenvector block, carried between steps
        self.reset()

    def reset(self, refine: bool = True) -> None:
        self.C: torch.Tensor | None = None
        self.A: torch.Tensor | None = None  # a wide input held for the implicit route (one micro-batch)
        self.source: torch.Tensor | None = None
        self.keys: list = []
        self.rows = 0
        self.unit: torch.Tensor | None = None  # the factor s² a Gram formed at unit scale carries (C = s²·AᵀA)

    def add(self, A: torch.Tensor, shared: list | None = None, key=None, source: torch.Tensor | None = None) -> None:
        """Add one micro-batch's rows A [rows, n]; `shared` = [A, its Gram or None] when weights share A;
        `source` is the tensor A was read from (its version counter shows a later in-place change)."""
        if self.holds_next():
            A, source = kept(A, source)
            self.A, self.source = A, A if source is None else source
            self.version = self.source._version
            self.keys.append(key if key is not None else id(A))
            self.rows += A.shape[0]
        else:
            self.add_gram(gram_of(A) if shared is None else _shared_gram(shared), A.shape[0], key if key is not None else id(A))

    def holds_next(self) -> bool:
        """Whether the next input is held for the implicit route: wide, the step's first, one process."""
        return self.C is None and self.A is None and self.n >= IMPLICIT_MIN and D.world_size() == 1

    def add_gram(self, C: torch.Tensor, rows: int, key) -> None:
        """Add the Gram C = AᵀA of `rows` rows already formed (a grouped convolution's groups, one batched product)."""
        self._materialize()
        self.C = C if self.C is None else self.C + C
        self.keys.append(key)
        self.rows += rows

    def _materialize(self, unit: bool = False) -> None:
        """Turn a held input into its Gram (a second micro-batch, or the implicit route failed). `unit`: the Gram of A
        at unit scale (A·2^-e, exact), for the step's only input when the solve on A itself failed — entries near
        1e18 or 1e-20, whose float32 Gram would leave float32's range; st(A) does not depend on the scale."""
        if self.A is not None:
            if self.source._version != self.version:
                raise SpecscopeError(f"an input of {self.n} features was modified in place after the product that used it; "
                                     "the probe cannot measure it: keep that activation unmodified until the step ends")
            A = rows_of(self.A)
            if unit and self.C is None:
                scale = pow2_scale(A.to(product_dtype(A.device)))
                A, self.unit = A * scale, scale.double().reshape(()).square()
            C, self.A, self.source = gram_of(A), None, None
            self.C = C if self.C is None else self.C + C

    def tensors(self) -> list[torch.Tensor]:
        if D.world_size() > 1:
            self._materialize()
        return [] if self.A is not None else [self.C]

    def set_tensors(self, ts: list[torch.Tensor]) -> None:
        if ts:
            (self.C,) = ts

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        (pair,) = finish_grams([self])
        return pair

    def state(self) -> dict:
        return {"V": None if self.V is None else self.V.detach().cpu()}

    def load_state(self, s: dict) -> None:
        self.V = s.get("V")


CERTIFIED = 1e-4  # λ_max is proved to lie in [θ, θ·(1 + CERTIFIED)]; θ is what is reported
BLOCK, WARM_ITERS, COLD_ITERS = 8, 6, 24
UNDERFLOW = 2.0**-100  # a float32 Gram whose largest diagonal entry is below this was formed from subnormal squares
IMPLICIT_MIN = 256  # inputs this wide skip the Gram when seen once per step (GramStats): the measured crossover
DIRECT_MAX = 64  # CPU Grams this small take eigvalsh itself (4 Grams of 32²: 108 µs against 315 for the warm
# iterations; 64²: 403 against 441; 128²: 2.8 ms against 1.0)
KRYLOV_DEPTH, COLD_DEPTH, FRESH = 0, 4, 8  # block Krylov depth (warm / cold start); fresh rows of A per step
RETRY_DEPTHS = (KRYLOV_DEPTH, COLD_DEPTH)  # unverified: again from the improved block, then deeper; then the Gram
VERIFIED = 1e-4  # the implicit route's tolerance on its a-posteriori error estimate (see krylov_top)


def tf32_matmuls() -> bool:
    """Whether CUDA float32 matmuls run as TF32 (set by torch.set_float32_matmul_precision("high"),
    torch.backends.cuda.matmul.fp32_precision = "tf32", or the legacy allow_tf32). Read only: setting it
    here could mix the legacy and new flag APIs, which torch then refuses in the user's own code."""
    m = torch.backends.cuda.matmul
    try:
        p = getattr(m, "fp32_precision", None)
        if p is None:  # torch before the fp32_precision API
            return bool(m.allow_tf32)
        return (getattr(torch.backends, "fp32_precision", "ieee") if p == "none" else p) == "tf32"
    except RuntimeError:  # flags set through both APIs: torch cannot say; assume the faster, coarser one
        return True


def product_dtype(device: torch.device) -> torch.dtype:
    """float32 for the probe's products of A, float64 on a CUDA device whose float32 matmuls are TF32
    (a 10-bit mantissa, ~1e-3 relative: ten times the probe's tolerance; float64 never uses TF32)."""
    return torch.float64 if device.type == "cuda" and tf32_matmuls() else torch.float32


def gram_of(A: "torch.Tensor | Deferred") -> torch.Tensor:
    """AᵀA in float32 (the feature side on purpose: it adds over micro-batches; the smaller side would not);
    float64 where float32 products would be TF32 (`product_dtype`)."""
    A = rows_of(A)
    A = A.to(product_dtype(A.device))
    return A.mT @ A


def _shared_gram(entry: list) -> torch.Tensor:
    """The Gram of a shared input entry [A, C | None, …], computed on first use and kept in the entry."""
    if entry[1] is None:
        entry[1] = gram_of(entry[0])
    return entry[1]


def _project_out(Z: torch.Tensor, Q: torch.Tensor | None, times: int = 2) -> torch.Tensor:
    """Z minus its part in span(Q) (orthonormal Q), twice: once is not enough in floating point where Z lies
    nearly in span(Q) (`times=1` for columns that do not: random directions)."""
    for _ in range(0 if Q is None else times):
        Z = Z - Q @ (Q.mT @ Z)
    return Z


def _cholesky_qr2(X: torch.Tensor, passes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """CholeskyQR2 of float64 X [..., n, b]: X ← X L⁻ᵀ with LLᵀ = XᵀX (+ a relative shift of 1e-13, so it
    never fails and QᵀQ ≼ I), twice (`passes`); and the columns it lost (X had fewer independent columns), read
    off the last pass's L ≈ I: a lost column leaves a ≈ 0 on its diagonal, a NaN a NaN. One pass leaves
    QᵀQ − I ≈ κ(X)²·eps: enough where X is well conditioned already."""
    for _ in range(passes):
        S = X.mT @ X
        S.diagonal(dim1=-2, dim2=-1).add_(1e-13 * S.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True) + torch.finfo(X.dtype).tiny)
        L = torch.linalg.cholesky_ex(S).L
        X = torch.linalg.solve_triangular(L.mT, X, upper=True, left=False)
    return X, ~(L.diagonal(dim1=-2, dim2=-1) > 0.5)


def cholesky_qr(Z: torch.Tensor, against: torch.Tensor | None = None) -> torch.Tensor:
    """An orthonormal basis of the columns of each Z [..., n, b] (minus their part in span(against)), batched
    and without host synchronisation: float64 CholeskyQR2, and where Z has fewer than b independent columns
    the lost ones replaced by fixed pseudo-random directions and orthonormalized once more — what a
    Householder QR's completion does, as batched products, b×b Cholesky factorizations and triangular
    solves (one call each for the whole batch; torch runs a batch of QRs as one cuSOLVER call per matrix)."""
    X, lost = _cholesky_qr2(_project_out(Z.double(), None if against is None else against.double()))
    X = torch.where(lost[..., None, :], _fill(*X.shape[-2:], X.device), X)
    # orthonormal columns beside a few random ones: κ(X)² ≈ n, so one projection and one pass leave
    # QᵀQ − I ≈ n·eps (float64), far below the float32 the blocks are used in
    X, _ = _cholesky_qr2(_project_out(X, None if against is None else against.double(), times=1), passes=1)
    return X.to(Z.dtype)


_FILLS: dict[tuple, torch.Tensor] = {}


def _fill(n: int, b: int, device: torch.device) -> torch.Tensor:
    """Fixed pseudo-random float64 directions [n, b] (private generator), made once per device: no copy per call."""
    key = (n, b, device)
    if key not in _FILLS:
        _FILLS[key] = torch.randn(n, b, generator=torch.Generator().manual_seed(n * 7_919 + b), dtype=torch.float64).to(device)
    return _FILLS[key]


def orthonormal(Z: torch.Tensor, against: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal basis of Z's columns minus their part in span(against): Householder QR on the CPU (one
    cheap LAPACK call per matrix; rounding-noise columns become clean directions), `cholesky_qr` elsewhere."""
    if Z.device.type != "cpu":
        return cholesky_qr(Z, against)
    if against is None:
        return torch.linalg.qr(Z).Q
    Z = torch.linalg.qr(_project_out(Z, against)).Q
    return torch.linalg.qr(Z - against @ (against.mT @ Z)).Q


Inputs = torch.Tensor | list[torch.Tensor]  # one input [rows, n], a batch [..., rows, n], or equal-shape inputs as a list


def krylov_top(A: Inputs, V: torch.Tensor, depth: int = KRYLOV_DEPTH, fresh: int = FRESH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """λ_max(AᵀA) without forming AᵀA: Rayleigh–Ritz on the block Krylov space [V₀, CV₀, …, C^depth V₀], C = AᵀA.

    A [..., rows, n] (a batch of inputs of one shape is solved at once; or a list of k inputs [rows, n] of one
    shape, solved as a batch of k without stacking them: the passes over A go input by input, the small algebra
    between them is batched), V [..., n, b] ([k, n, b] for a list) the warm block; V₀ is V
    with `fresh` rows of A, drawn by a private generator (the global RNG is untouched), so the space cannot miss
    the top direction: a row aᵢ has the component σ₁·u₁ᵢ along it. The Ritz value θ ≤ λ_max (a Rayleigh
    quotient). One more pass gives CY for the top-b Ritz vectors Y: the top pair's residual r = ‖Cy − θy‖
    (some eigenvalue lies within r of θ) and the error estimate bound = min(r, r²/δ)/θ, δ = θ − the next Ritz
    value — Kato–Temple's r²/(θ − λ₂) with the next Ritz value θ₂ ≤ λ₂ standing for λ₂, which no Krylov space
    certifies, so r²/δ can understate the error (by up to 1.22× on the benchmark GPT's inputs before the power
    step, docs/probe.md); and the next warm block, CY with unit columns — one subspace-iteration step past
    the Ritz vectors, so a block carried from step to step keeps converging while A drifts. Returns
    (θ, that block, bound) after one power step on the top pair (`_power_step`: two one-column products, which
    keep a warm block's first attempt within VERIFIED while the top eigenvector moves from step to step). Each
    pass over A is an A·Q or a (WᵀA)ᵀ product (the fast layouts for a row-major A): 2·(depth + 1) in all, plus
    those two. Products in float32, the small eigenproblem in float64; no host synchronisation.
    """
    one = A[0] if isinstance(A, list) else A  # an input: its shape and device are every input's
    b = V.shape[-1]
    if (b + fresh) * (depth + 1) > one.shape[-1]:  # the space would be all of Rⁿ: solve C itself
        C = (torch.stack([gram_of(a) for a in A]) if isinstance(A, list) else gram_of(A)).double()
        C = torch.where(torch.isfinite(C).flatten(-2).all(-1)[..., None, None], C, torch.zeros_like(C))
        theta, Y = torch.linalg.eigh(C)
        return theta[..., -1], Y[..., -b:].to(product_dtype(one.device)), torch.zeros_like(theta[..., -1])
    if _replays(A, depth, fresh):
        return _krylov_replayed(A, V, depth, fresh)
    A, Qc, Wc, H = _krylov_space(A, V, depth, fresh)
    theta, Y = torch.linalg.eigh(H)
    return _ritz_estimates(A, Qc, Wc, theta, Y, b)


def _krylov_space(A: Inputs, V: torch.Tensor, depth: int, fresh: int) -> tuple[Inputs, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`krylov_top`'s first half: (A in the product dtype, the orthonormal basis Qc of the block Krylov space,
    Wc = A·Qc, the Rayleigh–Ritz matrix H = Qcᵀ C Qc in float64, symmetric). No host synchronisation."""
    A = [a.to(product_dtype(a.device)) for a in A] if isinstance(A, list) else A.to(product_dtype(A.device))
    one = A[0] if isinstance(A, list) else A
    V = V.to(one.device, one.dtype)
    Q = [orthonormal(torch.cat([V, _rows(A, _fresh_rows(one.shape[-2:], fresh, one.device)).mT], -1) if fresh else V)]
    W = [_times(A, Q[0])]
    for _ in range(depth):
        Q.append(orthonormal(_times_t(A, W[-1]), torch.cat(Q, -1)))
        W.append(_times(A, Q[-1]))
    Qc, Wc = (Q[0], W[0]) if depth == 0 else (torch.cat(Q, -1), torch.cat(W, -1))
    H = (Wc.mT @ Wc).double()  # = Qcᵀ C Qc (float32 products: ~1e-7 relative, far inside VERIFIED)
    H = torch.where(torch.isfinite(H).flatten(-2).all(-1)[..., None, None], H, torch.zeros_like(H))  # non-finite A: the caller reports it
    return A, Qc, Wc, (H + H.mT) / 2


def _ritz_estimates(A: Inputs, Qc: torch.Tensor, Wc: torch.Tensor, theta: torch.Tensor, Y: torch.Tensor,
                    b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`krylov_top`'s second half, from the eigenpairs (θ, Y) of H: the top Ritz value, its error estimate and the
    next warm block, after the power step. No host synchronisation."""
    one = A[0] if isinstance(A, list) else A
    tiny = torch.finfo(torch.float64).tiny
    top, Y = theta[..., -1], Y[..., -b:].to(one.dtype)
    CY = _times_t(A, Wc @ Y)                                              # C·(Ritz vectors), [..., n, b]
    r = torch.linalg.vector_norm(CY[..., -1] - top.to(one.dtype)[..., None] * (Qc @ Y[..., -1:])[..., 0], dim=-1).double()
    bound = torch.minimum(r, r * r / (top - theta[..., -2]).clamp_min(tiny)) / top.clamp_min(tiny)
    top, CY, bound = _power_step(A, CY, top, theta[..., -2], bound)
    # the block's own dtype's tiny: float64's underflows to 0 in float32, and a zero column (an input of rank < b)
    # became 0/0 = NaN, poisoning the warm block of every later step
    return top, CY / torch.linalg.vector_norm(CY, dim=-2, keepdim=True).clamp_min(torch.finfo(CY.dtype).tiny), bound


KRYLOV_GRAPH_MAX = 2**24  # with SPECSCOPE_CUDA_GRAPHS=on: a stacked CUDA batch of at most this many elements of A replays


def _replays(A: Inputs, depth: int, fresh: int) -> bool:
    """Whether this solve runs as replayed CUDA graphs: a stacked CUDA batch of at most KRYLOV_GRAPH_MAX elements,
    the warm first attempt that every measured step makes (retries and cold starts, rarer and of varying batch
    size, stay eager), and SPECSCOPE_CUDA_GRAPHS=on."""
    return (isinstance(A, torch.Tensor) and A.is_cuda and A.numel() <= KRYLOV_GRAPH_MAX and depth == KRYLOV_DEPTH
            and fresh == FRESH and graphs.enabled())


_KRYLOV_GRAPHS: dict[tuple, tuple | None] = {}


def _krylov_replayed(A: torch.Tensor, V: torch.Tensor, depth: int, fresh: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`krylov_top` on a stacked CUDA batch as two CUDA graphs (`linalg.graphs`) around the small eigh, which
    synchronises with the host (torch checks its result) and so stays eager: `_krylov_space`, then
    `_ritz_estimates`, the second reading the first's buffers. Captured on the first call per (shapes, dtypes,
    product dtype, depth, fresh, device) and replayed after: the ≈ 90 launches of a solve become two, the eigh's
    and six copies. Where a capture fails, the eager solve."""
    key = (tuple(A.shape), A.dtype, tuple(V.shape), V.dtype, product_dtype(A.device), depth, fresh, A.device)
    if key not in _KRYLOV_GRAPHS:
        _KRYLOV_GRAPHS[key] = _krylov_captured(A, V, depth, fresh)
    if _KRYLOV_GRAPHS[key] is None:
        A, Qc, Wc, H = _krylov_space(A, V, depth, fresh)
        theta, Y = torch.linalg.eigh(H)
        return _ritz_estimates(A, Qc, Wc, theta, Y, V.shape[-1])
    space, ritz, (A0, V0, H, theta0, Y0), out = _KRYLOV_GRAPHS[key]
    A0.copy_(A)
    V0.copy_(V)
    space.replay()
    theta, Y = torch.linalg.eigh(H)
    theta0.copy_(theta)
    Y0.copy_(Y)
    ritz.replay()
    return tuple(o.clone() for o in out)  # the next replay overwrites `out`


def _krylov_captured(A: torch.Tensor, V: torch.Tensor, depth: int, fresh: int) -> tuple | None:
    """(the space's graph, the estimates' graph, their buffers (A, V, H, θ, Y), the estimates' outputs), or None."""
    A0, V0, b = A.clone(), V.clone(), V.shape[-1]
    got = graphs.capture(lambda a, v: _krylov_space(a, v, depth, fresh), A0, V0)
    if got is None:
        return None
    space, (Ad, Qc, Wc, H) = got
    space.replay()  # real values in the space's buffers for the second graph's warm-up
    theta0, Y0 = torch.linalg.eigh(H)
    got = graphs.capture(lambda *xs: _ritz_estimates(*xs, b), Ad, Qc, Wc, theta0, Y0)
    if got is None:
        return None
    ritz, out = got
    return space, ritz, (A0, V0, H, theta0, Y0), out


def _power_step(A: Inputs, CY: torch.Tensor, top: torch.Tensor, second: torch.Tensor,
                bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top Ritz pair (θ, y) one power step on, from two one-column products: u = Cy is CY's last column
    already; θ_u = ‖Au‖²/‖u‖² ≥ θ (the moment ratios yᵀC^(k+1)y / yᵀC^k y of a PSD C grow with k), and its
    residual ‖Cu − θ_u u‖/‖u‖ from Cu = Aᵀ(Au) gives its estimate as `krylov_top` gives θ's (δ = θ_u − the next Ritz
    value). A warm block's top Ritz vector misses a moving top eigenvector by an angle² of 1e-4–1e-2 (those
    first errors are real: the Kato–Temple estimate matches the error measured against float64); a power step
    shrinks it by (λ₂/λ₁)², which is small for activations. Returns (θ_u, CY with its last column Cu,
    min(bound, θ_u's bound)) where θ_u ≥ θ, else what it was given: θ ≤ θ_u ≤ λ_max keeps either estimate an
    estimate of θ_u's error."""
    u = CY[..., -1]
    Au = _times(A, u.unsqueeze(-1))                   # [..., rows, 1]
    Cu = _times_t(A, Au)[..., 0]                      # AᵀAu [..., n]
    uu = (u * u).sum(-1)
    theta_u = (Au * Au).sum((-2, -1)) / uu            # NaN for u = 0 (a zero input): then not taken
    r2 = (Cu - theta_u[..., None] * u).square().sum(-1) / uu
    bound_u = torch.minimum(r2.sqrt(), r2 / (theta_u - second).clamp_min(torch.finfo(u.dtype).tiny)) / theta_u
    better = (theta_u >= top) & (theta_u < float("inf"))
    CY[..., -1] = torch.where(better[..., None], Cu, u)
    # fmin: a NaN bound_u (an unlucky u) leaves the Ritz pair's bound, which holds for θ_u ≥ θ as well
    return torch.where(better, theta_u.double(), top), CY, torch.where(better, torch.fmin(bound, bound_u.double()), bound)


def _each(A: Inputs, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """f(A, X); for a list of inputs, f(A[i], X[i]) for each, stacked (the inputs themselves are never copied)."""
    return torch.stack([f(a, x) for a, x in zip(A, X)]) if isinstance(A, list) else f(A, X)


def _times(A: Inputs, Q: torch.Tensor) -> torch.Tensor:
    """A·Q; for a block of under 16 columns as (QᵀAᵀ)ᵀ, which MKL runs 3× faster than A·Q there (0.19 against
    0.59 ms for a 2048 × 256 A and 8 columns, one thread)."""
    return _each(A, lambda a, q: a @ q if q.shape[-1] >= 16 else (q.mT @ a.mT).mT, Q)


def _times_t(A: Inputs, Z: torch.Tensor) -> torch.Tensor:
    """Aᵀ·Z, as (ZᵀA)ᵀ: the fast layout for a row-major A."""
    return _each(A, lambda a, z: (z.mT @ a).mT, Z)


def _rows(A: Inputs, index: torch.Tensor) -> torch.Tensor:
    """The rows `index` of each input, [..., len(index), n]."""
    return torch.stack([a.index_select(-2, index) for a in A]) if isinstance(A, list) else A.index_select(-2, index)


_ROWS: dict[tuple, torch.Tensor] = {}


def _fresh_rows(shape: torch.Size, fresh: int, device: torch.device) -> torch.Tensor:
    """`fresh` row indices of an input of `shape` [rows, n], drawn by a private generator seeded by the shape (the
    global RNG is untouched), as an index tensor made once per device: no host-to-device copy per call."""
    key = (*shape, fresh, device)
    if key not in _ROWS:
        g = torch.Generator().manual_seed(shape[0] * 7919 + shape[1])
        _ROWS[key] = torch.randint(shape[0], (fresh,), generator=g).to(device)
    return _ROWS[key]


def verified_top(A: torch.Tensor, V: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """λ_max(AᵀA) for one input: `krylov_top` at `depth`, then at each of RETRY_DEPTHS from the block the last
    attempt improved, until the bound is within VERIFIED. (θ, the block for the next step, verified). Fresh rows
    of A join the first attempt only: a retry's block is already C times the first space's Ritz vectors. The
    one-input case of `_verified_batched`, which the Monitor uses: the same bits as the input gets in any batch."""
    return _verified_batched({0: (A, V, depth)})[0]


def top_eigenvalues(C: torch.Tensor, V: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """λ_max of each PSD matrix in the batch C [k, n, n], without an eigendecomposition of C.

    Block subspace iteration from V [k, n, b] gives the Ritz value θ ≤ λ_max; a Cholesky factorization of
    θ·(1 + CERTIFIED)·I − C succeeds exactly when that shift lies above λ_max, which certifies θ. Returns
    (θ, the improved block, certified) with no host synchronisation; uncertified entries need eigvalsh.
    Each orthonormalization is one batched call for the whole batch on a GPU (`orthonormal`).
    """
    V = V.to(C.dtype)
    for _ in range(iters):
        V = orthonormal(C @ V)
    H = V.mT @ C @ V
    theta = torch.linalg.eigvalsh((H + H.mT) / 2)[..., -1]
    eye = torch.eye(C.shape[-1], dtype=C.dtype, device=C.device)
    _, info = torch.linalg.cholesky_ex(theta[:, None, None] * (1 + CERTIFIED) * eye - C)
    return theta, V, (info == 0) & (theta > 0)


def _is_warm(s: GramStats) -> bool:
    return s.V is not None and s.V.shape == (s.n, min(BLOCK, s.n))


def _warm_block(s: GramStats, device: torch.device) -> torch.Tensor:
    return s.V.to(device) if _is_warm(s) else _initial_block(s.n, min(BLOCK, s.n), device)


def finish_implicit(stats: list[GramStats]) -> dict[tuple, torch.Tensor]:
    """λ_max for the stats holding a wide input, one solve per shared input: `krylov_top` at depth KRYLOV_DEPTH
    from a warm block (COLD_DEPTH from a cold one), then RETRY_DEPTHS where the bound exceeds VERIFIED; what
    still fails becomes a Gram for the certified route. Inputs of one shape are solved as one batch
    (`_verified_batched`). On a CPU that is one job of the one-thread workers (`linalg.workers`), ahead of what is
    queued there — beside the gradients' eigensolves a Monitor started, which, unlike these small calls, do not
    hold Python's lock — or one job per worker when the pool is idle; on an accelerator it runs on the caller's
    stream, one host synchronisation per attempt."""
    unique: dict[tuple, list[GramStats]] = {}
    for s in stats:
        unique.setdefault((tuple(s.keys), s.n), []).append(s)
    first = {k: (unique[k][0].A, _warm_block(g[0], g[0].A.device), KRYLOV_DEPTH if _is_warm(g[0]) else COLD_DEPTH)
             for k, g in unique.items()}
    if not first:
        return {}
    device = next(iter(first.values()))[0].device
    if not solves_in_batches(device):  # one job beside the workers' queued jobs, else one per worker
        keys = list(first)
        parts = workers.balanced([first[k][0].numel() * (first[k][2] + 1) for k in keys],
                                 1 if workers.busy(device) else workers.count(device))
        wait = workers.start(lambda part: _solved({keys[i]: first[keys[i]] for i in part}), parts, device=device, first=True)
        solved = {k: r for got in wait() for k, r in got.items()}
    else:
        solved = _solved(first)
    lam: dict[tuple, torch.Tensor] = {}
    # ‖A‖_F² = 0 from float32 products: a zero input, or entries so small (≈1e-20) that their squares underflow
    zero = dict(zip(solved, torch.stack([r[3] for r in solved.values()]).eq(0).tolist())) if solved else {}
    for k, (theta, V, good, fro2) in solved.items():
        group = unique[k]
        if good and not zero[k] and group[0].source._version == group[0].version:
            lam[k] = theta
            for s in group:
                s.V, s.fro2, s.A, s.source = V, fro2, None, None
        else:  # unverified (or non-finite): the Gram at unit scale, certified or reported as non-finite
            for s in group:
                s._materialize(unit=True)
    return lam


def solves_in_batches(device: torch.device) -> bool:
    """Whether held inputs are stacked, one batch per shape, and solved on the caller's stream (an accelerator,
    where launches and host synchronisations cost more than flops), rather than passed as lists to the CPU's
    one-thread workers."""
    return device.type != "cpu"


def _solved(problems: dict) -> dict:
    """{key: (θ, the next block, verified, ‖A‖_F²)} for {key: (A, V, depth)}, on a CPU in runs that fit the cache
    (`workers.cache_chunks`: each run's passes reread inputs the cache still holds)."""
    keys = list(problems)
    out = {}
    for run in workers.cache_chunks([problems[k][0].numel() * problems[k][0].element_size() for k in keys]):
        part = {keys[i]: (rows_of(problems[keys[i]][0]), *problems[keys[i]][1:]) for i in run}  # deferred rows built here
        fro2 = dict(zip(part, _fro2_all([A for A, _, _ in part.values()])))
        out.update({k: (*r, fro2[k]) for k, r in _verified_batched(part).items()})
    return out


def _verified_batched(problems: dict) -> dict:
    """verified_top for {key: (A, V, depth)}: problems of one (shape, dtype, depth) solved by one krylov_top call
    per attempt, one host synchronisation per attempt. On an accelerator their inputs are stacked (fewer
    launches); on a CPU they are passed as a list (no copy of the inputs: the passes over them are memory-bound
    there, and the batched small algebra saves the per-call overhead that was half of a 2048 × 256 input's solve;
    `_solved` hands over lists that fit the cache)."""
    todo, done = dict(problems), {}
    for attempt in range(1 + len(RETRY_DEPTHS)):
        groups: dict[tuple, list] = {}
        for k, (A, V, depth) in todo.items():
            groups.setdefault((tuple(A.shape), A.dtype, depth), []).append(k)
        out, oks = {}, []
        for keys in groups.values():
            A, V, depth = todo[keys[0]]
            fresh = FRESH if attempt == 0 else 0  # fresh rows join the first attempt only (see verified_top)
            As = [todo[k][0] for k in keys]  # a list on a CPU even for one input: each input's result is the same bits
            if solves_in_batches(A.device):  # in whatever batch it is solved (and the job split depends on timing)
                As = As[0].unsqueeze(0) if len(As) == 1 else torch.stack(As)
            theta, V, bound = krylov_top(As, torch.stack([todo[k][1] for k in keys]), depth, fresh)
            out.update({k: (theta[i], V[i]) for i, k in enumerate(keys)})
            oks.append(((bound <= VERIFIED) & torch.isfinite(theta)).reshape(-1))  # per shape, not per input: fewer launches
        ok = torch.cat(oks).tolist()
        last = attempt == len(RETRY_DEPTHS)
        for good, (k, (theta, V)) in zip(ok, out.items()):
            if good or last:
                done[k] = (theta, V, good)
                del todo[k]
            else:
                todo[k] = (todo[k][0], V, RETRY_DEPTHS[attempt])
        if not todo:
            break
    return done


def _fro2_all(As: list[torch.Tensor]) -> list[torch.Tensor]:
    """‖A‖_F² of each input by one multi-tensor norm (float32 accumulation; float64 inputs, of a float64 model, by
    another in float64, which torch's norm will not narrow)."""
    if all(A.dtype != torch.float64 for A in As):
        return list(torch.stack(torch._foreach_norm(As, 2, dtype=torch.float32)).double().square())
    out: list[torch.Tensor] = [None] * len(As)  # type: ignore[list-item]
    for dtype in (torch.float32, torch.float64):
        idx = [i for i, A in enumerate(As) if (A.dtype == torch.float64) == (dtype == torch.float64)]
        if idx:
            for i, v in zip(idx, torch.stack(torch._foreach_norm([As[i] for i in idx], 2, dtype=dtype)).double().square()):
                out[i] = v
    return out


def finish_grams(stats: list[GramStats]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(‖A‖_F², λ_max(AᵀA)) per GramStats: wide held inputs by `finish_implicit`, the rest by one batched
    certified solve per Gram size (shared Grams solved once; on a CPU, Grams of at most DIRECT_MAX rows by one
    batched float64 eigvalsh), one host synchronisation per size."""
    lam = finish_implicit([s for s in stats if s.A is not None])
    unique: dict[tuple, list[GramStats]] = {}
    for s in stats:
        if (tuple(s.keys), s.n) not in lam:
            unique.setdefault((tuple(s.keys), s.n), []).append(s)
    by_n: dict[int, list[tuple]] = {}
    for k in unique:
        by_n.setdefault(k[1], []).append(k)
    for n, keys in by_n.items():
        C = torch.stack([unique[k][0].C for k in keys])
        traces = C.diagonal(dim1=-2, dim2=-1).sum(-1, dtype=torch.float64)  # ‖A‖_F² = trace(AᵀA), one call per size
        finite = torch.isfinite(C).flatten(1).all(1)
        C = torch.where(finite[:, None, None], C, torch.zeros_like(C))
        # st(A) is scale-free: each C at unit scale (an exact power of two), so that the float32 products of the solve
        # cannot overflow where C itself is finite but near float32's range (inputs ~1e18); λ is scaled back
        d = C.diagonal(dim1=-2, dim2=-1).amax(-1)
        # squares below float32's normal range (inputs ≈ 1e-19) lost their digits when the Gram was formed: no st(A) is
        # left to read there, and ‖A‖_F² = 0 reports it as zero_input rather than a value that looks measured
        traces = torch.where(d < UNDERFLOW, torch.zeros_like(traces), traces)
        e = torch.log2(d.clamp_min(torch.finfo(C.dtype).tiny)).floor().clamp(-126, 127)
        C = C * torch.exp2(-e).to(C.dtype)[:, None, None]
        b = min(BLOCK, n)
        warm = [unique[k][0].V for k in keys]
        cold = any(v is None or v.shape != (n, b) for v in warm)
        V0 = torch.stack([_warm_block(unique[k][0], C.device) for k in keys])
        if C.device.type == "cpu" and n <= DIRECT_MAX:  # LAPACK outright: cheaper than the iterations, and exact
            theta, V, ok = torch.linalg.eigvalsh(C.double())[..., -1].to(C.dtype), V0, torch.ones_like(finite)
        else:
            theta, V, ok = top_eigenvalues(C, V0, COLD_ITERS if cold else WARM_ITERS)
        flags = torch.stack([ok, finite]).tolist()  # the one sync of this size
        bad = [i for i, good in enumerate(flags[0]) if not good]
        if bad:  # a full eigvalsh where the certificate failed
            theta = theta.clone()
            theta[bad] = torch.linalg.eigvalsh(C[bad].double())[:, -1].to(theta.dtype)
        top = torch.where(finite, theta.double() * torch.exp2(e.double()), torch.full_like(theta, float("nan"), dtype=torch.float64))
        for i, k in enumerate(keys):
            lam[k] = top[i]
            for s in unique[k]:
                s.V = V[i] if flags[1][i] or s.V is None else s.V
                s.fro2 = traces[i]
    # a Gram formed at unit scale gives ‖A‖_F² and λ_max times s²: undone, as a grouped convolution's groups are
    # compared at their own scale (Σ_g ‖A_g‖_F² / max_g λ_max(A_gᵀA_g))
    return [(s.fro2, lam[(tuple(s.keys), s.n)]) if s.unit is None else (s.fro2 / s.unit, lam[(tuple(s.keys), s.n)] / s.unit)
            for s in stats]


class GroupedStats:
    """st(A) of a grouped convolution, one statistics object per group: group g's rows of W multiply group g's
    patches A_g only, so a spectral step's second-order term is bounded by Σ_g ‖A_g‖_F² = ‖A‖_F² and a Euclidean
    step's by max_g λ_max(A_gᵀA_g), and st(A) = Σ_g ‖A_g‖_F² / max_g ‖A_g‖₂² (docs/probe.md "What it pairs").
    The groups' patches stacked would give ‖A‖_F² / λ_max(Σ_g A_gᵀA_g), up to `groups` times lower."""

    def __init__(self, parts: list):
        self.parts = parts
        self.n, self.estimator = parts[0].n, parts[0].estimator

    @property
    def groups(self) -> int:
        return len(self.parts)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def reset(self, refine: bool = True) -> None:
        for p in self.parts:
            p.reset(refine)

    def add(self, A: torch.Tensor, key=None, source: torch.Tensor | None = None) -> None:
        """Add the patches A [groups·rows, n], group-major (`pairing.patches`): rows g·rows:(g+1)·rows are group g's.
        Grams: a cache-sized chunk of groups at a time (GROUP_CHUNK_BYTES), built and multiplied by one batched
        product — a depthwise conv's patches, k² times its input, are never whole; held inputs: each group's
        deferred on its own."""
        key = id(A) if key is None else key
        rows = A.shape[0] // self.groups
        if isinstance(self.parts[0], GramStats) and not self.parts[0].holds_next():
            step = max(1, GROUP_CHUNK_BYTES // max(1, rows * self.n * A.element_size()))
            for g0 in range(0, self.groups, step):
                g1 = min(self.groups, g0 + step)
                for g, C in enumerate(gram_of(group_rows(A, self.groups, g0, g1).unflatten(0, (g1 - g0, rows))), g0):
                    self.parts[g].add_gram(C, rows, (key, g))
            return
        if isinstance(self.parts[0], GramStats):
            A, source = kept(A, source)  # one copy for all the groups, not one each
            for g, p in enumerate(self.parts):
                p.add(group_deferred(A, self.groups, g), None, (key, g), source)
            return
        for p, Ag in zip(self.parts, rows_of(A).unflatten(0, (self.groups, -1))):
            p.add(Ag)

    def tensors(self) -> list[torch.Tensor]:
        return [t for p in self.parts for t in p.tensors()]

    def set_tensors(self, ts: list[torch.Tensor]) -> None:
        i = 0
        for p in self.parts:
            k = len(p.tensors())
            p.set_tensors(ts[i : i + k])
            i += k

    @staticmethod
    def combine(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_g ‖A_g‖_F², max_g λ_max) from the groups' (‖A_g‖_F², λ_max) pairs (NaN in any group gives NaN)."""
        fro2 = torch.stack([f.double().reshape(()) for f, _ in pairs])
        lam = torch.stack([v.double().reshape(()) for _, v in pairs])
        return fro2.sum(), lam.max()

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.parts[0], GramStats):
            return self.combine(finish_grams(self.parts))
        return self.combine([p.finish() for p in self.parts])

    def state(self) -> dict:
        Vs = [p.state().get("V") for p in self.parts]
        if any(V is None for V in Vs):
            return {"V": None}
        return {"V": Vs[0], "V_groups": Vs}  # a list: each block keeps its memory layout (QR's is column-major)

    def load_state(self, s: dict) -> None:
        Vg = s.get("V_groups")
        for g, p in enumerate(self.parts):
            p.load_state({"V": None if Vg is None or len(Vg) != self.groups else Vg[g]})


class GroupedPowerStats(PowerStats):
    """`power` for a grouped convolution (st(A) as `GroupedStats` defines it): every group's warm block iterated at
    once, V [groups, n, block], by batched products, QR and Rayleigh–Ritz solves — one call where a loop over groups
    made `groups` (a depthwise convolution's 512 groups cost 2.2× the `gram` route's step that way)."""

    estimator = "power"

    def __init__(self, n: int, groups: int, block: int = 4, iters: int = 1):
        self.groups = groups
        super().__init__(n, block, iters)  # fro2 holds ‖A_g‖_F² of each group, Z each group's block product

    def add(self, A: torch.Tensor, key=None, source: torch.Tensor | None = None) -> None:
        """Add the patches A [groups·rows, n], group-major (`pairing.patches`): rows g·rows:(g+1)·rows are group g's."""
        A = rows_of(A)
        As = A.float().unflatten(0, (self.groups, -1))
        cold = self.V is None
        if cold:
            self.V = _initial_block(self.n, self.block, A.device).expand(self.groups, -1, -1).contiguous()
        V = self.V = self.V.to(A.device)
        if self.Z is None:  # first micro-batch of the step: refine the warm blocks on it
            for _ in range(self.iters if self.refine or cold else 0):
                (Z,) = D.all_reduce_sum([As.mT @ (As @ V)])
                Q = _orth(Z)
                V = torch.where(torch.isfinite(Q).flatten(1).all(1)[:, None, None], Q, V)  # per group: NaN keeps the block
            self.V = V.contiguous()  # one memory layout, the one a saved state is loaded into (bit-exact resume)
            self.fro2, self.Z = As.new_zeros(self.groups), torch.zeros_like(self.V)
        flat = As.flatten(1)
        self.fro2 += (flat.unsqueeze(1) @ flat.unsqueeze(2)).reshape(-1)  # ‖A_g‖_F² without a squared copy of A
        self.Z += As.mT @ (As @ self.V)
        self.rows += A.shape[0]

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_g ‖A_g‖_F², max_g σ_1(A_g)² estimate) as 0-d tensors (NaN if any group's are non-finite); carries the
        improved blocks to the next step."""
        fro2 = self.fro2.double()
        if not (bool(torch.isfinite(self.Z).all()) and bool(torch.isfinite(fro2).all())):
            nan = fro2.sum() * float("nan")
            return nan, nan  # reported as non-finite; V is kept
        V, Z = self.V.double(), self.Z.double()
        lam = torch.minimum(max_rayleigh_ratios(V.mT @ Z, Z.mT @ Z, self.Z.dtype), fro2)  # σ₁² ≤ ‖A_g‖_F²
        moved = self.Z.abs().flatten(1).sum(1) > 0
        self.V = torch.where(moved[:, None, None], _orth(self.Z), self.V).contiguous()
        return fro2.sum(), lam.max()

    def state(self) -> dict:
        if self.V is None:
            return {"V": None}
        Vs = list(self.V.detach().cpu().unbind(0))
        return {"V": Vs[0], "V_groups": Vs}

    def load_state(self, s: dict) -> None:
        Vg = s.get("V_groups")
        self.V = None if Vg is None or len(Vg) != self.groups else torch.stack(list(Vg)).contiguous()


def groups_of(stats) -> int:
    """How many groups' statistics `stats` keeps (1: not a grouped convolution's)."""
    return stats.groups if isinstance(stats, (GroupedStats, GroupedPowerStats)) else 1


class ExactStats:
    """Reference: keeps A (float64) and takes its SVD. Single process only; memory grows with the step."""

    estimator = "exact"

    def __init__(self, n: int):
        self.n = n
        self.reset()

    def reset(self, refine: bool = True) -> None:
        self.chunks: list[torch.Tensor] = []
        self.rows = 0

    def add(self, A: torch.Tensor) -> None:
        self.chunks.append(A.double().clone())
        self.rows += A.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return []

    def set_tensors(self, ts: list[torch.Tensor]) -> None:
        pass

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        A = torch.cat(self.chunks)
        fro2 = A.square().sum()
        if not bool(torch.isfinite(fro2)) or fro2 == 0:  # non-finite: the caller reports it; zero: flagged zero_input
            return fro2, fro2
        return fro2, fro2 / L.stable_rank(A)

    def state(self) -> dict:
        return {}

    def load_state(self, s: dict) -> None:
        pass


class TokenCounts:
    """Embedding input: token counts; the one-hot matrix of N tokens has st = N / c_max exactly."""

    estimator = "closed_form"

    def __init__(self, num_embeddings: int):
        self.n = num_embeddings
        self.reset()

    def reset(self, refine: bool = True) -> None:
        self.counts: torch.Tensor | None = None
        self._looked_up = 0
        self._padded: list[torch.Tensor] = []

    @property
    def rows(self) -> int:
        """Tokens counted: looked up minus padding (read when the step finishes, so no host sync per lookup)."""
        return self._looked_up - sum(int(t) for t in self._padded)

    def add(self, ids: torch.Tensor, padding_idx: int = -1) -> None:
        """Count a lookup's ids; those equal to `padding_idx` (≥ 0) are not counted: the padding row receives no
        gradient, so those positions are no rows of the input the gradient is paired with."""
        c = torch.bincount(ids.reshape(-1), minlength=self.n)
        if padding_idx >= 0:
            self._padded.append(c[padding_idx].clone())
            c[padding_idx] = 0
        self.counts = c if self.counts is None else self.counts + c
        self._looked_up += ids.numel()

    def tensors(self) -> list[torch.Tensor]:
        return [self.counts]

    def set_tensors(self, ts: list[torch.Tensor]) -> None:
        (self.counts,) = ts

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        # ‖X‖_F² = N and σ_1² = c_max for the one-hot matrix X (its Gram is diag(counts)).
        c = self.counts.double()
        return c.sum(), c.max()

    def state(self) -> dict:
        return {}

    def load_state(self, s: dict) -> None:
        pass


def make_stats(kind: str, n: int, estimator: str, *, block: int = 4, iters: int = 1, groups: int = 1):
    """The input accumulator for one weight: token counts for embeddings, else the chosen estimator (one per group
    of a grouped convolution: `GroupedStats`)."""
    if groups > 1 and estimator == "power" and kind != "embedding":
        return GroupedPowerStats(n, groups, block, iters)
    if groups > 1:
        return GroupedStats([make_stats(kind, n, estimator, block=block, iters=iters) for _ in range(groups)])
    if kind == "embedding":
        return TokenCounts(n)
    if estimator == "power":
        return PowerStats(n, block, iters)
    if estimator == "gram":
        return GramStats(n)
    return ExactStats(n)


NUCLEAR_METHOD = "auto"  # linalg.nuclear_norms' route for ‖G‖_*: "auto", "eigh" or "polar"


def nuclear_route(device: torch.device) -> str:
    """The estimator name of the route ‖G‖_* takes on `device`: "gram" (float64 Gram eigenvalues, the CPU's)
    or "polar" (linalg.nuclear_norms_polar, matmuls only, within 1e-4: an accelerator's)."""
    method = NUCLEAR_METHOD if NUCLEAR_METHOD != "auto" else ("eigh" if device.type == "cpu" else "polar")
    return "gram" if method == "eigh" else "polar"


def gradient_spectra(mats: list[torch.Tensor], exact: bool = False, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """‖G‖_F and ‖G‖_* for each matrix, as two float64 vectors.

    `exact=False`: `linalg.nuclear_norms` by NUCLEAR_METHOD — on the CPU from the eigenvalues of the smaller
    Gram, formed in float64 (exact to ~1e-12 relative; one job per matrix on the one-thread workers), on an
    accelerator by the matmul-only polar route (within 1e-4 relative; no eigensolver, no host synchronisation).
    `exact=True`: float64 SVD. A matrix holding NaN/Inf gets non-finite norms (the caller flags it), no error.
    float64 Grams by default: a float32 one leaves eigenvalue noise ~1e-7·σ_1², i.e. spurious singular values
    ~3e-4·σ_1 on every zero direction, inflating ‖G‖_* of a low-rank gradient by up to k·3e-4·σ_1.
    """
    return gradient_spectra_later(mats, exact, dtype)()


def gradient_spectra_later(mats: list[torch.Tensor], exact: bool = False, dtype: torch.dtype = torch.float64) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """`gradient_spectra` started now, collected by calling the returned function: on a CPU the eigensolves run
    on the one-thread workers meanwhile (`linalg.nuclear_norms_later`)."""
    if not exact:
        return fro_nuclear_norms_later(mats, dtype, method=NUCLEAR_METHOD)
    if not mats:
        z = torch.zeros(0, dtype=torch.float64)
        return lambda: (z, z)
    fro = torch.stack(torch._foreach_norm(mats, 2, dtype=torch.float64))
    nuc = torch.stack([L.nuclear_norm(G.double()).to(fro.device) if bool(torch.isfinite(f)) else f for G, f in zip(mats, fro)])
    return lambda: (fro, nuc)
