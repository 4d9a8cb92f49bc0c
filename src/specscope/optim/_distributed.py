"""Split orthogonalization work across torch.distributed ranks and gather the results.

Each rank computes the polar factors of a contiguous slice of a same-shape batch and all ranks
all_gather the slices, so every rank ends with the same tensors (bitwise: each matrix was computed once).
Without an initialised process group (or with one rank) everything runs locally.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sharded(fn: Callable[[Tensor], tuple[Tensor, ...]], X: Tensor) -> tuple[Tensor, ...]:
    """fn(X) for a batch X [b, ...] whose outputs all have leading dim b, work split over ranks.

    The batch is padded to a multiple of the world size by repeating its last matrix (a valid input),
    so every rank runs fn on an equal slice and all_gather sees equal sizes; the padding is dropped.
    """
    rank, size = world()
    if size == 1:
        return fn(X)
    b = X.shape[0]
    per = -(-b // size)
    if per * size > b:
        X = torch.cat([X, X[-1:].expand(per * size - b, *X.shape[1:])])
    mine = fn(X[rank * per : (rank + 1) * per].contiguous())
    out = []
    for t in mine:
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts)[:b])
    return tuple(out)


def agree(has_grad: Sequence[bool], nonfinite: Sequence[bool], device: torch.device) -> tuple[list[bool], list[bool]]:
    """Make all ranks agree on which parameters step (grad on every rank) and which are non-finite (on any).

    One small all_reduce per step; it keeps the collective calls of `sharded` identical on all ranks
    even when a parameter's grad is None on some rank.
    """
    rank, size = world()
    if size == 1:
        return list(has_grad), list(nonfinite)
    flags = torch.tensor([*map(int, has_grad), *map(int, nonfinite)], dtype=torch.int64, device=device)
    dist.all_reduce(flags)
    n = len(has_grad)
    return [int(v) == size for v in flags[:n]], [int(v) > 0 for v in flags[n:]]
