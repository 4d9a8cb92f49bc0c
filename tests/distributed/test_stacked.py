"""Muon on stacked expert weights under torch.distributed (2 gloo processes, plain replicated tensors as DDP
holds them): each expert's matrix is orthogonalized whole on one owner rank and every rank ends with one
process's parameters; an FSDP2-sharded stack is refused with the fix named."""

import torch

from specscope.errors import ConfigError
from specscope.optim import Muon
from specscope.train import distributed as D


POLARS = ("gram", "gram_newton_schulz")


def _stack_steps(rank, world):
    out = {}
    for polar in POLARS:
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5, 24, 40, generator=g))
        opt = Muon([p], lr=0.05, polar=polar, stacked=True)
        for _ in range(3):
            p.grad = torch.randn(5, 24, 40, generator=g)  # the same on every rank, as after DDP's all-reduce
            opt.step()
        out[polar] = p.detach().clone()
    return out


def _sharded_stack(rank, world):
    from torch.distributed.fsdp import fully_shard

    model = torch.nn.Module()
    model.experts = torch.nn.Module()
    model.experts.w = torch.nn.Parameter(torch.randn(4, 8, 8))
    fully_shard(model)
    try:
        Muon([model.experts.w], stacked=True)
    except ConfigError as e:
        return str(e)
    return None


def test_a_stack_under_two_ranks_equals_one_process():
    single = _stack_steps(0, 1)
    for got in D.spawn(_stack_steps, 2):
        for polar in POLARS:
            torch.testing.assert_close(got[polar], single[polar], rtol=0, atol=1e-6)


def test_an_fsdp2_sharded_stack_is_refused():
    for message in D.spawn(_sharded_stack, 2):
        assert message is not None and "DTensor (FSDP2)" in message and "AdamW" in message
