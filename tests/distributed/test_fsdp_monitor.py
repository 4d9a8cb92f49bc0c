"""The Monitor under FSDP2 on 2 gloo processes: a non-finite gradient is handled as `nonfinite=` says (as in one process
and under DDP), and a mesh it cannot measure (HSDP's 2-D one) is one ConfigError naming what is supported."""

import warnings

import pytest
import torch

from specscope.errors import ConfigError, NonFiniteError
from specscope.probe import Monitor
from specscope.train import distributed as D

from _nets import batch, build


def _nan_on_rank_1(rank, world, nonfinite):
    """Two monitored steps; at step 1 rank 1's loss is NaN. Per rank: the error raised (type, text) or the records of
    l2 (12x16, wider than tall: its gradient is gathered, not summed by Gram) and l1, and the warnings."""
    model, _ = build(world)
    mon = Monitor(model, nonfinite=nonfinite)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for step in range(2):
                x, y = batch(step, rank, world)
                model.zero_grad()
                with mon.step(step):
                    loss = (model(x) - y).square().mean()
                    (loss * float("nan") if step == 1 and rank == 1 else loss).backward()
        except Exception as e:
            return type(e).__name__, str(e)
    recs = {(r.step, r.layer): (r.value, r.flag) for r in mon.pop_records() if r.metric == "nuclear_rank"}
    return recs, [str(w.message) for w in caught if "non-finite" in str(w.message)]


@pytest.mark.parametrize("nonfinite", ["skip", "warn"])
def test_a_nonfinite_sharded_gradient_is_recorded_as_nan_when_asked(nonfinite):
    """A gradient gathered to form its Gram (more columns than rows) raised linalg's ValueError ("gram: A has 192 NaN
    and 0 Inf entries") on every rank, whatever `nonfinite` said; the Gram-summed ones were recorded as NaN."""
    for recs, warned in D.spawn(_nan_on_rank_1, 2, nonfinite, timeout=120):
        assert isinstance(recs, dict), recs  # not an error
        for layer in ("l1", "l2"):
            value, flag = recs[(1, layer)]
            assert flag == "nonfinite" and value != value, layer
            assert recs[(0, layer)][1] == "" and recs[(0, layer)][0] > 0, layer
        assert bool(warned) == (nonfinite == "warn")


def test_a_nonfinite_sharded_gradient_raises_non_finite_error_naming_the_layer():
    for kind, message in D.spawn(_nan_on_rank_1, 2, "raise", timeout=120):
        assert kind == NonFiniteError.__name__ and "non-finite gradient of '" in message and "at step 1" in message


def _hsdp(rank, world):
    """A Monitor over a model sharded on a 2-D mesh (HSDP: replicated across the first dimension, sharded along the
    second), one step: the error raised and where (at the Monitor's construction, or at the step)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    fully_shard(model, mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard")))
    try:
        mon = Monitor(model)
    except Exception as e:
        return "built", type(e).__name__, str(e)
    try:
        with mon.step(0):
            model(torch.randn(4, 8)).square().mean().backward()
    except Exception as e:
        return "step", type(e).__name__, str(e)
    return None


def test_a_model_on_a_2d_mesh_is_refused_with_a_config_error_naming_what_is_supported():
    """HSDP's gradients are DTensors with placements (Replicate(), Shard(dim=0)): the first measured step raised a plain
    ValueError."""
    for got in D.spawn(_hsdp, 2, timeout=120):
        assert got is not None and got[1] == ConfigError.__name__, got
        assert "2-D device mesh" in got[2] and "1-D mesh" in got[2], got
