"""Muon: momentum, then the polar factor of the update, with torch.optim.Muon's arguments and results.

Per parameter (torch.optim.Muon, Keller Jordan's muon.py):
    B <- μ·B + (1 − μ)·G                  (lerp; B kept in float32 for bf16/fp16 params)
    U <- (1 − μ)·G + μ·B  if nesterov else B
    O <- polar(U)                         (one batched call per shape; iterations in linalg.iteration_dtype)
    W <- W·(1 − lr·wd) − lr·s·O           s = sqrt(max(1, rows/cols)) ("original")
                                          or 0.2·sqrt(max(rows, cols)) ("match_rms_adamw")
A conv weight [out, in, kh, kw] is orthogonalized as the matrix [out, in·kh·kw]; rows/cols in s are
that matrix's (out and in·kh·kw). In a group with stacked=True every parameter is a stack of matrices
[..., rows, cols] (mixture-of-experts weights [experts, out, in]): each matrix of the stack is orthogonalized
on its own, and s is one matrix's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from specscope.errors import ConfigError, checked_keywords
from specscope.optim import _common, _distributed
from specscope.optim._euclidean import state_dtype
from specscope.optim.hybrid import Hybrid, register

# Default polar backend: see docs/optim.md ("Which backend") for the CPU measurements behind it.
DEFAULT_POLAR = "gram_newton_schulz"

MUON_DEFAULTS: dict[str, Any] = dict(
    weight_decay=0.1, momentum=0.95, nesterov=True, ns_coefficients=(3.4445, -4.775, 2.0315),
    eps=1e-7, ns_steps=5, adjust_lr_fn=None, polar=DEFAULT_POLAR, shardwise=False, stacked=False,
)


def muon_update(opt, group: dict, params: list[Tensor], grads: list[Tensor], names: list[str]) -> None:
    """One Muon step on a group: momentum, one batched polar map over all matrices, apply.

    The polar map is one call so that, under torch.distributed, matrices of every shape are balanced over
    the owner ranks at once (optim/_distributed.py); shardwise=True orthogonalizes each local shard. Momentum
    and the update are multi-tensor (`torch._foreach_*`) ops: one call for all parameters instead of one per
    parameter (per element the same arithmetic as torch.optim.Muon's, so equal bit for bit on CPU for float32 and
    float64 parameters; bfloat16 and float16 ones keep a float32 momentum, torch's is in their dtype; their decay takes
    `mul_` one by one, as torch's, see `_decay_`).
    """
    mu, lr, wd = group["momentum"], float(group["lr"]), group["weight_decay"]
    stacked = group.get("stacked", False)
    bufs = []
    for p, g in zip(params, grads):
        state = opt.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g, dtype=state_dtype(g))
        bufs.append(state["momentum_buffer"])
    grads = [g.to(b.dtype) for g, b in zip(grads, bufs)]
    updates: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    for idx in _foreach_groups(bufs, lambda i: ()):
        bs, gs = [bufs[i] for i in idx], [grads[i] for i in idx]
        torch._foreach_lerp_(bs, gs, 1 - mu)
        for i, u in zip(idx, torch._foreach_lerp(gs, bs, mu) if group["nesterov"] else bs):
            updates[i] = u
    mats = [_common.matrices(u, stacked) for u in updates]
    out = iter(_common.batched_polar([m for ms in mats for m in ms], _common.polar_fn(group), group.get("shardwise", False)))
    outs = [torch.stack([next(out) for _ in ms]) if stacked else next(out) for ms in mats]
    scales = [_common.adjust_lr(lr, group["adjust_lr_fn"], _common.matrix_shape(p, stacked)) for p in params]
    for idx in _foreach_groups(params, lambda i: (scales[i],)):
        ps = [params[i] for i in idx]
        if lr * wd != 0:
            _decay_(ps, 1 - lr * wd)
        torch._foreach_add_(ps, [outs[i].reshape(params[i].shape) for i in idx], alpha=-scales[idx[0]])


def _decay_(ps: list[Tensor], factor: float) -> None:
    """p <- factor·p. torch._foreach_mul_ rounds a Python scalar to the tensors' dtype first (bfloat16's 0.998 is
    0.99609375: 2.7× the decay asked for) where `mul_`, torch.optim.Muon's, multiplies in float32; so bfloat16 and
    float16 parameters take `mul_` one by one, float32 and float64 ones one multi-tensor call (the same result)."""
    narrow = [p for p in ps if p.dtype in (torch.bfloat16, torch.float16)]
    wide = [p for p in ps if p.dtype not in (torch.bfloat16, torch.float16)]
    if wide:
        torch._foreach_mul_(wide, factor)
    for p in narrow:
        p.mul_(factor)


def _foreach_groups(ts: list[Tensor], extra) -> list[list[int]]:
    """Indices of tensors one multi-tensor op may take together: plain tensors of one device, or DTensors of one
    mesh (torch refuses a mix), split further by `extra(i)`."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(ts):
        kind = (id(t.device_mesh),) if _distributed.is_dtensor(t) else (None, t.device)
        groups.setdefault((*kind, *extra(i)), []).append(i)
    return list(groups.values())


def check_muon(group: dict) -> None:
    """The iteration options the group's polar backend would ignore, if set to other than their defaults; stacked=True:
    every parameter a local stack of matrices [..., rows, cols] (≥ 3-D, not an FSDP2 DTensor)."""
    _common.check_iteration_options(group, MUON_DEFAULTS)
    if not group.get("stacked", False):
        return
    for i, p in enumerate(group["params"]):
        if p.ndim < 3:
            raise ConfigError(f"stacked=True: parameter {i} of the group has shape {tuple(p.shape)}; a stacked group "
                              "holds stacks of matrices [..., rows, cols] (e.g. MoE experts [experts, out, in]); put "
                              "2-D weights in a group without stacked")
        if _distributed.is_dtensor(p):
            raise ConfigError(f"stacked=True: parameter {i} of the group is a DTensor (FSDP2); stacks are orthogonalized "
                              "matrix by matrix only on local tensors (one process or DDP); put it in an AdamW group")


register("muon", muon_update, MUON_DEFAULTS, spectral=True, check=check_muon, state={"momentum_buffer"})


class Muon(Hybrid):
    """torch.optim.Muon's interface plus `polar=` (a specscope.linalg backend name or a callable).

    The default polar="gram_newton_schulz" (4 steps, the d×4d matrices iterated on their Gram; in bfloat16 where
    the device multiplies it in hardware, else float32: `linalg.iteration_dtype`) is cheaper than torch's step
    and ~30× more accurate at 0.1·σ_1; polar="newton_schulz" with the defaults
    reproduces torch.optim.Muon bit for bit on CPU for float32/float64 parameters (bf16 Newton–Schulz; pass a list of (a, b, c) as
    ns_coefficients for any per-step schedule); "gram" and "svd" give the exact polar factor;
    "polar_express" per-step minimax coefficients. Groups with algorithm="adamw" (and their own
    lr) may sit beside the Muon groups. Parameters of ≥2 dims only; embeddings and heads raise ConfigError.

    Under torch.distributed (DDP or FSDP2 DTensor parameters) the update equals one process's: each matrix
    is orthogonalized whole on one owner rank. shardwise=True orthogonalizes each rank's row shard instead:
    cheaper, no communication, and a different update (see docs/distributed.md).

    stacked=True (usually per group: `spectral_param_groups` makes one for mixture-of-experts weights) treats
    each parameter as a stack of matrices [..., rows, cols] and orthogonalizes every matrix of it on its own.
    """

    @checked_keywords
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] | list = (3.4445, -4.775, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        polar: _common.PolarSpec = DEFAULT_POLAR,
        shardwise: bool = False,
        stacked: bool = False,
    ) -> None:
        super().__init__(
            params, "muon", lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, polar=polar,
            shardwise=shardwise, stacked=stacked,
        )
