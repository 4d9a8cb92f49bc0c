"""A small model, its data and its optimizer, built the same way in one process and in each gloo worker."""

import torch
from torch import nn

from specscope.optim import Muon
from specscope.train import distributed as D

BATCH = 8


class Net(nn.Module):
    """Three linears; the last has 3 rows, so on 4 ranks one shard is empty. Plus a weight outside FSDP."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.l3 = nn.Linear(8, 12), nn.Linear(12, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


def batch(step: int, rank: int = 0, world: int = 1):
    """Rows [rank/world, (rank+1)/world) of the global batch of `step`."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 3, generator=g)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    return x[rows], y[rows]


def build(world: int = 1, shardwise: bool = False, polar: str = "gram"):
    """(model, extra, optimizer): FSDP2 on every layer when world > 1; `extra` is a plain replicated weight."""
    model = Net()
    torch.manual_seed(1)
    extra = nn.Parameter(torch.randn(3, 3) / 3)
    if world > 1:
        D.shard(model, [model.l1, model.l2, model.l3])
    named = list(model.named_parameters())
    opt = Muon(
        [
            {"params": [(n, p) for n, p in named if n.endswith("weight")] + [("extra.weight", extra)]},
            {"params": [(n, p) for n, p in named if n.endswith("bias")], "algorithm": "adamw", "lr": 1e-2},
        ],
        lr=0.05, polar=polar, shardwise=shardwise,
    )
    return model, extra, opt


def train_step(model, extra, opt, step: int, rank: int = 0, world: int = 1) -> None:
    x, y = batch(step, rank, world)
    opt.zero_grad()
    ((model(x) @ extra - y).square().mean()).backward()
    if world > 1:  # `extra` is not under FSDP: average its gradient by hand, as DDP would
        torch.distributed.all_reduce(extra.grad)
        extra.grad /= world
    opt.step()


def full(model, extra) -> dict[str, torch.Tensor]:
    """Every parameter whole (gathered from its shards), by name."""
    out = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}
    out["extra"] = extra.detach().clone()
    return out
