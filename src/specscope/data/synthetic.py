"""Synthetic data for the random-feature and sparse-MLP labs (paper 001 §1.2, §3, Fig. 1, 17, 18).

Everything is a deterministic function of an explicit `torch.Generator`, created on CPU and then moved,
so the same seed gives the same data on CPU and CUDA.

Conventions (REFERENCE §3 "Quadratic check"): random-feature matrices A are features × samples, so the
trained layer is y = W a and the loss is f(W) = ½‖W A − Y‖_F². stable_rank is transpose-invariant, so the
number is the same as for the samples × features layout of REFERENCE §1.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from specscope.errors import ConfigError

# Elementwise activations. SwiGLU is not elementwise (it needs a second projection) and is handled apart.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu2": lambda z: F.relu(z) ** 2,  # squared ReLU, the paper's Fig. 1 activation
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "abs": torch.abs,
    "linear": lambda z: z,
}
GATED = ("swiglu",)
ACTIVATION_NAMES = tuple(ACTIVATIONS) + GATED


def check_activation(name: str) -> str:
    """The name if known; otherwise a ConfigError listing the known names."""
    if name not in ACTIVATION_NAMES:
        raise ConfigError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATION_NAMES)}")
    return name


def check_size(name: str, value, minimum: int = 1) -> int:
    """A whole number ≥ minimum (not a bool, not a float); otherwise a ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be a whole number ≥ {minimum}; give an integer ≥ {minimum}")
    return int(value)


def generator(seed: int) -> torch.Generator:
    """A CPU generator with this seed (data are drawn on CPU so every device sees the same numbers)."""
    return torch.Generator().manual_seed(seed)


def gaussian(shape: tuple[int, ...], gen: torch.Generator, *, scale: float = 1.0,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """iid N(0, scale²) entries, drawn on CPU from `gen`, returned on `device`."""
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)


def activate(name: str, z: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """σ(z); for SwiGLU, silu(z) ⊙ gate (the paper's gated feature silu(b₁ᵀx)·(b₂ᵀx))."""
    check_activation(name)
    if name == "swiglu":
        if gate is None:
            raise ValueError("swiglu needs the second projection `gate`")
        return F.silu(z) * gate
    return ACTIVATIONS[name](z)


def random_features(X: torch.Tensor, width: int, activation: str, gen: torch.Generator) -> torch.Tensor:
    """A = σ(B X) (width × samples) for X (dim × samples), B with iid N(0, 1/dim) entries.

    The 1/dim variance keeps pre-activations O(1) at every dimension. The features are never centred:
    the mean of ReLU features is the rank-one spike that keeps st(A) ≈ π (REFERENCE §1).
    """
    d = X.shape[0]
    B = gaussian((width, d), gen, scale=1 / math.sqrt(d), device=X.device, dtype=X.dtype)
    gate = None
    if activation == "swiglu":
        gate = gaussian((width, d), gen, scale=1 / math.sqrt(d), device=X.device, dtype=X.dtype) @ X
    return activate(activation, B @ X, gate)


@dataclass
class RFProblem:
    """Random-feature regression f(W) = ½‖W A − Y‖_F² with realizable labels Y = W̄ A."""

    A: torch.Tensor  # width × samples
    Y: torch.Tensor  # outputs × samples
    W_star: torch.Tensor  # outputs × width


def rf_regression(dim: int, width: int, samples: int, outputs: int, activation: str, seed: int, *,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> RFProblem:
    """Gaussian inputs X (dim × samples), features A = σ(B X), a Gaussian ground truth W̄ and Y = W̄ A.

    float64 by default: the quadratic check compares exact one-step decreases, which float32 would blur.
    """
    for name, value in dict(dim=dim, width=width, samples=samples, outputs=outputs).items():
        check_size(name, value)
    gen = generator(seed)
    X = gaussian((dim, samples), gen, device=device, dtype=dtype)
    A = random_features(X, width, check_activation(activation), gen)
    W_star = gaussian((outputs, width), gen, device=device, dtype=dtype)
    return RFProblem(A=A, Y=W_star @ A, W_star=W_star)


def sparse_function(X: torch.Tensor, support: int = 3) -> torch.Tensor:
    """y = x₁ x₂ ⋯ x_support for X (samples × dim): a sparse function of the input (paper 001 Fig. 1 uses the cubic)."""
    if isinstance(support, bool) or not isinstance(support, numbers.Integral) or not 1 <= support <= X.shape[1]:
        raise ConfigError(f"support={support} must be between 1 and the input dimension {X.shape[1]}")
    return X[:, :support].prod(dim=1, keepdim=True)


def sparse_regression(dim: int, samples: int, seed: int, *, support: int = 3,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(X, y): Gaussian inputs (samples × dim, the nn.Linear layout) and the sparse target x₁x₂x₃."""
    check_size("dim", dim)
    check_size("samples", samples)
    check_size("support", support)
    X = gaussian((samples, dim), generator(seed), device=device)
    return X, sparse_function(X, support)
