"""specscope.train.distributed.save and load in one process: a save before the first step leaves the training as it
was, and a checkpoint loaded into objects it does not fit is one clear error."""

import copy

import pytest
import torch

from specscope.errors import ConfigError
from specscope.optim import AutoGeometry, Muon
from specscope.probe import Monitor
from specscope.train import distributed as D


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3))


def _optimizer(kind, model, monitor):
    named = list(model.named_parameters())
    weights = [(n, p) for n, p in named if n.endswith("weight")]
    biases = {"params": [(n, p) for n, p in named if n.endswith("bias")], "algorithm": "adamw", "lr": 1e-2}
    if kind == "muon":
        return Muon([{"params": weights}, biases], lr=0.02, polar="gram")
    if kind == "auto":
        return AutoGeometry([{"params": weights}, biases], lr=0.05, monitor=monitor, hysteresis=0.5)
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(kind, save_first, tmp_path):
    model = _net()
    monitor = Monitor(model)
    opt = _optimizer(kind, model, monitor)
    if save_first:
        D.save(tmp_path / f"{kind}-initial", model, opt, monitor)
    records = []
    for step in range(3):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step))
        with monitor.step(step):
            model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        records += [(r.step, r.layer, r.metric, r.value) for r in getattr(opt, "pop_records", list)()]
    return {n: p.detach().clone() for n, p in model.named_parameters()}, records, copy.deepcopy(getattr(opt, "choices", None))


@pytest.mark.parametrize("kind", ["muon", "auto", "adamw"])
def test_a_save_before_the_first_step_changes_nothing_that_follows(kind, tmp_path):
    """torch's get_state_dict gives a never-stepped optimizer its state by a zero-gradient, lr=0 step: AdamW's step
    count shifted its bias correction (parameters off by 3.7e-3 after two steps), and AutoGeometry decided every
    layer from the zero gradient and recorded that step."""
    plain, saved = _train(kind, False, tmp_path), _train(kind, True, tmp_path)
    for name, p in plain[0].items():
        assert torch.equal(saved[0][name], p), name
    assert saved[1] == plain[1] and saved[2] == plain[2]


def test_a_checkpoint_loaded_into_objects_it_does_not_fit_is_one_clear_error(tmp_path):
    """torch's CheckpointException is a BaseException whose message names only the ranks; the cause was in the
    traceback."""
    model = _net()
    opt = _optimizer("adamw", model, None)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    D.save(tmp_path / "ck", model, opt)
    with pytest.raises(ConfigError, match=r"does not fit .*Missing key in checkpoint state_dict: monitor.*without a Monitor"):
        D.load(tmp_path / "ck", model, opt, Monitor(model))
    other = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 4))
    with pytest.raises(ConfigError, match=r"does not fit .*Size mismatch"):
        D.load(tmp_path / "ck", other, _optimizer("adamw", other, None))
