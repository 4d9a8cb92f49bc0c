"""Random-feature regression: GD vs SpecGD vs AutoGeometry, st(A) vs width, nr(G) at steps 0 and 1 (RF-1..3).

f(W) = ½‖W A − Y‖_F² with random features A = σ(B X) (features × samples) and realizable labels Y = W̄ A
(paper 001 §1.2, §3; REFERENCE §3 "Quadratic check"). The Hessian is ΔW ↦ ΔW A Aᵀ, so
‖ΔW A‖_F² ≤ ‖A‖_2²‖ΔW‖_F² (Euclidean, L_E = ‖A‖_2²) and ≤ ‖A‖_F²‖ΔW‖_2² (spectral, L_S = ‖A‖_F² = st(A)·L_E).
With these exact constants both steps are guaranteed to decrease f:
    GD:      ΔW = −G / L_E                    decrease ≥ ‖G‖_F² / (2 L_E)
    SpecGD:  ΔW = −(‖G‖_* / L_S) · polar(G)   decrease ≥ ‖G‖_*² / (2 L_S)
and the ratio of the guarantees is nr(G)/st(A). ReLU features have a mean spike (st(A) ≈ π at any width),
SwiGLU features are nearly centred (st(A) grows with width), which decides the winner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from specscope.data.synthetic import ACTIVATION_NAMES, RFProblem, check_activation, rf_regression
from specscope.labs.base import Arm, LabConfig, Measure
from specscope.linalg import nuclear_norm, nuclear_rank, polar, stable_rank
from specscope.records import Claim, Record

NAME = "random-features"


# ---------------------------------------------------------------------------------------------------
# The quadratic check: plain tensor math, shared by `specscope demo` and the lab's measures.
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Constants:
    """Exact smoothness constants of f in the two geometries (REFERENCE §3)."""

    L_E: float  # ‖A‖_2²: Euclidean
    L_S: float  # ‖A‖_F²: spectral
    st: float  # st(A) = L_S / L_E


def constants(A: torch.Tensor) -> Constants:
    """L_E from the exact largest singular value (float64), L_S the squared Frobenius norm.

    Exact rather than power iteration: an underestimated ‖A‖_2 would void the descent guarantee.
    """
    A64 = A.detach().double()
    L_E = float(torch.linalg.matrix_norm(A64, ord=2)) ** 2
    L_S = float(A64.square().sum())
    return Constants(L_E=L_E, L_S=L_S, st=L_S / L_E)


def objective(W: torch.Tensor, A: torch.Tensor, Y: torch.Tensor) -> float:
    """f(W) = ½‖W A − Y‖_F²."""
    return 0.5 * float((W @ A - Y).square().sum())


def gradient(W: torch.Tensor, A: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """∇f(W) = (W A − Y) Aᵀ (outputs × features)."""
    return (W @ A - Y) @ A.T


def gd_step(G: torch.Tensor, c: Constants) -> torch.Tensor:
    """Euclidean step ΔW = −G / L_E."""
    return -G / c.L_E


def spectral_step(G: torch.Tensor, L: float) -> torch.Tensor:
    """Spectral step ΔW = −(‖G‖_* / L) · polar(G); L = L_S is correct, L = L_E is the known mistake."""
    return -(float(nuclear_norm(G)) / L) * polar(G, method="svd")


METHODS = ("gd", "specgd", "specgd_wrong_L")


@dataclass
class Trajectory:
    """Objective and nr(G) at every step 0..steps of one method from W = 0 (index t = before update t+1)."""

    method: str
    objective: list[float] = field(default_factory=list)
    nuclear_rank: list[float] = field(default_factory=list)


def descend(problem: RFProblem, method: str, steps: int, c: Constants | None = None) -> Trajectory:
    """Run `method` ∈ METHODS for `steps` steps from W = 0, recording f(W_t) and nr(∇f(W_t)) for t = 0..steps."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    A, Y = problem.A, problem.Y
    c = c or constants(A)
    W = torch.zeros(Y.shape[0], A.shape[0], dtype=A.dtype, device=A.device)
    traj = Trajectory(method)
    for t in range(steps + 1):
        G = gradient(W, A, Y)
        traj.objective.append(objective(W, A, Y))
        traj.nuclear_rank.append(float(nuclear_rank(G)) if G.abs().max() > 0 else math.nan)
        if t == steps:
            break
        if method == "gd":
            W = W + gd_step(G, c)
        else:
            W = W + spectral_step(G, c.L_S if method == "specgd" else c.L_E)
    return traj


def first_step_ranks(problem: RFProblem, c: Constants | None = None) -> tuple[float, float]:
    """nr(G) at W = 0 and after one exact GD step (the paper's step 0 → step 1 jump)."""
    traj = descend(problem, "gd", 1, c)
    return traj.nuclear_rank[0], traj.nuclear_rank[1]


def predicted(nr: float, st: float) -> str:
    """The geometry whose one-step guarantee is larger: spectral when nr(G)/st(A) > 1."""
    return "spectral" if nr > st else "euclidean"
