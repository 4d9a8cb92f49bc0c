"""Optimizers built differently on the ranks (2 gloo processes): one ConfigError on every rank at the first step, where
their collectives once hung, aborted gloo or mixed two configurations in silence."""

import pytest
import torch

from specscope.errors import ConfigError
from specscope.optim import LowRankDecay
from specscope.train import distributed as D

# per case: rank 0's and rank 1's (hidden width, number of weights, LowRankDecay options)
CASES = {
    "weight_decay": ((16, 3, {"weight_decay": 0.5}), (16, 3, {"weight_decay": 0.0})),
    "mode": ((16, 3, {"mode": "polar"}), (16, 3, {"mode": "l2"})),
    "prox weight_decay": ((16, 3, {"mode": "prox"}), (16, 3, {"mode": "prox", "weight_decay": 0.3})),
    "parameters": ((16, 3, {}), (16, 2, {})),
    "shapes": ((16, 3, {}), (12, 3, {})),
}


def _decay_step(rank, world, case):
    """One LowRankDecay step over this rank's weights of a 8 -> h -> h -> 4 chain; the error raised (type, text)."""
    hidden, count, options = CASES[case][rank]
    torch.manual_seed(0)
    dims = [8, hidden, hidden, 4]
    weights = [torch.nn.Parameter(torch.randn(dims[i + 1], dims[i])) for i in range(3)][:count]
    decay = LowRankDecay(weights, lr=0.1, **{"weight_decay": 0.5, "polar_method": "gram", **options})
    try:
        decay.step()
    except Exception as e:
        return type(e).__name__, str(e)
    return None


@pytest.mark.parametrize("case", CASES)
def test_a_lowrank_decay_built_differently_on_the_ranks_is_one_config_error_on_every_rank(case):
    """A weight_decay of 0 or mode 'l2' on one rank skipped the owner map's collectives the other entered (a hang);
    another parameter list or shape aborted gloo ("op.preamble.length <= op.nbytes"); prox with another weight_decay
    decayed each matrix by its owner rank's setting, in silence."""
    for got in D.spawn(_decay_step, 2, case, timeout=60):
        assert got is not None and got[0] == ConfigError.__name__, got
        assert "every rank" in got[1] and ("shape" in got[1] if case == "shapes" else True), got


def _one_frozen(rank, world):
    """One LowRankDecay step over three weights, the first frozen on rank 1 only; the weights after it."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((16, 8), (12, 16), (4, 12))]
    weights[0].requires_grad_(rank == 0)
    before = [w.detach().clone() for w in weights]
    LowRankDecay(weights, lr=0.1, weight_decay=0.5, polar_method="gram").step()
    return [torch.equal(b, w) for b, w in zip(before, weights)], [w.detach().clone() for w in weights]


def test_a_weight_frozen_on_one_rank_is_decayed_on_none():
    """Each rank left out its own frozen weights: the ranks' owner maps were given different lists of matrices (sized by
    them, their collectives can abort gloo), and the weight frozen on rank 1 was decayed on rank 0."""
    (same0, w0), (same1, w1) = D.spawn(_one_frozen, 2, timeout=60)
    assert same0 == same1 == [True, False, False]
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
