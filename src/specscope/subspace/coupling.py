"""Centroid coupling of a parameter direction (paper 003, REFERENCE §5).

A(v) = mean_x ‖(μ_x(θ + εv) − μ_x(θ − εv)) / (2ε)‖², with μ_x(θ) the per-input "centroid" features (the
gradient of the correct-class logit w.r.t. the embedded input), the perturbation on a chosen parameter set
only and ε = eps_rel·‖θ_set‖. R_k = A(v_k) / median_j A(r_j) over random unit directions r_j.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from specscope.subspace.project import flatten, unflatten_


def directional_coupling(centroids: Callable[[], Tensor], params: list[Tensor], v: Tensor, eps: float) -> float:
    """A(v) by a central difference along unit vector v; the parameters are restored bit for bit."""
    saved = [p.detach().clone() for p in params]
    theta = flatten([p.detach() for p in params], params)
    v = v.to(theta.device, theta.dtype) / v.norm()
    try:
        with torch.no_grad():
            unflatten_(theta + eps * v, [p.data for p in params])
        plus = centroids().detach()
        with torch.no_grad():
            unflatten_(theta - eps * v, [p.data for p in params])
        minus = centroids().detach()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    diff = (plus - minus) / (2 * eps)
    return float(diff.reshape(diff.shape[0], -1).pow(2).sum(1).mean())


def coupling_ratios(
    centroids: Callable[[], Tensor],
    params: list[Tensor],
    directions: Tensor,
    *,
    n_random: int = 20,
    eps_rel: float = 0.005,
    generator: torch.Generator | None = None,
) -> tuple[list[float], float]:
    """(R_k for each row of `directions`, the median random-direction coupling it is normalised by).

    `centroids` must be deterministic: call `model.eval()` first (dropout, on in a freshly built Hugging Face
    model, makes the two sides of every difference different draws and the ratios ≈ 1)."""
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"coupling_ratios: n_random must be an int ≥ 1 (the baseline is their median), got {n_random!r}")
    if not 0 < eps_rel < 1:
        raise ValueError(f"coupling_ratios: eps_rel must be in (0, 1) (the step is eps_rel·‖θ‖), got {eps_rel!r}")
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
    gen = generator or torch.Generator().manual_seed(0)
    random_a = [directional_coupling(centroids, params, torch.randn(dim, generator=gen), eps) for _ in range(n_random)]
    baseline = float(torch.tensor(random_a, dtype=torch.float64).median())
    if math.isnan(baseline):
        raise ValueError("coupling_ratios: the centroids are NaN or Inf at θ ± ε·r; check the model's output there")
    if not baseline > 0:
        raise ValueError(f"coupling_ratios: the median coupling of random directions is {baseline}: the centroids do "
                         "not move with these parameters, so no ratio is defined (are they the parameters the centroids use?)")
    ratios = [directional_coupling(centroids, params, d, eps) / baseline for d in directions]
    return ratios, baseline
