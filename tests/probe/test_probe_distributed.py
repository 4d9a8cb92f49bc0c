"""Two gloo processes on halves of a batch record the same numbers as one process on the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from specscope.probe import Monitor

STEPS = 3


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)), nn.Embedding(10, 6)


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 10, (8, 3), generator=g), torch.randn(8, 3, 3, generator=g)


def run(rank: int, world: int, ddp: bool, estimator: str):
    net, emb = make()
    model = nn.ModuleDict({"net": net, "emb": emb})
    wrapped = nn.parallel.DistributedDataParallel(model) if ddp else model
    mon = Monitor(wrapped, estimator=estimator)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for step in range(STEPS):
        ids, y = batch(step)
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        opt.zero_grad()
        with mon.step(step):
            x = model["emb"](ids[rows]) if not ddp else None
            pred = model["net"](x) if not ddp else wrapped.module["net"](wrapped.module["emb"](ids[rows]))
            ((pred - y[rows]).square().mean() * (world if not ddp else 1) / world).backward()
        if ddp:
            pass
        opt.step()
        out += [(r.step, r.layer, r.metric, r.value, r.rows) for r in mon.pop_records()]
    return out


def worker(rank, world, port, ddp, estimator, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        q.put((rank, run(rank, world, ddp, estimator)))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("estimator", ["power", "gram"])
def test_two_gloo_ranks_match_one_process(estimator):
    single = run(0, 1, False, estimator)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, 2, free_port.port, False, estimator, q)) for r in range(2)] if False else None
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, False, estimator, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1] or all(a[:3] == b[:3] and a[3] == pytest.approx(b[3], rel=1e-12) for a, b in zip(results[0], results[1]))
    assert len(results[0]) == len(single)
    for a, b in zip(results[0], single):
        assert a[:3] == b[:3] and a[4] == b[4]
        assert a[3] == pytest.approx(b[3], rel=1e-4), a
