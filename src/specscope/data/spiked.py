"""Spiked data for the two-layer gradient lab (paper 000, REFERENCE §4): generated, digits, or a user's matrix.

Every data set is held as its split X = X_B + ζ z qᵀ (n × d), the form the gradient decomposition needs.
- generated: bulk rows x_B ~ N(0, diag(k^{−α})), z ~ N(0, I_n), q a unit vector, ζ = n^ν, so the population
  covariance is diag(k^{−α}) + ζ² qqᵀ;
- measured (digits, a user's .npy): q is the top eigenvector of the *uncentred* second moment XᵀX/n,
  ζ z = Xq, ζ = ‖Xq‖/√n (so mean(z²) = 1) and X_B = X − (Xq)qᵀ; the split is exact, so the decomposition
  is exact on real data too. ν̂ = log ζ / log n and α̂ is a log-log fit of the bulk eigenvalues.
Everything is drawn on CPU in float64 from an explicit seed, then moved.
"""

from __future__ import annotations

import math
import numbers
import pickle
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from specscope.errors import ConfigError
from specscope.linalg._scale import pow2_scale

TARGETS = ("teacher", "multi-index")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be a whole number ≥ {minimum}; give an integer ≥ {minimum}")


def _check_finite(name: str, value, minimum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or (
            minimum is not None and value < minimum):
        bound = f" ≥ {minimum}" if minimum is not None else ""
        raise ConfigError(f"{name}={value!r} must be a finite number{bound}; give a real value{bound}")


def _as_real_tensor(a, what: str) -> torch.Tensor:
    """float64 CPU tensor of a real numeric array; complex, string or object arrays are refused (never cast)."""
    if isinstance(a, torch.Tensor):
        if a.is_complex():
            raise ConfigError(f"{what} is complex ({a.dtype}); give a real array (take .real or .abs() first)")
        return a.detach().double().cpu()
    arr = np.asarray(a)
    if arr.dtype.kind == "c":
        raise ConfigError(f"{what} is complex ({arr.dtype}); give a real array (take .real or abs() first)")
    if arr.dtype.kind not in "biuf":
        raise ConfigError(f"{what} has dtype {arr.dtype}, not numbers; give a numeric (float or int) array")
    return torch.as_tensor(arr).double().cpu()


@dataclass
class SpikedData:
    """X = X_B + ζ z qᵀ with targets y (n,). `alpha`/`nu` are the requested values (None for real data)."""

    X_B: torch.Tensor  # n × d
    z: torch.Tensor  # (n,)
    q: torch.Tensor  # (d,), unit norm
    zeta: float
    y: torch.Tensor  # (n,)
    name: str = "synthetic"
    alpha: float | None = None
    nu: float | None = None

    @property
    def X(self) -> torch.Tensor:
        return self.X_B + self.zeta * torch.outer(self.z, self.q)

    @property
    def n(self) -> int:
        return self.X_B.shape[0]

    @property
    def d(self) -> int:
        return self.X_B.shape[1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SpikedData":
        mv = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return replace(self, X_B=mv(self.X_B), z=mv(self.z), q=mv(self.q), y=mv(self.y))

    def labels(self) -> torch.Tensor:
        """±1 labels for the logistic loss: sign(y), with 0 mapped to +1."""
        return torch.where(self.y >= 0, 1.0, -1.0).to(self.y.dtype)


@dataclass
class SpectrumEstimate:
    """Measured spectrum of a data matrix: α̂, ζ̂ = √λ_1, ν̂ = log ζ̂ / log n, q̂ and all eigenvalues of XᵀX/n."""

    alpha: float
    zeta: float
    nu: float
    q: torch.Tensor
    eigenvalues: torch.Tensor  # descending


def bulk_eigenvalues(d: int, alpha: float) -> torch.Tensor:
    """λ_k = k^{−α}, k = 1..d."""
    return torch.arange(1, d + 1, dtype=torch.float64) ** (-alpha)


def spike_direction(d: int, q: str | torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """"random" (uniform on the sphere), "top"/"bottom" (the bulk's largest/smallest eigendirection) or a vector."""
    if isinstance(q, torch.Tensor):
        if q.shape != (d,) or q.norm() == 0:
            raise ConfigError(f"q must be a nonzero vector of length d={d}, got shape {tuple(q.shape)}")
        return q.double().cpu() / q.norm()
    if q == "random":
        v = torch.randn(d, generator=gen, dtype=torch.float64)
        return v / v.norm()
    if q in ("top", "bottom"):
        v = torch.zeros(d, dtype=torch.float64)
        v[0 if q == "top" else -1] = 1.0
        return v
    raise ConfigError(f"unknown q {q!r}; choose 'random', 'top', 'bottom' or pass a unit vector")


def spiked_covariance(n: int, d: int, alpha: float = 0.0, nu: float = 0.25, *, q: str | torch.Tensor = "random",
                      target: str = "teacher", teacher_width: int = 4, label_noise: float = 0.0, seed: int = 0,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> SpikedData:
    """X = X_B + ζ z qᵀ with bulk covariance diag(k^{−α}), ζ = n^ν, and targets (`teacher_targets` or
    `multi_index_targets`). The same seed draws the same Gaussians for every (α, ν): sweeps use common
    random numbers, so a map over (ν, α) changes only what it varies."""
    _check_int("n", n, 2)
    _check_int("d", d, 2)
    _check_finite("alpha", alpha)
    _check_finite("nu", nu)
    _check_finite("label_noise", label_noise, 0)
    _check_int("teacher_width", teacher_width, 1)
    try:
        zeta = float(n) ** nu
    except OverflowError:
        zeta = math.inf
    if not math.isfinite(zeta):
        raise ConfigError(f"nu={nu!r} makes the spike ζ = n^ν = {n}^{nu} overflow; give a smaller nu")
    gen = torch.Generator().manual_seed(seed)
    X_B = torch.randn(n, d, generator=gen, dtype=torch.float64) * bulk_eigenvalues(d, alpha).sqrt()
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    qv = spike_direction(d, q, gen)
    X = X_B + zeta * torch.outer(z, qv)
    y = make_targets(X, target, width=teacher_width, seed=seed + 1)
    if label_noise:
        y = y + label_noise * torch.randn(n, generator=gen, dtype=torch.float64)
    data = SpikedData(X_B, z, qv, zeta, y, "synthetic", alpha, nu)
    return data.to(device, dtype)


def _standardize(v: torch.Tensor) -> torch.Tensor:
    return (v - v.mean()) / v.std().clamp_min(1e-12)


def teacher_targets(X: torch.Tensor, width: int = 4, seed: int = 0) -> torch.Tensor:
    """y = Σ_j tanh(w*_j·x / s_j) with teacher rows w*_j on the unit sphere, s_j the preactivation's RMS
    (so the teacher is neither linear nor saturated at any α); standardised to mean 0, variance 1."""
    gen = torch.Generator().manual_seed(seed)
    Wt = torch.randn(width, X.shape[1], generator=gen, dtype=torch.float64).to(X)
    Wt = Wt / Wt.norm(dim=1, keepdim=True)
    h = X @ Wt.T
    return _standardize(torch.tanh(h / h.pow(2).mean(0).sqrt().clamp_min(1e-12)).sum(1))


def multi_index_targets(X: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """y = h_1 + h_1 h_2, h = Uᵀx normalised to unit RMS, U two random orthonormal directions; standardised."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(X.shape[1], 2, generator=gen, dtype=torch.float64))
    h = X @ U.to(X)
    h = h / h.pow(2).mean(0).sqrt().clamp_min(1e-12)
    return _standardize(h[:, 0] + h[:, 0] * h[:, 1])


def make_targets(X: torch.Tensor, target: str, width: int = 4, seed: int = 0) -> torch.Tensor:
    if target == "teacher":
        _check_int("teacher_width", width, 1)
        return teacher_targets(X, width, seed)
    if target == "multi-index":
        return multi_index_targets(X, seed)
    raise ConfigError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


def estimate_spectrum(X: torch.Tensor, fit_range: tuple[int, int] | None = None) -> SpectrumEstimate:
    """α̂, ζ̂, ν̂ and q̂ from the uncentred second moment XᵀX/n.

    α̂ is the least-squares slope of −log λ_k on log k over `fit_range` (1-based, inclusive; default
    k = 2 .. min(n, d)/2: the top eigenvalue is the spike, the tail is distorted by finite n).
    """
    X = X.detach().double().cpu()
    n, d = X.shape
    p = float(pow2_scale(X))  # XᵀX of X·2^-e (exact): a finite X of 1e160 overflowed float64's XᵀX, 1e-170 underflowed it
    unit, evecs = torch.linalg.eigh((X * p).T @ (X * p) / n)
    unit, evecs = unit.flip(0).clamp_min(0), evecs.flip(1)  # λ·p²: the fit's slope and cut-off do not depend on p
    lo, hi = fit_range or (2, max(3, min(n, d) // 2))
    if fit_range is not None and not (all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi))
                                      and 1 <= lo < hi <= min(n, d)):
        raise ValueError(f"estimate_spectrum: fit_range={fit_range!r} must be two whole numbers 1 ≤ lo < hi ≤ "
                         f"min(n, d) = {min(n, d)} (1-based eigenvalue indices, inclusive)")
    k = torch.arange(lo, hi + 1, dtype=torch.float64)
    lam = unit[lo - 1 : hi]
    keep = lam > unit[0] * max(n, d) * torch.finfo(torch.float64).eps  # below this is rounding noise, not spectrum
    if keep.sum() < 2:
        raise ValueError(f"too few positive eigenvalues in k = {lo}..{hi} to fit α; widen fit_range")
    lk, ll = k[keep].log(), lam[keep].log()
    slope = ((lk - lk.mean()) * (ll - ll.mean())).sum() / ((lk - lk.mean()) ** 2).sum()
    zeta = unit[0].sqrt().item() / p
    return SpectrumEstimate(-slope.item(), zeta, math.log(zeta) / math.log(n), evecs[:, 0].clone(), unit / p / p)


def from_matrix(X: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | None = None, *, name: str = "matrix",
                target: str = "teacher", seed: int = 0) -> SpikedData:
    """Split a measured data matrix (n × d, rows are samples, not centred) as X_B + ζ z qᵀ around its top
    eigendirection. Without y, targets come from a seeded teacher network on X."""
    X = _as_real_tensor(X, f"the data matrix {name!r}")
    if X.ndim != 2 or min(X.shape) < 2:
        raise ConfigError(f"the data matrix must be 2-D n × d with n, d ≥ 2 (rows = samples); got shape {tuple(X.shape)}")
    if not torch.isfinite(X).all():
        raise ConfigError("the data matrix has NaN or Inf entries; clean or impute them first")
    if y is not None:  # checked before the eigendecomposition: a bad y fails fast
        yt = _as_real_tensor(y, f"the targets y of {name!r}")
        if not (yt.ndim == 1 or (yt.ndim == 2 and yt.shape[1] == 1)) or yt.shape[0] != X.shape[0]:
            raise ConfigError(f"targets y of {name!r} have shape {tuple(yt.shape)} but the matrix has {X.shape[0]} rows; "
                              f"give y of shape ({X.shape[0]},) or ({X.shape[0]}, 1), one target per row")
        yt = yt.reshape(-1)
        if not torch.isfinite(yt).all():
            raise ConfigError(f"targets y of {name!r} have NaN or Inf entries; clean or drop those rows first")
    try:
        est = estimate_spectrum(X)
    except ValueError as e:
        raise ConfigError(f"the data matrix {name!r} ({X.shape[0]} × {X.shape[1]}) has too few positive eigenvalues "
                          "after the top one to fit α (it is constant or nearly rank one, or too small); give a "
                          "matrix with more varied rows and columns") from e
    q = est.q
    proj = X @ q
    k = float(pow2_scale(proj[None]))  # ‖Xq‖ at unit scale (exact): its square overflows for an X of 1e160
    zeta = (proj * k).norm().item() / k / math.sqrt(X.shape[0])
    X_B = X - torch.outer(proj, q)
    if y is None:
        yt = make_targets(X, target, seed=seed)
    return SpikedData(X_B, proj / zeta, q, zeta, yt, name)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797 × 64 pixels, labels) from the CSV scikit-learn ships (read directly: importing sklearn.datasets
    costs seconds); `sklearn.datasets.load_digits` when the file is not where scikit-learn keeps it."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            raw = np.loadtxt(path, delimiter=",")
            return raw[:, :-1], raw[:, -1].astype(int)
    from sklearn.datasets import load_digits

    ds = load_digits()
    return ds.data, ds.target


def digits(embed_dim: int = 0, seed: int = 0) -> SpikedData:
    """scikit-learn's bundled 8×8 digits (1797 × 64, no download), each pixel standardised (constant
    pixels left at 0), target +1 for digits 0–4 and −1 for 5–9.

    With `embed_dim` > 0 the images go through a fixed random ReLU embedding x ↦ relu(Rx/√64),
    R ∈ R^{embed_dim × 64} Gaussian (seeded); its outputs are not centred, so their mean is a natural spike.
    """
    pixels, labels = _digits_arrays()
    X = torch.as_tensor(pixels, dtype=torch.float64)
    X = (X - X.mean(0)) / torch.where(X.std(0) > 0, X.std(0), torch.ones(()))
    if embed_dim:
        R = torch.randn(embed_dim, X.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        X = torch.relu(X @ R.T / math.sqrt(X.shape[1]))
    y = torch.where(torch.as_tensor(labels) <= 4, 1.0, -1.0).double()
    return from_matrix(X, y, name="digits" if not embed_dim else f"digits-relu{embed_dim}")


def load_matrix(path: str | Path, *, target: str = "teacher", seed: int = 0) -> SpikedData:
    """A user's matrix: `.npy` with X (n × d), or `.npz` with arrays `X` and optionally `y`."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ConfigError(f"data file {path} is not a regular file (a folder, a device or a pipe); give a .npy (n × d) "
                          "or .npz (X, y) file")
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist; give a .npy (n × d) or .npz (X, y) path")
    if path.suffix not in (".npy", ".npz"):
        raise ConfigError(f"data file {path} must end in .npy or .npz")
    try:
        if path.suffix == ".npz":
            with np.load(path) as f:
                if "X" not in f:
                    raise ConfigError(f"{path} has arrays {list(f.keys())}; it needs one named 'X' (and optionally 'y')")
                X, y = f["X"], (f["y"] if "y" in f else None)
        else:  # mapped first: a header that claims more entries than the file holds is refused, not allocated
            X, y = np.array(np.load(path, mmap_mode="r")), None
    except ConfigError:
        raise
    except MemoryError:
        raise ConfigError(f"data file {path} ({path.stat().st_size} bytes) declares an array too large to load; it is "
                          "corrupt, or too large for this machine's memory: check it, or save a smaller one") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise ConfigError(f"data file {path} could not be read as {path.suffix} ({type(e).__name__}: {e}); "
                          f"it is truncated, corrupt or holds Python objects: save it again with numpy.save"
                          f"{'z' if path.suffix == '.npz' else ''}") from e
    return from_matrix(X, y, name=path.stem, target=target, seed=seed)


def load(spec: str, *, n: int, d: int, alpha: float, nu: float, q: str = "random", target: str = "teacher",
         teacher_width: int = 4, seed: int = 0, digits_embed_dim: int = 0) -> SpikedData:
    """The lab's `data` key: "synthetic", "digits" or a path to a .npy/.npz matrix."""
    if spec == "synthetic":
        return spiked_covariance(n, d, alpha, nu, q=q, target=target, teacher_width=teacher_width, seed=seed)
    if spec == "digits":
        return digits(digits_embed_dim, seed)
    return load_matrix(spec, target=target, seed=seed)
