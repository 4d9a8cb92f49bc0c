"""Rolling SVD of a window of flattened gradient (or update) vectors: the spectral edge directions (SED).

Stack the last W vectors g(τ) ∈ R^P as the rows of M (W × P). Its top-k right singular vectors are the
SED-k directions. We never form anything P × P: the W × W Gram matrix C = M Mᵀ is kept up to date one
row/column per push (O(W·P)), and eigh(C) = U Λ Uᵀ gives σ = sqrt(Λ) and V = Mᵀ U Σ⁻¹ (O(W³ + k·W·P)).
Both products accumulate in float64 (a float32 Gram leaves rounding noise of ≈ sqrt(eps32)·σ₁ under the small
singular values, whose "directions" then were neither unit nor orthogonal): the result is the SVD of the
stored rows, each σ_i to a relative error of about W·eps64·σ₁²/σ_i² (the float64 Gram's eigenvalue noise over σ_i²;
a direction's error is of that order too), down to the cut-off: σ ≤ max(W·eps, sqrt(W·eps64))·σ₁, eps the rows' own
dtype's — the rows' rounding (float32: 2.4e-6·σ₁ at W = 20, where the error above is below 1e-5), or the Gram's
noise itself (6.6e-8·σ₁ in σ: what bounds a float64 tracker, whose directions between that and ≈ 1e-6·σ₁ are
accurate only to 3e-3 at 1e-7·σ₁, 1e-5 at 1e-6·σ₁, measured). Singular values at or below it read 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from specscope.linalg import principal_angles

CHUNK = 1 << 16  # columns per float64 product: the rows are never copied whole in float64 (measured fastest)


def _times_rows(left: Tensor, rows: Tensor) -> Tensor:
    """left @ rows in float64 (left [a, n] float64, rows [n, P]), column chunk by column chunk."""
    out = torch.empty(left.shape[0], rows.shape[1], dtype=torch.float64, device=rows.device)
    for c in range(0, rows.shape[1], CHUNK):
        out[:, c:c + CHUNK] = left @ rows[:, c:c + CHUNK].double()
    return out


class RollingSVD:
    """Top-k right singular vectors of the last `window` vectors pushed.

    >>> sed = RollingSVD(window=20, k=3)
    >>> for g in grads: sed.push(g)        # g: any tensor, flattened
    >>> V = sed.directions()               # [k, P], orthonormal rows, σ descending
    """

    def __init__(self, window: int = 20, k: int = 3, dtype: torch.dtype = torch.float32):
        for name, value in (("window", window), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RollingSVD: {name} must be an int ≥ 1, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"RollingSVD: dtype={dtype} must be a floating-point dtype (float32 or float64)")
        if k > window:
            raise ValueError(f"RollingSVD: k ({k}) cannot exceed the window ({window}): the window has rank ≤ {window}")
        self.window, self.k, self.dtype = window, k, dtype
        self._rows: Tensor | None = None  # [W, P] ring buffer
        self._gram: Tensor | None = None  # [W, W], float64
        self._count = 0
        self._cache: tuple[Tensor, Tensor] | None = None
        self._directions: Tensor | None = None
        self._previous: Tensor | None = None

    @property
    def full(self) -> bool:
        return self._count >= self.window

    def __len__(self) -> int:
        return min(self._count, self.window)

    def push(self, vector: Tensor) -> None:
        """Add one vector (flattened); the oldest leaves once the window is full."""
        if not isinstance(vector, Tensor) or vector.is_complex():
            raise ValueError(f"RollingSVD.push: the vector must be a real torch.Tensor, got "
                             f"{vector.dtype if isinstance(vector, Tensor) else type(vector).__name__}; "
                             "push torch.as_tensor(...) of the flattened gradient or update")
        if vector.layout != torch.strided:
            raise ValueError("RollingSVD.push: the vector is sparse; push a dense one (.to_dense(), or "
                             "nn.Embedding(..., sparse=False), whose gradient is dense)")
        v = vector.detach().reshape(-1).to(self.dtype)
        if v.numel() == 0:
            raise ValueError("RollingSVD.push: the vector is empty; push the flattened gradient or update")
        rows, gram = self._rows, self._gram
        if rows is None:
            rows = torch.zeros(self.window, v.numel(), dtype=self.dtype, device=v.device)
            gram = torch.zeros(self.window, self.window, dtype=torch.float64, device=v.device)
        if v.numel() != rows.shape[1]:
            raise ValueError(f"RollingSVD.push: got {v.numel()} entries, the window holds vectors of {rows.shape[1]}")
        i = self._count % self.window
        # The new Gram row against the stored rows (row i still the old one, so a refused vector leaves no trace),
        # then its own squared norm on the diagonal. One finiteness check of these W numbers covers both a NaN/Inf
        # entry of v (its squared norm is NaN/Inf) and a Gram entry that overflowed float64.
        g = sum(rows[:, c:c + CHUNK].double() @ v[c:c + CHUNK].double() for c in range(0, v.numel(), CHUNK))
        g[i] = sum(v[c:c + CHUNK].double() @ v[c:c + CHUNK].double() for c in range(0, v.numel(), CHUNK))
        if not bool(torch.isfinite(g).all()):
            self._refuse(vector, v)
        if float(g[i]) < torch.finfo(torch.float64).tiny and bool(v.any()):
            raise ValueError(f"RollingSVD.push: the vector's squared norm ({float(g[i]):.3g}) underflows float64 "
                             f"(entries up to {float(v.abs().max()):.3g}), so its singular values would read 0; "
                             "rescale the vectors (e.g. by a fixed factor) before pushing them")
        self._rows, self._gram = rows, gram
        rows[i] = v
        gram[i, :] = g
        gram[:, i] = g
        self._count += 1
        self._cache = self._directions = None

    def _refuse(self, vector: Tensor, v: Tensor) -> None:
        if not bool(torch.isfinite(vector).all()):
            raise ValueError("RollingSVD.push: the vector has NaN or Inf entries")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"RollingSVD.push: the vector's entries (up to {float(vector.abs().max()):.3g}) overflow "
                             f"this tracker's {self.dtype}; make it with dtype=torch.float64 or rescale the vectors")
        raise ValueError(f"RollingSVD.push: the Gram matrix overflowed float64 (entries up to "
                         f"{float(v.abs().max()):.3g}: the vector's squared norm or its products with the window "
                         "exceed 1.8e308); rescale the vectors (e.g. by a fixed factor) before pushing them")

    def _decompose(self) -> tuple[Tensor, Tensor]:
        """(σ descending [n], U [n, r]: the Gram's eigenvectors of the r singular values above the cut-off)."""
        if self._cache is None:
            if self._count == 0:
                raise ValueError("RollingSVD: no vectors pushed yet")
            n = len(self)
            evals, U = torch.linalg.eigh(self._gram[:n, :n])
            if not bool(torch.isfinite(evals).all()):
                raise ValueError("RollingSVD: the window's Gram matrix overflowed float64 (vectors with norms near "
                                 "1e154); rescale the vectors (e.g. by a fixed factor) before pushing them")
            evals, U = evals.flip(0).clamp(min=0), U.flip(1)
            sigma = evals.sqrt()
            keep = sigma > sigma[0] * max(n * torch.finfo(self.dtype).eps, (n * torch.finfo(torch.float64).eps) ** 0.5)
            self._cache = (torch.where(keep, sigma, torch.zeros_like(sigma)), U[:, keep])
        return self._cache

    def singular_values(self) -> Tensor:
        """All singular values of the window matrix, descending; those at or below the cut-off (module docstring:
        the rows' rounding, or the Gram's) read 0."""
        return self._decompose()[0]

    def directions(self, k: int | None = None) -> Tensor:
        """The top-k right singular vectors (k=None: the tracker's k) as orthonormal rows [k, P] (fewer if the
        window has lower rank; a float64 tracker's directions of σ below ≈ 1e-6·σ₁ are orthonormal only to about
        W·eps64·σ₁²/σ², module docstring)."""
        k = self.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"RollingSVD.directions: k must be an int ≥ 1, got {k!r}")
        sigma, U = self._decompose()
        k = min(k, U.shape[1])
        if self._directions is None or self._directions.shape[0] < k:  # V = Mᵀ U Σ⁻¹, only the rows asked for
            rows = self._rows[: U.shape[0]]
            self._directions = (_times_rows(U[:, :k].T.contiguous(), rows) / sigma[:k, None]).to(self.dtype)
        return self._directions[:k]

    def gap(self) -> float:
        """σ_k / σ_{k+1}: how well separated the SED-k subspace is (inf when σ_{k+1} = 0; NaN when σ_k = 0: the
        window has fewer than k directions, e.g. only zero vectors, and no SED-k subspace)."""
        s = self.singular_values()
        if len(s) < self.k or not s[self.k - 1] > 0:
            return float("nan")
        if len(s) == self.k:
            return float("inf")
        return float(s[self.k - 1] / s[self.k]) if s[self.k] > 0 else float("inf")

    def rotation(self) -> float:
        """Largest principal angle (radians) between the current SED-k subspace and the one at the last call (NaN at
        the first call, or when either has no directions or another number of them)."""
        V = self.directions()
        prev, self._previous = self._previous, V.clone()
        if prev is None or prev.shape != V.shape or len(V) == 0:
            return float("nan")
        return float(principal_angles(prev.T, V.T).max())

    def state_dict(self) -> dict:
        """The window's tensors by reference, as torch's state dicts: `torch.save` it, or copy it to keep a snapshot
        (`load_state_dict` copies what it loads, so two trackers never share a window)."""
        return {"rows": self._rows, "gram": self._gram, "count": self._count, "previous": self._previous}

    def load_state_dict(self, state: dict) -> None:
        missing = [key for key in ("rows", "gram", "count", "previous") if key not in state] \
            if isinstance(state, dict) else None
        if missing is None or missing:
            raise ValueError(f"RollingSVD.load_state_dict: the state lacks {missing or 'everything (not a dict)'}; "
                             "give the dict RollingSVD.state_dict() returned")
        rows, gram, count = state["rows"], state["gram"], state["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0 or (count == 0) != (rows is None):
            raise ValueError(f"RollingSVD.load_state_dict: count={count!r} must be an int ≥ 0, 0 exactly when no rows "
                             "are stored; give the dict RollingSVD.state_dict() returned")
        if rows is not None and not (isinstance(rows, Tensor) and isinstance(gram, Tensor)):
            raise ValueError("RollingSVD.load_state_dict: 'rows' and 'gram' must be tensors (or both None); give the "
                             "dict RollingSVD.state_dict() returned")
        if rows is not None and (rows.ndim != 2 or rows.shape[0] != self.window or rows.dtype != self.dtype
                                 or gram is None or tuple(gram.shape) != (self.window, self.window)):
            raise ValueError(f"RollingSVD.load_state_dict: the state holds a window of {tuple(rows.shape)} {rows.dtype} rows; "
                             f"this tracker keeps window={self.window} rows of {self.dtype}: make it with the saved window and dtype")
        if rows is not None and (gram.dtype != torch.float64 or gram.device != rows.device):
            raise ValueError(f"RollingSVD.load_state_dict: 'gram' is {gram.dtype} on {gram.device}; the window's Gram is "
                             f"float64 beside its rows ({rows.device}); give the dict RollingSVD.state_dict() returned")
        previous = state["previous"]
        if previous is not None and not (isinstance(previous, Tensor) and rows is not None and previous.ndim == 2
                                         and previous.shape[0] <= self.k and previous.shape[1] == rows.shape[1]):
            shape = tuple(previous.shape) if isinstance(previous, Tensor) else type(previous).__name__
            raise ValueError(f"RollingSVD.load_state_dict: 'previous' {shape} is not the last directions of this window "
                             f"(rows [≤ {self.k}, P], P the rows' size); give the dict RollingSVD.state_dict() returned")
        if rows is not None:
            bad = [name for name, t in (("rows", rows), ("gram", gram), ("previous", previous))
                   if t is not None and not bool(torch.isfinite(t).all())]
            # the Gram is the rows' own (it is updated row by row): a changed entry would give wrong directions silently
            if bad or not torch.allclose(gram, rows.double() @ rows.double().T, rtol=1e-6,
                                         atol=1e-9 * float(gram.diagonal().abs().max().clamp(min=1e-300))):
                what = f"non-finite entries in {bad}" if bad else "a 'gram' that is not its rows' Gram"
                raise ValueError(f"RollingSVD.load_state_dict: the state has {what}: it was changed after it was saved; "
                                 "give the dict RollingSVD.state_dict() returned, unchanged")
        copy = lambda t: None if t is None else t.detach().clone()  # noqa: E731  never the saved tensors themselves
        self._rows, self._gram, self._count = copy(rows), copy(gram), count
        self._previous, self._cache, self._directions = copy(previous), None, None
