"""torch.distributed helpers: the probe reduces small statistics, never activations.

Every rank adds its rows' Frobenius sums, power-iteration products, Grams and token counts; one
all-reduce per measured step makes them the statistics of the global batch, so all ranks record the
same numbers (a small one before it sums each weight's row counts, so all ranks reduce the same weights). Outside torch.distributed (or with one process) everything here is the identity.

Under FSDP2 a weight's gradient is a DTensor already averaged over ranks and sharded by rows (Shard(0)).
nr(G) needs only the eigenvalues of a Gram: for row shards G_r, GᵀG = Σ_r G_rᵀG_r, so each rank forms its
cols×cols Gram and one all-reduce sums them. That is the cheaper message when cols ≤ rows; otherwise the
gradient itself (rows·cols < cols²) is gathered. Every rank then holds the same Gram and records the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from specscope import linalg as L
from specscope.errors import ConfigError
from specscope.linalg._checks import smaller_gram
from specscope.linalg.devices import is_dtensor


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


def same_on_every_rank(values: list[float], device: torch.device) -> bool:
    """Whether every rank passed the same numbers (each exact in float64): one all-reduce of a fixed size, which
    cannot mismatch however the ranks differ (a sized one whose sizes differ aborts gloo and hangs NCCL)."""
    if world_size() == 1:
        return True
    v = torch.tensor([*values, *(-x for x in values)], dtype=torch.float64, device=device)
    dist.all_reduce(v, op=dist.ReduceOp.MAX)
    top, low = v[: len(values)], -v[len(values):]
    return bool(torch.equal(top, low))


def all_reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Average over ranks (gradients of a model that is not wrapped in DistributedDataParallel).

    DTensors pass through: FSDP2 has averaged them already."""
    n = world_size()
    idx = [i for i, t in enumerate(tensors) if not is_dtensor(t)]
    if n == 1 or not idx:
        return tensors
    out = list(tensors)
    for i, t in zip(idx, all_reduce_sum([tensors[i] for i in idx])):
        out[i] = t / n
    return out


def whole(G: torch.Tensor) -> torch.Tensor:
    """The whole matrix on every rank (gathered from a DTensor's shards; a plain tensor as it is)."""
    return G.full_tensor() if is_dtensor(G) else G


def check_supported(t: torch.Tensor) -> None:
    """A ConfigError, naming what is supported, for a DTensor (a weight or its gradient) the probe cannot measure: one
    on a mesh of more than one dimension (HSDP, tensor parallelism), sharded along a third dimension, or holding
    partial sums."""
    if not is_dtensor(t):
        return
    mesh, placements = t.device_mesh, t.placements
    if mesh.ndim != 1:
        raise ConfigError(f"probe: a DTensor on a {mesh.ndim}-D device mesh ({placements}: HSDP or tensor parallelism) "
                          "is not measured by the Monitor; shard the model on a 1-D mesh (fully_shard's default) or "
                          "replicate it (DDP)")
    (place,) = placements
    if (place.is_shard() and place.dim not in (0, 1)) or place.is_partial():
        raise ConfigError(f"probe: a DTensor with placement {place} is not measured by the Monitor; shard matrices by "
                          "rows or columns on a 1-D mesh (fully_shard's default) or replicate them")


def _sharded_dim(G: torch.Tensor) -> int | None:
    """0 or 1 for a 2-D DTensor sharded by rows or columns on a 1-D mesh; None when its local part is whole."""
    check_supported(G)
    (place,) = G.placements
    return place.dim if place.is_shard() else None


def gram_of_shards(G: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """(this rank's part of a Gram of G, whether it must be summed over ranks) for a sharded DTensor G.

    Row shards: G_rᵀG_r (sums to GᵀG); column shards: G_rG_rᵀ (sums to GGᵀ) — when that Gram is no larger
    than G. Otherwise G is gathered and the smaller-side Gram formed whole (the same on every rank)."""
    d = _sharded_dim(G)
    sharded, other = (G.shape[d], G.shape[1 - d]) if d is not None else (0, 0)
    if d is None or other > sharded:
        return _whole_gram(whole(G), dtype), False
    A = G.to_local().to(dtype)
    return (A.T @ A if d == 0 else A @ A.T), True


def _whole_gram(G: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smaller-side Gram of a whole gradient in `dtype`. A non-finite one's Gram holds its NaN, as the summed shards'
    Grams do, and is recorded with flag "nonfinite" as the Monitor's `nonfinite` says (linalg.gram refuses it)."""
    if bool(torch.isfinite(G).all()):
        return L.gram(G, dtype=dtype)
    return smaller_gram(G.to(dtype))


def gradient_spectra(mats: list[torch.Tensor], exact: bool = False, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """‖G‖_F and ‖G‖_* per matrix (float64 vectors), as estimators.gradient_spectra; DTensor gradients are
    measured through the all-reduced Gram of their shards (see the module docstring), never gathered to
    one rank only."""
    return gradient_spectra_later(mats, exact, dtype)()


def gradient_spectra_later(mats: list[torch.Tensor], exact: bool = False, dtype: torch.dtype = torch.float64):
    """`gradient_spectra` started now and collected by calling the returned function (estimators'
    gradient_spectra_later); with DTensor gradients everything, collectives included, is done before it
    returns, so every rank issues them in the same order."""
    from specscope.probe.estimators import gradient_spectra_later as plain_later

    if not any(is_dtensor(G) for G in mats):
        return plain_later(mats, exact=exact, dtype=dtype)
    out = _sharded_spectra(mats, exact, dtype)
    return lambda: out


def _sharded_spectra(mats: list[torch.Tensor], exact: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The spectra of a list holding DTensor gradients: plain matrices as usual, sharded ones by their Grams."""
    from specscope.probe.estimators import gradient_spectra as plain_spectra

    sharded = [i for i, G in enumerate(mats) if is_dtensor(G)]
    plain = [i for i in range(len(mats)) if i not in sharded]
    fro = torch.zeros(len(mats), dtype=torch.float64)
    nuc = torch.zeros(len(mats), dtype=torch.float64)
    if plain:
        fro[plain], nuc[plain] = (t.cpu() for t in plain_spectra([mats[i] for i in plain], exact=exact, dtype=dtype))
    grams, summed = zip(*(gram_of_shards(mats[i], dtype) for i in sharded))
    to_sum = [i for i, s in enumerate(summed) if s]
    grams = list(grams)
    for k, C in zip(to_sum, all_reduce_sum([grams[k] for k in to_sum])):
        grams[k] = C
    for i, C in zip(sharded, grams):
        f2 = torch.diagonal(C).sum().double()
        fro[i] = f2.clamp(min=0).sqrt().cpu() if torch.isfinite(f2) else float("nan")
        nuc[i] = L.nuclear_norm_from_gram(C.double()).cpu() if torch.isfinite(f2) else float("nan")
    return fro, nuc
