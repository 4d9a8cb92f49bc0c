"""The two-layer model of paper 000 and the exact split of its input-weight gradient (REFERENCE §4).

f(x) = γ aᵀσ(Wx), W ∈ R^{m×d} trainable, a ∈ {±1}^m fixed, γ = 1/m (mean field, "mf") or 1/√m ("ntk").

Orientation: everything here is m × d, the shape of `W` and of `W.grad`. REFERENCE §4 writes the gradient
as d × m (G_ref = γ Xᵀ[(r aᵀ) ∘ σ'(XWᵀ)]); our G is its transpose, G = γ [(a rᵀ) ∘ σ'(WXᵀ)] X, so the
*right* singular vectors of G live in input space and are the ones compared with X_Bᵀr and q.

With X = X_B + ζ z qᵀ and σ'(XWᵀ) = 1μᵀ + Φ⊥ (μ_j the sample mean of unit j's derivative) the gradient of
the data loss splits exactly into four terms:
    S1  = γ (a∘μ)(X_Bᵀr)ᵀ                    residue-aligned, rank one
    S12 = γ ζ (zᵀr) (a∘μ) qᵀ                  interpolant, rank one
    S2  = γ ζ [a ∘ (Φ⊥ᵀ(z∘r))] qᵀ             spike-aligned, rank one
    E   = γ [(a rᵀ) ∘ Φ⊥ᵀ] X_B                the rest
r = ∂L/∂f is the residue of the *mean* loss L = (1/n)Σℓ(f(x_i), y_i), so r_i = ℓ'(f_i, y_i)/n and
S1 + S12 + S2 + E equals autograd's W.grad with no leftover factor.

Only torch is imported: this module is usable from probes, benchmarks and notebooks alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from specscope.errors import ConfigError

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
    "erf": torch.erf,
    "quadratic": lambda z: z * z,
    "linear": lambda z: z,
}
SCALINGS = ("mf", "ntk")
LOSSES = ("mse", "logistic")
INITS = ("sphere", "spike")


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """σ by name; an unknown name is a ConfigError listing the known ones."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def activation_derivative(name: str, z: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """σ'(z) elementwise, by autograd (exact for any elementwise σ; ReLU'(0) = 0 as torch defines it).

    With `create_graph=True` the result stays differentiable in z (needed by the Jacobian penalty,
    whose gradient involves σ'').
    """
    act = activation(name)
    with torch.enable_grad():
        zz = z if create_graph else z.detach().requires_grad_(True)
        if not zz.requires_grad:
            zz = zz.requires_grad_(True)
        (d,) = torch.autograd.grad(act(zz).sum(), zz, create_graph=create_graph)
    return d


def gamma(m: int, scaling: str) -> float:
    """Output scale γ_m: 1/m for mean field, 1/√m for NTK."""
    if scaling not in SCALINGS:
        raise ConfigError(f"unknown scaling {scaling!r}; choose 'mf' (γ=1/m) or 'ntk' (γ=1/√m)")
    return 1.0 / m if scaling == "mf" else 1.0 / math.sqrt(m)


def init_weights(m: int, d: int, *, init: str = "sphere", q: torch.Tensor | None = None, spike_corr: float = 0.0,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Rows of W on the unit sphere ("sphere", the paper's setting) or correlated with the spike ("spike").

    "spike": w_j ∝ √(1−ρ²) g_j/‖g_j‖ + ρ s_j q with s_j = ±1, renormalised, so ⟨w_j, q⟩ ≈ ±ρ.
    """
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    g = torch.randn(m, d, generator=generator, dtype=torch.float64)
    w = g / g.norm(dim=1, keepdim=True)
    if init == "spike":
        if q is None:
            raise ConfigError("init='spike' needs the spike direction q")
        if not 0.0 <= spike_corr <= 1.0:
            raise ConfigError(f"init_spike_corr={spike_corr} must lie in [0, 1]")
        signs = torch.randint(0, 2, (m, 1), generator=generator, dtype=torch.float64) * 2 - 1
        w = math.sqrt(1 - spike_corr**2) * w + spike_corr * signs * q.detach().cpu().double()[None, :] / q.norm().item()
        w = w / w.norm(dim=1, keepdim=True)
    return w.to(dtype)


class TwoLayer(torch.nn.Module):
    """f(x) = γ aᵀσ(Wx) with a ∈ {±1}^m fixed (a buffer) and W (m × d) the only parameter."""

    def __init__(self, W: torch.Tensor, a: torch.Tensor, activation_name: str = "tanh", scaling: str = "mf"):
        super().__init__()
        activation(activation_name)  # validate early
        self.W = torch.nn.Parameter(W.clone())
        self.register_buffer("a", a.to(W.dtype).clone())
        self.activation_name = activation_name
        self.scaling = scaling
        self.gamma = gamma(W.shape[0], scaling)

    @classmethod
    def init(cls, d: int, m: int, *, activation_name: str = "tanh", scaling: str = "mf", init: str = "sphere",
             q: torch.Tensor | None = None, spike_corr: float = 0.0, seed: int = 0,
             dtype: torch.dtype = torch.float64) -> "TwoLayer":
        """A seeded model: a_j = ±1 with equal probability, W from `init_weights`."""
        gen = torch.Generator().manual_seed(seed)
        a = (torch.randint(0, 2, (m,), generator=gen) * 2 - 1).to(dtype)
        W = init_weights(m, d, init=init, q=q, spike_corr=spike_corr, generator=gen, dtype=dtype)
        return cls(W, a, activation_name, scaling)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.gamma * activation(self.activation_name)(X @ self.W.T) @ self.a

    def derivative(self, X: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """Φ = σ'(XWᵀ), n × m."""
        return activation_derivative(self.activation_name, X @ self.W.T, create_graph=create_graph)


def per_sample_loss(f: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """ℓ(f, y): mse ½(f−y)²; logistic log(1 + e^{−yf}) for labels y ∈ {±1}."""
    if loss == "mse":
        return 0.5 * (f - y) ** 2
    if loss == "logistic":
        return F.softplus(-y * f)
    raise ConfigError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def residue(f: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """r = ∂L/∂f for L = mean ℓ, in closed form: (f−y)/n (mse) or −y·sigmoid(−yf)/n (logistic)."""
    n = f.shape[0]
    if loss == "mse":
        return (f - y) / n
    if loss == "logistic":
        return -y * torch.sigmoid(-y * f) / n
    raise ConfigError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def jacobian_penalty(model: TwoLayer, X: torch.Tensor, lam: float) -> torch.Tensor:
    """(λ/2n) Σ_i ‖∂_W f(x_i)‖_F², in closed form.

    ∂_W f(x_i) = γ (a∘σ'(Wx_i)) x_iᵀ, so its squared norm is γ² ‖x_i‖² Σ_j σ'(w_j·x_i)² (a_j² = 1).
    Differentiable in W (its gradient involves σ'σ''; zero almost everywhere for ReLU).
    """
    phi = model.derivative(X, create_graph=True)
    per_sample = model.gamma**2 * (X * X).sum(1) * (phi * phi).sum(1)
    return lam / (2 * X.shape[0]) * per_sample.sum()


def objective(model: TwoLayer, X: torch.Tensor, y: torch.Tensor, loss: str = "mse", *, weight_decay: float = 0.0,
              jac_lambda: float = 0.0) -> torch.Tensor:
    """Training objective: mean loss + (wd/2)‖W‖_F² + Jacobian penalty. Input noise enters through X."""
    out = per_sample_loss(model(X), y, loss).mean()
    if weight_decay:
        out = out + 0.5 * weight_decay * (model.W * model.W).sum()
    if jac_lambda:
        out = out + jacobian_penalty(model, X, jac_lambda)
    return out


@dataclass
class Decomposition:
    """G = S1 + S12 + S2 + E (all m × d) with the pieces they are built from."""

    S1: torch.Tensor
    S12: torch.Tensor
    S2: torch.Tensor
    E: torch.Tensor
    mu: torch.Tensor  # (m,) mean derivative of each unit
    r: torch.Tensor  # (n,) residue ∂L/∂f
    bulk_residue: torch.Tensor  # (d,) X_Bᵀ r, the direction of S1's rows
    q: torch.Tensor  # (d,) unit spike direction, the direction of S12's and S2's rows

    @property
    def total(self) -> torch.Tensor:
        return self.S1 + self.S12 + self.S2 + self.E


def decompose(model: TwoLayer, X_B: torch.Tensor, z: torch.Tensor, zeta: float, q: torch.Tensor,
              r: torch.Tensor) -> Decomposition:
    """The exact split of the data-loss gradient for X = X_B + ζ z qᵀ and residue r (module docstring).

    q must be a unit vector (the split is exact for any X_B, z, ζ; unit q keeps ζ the spike's size).
    """
    if abs(q.norm().item() - 1.0) > 1e-6:
        raise ValueError(f"q must be a unit vector, got norm {q.norm().item():.6g}; normalise it")
    W, a, g = model.W.detach(), model.a, model.gamma
    X = X_B + zeta * torch.outer(z, q)
    phi = activation_derivative(model.activation_name, X @ W.T)  # n × m
    mu = phi.mean(0)
    phi_perp = phi - mu
    c = g * a * mu  # (m,) the common left factor of S1 and S12
    b = X_B.T @ r
    S1 = torch.outer(c, b)
    S12 = zeta * torch.dot(z, r) * torch.outer(c, q)
    S2 = g * zeta * torch.outer(a * (phi_perp.T @ (z * r)), q)
    E = g * (a[:, None] * (phi_perp * r[:, None]).T) @ X_B
    return Decomposition(S1, S12, S2, E, mu, r, b, q)
