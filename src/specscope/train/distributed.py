"""More than one process: gloo workers on one machine, FSDP2 wrapping, and distributed checkpoints.

    results = spawn(fn, world=2, *args)      # fn(rank, world, *args) in 2 processes; their return values
    shard(model, blocks)                     # fully_shard each block, then the root (FSDP2, DTensor params)
    save(path, model, opt, monitor)          # torch.distributed.checkpoint: every rank writes its shards
    load(path, model, opt, monitor)          # at any world size (2 -> 4, 2 -> 1): DCP reshards on load

Under `torchrun` the process group is already there: call `shard`, `save` and `load` directly.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from specscope.errors import ConfigError, SpecscopeError


# ---------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        buf = io.BytesIO()
        torch.save(fn(rank, world, *args), buf)  # bytes, not shared-memory tensors: safe after this process exits
        queue.put((rank, buf.getvalue(), None))
    except BaseException:
        queue.put((rank, None, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 600) -> list[Any]:
    """fn(rank, world, *args) in `world` CPU processes joined by a gloo process group; per rank its result.

    fn must be importable (a module-level function) and return something torch.save can write.
    A worker that fails raises SpecscopeError here with its traceback.
    """
    if world < 1:
        raise ConfigError(f"world must be >= 1, got {world}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        for _ in procs:
            rank, data, err = queue.get(timeout=timeout)
            if err is not None:
                raise SpecscopeError(f"rank {rank} of {world} failed:\n{err}")
            out[rank] = torch.load(io.BytesIO(data), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world)]


# ---------------------------------------------------------------- FSDP2


def shard(model: nn.Module, blocks: Iterable[nn.Module] = (), ignored: Iterable[nn.Parameter] = ()) -> nn.Module:
    """FSDP2: `fully_shard` each block (its parameters gathered only while it runs), then the root.

    Parameters become row-sharded DTensors (Shard(0)); gradients are averaged over ranks on backward.
    `ignored` parameters stay plain tensors (their gradients are then yours to average, as under DDP).
    """
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise ConfigError("shard() needs a torch.distributed process group; launch with torchrun (or spawn())")
    for b in blocks:
        fully_shard(b)
    fully_shard(model, ignored_params=set(ignored) or None)
    return model


# ---------------------------------------------------------------- checkpoints


def _blob(obj: Any) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _state(model: nn.Module, optimizer: Any, monitor: Any, extra: dict | None) -> dict[str, Any]:
    """The state DCP reads and writes: model and optimizer keyed by parameter name (sharded tensors stay
    DTensors, so DCP can reshard them), Monitor state and `extra` as one replicated blob each."""
    msd, osd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": msd, "optim": osd}
    if monitor is not None:
        state["monitor"] = _blob(monitor.state_dict())
    state["extra"] = _blob(extra or {})
    return state


def save(path: str | os.PathLike, model: nn.Module, optimizer: Any, monitor: Any = None, extra: dict | None = None) -> None:
    """Write a distributed checkpoint (a directory): each rank writes its own shards; call on every rank."""
    dcp.save(_state(model, optimizer, monitor, extra), checkpoint_id=os.fspath(path))


def load(path: str | os.PathLike, model: nn.Module, optimizer: Any, monitor: Any = None) -> dict | None:
    """Load a checkpoint written by `save` at any world size (or in one process); returns its `extra`.

    Call on every rank, after building the model (sharded as it will train), the optimizer and the monitor.
    """
    if not os.path.isdir(path):
        raise ConfigError(f"no distributed checkpoint at {os.fspath(path)!r} (a directory written by specscope.train.distributed.save)")
    state = _state(model, optimizer, monitor, {})
    dcp.load(state, checkpoint_id=os.fspath(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if hasattr(optimizer, "pop_records"):  # get_state_dict's zero-gradient, lr=0 step to create state recorded nothing real
        optimizer.pop_records()
    if monitor is not None:
        state["monitor"].seek(0)
        monitor.load_state_dict(torch.load(state["monitor"], weights_only=False))
    state["extra"].seek(0)
    return torch.load(state["extra"], weights_only=False)
