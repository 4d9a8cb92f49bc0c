"""Centroid coupling of a parameter direction (paper 003, REFERENCE §5).

A(v) = mean_x ‖(μ_x(θ + εv) − μ_x(θ − εv)) / (2ε)‖², with μ_x(θ) the per-input "centroid" features (the
gradient of the correct-class logit w.r.t. the embedded input), the perturbation on a chosen parameter set
only and ε = eps_rel·‖θ_set‖. R_k = A(v_k) / median_j A(r_j) over random unit directions r_j.
"""

from __future__ import annotations

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
    """(R_k for each row of `directions`, the median random-direction coupling it is normalised by)."""
    theta_norm = float(flatten([p.detach() for p in params], params).norm())
    eps = eps_rel * theta_norm
    dim = directions.shape[1]
    gen = generator or torch.Generator().manual_seed(0)
    random_a = [directional_coupling(centroids, params, torch.randn(dim, generator=gen), eps) for _ in range(n_random)]
    baseline = float(torch.tensor(random_a).median())
    ratios = [directional_coupling(centroids, params, d, eps) / baseline for d in directions]
    return ratios, baseline
