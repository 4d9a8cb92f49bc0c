"""Two gloo processes on halves of a batch record the same numbers as one process on the whole batch, also when one
process's share of a step is empty."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from specscope import linalg as L
from specscope.errors import ConfigError
from specscope.probe import Monitor
from specscope.train.distributed import spawn

STEPS = 3
VARIANTS = [(est, ddp) for est in ("power", "gram") for ddp in (True, False)]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1, groups=3)  # st(A) per group: each group's statistics reduced
        self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))

    def forward(self, ids):
        h = self.emb(ids)
        return self.net(h + self.conv(h.transpose(1, 2)).transpose(1, 2))


def run(rank: int, world: int, estimator: str, ddp: bool, empty_at: int | None = None) -> list[tuple]:
    """STEPS of SGD on rows [rank/world, (rank+1)/world) of each global batch of 8 sequences; at step `empty_at` the
    last rank's share is empty and the first rank takes the whole batch (uneven data, a short last batch)."""
    model = Net()
    wrapped = nn.parallel.DistributedDataParallel(model) if ddp and world > 1 else model
    mon = Monitor(wrapped, estimator=estimator)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        ids, y = torch.randint(0, 10, (8, 3), generator=g), torch.randn(8, 3, 3, generator=g)
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        if step == empty_at:
            rows = slice(0, 8) if rank == 0 else slice(0, 0)
        opt.zero_grad()
        with mon.step(step):
            # the global batch's mean loss once gradients are averaged over ranks, whatever each rank's share
            ((wrapped(ids[rows]) - y[rows]).square().sum() * world / y.numel()).backward()
        if world > 1 and not ddp:  # plain data parallelism by hand: the probe reduces its own copy
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        out += [(r.step, r.layer, r.metric, r.value, r.rows, r.estimator) for r in mon.pop_records()]
    return out


def worker(rank, world):
    return {v: run(rank, world, *v) for v in VARIANTS} | {("empty", v): run(rank, world, *v, empty_at=1) for v in VARIANTS}


def test_two_gloo_ranks_match_one_process():
    # results come back through train.distributed.spawn's queue, not exit codes: gloo's own teardown can
    # abort a finished worker ("terminate called without an active exception") after its results are in
    results = spawn(worker, 2, timeout=240)
    for v in VARIANTS + [("empty", v) for v in VARIANTS]:
        # a rank with an empty batch measured nothing and skipped the reduction the other rank waited in
        single = run(0, 1, *v[1]) if v[0] == "empty" else run(0, 1, *v)
        assert results[0][v] == results[1][v], v  # every rank records the same numbers
        assert len(results[0][v]) == len(single) > 0
        for a, b in zip(results[0][v], single):
            assert a[:3] == b[:3] and a[4:] == b[4:], (v, a, b)
            # sums in a different order: float32 rounding, amplified a little by power iteration
            assert a[3] == pytest.approx(b[3], rel=1e-4), (v, a, b)


class Routed(nn.Module):
    """`b` multiplies only when asked: an expert no token of one rank's batch was routed to."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, use_b: bool):
        h = self.a(x)
        return self.b(h) if use_b else h


def routed_worker(rank, world):
    model = Routed()
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    mon = Monitor(ddp)
    out = []
    for step in range(2):  # step 0: only rank 0 uses b (rank 1 has no statistics for it yet); step 1: both do
        with mon.step(step):
            ddp(torch.randn(5, 4, generator=torch.Generator().manual_seed(10 * step + rank)), use_b=rank == 0 or step == 1).sum().backward()
        out += [(r.step, r.layer, r.metric, r.value, r.flag) for r in mon.pop_records() if r.metric in ("stable_rank", "unmeasured")]
    return out


def test_a_weight_one_rank_has_not_used_yet_is_unmeasured_on_every_rank_not_a_hang():
    """Rank 1 left `b` out of its reduction while rank 0 put its Gram in: the ranks hung in the all-reduce."""
    results = spawn(routed_worker, 2, timeout=120)
    assert results[0] == results[1]
    assert any("used on some ranks only so far" in flag for *_, metric, _, flag in results[0] if metric == "unmeasured")
    unmeasured = {(step, layer) for step, layer, metric, _, _ in results[0] if metric == "unmeasured"}
    measured = {(step, layer) for step, layer, metric, _, _ in results[0] if metric == "stable_rank"}
    assert unmeasured == {(0, "b")} and measured == {(0, "a"), (1, "a"), (1, "b")}


def skipping_worker(rank, world):
    model = Routed()
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    mon = Monitor(ddp)
    out = []
    for step in range(3):  # b on both ranks, then on rank 0 only, then on both again
        with mon.step(step):
            ddp(torch.randn(5, 4, generator=torch.Generator().manual_seed(10 * step + rank)), use_b=rank == 0 or step != 1).sum().backward()
        out += [(r.step, r.layer, r.metric, r.value, r.flag) for r in mon.pop_records() if r.metric in ("stable_rank", "unmeasured")]
    return out


def test_a_weight_one_rank_skips_after_using_it_is_unmeasured_that_step_not_a_crash():
    """Rank 1 used `b` at step 0 and skipped it at step 1 (a task head its batch did not need): its emptied statistics
    went into the all-reduce as None and the step raised AttributeError on that rank. Now b is unmeasured at step 1
    on every rank and measured again at step 2."""
    results = spawn(skipping_worker, 2, timeout=120)
    assert results[0] == results[1]
    unmeasured = {(step, layer) for step, layer, metric, _, _ in results[0] if metric == "unmeasured"}
    measured = {(step, layer) for step, layer, metric, _, _ in results[0] if metric == "stable_rank"}
    assert unmeasured == {(1, "b")} and measured == {(0, "a"), (0, "b"), (1, "a"), (2, "a"), (2, "b")}


def plain_routed_worker(rank, world, frozen_on_rank_1=False):
    """Routed without DDP (the probe averages the gradients itself): rank 1 skips b at step 0, so it has no b.grad."""
    model = Routed()
    if frozen_on_rank_1 and rank == 1:
        model.b.weight.requires_grad_(False)
    mon = Monitor(model)
    out = []
    for step in range(2):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(10 * step + rank))
        with mon.step(step):
            model(x, use_b=rank == 0 or step == 1).sum().backward()
        out += [(r.step, r.layer, r.metric, r.value, r.flag) for r in mon.pop_records() if r.metric in ("nuclear_rank", "unmeasured")]
        model.zero_grad()
    return out, (model.b.weight.grad is None)


def test_a_weight_without_a_gradient_on_one_rank_is_averaged_as_zero_there_not_an_abort():
    """Without DDP each rank all-reduced the gradients it had: rank 1 had no b.grad, the sizes differed and gloo
    aborted the processes (NCCL hangs). Every rank now reduces the weights any rank has a gradient of, its own zero
    where it has none, as DDP's mean does: b's nr(G) is that of rank 0's gradient / 2, the same on both ranks."""
    results = spawn(plain_routed_worker, 2, timeout=120)
    (r0, _), (r1, _) = results
    assert r0 == r1
    nr = {(step, layer): value for step, layer, metric, value, _ in r0 if metric == "nuclear_rank"}
    assert set(nr) == {(0, "a"), (0, "b"), (1, "a"), (1, "b")}
    torch.manual_seed(0)
    alone = Routed()  # rank 0's step 0 in one process: b's gradient halved has the same nuclear rank
    alone(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), use_b=True).sum().backward()
    assert nr[(0, "b")] == pytest.approx(float(L.nuclear_rank(alone.b.weight.grad.double() / 2)), rel=1e-6)


def frozen_worker(rank, world):
    try:
        plain_routed_worker(rank, world, frozen_on_rank_1=True)
    except ConfigError as e:
        return str(e)
    return None


def test_monitors_of_different_weights_on_the_ranks_are_refused_not_a_hang():
    """A weight frozen on one rank before its Monitor was made left it out there: the ranks' reductions differed in
    size and both hung until the spawn timeout. The first measured step now refuses it on every rank."""
    messages = spawn(frozen_worker, 2, timeout=120)
    assert all(m is not None and "the ranks measure different weights" in m for m in messages)


def _settings_worker(rank, world):
    out = {}
    for what, options in (("every", dict(every=1 if rank == 0 else 2)), ("estimator", dict(estimator="gram" if rank == 0 else "power")),
                          ("grad_gram_dtype", dict(grad_gram_dtype=torch.float64 if rank == 0 else torch.float32))):
        model = Net()
        mon = Monitor(nn.parallel.DistributedDataParallel(model), **options)
        try:
            for step in range(2):
                with mon.step(step):
                    model(torch.randint(0, 10, (4, 3))).sum().backward()
            out[what] = None
        except ConfigError as e:
            out[what] = str(e)
    return out


def test_monitors_set_up_differently_on_the_ranks_are_refused_not_an_abort():
    """every=1 on one rank and 2 on the other (or gram against power) aborted gloo (NCCL hangs): one rank reduced
    statistics the other never did."""
    for got in spawn(_settings_worker, 2, timeout=120):
        for what in ("every", "estimator", "grad_gram_dtype"):  # the gradients' Grams are reduced in grad_gram_dtype
            assert got[what] is not None and "the ranks' Monitors are set up differently" in got[what], (what, got)


class TwoOfAWidth(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def empty_share_run(rank: int, world: int) -> list[tuple]:
    model = TwoOfAWidth()
    mon = Monitor(model)
    out = []
    for step in range(2):  # step 0: rank 1's share of the batch is empty
        x = torch.randn(8, 8, generator=torch.Generator().manual_seed(step))
        rows = slice(0, 8) if world == 1 or (step == 0 and rank == 0) else slice(0, 0) if step == 0 else slice(rank * 4, rank * 4 + 4)
        with mon.step(step):
            (model(x[rows]).square().sum() * world).backward()
        out += [(r.step, r.layer, r.metric, r.value, r.rows) for r in mon.pop_records() if r.metric == "stable_rank"]
        model.zero_grad()
    return out


def test_a_rank_with_an_empty_share_records_each_weight_of_one_width_as_its_own():
    """Two weights of one input width and a rank whose share is empty: the empty inputs had one key (the same pointer,
    shape and version), so that rank solved them as one shared input and recorded a's st(A) for b too."""
    results = spawn(_empty_share_worker, 2, timeout=120)
    single = empty_share_run(0, 1)
    assert results[0] == results[1]
    for a, b in zip(results[0], single):
        assert a[:3] == b[:3] and a[4] == b[4] and a[3] == pytest.approx(b[3], rel=1e-4), (a, b)


def _empty_share_worker(rank, world):
    return empty_share_run(rank, world)


def _attention_run(rank, world, estimator):
    """Self-attention called with three views of one input, x[:] each (q is not k): the rank whose share is empty
    gave each empty view a key of its own, so in_proj's q/k/v blocks read as three inputs there ("output blocks …
    multiply different inputs") while the other rank measured it; with `power` gloo aborted."""
    torch.manual_seed(0)
    att = nn.MultiheadAttention(16, 2, batch_first=True)
    run = nn.parallel.DistributedDataParallel(att) if world > 1 else att
    mon = Monitor(att, estimator=estimator)
    x = torch.randn(6, 1, 16)[: 6 if rank == 0 else 0]
    with mon.step(0):
        run(x[:], x[:], x[:])[0].sum().backward()
    return dict(mon.unmeasured), [(r.layer, r.value, r.rows) for r in mon.pop_records() if r.metric == "stable_rank"]


def _attention_worker(rank, world):
    return {est: _attention_run(rank, world, est) for est in ("gram", "power")}


def test_views_of_an_empty_share_pair_as_views_of_a_full_one_do():
    results = spawn(_attention_worker, 2, timeout=120)
    for est in ("gram", "power"):
        single = _attention_run(0, 1, est)
        assert results[0][est] == results[1][est] and not single[0] and not results[0][est][0], est
        assert [(a[0], a[2]) for a in results[0][est][1]] == [(a[0], a[2]) for a in single[1]]
        for a, b in zip(results[0][est][1], single[1]):
            assert a[1] == pytest.approx(b[1], rel=1e-4), (est, a, b)
