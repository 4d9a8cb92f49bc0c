"""FSDP2 (DTensor) Muon on 2 and 4 gloo processes: the global update equals one process's; shardwise=True is
the polar factor of each row shard."""

import pytest
import torch

from specscope import linalg
from specscope.train.distributed import spawn

from _nets import build, full, train_step

STEPS = 5


def _global_and_shardwise(rank, world):
    out = {}
    for shardwise in (False, True):
        model, extra, opt = build(world, shardwise=shardwise)
        for step in range(STEPS):
            train_step(model, extra, opt, step, rank, world)
        out[shardwise] = full(model, extra)
    return out


def _single(shardwise=False):
    model, extra, opt = build(1, shardwise=shardwise)
    for step in range(STEPS):
        train_step(model, extra, opt, step)
    return full(model, extra)


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_muon_equals_one_process_and_shardwise_differs(world):
    ranks = spawn(_global_and_shardwise, world)
    single = _single()
    for r in ranks[1:]:  # every rank ends with the same parameters, bitwise
        for k in single:
            assert torch.equal(r[False][k], ranks[0][False][k]) and torch.equal(r[True][k], ranks[0][True][k])
    for k in single:
        torch.testing.assert_close(ranks[0][False][k], single[k], rtol=0, atol=1e-6)
    gap = max((ranks[0][True][k] - single[k]).abs().max().item() for k in ("l1.weight", "l2.weight"))
    assert gap > 1e-3  # shard-wise orthogonalization is a different update


def _one_shardwise_step(rank, world):
    """One step from zero momentum: the update of a weight is −lr·s·polar(U_local), U = nesterov momentum."""
    model, extra, opt = build(world, shardwise=True)
    before = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
    train_step(model, extra, opt, 0, rank, world)
    out = {}
    for n, p in model.named_parameters():
        if n.endswith("weight"):
            g = p.grad.to_local()
            mu = opt.param_groups[0]["momentum"]
            u = g.lerp((1 - mu) * g, mu)  # nesterov on the first step: buffer (1 − mu)·g
            out[n] = (before[n], p.to_local().detach().clone(), u)
    return out


def test_shardwise_is_the_polar_factor_of_each_shard():
    for rank_out in spawn(_one_shardwise_step, 2):
        for n, (w0, w1, u) in rank_out.items():
            if u.shape[0] == 0:
                continue
            lr, wd = 0.05, 0.1
            rows, cols = {"l1.weight": (12, 8), "l2.weight": (10, 12), "l3.weight": (3, 10)}[n]
            scale = lr * max(1.0, rows / cols) ** 0.5
            expected = w0 * (1 - lr * wd) - scale * linalg.polar(u.unsqueeze(0), method="gram")[0]
            torch.testing.assert_close(w1, expected, rtol=0, atol=1e-6)
