"""specscope.linalg: pure tensor functions for the spectral structure of gradients and activations.

Ranks (REFERENCE §1), norms, polar-factor backends and subspace tools. Every function takes tensors
[..., m, n] (CPU or CUDA), computes half-precision input in float32/float64, and raises ValueError naming
the function and the problem on non-finite, empty, complex, sparse or meta input (the raw polar kernels check
shape, kind and options only: see docs/linalg.md). The polar backends and the nuclear norms of lists build no autograd graph
(docs/linalg.md "No autograd"); the raw kernels are plain, differentiable torch products.
"""
from .devices import iteration_dtype
from .norms import (
    fro_nuclear_norms_later,
    gram,
    nuclear_norm_from_gram,
    nuclear_norms,
    nuclear_norms_later,
    spectral_norm,
    stable_rank_from_gram,
)
from .polar import (
    GRAM_NS_COEFFICIENTS,
    KELLER_COEFFICIENTS,
    POLAR_EXPRESS_COEFFICIENTS,
    default_rcond,
    gram_newton_schulz,
    newton_schulz,
    orthogonality_error,
    polar,
    polar_error,
    polar_express,
    polar_later,
    polar_with_nuclear_norm,
    polar_with_nuclear_norm_later,
)
from .ranks import onehot_stable_rank, spectral_advantage, stable_rank
from .spectra import energy_rank, entropy_rank, nuclear_norm, nuclear_rank, participation_ratio, singular_values
from .subspaces import principal_angles, singular_value_soft_threshold

__all__ = [
    "stable_rank", "nuclear_rank", "spectral_advantage", "entropy_rank", "participation_ratio", "energy_rank",
    "singular_values", "spectral_norm", "nuclear_norm", "gram", "stable_rank_from_gram", "nuclear_norm_from_gram", "nuclear_norms",
    "nuclear_norms_later", "fro_nuclear_norms_later",
    "polar", "polar_later", "polar_with_nuclear_norm", "polar_with_nuclear_norm_later", "polar_error", "orthogonality_error", "newton_schulz", "polar_express",
    "gram_newton_schulz", "iteration_dtype", "default_rcond", "KELLER_COEFFICIENTS", "POLAR_EXPRESS_COEFFICIENTS", "GRAM_NS_COEFFICIENTS",
    "singular_value_soft_threshold", "principal_angles", "onehot_stable_rank",
]
