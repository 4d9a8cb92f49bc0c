"""torch.distributed helpers: the probe reduces small statistics, never activations.

Every rank adds its rows' Frobenius sums, power-iteration products, Grams and token counts; one
all-reduce per measured step makes them the statistics of the global batch, so all ranks record the
same numbers. Outside torch.distributed (or with one process) everything here is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes in the default group, 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor over ranks with one all-reduce per dtype; returns new tensors (inputs untouched)."""
    if world_size() == 1 or not tensors:
        return tensors
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for i, chunk in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = chunk.view_as(tensors[i])
    return out  # type: ignore[return-value]


def all_reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Average over ranks (gradients of a model that is not wrapped in DistributedDataParallel)."""
    n = world_size()
    return tensors if n == 1 else [t / n for t in all_reduce_sum(tensors)]
