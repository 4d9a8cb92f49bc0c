"""A small model, its data and its optimizer, built the same way in one process and in each gloo worker."""

import contextlib

import torch
from torch import nn

from specscope.optim import Muon
from specscope.train import distributed as D

BATCH, OUT = 32, 13


class Net(nn.Module):
    """Four linears (l4 has 3 rows: on 4 ranks one shard is empty) and a weight FSDP leaves plain."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 12, bias=False)
        self.l3, self.l4 = nn.Linear(12, 10, bias=False), nn.Linear(12, 3, bias=False)
        self.extra = nn.Parameter(torch.eye(8) + torch.randn(8, 8) / 10)

    def forward(self, x):
        h = torch.tanh(self.l2(torch.tanh(self.l1(x @ self.extra))))
        return torch.cat([self.l3(h), self.l4(h)], dim=-1)


def batch(step: int, rank: int = 0, world: int = 1):
    """Rows [rank/world, (rank+1)/world) of the global batch of `step`."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, OUT, generator=g)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    return x[rows], y[rows]


def build(world: int = 1, shardwise: bool = False, polar: str = "gram"):
    """(model, Muon): FSDP2 on every layer but `extra` when world > 1 (`extra` stays a plain tensor)."""
    model = Net()
    if world > 1:
        D.shard(model, [model.l1, model.l2, model.l3, model.l4], ignored=[model.extra])
    named = list(model.named_parameters())
    opt = Muon(
        [
            {"params": [(n, p) for n, p in named if not n.endswith("bias")]},
            {"params": [(n, p) for n, p in named if n.endswith("bias")], "algorithm": "adamw", "lr": 1e-2},
        ],
        lr=0.02, polar=polar, shardwise=shardwise,
    )
    return model, opt


def train_step(model, opt, step: int, rank: int = 0, world: int = 1, monitor=None) -> None:
    x, y = batch(step, rank, world)
    opt.zero_grad()
    with monitor.step(step) if monitor is not None else contextlib.nullcontext():
        (model(x) - y).square().mean().backward()
    if world > 1:  # `extra` is not under FSDP: average its gradient by hand, as DDP would
        torch.distributed.all_reduce(model.extra.grad)
        model.extra.grad /= world
    opt.step()


def full(model) -> dict[str, torch.Tensor]:
    """Every parameter whole (gathered from its shards), by name."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def records(monitor) -> list[tuple]:
    return [(r.step, r.layer, r.metric, r.value, r.rows, r.estimator) for r in monitor.pop_records()]
