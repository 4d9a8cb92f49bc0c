"""Euclidean update pieces: AdamW (torch.optim.AdamW's formulas) and SGD with momentum (torch.optim.SGD's).

Each `*_direction` updates the state of one parameter and returns the direction d; the caller applies
p <- p·(1 − lr·wd) − lr·d (decoupled weight decay, as torch.optim.AdamW and Muon).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from specscope.errors import ConfigError
from specscope.linalg.devices import is_dtensor

ADAMW_DEFAULTS: dict[str, Any] = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
SGD_DEFAULTS: dict[str, Any] = dict(momentum=0.0, nesterov=False, weight_decay=0.0)


def check_sgd(group: dict[str, Any]) -> None:
    """nesterov=True needs momentum > 0 (torch.optim.SGD refuses it too: the step would be plain SGD)."""
    if group["nesterov"] and float(group["momentum"]) == 0:
        raise ConfigError("nesterov=True needs momentum > 0")


def state_dtype(g: Tensor) -> torch.dtype:
    """Optimizer state is kept in float32 for bf16/fp16 parameters (their precision would corrupt it)."""
    return torch.float32 if g.dtype in (torch.bfloat16, torch.float16) else g.dtype


def sgd_direction(state: dict, g: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """torch.optim.SGD's momentum (dampening 0): b <- μ·b + g (b = g at the first step); Nesterov: g + μ·b."""
    g = g.to(state_dtype(g))
    if momentum == 0:
        return g
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = g.clone()
    else:
        state["momentum_buffer"].mul_(momentum).add_(g)
    buf = state["momentum_buffer"]
    return g.add(buf, alpha=momentum) if nesterov else buf


def adam_moments(state: dict, g: Tensor, betas: tuple[float, float]) -> tuple[Tensor, Tensor, int]:
    """Update Adam's first and second moments in place; returns (m, v, step) with step counted from 1."""
    g = g.to(state_dtype(g))
    if "exp_avg" not in state:
        state["adam_step"] = 0
        state["exp_avg"] = torch.zeros_like(g)
        state["exp_avg_sq"] = torch.zeros_like(g)
    state["adam_step"] += 1
    beta1, beta2 = betas
    state["exp_avg"].lerp_(g, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
    return state["exp_avg"], state["exp_avg_sq"], state["adam_step"]


def adam_direction(m: Tensor, v: Tensor, step: int, betas: tuple[float, float], eps: float) -> Tensor:
    """m̂ / (sqrt(v̂) + eps), computed in torch.optim.AdamW's order."""
    beta1, beta2 = betas
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    return (m / (1 - beta1**step)) / denom


def apply(p: Tensor, d: Tensor, lr: float, weight_decay: float) -> None:
    """p <- p·(1 − lr·wd) − lr·d, decay first (torch.optim.AdamW / Muon order)."""
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    p.add_(d.view_as(p).to(p.dtype), alpha=-lr)


def apply_scaled(p: Tensor, d: Tensor, length: Tensor | float, lr: float, weight_decay: float) -> None:
    """p <- p·(1 − lr·wd) − (lr·length)·d, the product lr·length formed in float64 before it becomes a number of d's
    dtype: a step's length (‖D‖_* or ‖D‖_{2,1} of a float32 D of entries ≈ 1e36) can exceed float32's range while
    lr times it does not."""
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    if is_dtensor(length):  # a sum or norm over a sharded tensor (FSDP2): partial on each rank until reduced
        length = length.full_tensor()
    scale = length.double() * lr if isinstance(length, Tensor) else torch.tensor(float(length) * lr, dtype=torch.float64)
    p.add_((d * scale.to(d.device, d.dtype)).view_as(p).to(p.dtype), alpha=-1.0)


def adamw_update(opt, group: dict, params: list[Tensor], grads: list[Tensor], names: list[str]) -> None:
    """The AdamW step on each parameter of the group (no amsgrad, no maximize); lr may be a one-element tensor."""
    for p, g in zip(params, grads):
        m, v, step = adam_moments(opt.state[p], g, group["betas"])
        apply(p, adam_direction(m, v, step, group["betas"], group["eps"]), float(group["lr"]), group["weight_decay"])


def sgd_update(opt, group: dict, params: list[Tensor], grads: list[Tensor], names: list[str]) -> None:
    """SGD with optional (Nesterov) momentum and decoupled weight decay."""
    for p, g in zip(params, grads):
        d = sgd_direction(opt.state[p], g, group["momentum"], group["nesterov"])
        apply(p, d, float(group["lr"]), group["weight_decay"])
