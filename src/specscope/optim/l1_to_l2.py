"""ℓ₁→ℓ₂ steepest descent for embeddings: each token's vector moves along its own normalized gradient.

An embedding E multiplies one-hot tokens x (‖x‖_1 = 1), so its natural operator norm is
    ‖E‖_{1→2} = max_j ‖E_j‖_2                    (E_j: token j's vector; Scion, Pethick et al. 2025)
whose dual norm is ‖G‖_{2,1} = Σ_j ‖G_j‖_2 and whose steepest-descent direction is the column-normalized
gradient colnorm(G)_j = G_j / ‖G_j‖_2 (0 where G_j = 0). For ½‖E X − Y‖² with one-hot X (N tokens,
token j c_j times) the second-order term is Σ_j c_j ‖ΔE_j‖², so
    L_E = c_max (Euclidean),   L_{1→2} = N = Σ_n ‖x_n‖_1²,   L_{1→2} / L_E = N / c_max = st(X),
the same ratio as the spectral geometry (docs/optim.md, "ℓ₁→ℓ₂ geometry"). The step with a source of
st(A) (scale="matched", the geometry-matched rule of REFERENCE §3, st = 1 without a source):
    ΔE = −lr·(‖D‖_{2,1}/st)·colnorm(D)           (= the 1/L_{1→2} steepest-descent step when lr = 1/L_E)
or Scion's fixed-radius step, each token's vector moved by an RMS of `rms` (scale="rms"):
    ΔE = −lr·rms·sqrt(d)·colnorm(D)              (d: the vector length)
D is the gradient or torch.optim.SGD's momentum buffer. `token_dim` names the axis that indexes tokens:
0 for nn.Embedding's [vocab, d] weight (the default), 1 for a Linear [out, in] fed one-hot inputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from specscope.errors import ConfigError, checked_keywords
from specscope.linalg._scale import pow2_scale
from specscope.optim import _common, _distributed, _euclidean
from specscope.optim.hybrid import Hybrid, register
from specscope.optim.specgd import layer_stable_ranks

SCALES = ("matched", "rms")
L1_TO_L2_DEFAULTS: dict[str, Any] = dict(
    momentum=0.0, nesterov=False, weight_decay=0.0, scale="matched", rms=0.2, token_dim=0,
)


def token_norms(D: Tensor, token_dim: int) -> Tensor:
    """‖D_j‖_2 per token, shaped to broadcast against D (norm over every axis but `token_dim`). A token whose squares
    leave D's dtype (float32 entries of ≈ 1e18 over a few hundred features: the norm came out inf, and the step
    zero or NaN) is normed at unit scale, divided by the power of two at or below its largest entry and multiplied
    back (exact: linalg._scale.pow2_scale). On a CPU only when the plain norm overflowed (one host read); on an
    accelerator always, without a host synchronisation (one reduction and one product more)."""
    other = [k for k in range(D.ndim) if k != token_dim % D.ndim]
    n = torch.linalg.vector_norm(D, dim=other, keepdim=True)
    if D.device.type == "cpu" and not bool(torch.isinf(n).any()):
        return n
    p = pow2_scale(D, dim=other)
    return torch.linalg.vector_norm(D * p, dim=other, keepdim=True) / p


def colnorm(D: Tensor, token_dim: int = 0) -> Tensor:
    """The ℓ₁→ℓ₂ steepest-descent direction: every token's vector scaled to unit ℓ₂ norm; zero stays zero."""
    n = token_norms(D, token_dim)
    return torch.where(n > 0, D / n.clamp_min(torch.finfo(D.dtype).tiny), torch.zeros_like(D))


def dual_norm(D: Tensor, token_dim: int = 0) -> Tensor:
    """‖D‖_{2,1} = Σ_j ‖D_j‖_2 = ⟨D, colnorm(D)⟩, the dual of ‖·‖_{1→2} (a 0-D tensor, no host sync)."""
    return token_norms(D, token_dim).sum()


def column_rank(D: Tensor, token_dim: int = 0) -> float:
    """‖D‖_{2,1}² / ‖D‖_F²: the ℓ₁→ℓ₂ analogue of nr(G) (1 ≤ it ≤ number of non-zero tokens); of a DTensor (FSDP2)
    the whole tensor's, not the local shard's."""
    fro2 = _common.fro_squared(D)
    return _distributed.number(dual_norm(D.double(), token_dim)) ** 2 / fro2 if fro2 > 0 else 1.0


def step_direction(D: Tensor, group: dict, st: float) -> tuple[Tensor, Tensor | float]:
    """(colnorm(D), its length) of the update before −lr: matched ‖D‖_{2,1}/st (a float64 0-D tensor: ‖D‖_{2,1} of a
    float32 D can exceed float32's range) or rms·sqrt(d); for `_euclidean.apply_scaled`."""
    k = group["token_dim"]
    P = colnorm(D, k)
    if group["scale"] == "rms":
        return P, group["rms"] * math.sqrt(D.numel() / D.shape[k])
    return P, dual_norm(D.double(), k) / st


def check_group(group: dict) -> None:
    if "token_dim" in group and group["token_dim"] is None:  # the shared check (hybrid._check_token_dim) allows it for "auto" groups
        raise ConfigError("token_dim=None: algorithm='l1_to_l2' steps each token's vector, so it needs the axis that "
                          "indexes tokens (0 for nn.Embedding's [vocab, d] weight, 1 for a Linear fed one-hot inputs)")
    if group["scale"] not in SCALES:
        raise ConfigError(f"scale={group['scale']!r} is unknown for algorithm='l1_to_l2'; use one of {SCALES}")
    if group["momentum"] < 0 or (group["nesterov"] and group["momentum"] == 0):
        raise ConfigError(f"momentum must be >= 0 and > 0 for nesterov (got {group['momentum']}, nesterov={group['nesterov']})")


def l1_to_l2_update(opt, group: dict, params: list[Tensor], grads: list[Tensor], names: list[str]) -> None:
    """One ℓ₁→ℓ₂ step on a group (see the module docstring)."""
    check_group(group)
    lr, wd = float(group["lr"]), group["weight_decay"]
    sts = _common.taken_ahead(opt, group, lambda: l1_to_l2_stable_ranks(opt, group, params, grads, names))
    for p, g, st in zip(params, grads, sts):  # every p ≥ 2-D: checked when its group was made (_common.check_matrices)
        D = _euclidean.sgd_direction(opt.state[p], g, group["momentum"], group["nesterov"])
        _euclidean.apply_scaled(p, *step_direction(D, group, st or 1.0), lr, wd)


def l1_to_l2_stable_ranks(opt, group: dict, params: list[Tensor], grads: list[Tensor], names: list[str]) -> list[float | None]:
    """st(A) of each parameter's layer (needed for scale="matched"), read before the step changes anything."""
    return layer_stable_ranks(opt, names, required=group["scale"] == "matched")


register("l1_to_l2", l1_to_l2_update, L1_TO_L2_DEFAULTS, spectral=False, check=check_group, state={"momentum_buffer"},
         ahead=l1_to_l2_stable_ranks)


class L1ToL2(Hybrid):
    """ℓ₁→ℓ₂ steepest descent (see the module docstring); other groups may set algorithm="adamw"/"muon"/...

    `stable_rank`: a probe Monitor or a callable layer -> st(A) (the embedding's is N/c_max) for scale="matched".
    """

    @checked_keywords
    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, scale: str = "matched",
                 rms: float = 0.2, token_dim: int = 0, weight_decay: float = 0.0, stable_rank: Any = None) -> None:
        super().__init__(params, "l1_to_l2", stable_rank=stable_rank, lr=lr, momentum=momentum, nesterov=nesterov,
                         scale=scale, rms=rms, token_dim=token_dim, weight_decay=weight_decay)
