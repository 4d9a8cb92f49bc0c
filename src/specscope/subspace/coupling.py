"""Centroid coupling of a parameter direction (paper 003, REFERENCE §5).

A(v) = mean_x ‖(μ_x(θ + εv) − μ_x(θ − εv)) / (2ε)‖², with μ_x(θ) the per-input "centroid" features (the
gradient of the correct-class logit w.r.t. the embedded input), the perturbation on a chosen parameter set
only and ε = eps_rel·‖θ_set‖. R_k = A(v_k) / median_j A(r_j) over random unit directions r_j (for an even count, the mean of the middle two).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from specscope.subspace._params import checked_params
from specscope.subspace.project import flatten, unflatten_


def _centroids_at(centroids: Callable[[], Tensor]) -> Tensor:
    """One call of `centroids`, checked to be a tensor with a leading per-input axis."""
    out = centroids()
    if not isinstance(out, Tensor) or out.ndim < 1:
        what = f"a {out.ndim}-d tensor" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"coupling: centroids() returned {what}; it must return a tensor [n_inputs, ...] "
                         "(one centroid per input)")
    return out.detach()


def directional_coupling(centroids: Callable[[], Tensor], params: list[Tensor], v: Tensor, eps: float) -> float:
    """A(v) by a central difference along unit vector v; the parameters are restored bit for bit."""
    saved = [p.detach().clone() for p in params]
    theta = flatten([p.detach() for p in params], params)
    v = v.to(theta.device, theta.dtype) / v.norm()
    plus_theta, minus_theta = theta + eps * v, theta - eps * v
    if torch.equal(plus_theta, minus_theta):
        raise ValueError(f"coupling: the step ε = {eps:.3g} along v changes no parameter in {theta.dtype} (it underflows "
                         f"or is below the parameters' rounding); use a larger eps_rel ({_larger(theta.dtype)})")
    try:
        with torch.no_grad():
            unflatten_(plus_theta, [p.data for p in params])
        plus = _centroids_at(centroids)
        with torch.no_grad():
            unflatten_(minus_theta, [p.data for p in params])
        minus = _centroids_at(centroids)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    diff = (plus - minus) / (2 * eps)
    return float(diff.reshape(diff.shape[0], -1).pow(2).sum(1).mean())


def _larger(dtype: torch.dtype) -> str:
    """A step size to suggest: the default 0.005 where it is above the dtype's rounding, else 4·eps (bfloat16: 0.031)."""
    eps = torch.finfo(dtype).eps
    return "e.g. the default 0.005" if 0.005 > 2 * eps else f"e.g. {4 * eps:.2g}: {dtype} rounds at {eps:.2g}"


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal up to the dtype's square-root rounding (nondeterministic GPU kernels), NaN equal to NaN."""
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    scale = float(a.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()) if a.numel() else 0.0
    tol = torch.finfo(a.dtype).eps ** 0.5 * max(scale, torch.finfo(a.dtype).tiny)
    return bool(torch.allclose(a, b, rtol=0.0, atol=tol, equal_nan=True))


def coupling_ratios(
    centroids: Callable[[], Tensor],
    params: list[Tensor],
    directions: Tensor,
    *,
    n_random: int = 20,
    eps_rel: float = 0.005,
    generator: torch.Generator | None = None,
) -> tuple[list[float], float]:
    """(R_k for each row of `directions`, the median random-direction coupling it is normalised by); the list is
    empty when `directions` has no rows (a window of zero vectors has no SED directions).

    `centroids` must be deterministic: call `model.eval()` first (dropout, on in a freshly built Hugging Face
    model, makes the two sides of every difference different draws and the ratios ≈ 1)."""
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"coupling_ratios: n_random must be an int ≥ 1 (the baseline is their median), got {n_random!r}")
    if isinstance(eps_rel, bool) or not isinstance(eps_rel, (int, float)) or not 0 < eps_rel < 1:
        raise ValueError(f"coupling_ratios: eps_rel must be a number in (0, 1) (the step is eps_rel·‖θ‖), got {eps_rel!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"coupling_ratios: generator must be a torch.Generator or None, got {type(generator).__name__}")
    params = checked_params(params, "coupling_ratios", trainable=False)
    dtype = params[0].dtype
    if eps_rel <= torch.finfo(dtype).eps:
        raise ValueError(f"coupling_ratios: eps_rel={eps_rel!r} is at or below {dtype}'s rounding "
                         f"({torch.finfo(dtype).eps:.3g}): the step eps_rel·‖θ‖ would not change the parameters; "
                         f"use a larger eps_rel ({_larger(dtype)})")
    theta_norm = float(flatten([p.detach() for p in params], params).norm())
    if not theta_norm > 0 or not math.isfinite(theta_norm):
        raise ValueError(f"coupling_ratios: the parameters' norm is {theta_norm}, so the step eps_rel·‖θ‖ is undefined; "
                         "measure coupling on trained (nonzero, finite) parameters")
    eps = eps_rel * theta_norm
    dim = sum(p.numel() for p in params)
    if not isinstance(directions, Tensor) or directions.ndim != 2 or directions.shape[1] != dim:
        shape = tuple(directions.shape) if isinstance(directions, Tensor) else type(directions).__name__
        raise ValueError(f"coupling_ratios: directions {shape} must be rows [k, {dim}] ({dim} = the parameters' total "
                         "size), e.g. RollingSVD.directions()")
    norms = directions.detach().double().norm(dim=1)
    if not bool(torch.isfinite(directions).all()) or not bool((norms > 0).all()):
        raise ValueError("coupling_ratios: every direction must be finite and nonzero (it is normalised to unit length)")
    first, second = _centroids_at(centroids), _centroids_at(centroids)
    if first.shape != second.shape or not _same(first, second):
        raise ValueError("coupling_ratios: centroids() gave different values in two calls at the same θ (dropout or "
                         "another random layer is on); call model.eval() first, the ratios would be noise ≈ 1")
    gen = generator or torch.Generator().manual_seed(0)
    random_a = [directional_coupling(centroids, params, torch.randn(dim, generator=gen), eps) for _ in range(n_random)]
    baseline = float(torch.tensor(random_a, dtype=torch.float64).quantile(0.5))  # the mean of the middle two for even n
    if math.isnan(baseline):
        raise ValueError("coupling_ratios: the centroids are NaN or Inf at θ ± ε·r; check the model's output there")
    if not baseline > 0:
        raise ValueError(f"coupling_ratios: the median coupling of random directions is {baseline}: the centroids do "
                         "not move with these parameters, so no ratio is defined (are they the parameters the centroids use?)")
    ratios = [directional_coupling(centroids, params, d, eps) / baseline for d in directions]
    return ratios, baseline
