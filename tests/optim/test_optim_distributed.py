"""2 CPU processes on gloo: ranks split the orthogonalization, end identical, equal to one process."""

import importlib
import threading

import pytest
import torch
import torch.distributed as dist

from specscope.optim import Hybrid
from specscope.train.distributed import spawn

SHAPES = [(24, 16), (24, 16), (24, 16), (16, 40), (8,)]
STEPS = 4


def _build():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = Hybrid(
        [
            {"params": [(f"w{i}.weight", params[i]) for i in (0, 1, 2)], "algorithm": "muon", "polar": "gram"},
            {"params": [("w3.weight", params[3])], "algorithm": "specgd", "lr": 0.05},
            {"params": [("b.bias", params[4])], "algorithm": "adamw", "lr": 1e-2},
        ],
        algorithm="muon", lr=0.02,
    )
    return params, opt


def _local_grads(step, rank, world):
    g = torch.Generator().manual_seed(100 * step + rank)
    grads = [torch.randn(s, generator=g) for s in SHAPES]
    if step == 2 and rank == 1:
        grads[1] = None  # a parameter unused on one rank: it must not desynchronise anything
    return grads


def _averaged_grads(step, world):
    per_rank = [_local_grads(step, r, world) for r in range(world)]
    out = []
    for i in range(len(SHAPES)):
        gs = [g[i] for g in per_rank]
        out.append(None if any(g is None for g in gs) else sum(gs) / world)
    return out


def _train(params, opt, world):
    for step in range(STEPS):
        for p, g in zip(params, _averaged_grads(step, world)):
            p.grad = g
        opt.step()


def _worker(rank, world, pool_min=None):
    torch.set_num_threads(1 if pool_min is None else 2)
    polar_module, threads = importlib.import_module("specscope.linalg.polar"), []
    if pool_min is not None:  # each owner's exact polar jobs on its one-thread workers, even at these sizes
        polar_module.POOL_MIN, job = pool_min, polar_module._gram_job
        polar_module._gram_job = lambda *a, **k: threads.append(threading.current_thread().name) or job(*a, **k)
    params, opt = _build()
    for step in range(STEPS):
        local = _local_grads(step, rank, world)
        for i, (p, g) in enumerate(zip(params, local)):  # DDP-like average
            if not (step == 2 and i == 1):
                dist.all_reduce(g)
                g /= world
            p.grad = g  # step 2: param 1 keeps a local grad on rank 0 and has none on rank 1
        opt.step()
    if pool_min is not None and rank == 0:  # rank 0 owns two of the three Muon matrices: one start for both
        assert any(name.startswith("specscope-worker") for name in threads), threads
    return [p.detach() for p in params]


@pytest.mark.parametrize("pool_min", [None, 1])  # one thread; two threads with the owners' jobs on workers
def test_two_ranks_match_each_other_and_single_process(pool_min):
    # results come back through train.distributed.spawn's queue: gloo's own teardown (which can abort a
    # finished worker with "terminate called without an active exception") cannot fail the comparison
    r0, r1 = spawn(_worker, 2, pool_min)
    params, opt = _build()
    _train(params, opt, 2)
    for a, b, c in zip(r0, r1, params):
        assert torch.equal(a, b)  # every matrix was computed once and broadcast: bitwise identical
        # float64 eigh on a slice vs on the full batch: equal up to float32 rounding of the result
        torch.testing.assert_close(a, c.detach(), rtol=0, atol=1e-6)


def _fewer_worker(rank, world):
    from specscope.optim import Muon

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3)]
    return _refusal(Muon(weights if rank == 0 else weights[:2], lr=0.02), weights)


def _refusal(opt, weights) -> str | None:
    """The ConfigError one step of `opt` raises on this rank (unit gradients), None if it steps."""
    from specscope.errors import ConfigError

    for w in weights:
        w.grad = torch.ones_like(w)
    try:
        opt.step()
    except ConfigError as e:
        return str(e)
    return None


def test_optimizers_of_different_parameters_on_the_ranks_are_refused_not_an_abort():
    """One rank's Muon over 3 weights, the other's over 2: the per-step agreement's all-reduce differed in size and
    gloo aborted both ranks (NCCL hangs)."""
    for message in spawn(_fewer_worker, 2, timeout=120):
        assert message is not None and "the ranks' optimizers hold different parameters" in message


def _other_options_worker(rank, world, option):
    from specscope.optim import Muon

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3)]
    settings = {"lr": 0.02} | ({option: {"lr": 0.05, "shardwise": True, "polar": "gram"}[option]} if rank == 1 else {})
    return _refusal(Muon(weights, **settings), weights)


@pytest.mark.parametrize("option", ["shardwise", "lr", "polar"])
def test_optimizers_of_different_options_on_the_ranks_are_refused_not_a_hang(option):
    """A shardwise=True on one rank skipped the collectives the other entered (a hang); another lr or polar stepped
    each matrix by its owner rank's setting, a mix of two configurations, in silence."""
    for message in spawn(_other_options_worker, 2, option, timeout=120):
        assert message is not None and "param groups of different options" in message
