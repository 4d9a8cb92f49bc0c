"""The random-feature regression check (REFERENCE §3 quadratic check, §7 RF-1/RF-2) for the optimizers.

f(W) = ½‖W·A − Y‖_F² with A = σ(B X) (features × samples), G = (W A − Y) Aᵀ. With L_E = ‖A‖_2² and
L_S = ‖A‖_F² = st(A)·L_E:  GD: W <- W − G/L_E;  SpecGD: W <- W − (‖G‖_*/L_S)·polar(G);  AutoGeometry:
lr = 1/L_E with st(A) supplied, so it takes whichever of the two steps is predicted to descend more.
ReLU features have st(A) = O(1) (SpecGD wins); SwiGLU features have large st(A) (GD wins).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from specscope import linalg


def random_features(activation: str, d: int, width: int, n: int, d_out: int, seed: int) -> tuple[Tensor, Tensor]:
    """(A, Y): features σ(BX) [width, n] of Gaussian inputs and targets of a random linear teacher of X."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, n, generator=g, dtype=torch.float64)
    B = torch.randn(width, d, generator=g, dtype=torch.float64) / d**0.5
    if activation == "relu":
        A = torch.relu(B @ X)
    elif activation == "swiglu":
        B2 = torch.randn(width, d, generator=g, dtype=torch.float64) / d**0.5
        A = nn.functional.silu(B @ X) * (B2 @ X)
    else:
        raise ValueError(f"activation must be 'relu' or 'swiglu', got {activation!r}")
    Y = torch.randn(d_out, d, generator=g, dtype=torch.float64) @ X / d**0.5
    return A, Y


def run(optimizer: str, A: Tensor, Y: Tensor, steps: int) -> float:
    """Final loss ½‖WA − Y‖² after `steps` steps from W = 0 with "gd", "specgd" or "auto"."""
    from specscope.optim import AutoGeometry, SpecGD  # optim imports this module's users, not vice versa

    L_E = float(torch.linalg.matrix_norm(A, ord=2)) ** 2
    st = float(linalg.stable_rank(A))
    W = nn.Parameter(torch.zeros(Y.shape[0], A.shape[0], dtype=A.dtype))
    if optimizer == "gd":
        opt = torch.optim.SGD([W], lr=1 / L_E)
    elif optimizer == "specgd":
        opt = SpecGD([("w.weight", W)], lr=1 / L_E, stable_rank=lambda layer: st)
    elif optimizer == "auto":
        opt = AutoGeometry([("w.weight", W)], lr=1 / L_E, monitor=lambda layer: st)
    else:
        raise ValueError(f"optimizer must be 'gd', 'specgd' or 'auto', got {optimizer!r}")
    for _ in range(steps):
        W.grad = (W.detach() @ A - Y) @ A.T
        opt.step()
    return 0.5 * float((W.detach() @ A - Y).square().sum())
