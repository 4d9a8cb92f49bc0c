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
from specscope.linalg import nuclear_norm, nuclear_rank, stable_rank
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


class RFModel(torch.nn.Module):
    """The trained layer y = W a, W zero at start; fed Aᵀ (samples × features), the nn.Linear layout."""

    def __init__(self, width: int, outputs: int, *, dtype: torch.dtype = torch.float64, device=None):
        super().__init__()
        self.W = torch.nn.Linear(width, outputs, bias=False, dtype=dtype, device=device)
        torch.nn.init.zeros_(self.W.weight)

    def forward(self, At: torch.Tensor) -> torch.Tensor:
        return self.W(At)


def rf_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """f(W) = ½‖W A − Y‖_F² for a batch (Aᵀ, Yᵀ); its gradient is (W A − Y) Aᵀ."""
    At, Yt = batch
    return 0.5 * (model(At) - Yt).square().sum()


METHODS = ("gd", "specgd", "auto", "specgd_wrong_L")


def make_optimizer(method: str, model: RFModel, c: Constants, threshold: float = 1.0, hysteresis: float = 0.1):
    """The exact-constant steps as optimizers, all with lr = 1/L_E (one implementation of each step):

    gd              torch.optim.SGD:  ΔW = −G/L_E
    specgd          SpecGD fed st(A): ΔW = −(1/L_E)(‖G‖_*/st(A))·polar(G) = −(‖G‖_*/L_S)·polar(G)
    auto            AutoGeometry: per step the one of the two above with the larger guarantee (nr/st vs 1)
    specgd_wrong_L  SpecGD without st(A): ΔW = −(‖G‖_*/L_E)·polar(G), the known mistake (REFERENCE §3)
    """
    from specscope.optim import AutoGeometry, SpecGD

    lr, st = 1.0 / c.L_E, (lambda layer: c.st)
    named = list(model.named_parameters())
    if method == "gd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if method == "specgd":
        return SpecGD(named, lr=lr, stable_rank=st, polar="svd")
    if method == "auto":
        return AutoGeometry(named, lr=lr, monitor=st, threshold=threshold, hysteresis=hysteresis,
                            euclidean="sgd", polar="svd")
    if method == "specgd_wrong_L":
        return SpecGD(named, lr=lr, polar="svd")
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


@dataclass
class Trajectory:
    """Per step t = 0..steps of one method from W = 0: f(W_t), ‖G_t‖_F², ‖G_t‖_*, nr(G_t)."""

    method: str
    objective: list[float] = field(default_factory=list)
    grad_fro2: list[float] = field(default_factory=list)
    grad_nuclear: list[float] = field(default_factory=list)
    nuclear_rank: list[float] = field(default_factory=list)


def descend(problem: RFProblem, method: str, steps: int, c: Constants | None = None) -> Trajectory:
    """Run `method` ∈ METHODS for `steps` steps from W = 0, recording the trajectory at t = 0..steps."""
    A, Y = problem.A, problem.Y
    c = c or constants(A)
    model = RFModel(A.shape[0], Y.shape[0], dtype=A.dtype, device=A.device)
    opt = make_optimizer(method, model, c)
    batch = (A.T, Y.T)
    traj = Trajectory(method)
    for t in range(steps + 1):
        opt.zero_grad()
        loss = rf_loss(model, batch)
        loss.backward()
        G = model.W.weight.grad
        fro2 = float(G.square().sum())
        traj.objective.append(float(loss))
        traj.grad_fro2.append(fro2)
        traj.grad_nuclear.append(float(nuclear_norm(G)) if fro2 > 0 else 0.0)
        traj.nuclear_rank.append(float(nuclear_rank(G)) if fro2 > 0 else math.nan)
        if t < steps:
            opt.step()
    return traj


def first_step_ranks(problem: RFProblem, c: Constants | None = None) -> tuple[float, float]:
    """nr(G) at W = 0 and after one exact GD step (the paper's step 0 → step 1 jump)."""
    traj = descend(problem, "gd", 1, c)
    return traj.nuclear_rank[0], traj.nuclear_rank[1]


def predicted(nr: float, st: float) -> str:
    """The geometry whose one-step guarantee is larger: spectral when nr(G)/st(A) > 1."""
    return "spectral" if nr > st else "euclidean"
