"""Matrix maps over torch.distributed ranks: each matrix goes to one owner rank, is transformed there, and
comes back in the layout it left in (microsoft/dion's and torchtitan's distributed Muon do the same).

A matrix reaches `owner_map` as one of
    a plain tensor                      every rank holds all of it (no process group, DDP);
    a DTensor on a 1-D mesh, Shard(0)   rank r holds rows [r·c, (r+1)·c) with c = ceil(rows/world)
                                        (FSDP2's `fully_shard` layout; the last shards may be short or empty);
    a DTensor on a 1-D mesh, Replicate  as a plain tensor.
Global map (default), per process group:
    1. owners: matrices sorted by cost rows·cols·min(rows, cols), each to the least-loaded rank (LPT);
    2. one all_to_all: every rank sends each owner its rows of that owner's matrices (a replicated
       matrix is already whole on its owner and sends nothing);
    3. each owner runs fn once per shape on its whole matrices (batched);
    4. one all_to_all back: every rank receives the rows it holds (a replicated matrix: all rows).
So fn(M) is computed once per matrix, on the whole matrix: the result equals one process's, and every
rank ends with bitwise the same values. With `shardwise=True` a Shard(0) matrix is instead mapped shard by
shard on its own rank, without communication: fn(shard) is *a different update* (the polar factor of a
row block is not a row block of the polar factor). Without a process group (or with one rank) all of this
runs locally, with no collective call.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from specscope.errors import ConfigError
from specscope.linalg import workers
from specscope.linalg.devices import is_dtensor

MapFn = Callable[[Tensor], "Tensor | tuple[Tensor, ...]"]


@dataclass(frozen=True)
class LaterMap:
    """A batched map `now` that can also be started on a whole list of matrices of mixed shapes and collected
    later (`start`: linalg's `*_later` functions, one result per matrix). On a multi-thread CPU `_batched`
    starts all the matrices at once, so that their jobs share the one-thread workers, with nothing run on
    the calling thread beside them (a parallel op there while the workers hold the cores stalls)."""

    now: MapFn
    start: Callable[[list[Tensor]], Callable[[], list]]

    def __call__(self, X: Tensor) -> "Tensor | tuple[Tensor, ...]":
        return self.now(X)


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def number(t: Tensor) -> float:
    """A 0-D result as a Python float; of a DTensor the whole one (a norm or sum of a sharded tensor is a partial
    value on each rank, which float() would read as the local shard's)."""
    return float(t.full_tensor() if is_dtensor(t) else t)


def local(t: Tensor) -> Tensor:
    """This rank's part of a tensor: the local shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


# ---------------------------------------------------------------- bytes sent, for the benchmark


@dataclass
class Traffic:
    """Bytes this rank sent to other ranks in the optimizers' collectives since the last reset."""

    bytes_sent: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.bytes_sent, self.calls = 0, 0


TRAFFIC = Traffic()


# ---------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """Where a [rows, cols] matrix lives: rank r holds rows spans[r] (None: every rank holds all rows)."""

    rows: int
    cols: int
    group: object  # the ProcessGroup (None: the default group)
    spans: tuple[tuple[int, int], ...] | None

    def held(self, rank: int) -> tuple[int, int]:
        """Rows `rank` holds, and so receives back."""
        return (0, self.rows) if self.spans is None else self.spans[rank]

    def sent(self, rank: int) -> tuple[int, int]:
        """Rows `rank` sends its owner on the way in (a replicated matrix is whole on its owner already)."""
        return (0, 0) if self.spans is None else self.spans[rank]


def row_spans(rows: int, size: int) -> tuple[tuple[int, int], ...]:
    """Shard(0)'s rows per rank (torch.chunk: chunks of ceil(rows/size), the tail short or empty)."""
    c = -(-rows // size)
    return tuple((min(r * c, rows), min((r + 1) * c, rows)) for r in range(size))


def layout(m: Tensor) -> Layout:
    """The Layout of a 2-D matrix view; other DTensor layouts raise with what is supported."""
    rows, cols = m.shape
    if not is_dtensor(m):
        return Layout(rows, cols, None, None)
    from torch.distributed.tensor import Replicate, Shard  # imported already: m is a DTensor

    mesh, placements = m.device_mesh, m.placements
    if mesh.ndim != 1:
        raise ConfigError(f"a DTensor on a {mesh.ndim}-D device mesh ({placements}) is not supported by "
                          "specscope.optim; use a 1-D mesh (fully_shard's default, or DDP)")
    group = mesh.get_group()
    if isinstance(placements[0], Replicate):
        return Layout(rows, cols, group, None)
    if not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise ConfigError(f"a DTensor with placement {placements[0]} is not supported by specscope.optim; "
                          "shard matrices by rows (Shard(0), fully_shard's default) or replicate them")
    spans = row_spans(rows, dist.get_world_size(group))
    a, b = spans[dist.get_rank(group)]
    if m.to_local().shape[0] != b - a:
        raise ConfigError(f"a Shard(0) DTensor of {rows} rows holds {m.to_local().shape[0]} rows on rank "
                          f"{dist.get_rank(group)}, not torch.chunk's {b - a}; uneven custom sharding is not supported")
    return Layout(rows, cols, group, spans)


def _rewrap(like: Tensor, rows: Tensor) -> Tensor:
    """The local result rows in `like`'s form (a DTensor with its mesh and placements, or plain)."""
    if not is_dtensor(like):
        return rows
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(rows, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=rows.new_empty(like.shape, device="meta").stride())


# ---------------------------------------------------------------- the map


def owners(costs: Sequence[float], size: int) -> list[int]:
    """Longest-processing-time assignment: the costliest matrix first, each to the least-loaded rank."""
    load = [0.0] * size
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += costs[i]
    return out


def _as_tuple(x: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def _batched(fn: MapFn, mats: Sequence[Tensor], extras: int = 0) -> list[tuple[Tensor, ...]]:
    """fn on each matrix, one call per (shape, dtype) — a `transposable` map's tall matrices counted by their
    transpose's shape —; an empty matrix (a shard of no rows) maps to itself
    and zero extras. A `LaterMap` over several matrices on a multi-thread CPU gets one `start` call for all."""
    out: list[tuple[Tensor, ...]] = [()] * len(mats)
    live = [i for i, m in enumerate(mats) if m.numel() > 0]
    for i in set(range(len(mats))) - set(live):
        out[i] = (mats[i].clone(), *mats[i].new_zeros(extras))
    if isinstance(fn, LaterMap) and len(live) > 1 and workers.count(mats[live[0]].device):
        for i, res in zip(live, fn.start([mats[i] for i in live])()):
            out[i] = _as_tuple(res)
        return out
    flip = getattr(fn, "transposable", False)
    wide = {i: mats[i].mT if flip and mats[i].shape[-2] > mats[i].shape[-1] else mats[i] for i in live}
    buckets: dict[tuple, list[int]] = {}
    for i in live:
        buckets.setdefault((tuple(wide[i].shape), mats[i].dtype, mats[i].device), []).append(i)
    for idx in buckets.values():
        X = wide[idx[0]].unsqueeze(0) if len(idx) == 1 else torch.stack([wide[i] for i in idx])
        res = _as_tuple(fn(X))
        for k, i in enumerate(idx):
            out[i] = (res[0][k].mT if wide[i] is not mats[i] else res[0][k], *(t[k] for t in res[1:]))
    return out


def transposable(fn: MapFn) -> MapFn:
    """Mark a map with fn(Xᵀ) = fn(X)ᵀ (a polar map): `_batched` then stacks a tall matrix, transposed, with the
    wide ones of its shape — one call for a d×4d and a 4d×d matrix, not two."""
    fn.transposable = True  # type: ignore[attr-defined]
    return fn


def owner_map(mats: Sequence[Tensor], fn: MapFn, shardwise: bool = False, extras: int = 0) -> list[tuple[Tensor, ...]]:
    """fn on every 2-D matrix, each whole on one owner rank (see the module docstring). Per matrix a tuple:
    the result matrix in the input's layout, then fn's `extras` per-matrix scalars (e.g. a nuclear norm).

    `fn` maps a batch [b, rows, cols] to [b, rows, cols], or (extras > 0) to a tuple of that and `extras`
    tensors of shape [b]; it must not call collectives itself.
    """
    out: list[tuple[Tensor, ...]] = [()] * len(mats)
    lays = [layout(m) for m in mats]
    size = world()[1]
    jobs: dict[object, list[int]] = {}
    local_only = []
    for i, lay in enumerate(lays):
        if size == 1 or (shardwise and lay.spans is not None):
            local_only.append(i)
        else:
            jobs.setdefault(lay.group, []).append(i)
    for i, res in zip(local_only, _batched(fn, [local(mats[i]) for i in local_only], extras)):
        out[i] = (_rewrap(mats[i], res[0]), *res[1:])
    for group, idx in jobs.items():
        for i, res in zip(idx, _global(fn, [mats[i] for i in idx], [lays[i] for i in idx], group, extras)):
            out[i] = res
    return out


def _rows(span: tuple[int, int], cols: int) -> tuple[int, int]:
    return (span[1] - span[0], cols)


def _global(fn: MapFn, mats: list[Tensor], lays: list[Layout], group, extras: int) -> list[tuple[Tensor, ...]]:
    """Steps 1-4 of the module docstring for the matrices of one process group."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    own = owners([lay.rows * lay.cols * min(lay.rows, lay.cols) for lay in lays], size)
    owned = [[i for i, o in enumerate(own) if o == r] for r in range(size)]
    mine = owned[rank]
    locs = [local(m) for m in mats]
    dtypes = sorted({m.dtype for m in locs}, key=str)
    device = locs[0].device

    # 2. in: to owner o my rows of each matrix o owns; from rank s, s's rows of each matrix I own
    send = [[locs[i] if lays[i].spans else locs[i][:0] for i in owned[o]] for o in range(size)]
    recv = [[(_rows(lays[i].sent(s), lays[i].cols), locs[i].dtype) for i in mine] for s in range(size)]
    got = _exchange(send, recv, dtypes, device, group)

    # 3. whole matrices on their owner, one fn call per shape
    whole = [torch.cat([got[s][k] for s in range(size)]) if lays[i].spans else locs[i] for k, i in enumerate(mine)]
    results = _batched(fn, whole, extras)

    # 4. out: to rank s the rows s holds of each matrix I own (in the input's dtype); from owner o, mine of o's
    back = [[results[k][0][slice(*lays[i].held(s))].to(locs[i].dtype) for k, i in enumerate(mine)] for s in range(size)]
    shapes = [[(_rows(lays[i].held(rank), lays[i].cols), locs[i].dtype) for i in owned[o]] for o in range(size)]
    came = _exchange(back, shapes, dtypes, device, group)
    rows: list[Tensor] = [None] * len(mats)  # type: ignore[list-item]
    for o in range(size):
        for t, i in zip(came[o], owned[o]):
            rows[i] = t
    scalars = _scalars(results, mine, len(mats), extras, device, group)
    return [(_rewrap(m, r.view_as(local(m))), *(e[i] for e in scalars)) for i, (m, r) in enumerate(zip(mats, rows))]


def _scalars(results: list[tuple[Tensor, ...]], mine: list[int], n: int, extras: int, device, group) -> list[Tensor]:
    """fn's per-matrix scalars to every rank: one float64 all_reduce (owners write, others add zeros)."""
    if extras == 0:
        return []
    buf = torch.zeros(extras, n, dtype=torch.float64, device=device)
    for r, i in zip(results, mine):
        for j, t in enumerate(r[1 : 1 + extras]):
            buf[j, i] = t.double()
    dist.all_reduce(buf, group=group)
    _count_all_reduce(buf, group)
    return list(buf)


def _count_all_reduce(t: Tensor, group) -> None:
    """A ring all_reduce sends 2·(world − 1)/world of the buffer from each rank."""
    size = dist.get_world_size(group)
    _count(t.numel() * t.element_size() * 2 * (size - 1) // size)


def _exchange(send: list[list[Tensor]], recv: list[list[tuple[tuple[int, int], torch.dtype]]],
              dtypes: list[torch.dtype], device, group) -> list[list[Tensor]]:
    """all_to_all: send[d] (a list of matrices) goes to rank d; returns, per source rank s, the matrices s sent,
    shaped as recv[s]. One all_to_all_single per dtype in `dtypes` (the same list on every rank)."""
    size, rank = len(send), dist.get_rank(group)
    out: list[list[Tensor]] = [[None] * len(r) for r in recv]  # type: ignore[misc]
    for dt in dtypes:
        parts = [[t.reshape(-1) for t in send[d] if t.dtype == dt] for d in range(size)]
        s_split = [sum(t.numel() for t in p) for p in parts]
        r_split = [sum(math.prod(sh) for sh, d_ in recv[s] if d_ == dt) for s in range(size)]
        flat = [t for p in parts for t in p]
        sbuf = torch.cat(flat) if flat else torch.empty(0, dtype=dt, device=device)
        rbuf = torch.empty(sum(r_split), dtype=dt, device=device)
        dist.all_to_all_single(rbuf, sbuf, r_split, s_split, group=group)
        _count((sum(s_split) - s_split[rank]) * sbuf.element_size())
        for s, chunk in enumerate(rbuf.split(r_split)):
            k = 0
            for j, (sh, d_) in enumerate(recv[s]):
                if d_ == dt:
                    n = math.prod(sh)
                    out[s][j] = chunk[k : k + n].view(sh)
                    k += n
    return out


def _count(nbytes: int) -> None:
    TRAFFIC.bytes_sent += int(nbytes)
    TRAFFIC.calls += 1


# ---------------------------------------------------------------- step agreement


def check_same_parameters(names: Sequence[str], device: torch.device, options: Sequence[str] = (),
                          params: Sequence[Tensor] = ()) -> None:
    """A ConfigError on every rank when the ranks' optimizers hold different parameters (`agree`'s all-reduce is sized
    by them: sizes that differ abort gloo and hang NCCL), parameters of other global shapes or dtypes (`params`, in the
    order of `names`: `owner_map`'s all_to_all is sized by them) or their groups different options (`options`, one text
    per group: a `shardwise` on one rank skips the collectives of `owner_map` the others enter, a hang; another lr, polar
    or momentum steps each matrix by its owner's settings, a mix of two runs). One all-reduce of a fixed size; call it
    once per optimizer."""
    if world()[1] == 1:
        return
    shapes = [f"{name} {tuple(p.shape)} {str(p.dtype).removeprefix('torch.')}" for name, p in zip(names, params)]
    key = [float(len(names)), *(float(zlib.crc32("\n".join(text).encode())) for text in (names, shapes, options))]
    v = torch.tensor([*key, *(-x for x in key)], dtype=torch.float64, device=device)
    dist.all_reduce(v, op=dist.ReduceOp.MAX)
    same = (v[: len(key)] == -v[len(key):]).tolist()
    if not (same[0] and same[1]):
        raise ConfigError(f"the ranks' optimizers hold different parameters (this rank's: {len(names)}, e.g. "
                          f"{list(names[:3])}): build the optimizer on every rank from the same model and parameter groups")
    if not same[2]:
        raise ConfigError(f"the ranks' optimizers hold parameters of different shapes or dtypes (this rank's: "
                          f"{shapes[:3]}{' …' if len(shapes) > 3 else ''}): build the model with the same sizes and dtype on "
                          "every rank")
    if not same[3]:
        raise ConfigError(f"the ranks' optimizers have param groups of different options (this rank's group 0: "
                          f"{options[0][:200] if options else ''}): build the optimizer with the same settings on every rank")


def agree(has_grad: Sequence[bool], nonfinite: Sequence[bool], device: torch.device) -> tuple[list[bool], list[bool]]:
    """Make all ranks agree on which parameters step (grad on every rank) and which are non-finite (on any).

    One small all_reduce per step; it keeps the collective calls of `owner_map` identical on all ranks
    even when a parameter's grad is None on some rank.
    """
    rank, size = world()
    if size == 1:
        return list(has_grad), list(nonfinite)
    flags = torch.tensor([*map(int, has_grad), *map(int, nonfinite)], dtype=torch.int64, device=device)
    dist.all_reduce(flags)
    _count_all_reduce(flags, None)
    n = len(has_grad)
    return [int(v) == size for v in flags[:n]], [int(v) > 0 for v in flags[n:]]
