"""Hybrid groups: routing, the routing error, AdamW/SGD groups equal to torch's, per-group schedules."""

import pytest
import torch

from specscope.errors import ConfigError
from specscope.optim import Hybrid, Muon, SpecGD, spectral_param_groups


def test_spectral_param_groups_routes_hidden_matrices(tiny_model):
    groups = spectral_param_groups(tiny_model, lr_spectral=0.02, lr_adamw=3e-4)
    names = {g["algorithm"]: sorted(n for n, _ in g["params"]) for g in groups}
    assert names["muon"] == ["conv.weight", "down.weight", "up.weight"]
    assert names["adamw"] == ["embed.weight", "lm_head.weight", "norm.bias", "norm.weight", "up.bias"]
    opt = Muon(groups)
    assert [g["algorithm"] for g in opt.param_groups] == ["muon", "adamw"]
    assert opt.param_groups[1]["eps"] == 1e-8  # AdamW's eps, not Muon's 1e-7


@pytest.mark.parametrize("name", ["embed.weight", "lm_head.weight", "up.bias", "norm.weight"])
def test_non_hidden_in_spectral_group_raises_with_fix(tiny_model, name):
    p = dict(tiny_model.named_parameters())[name]
    with pytest.raises(ConfigError, match="algorithm='adamw'") as e:
        Muon([(name, p)], lr=0.02)
    assert name in str(e.value)


def test_unnamed_embedding_is_caught_by_mark(tiny_model):
    spectral_param_groups(tiny_model, 0.02, 3e-4)  # marks nn.Embedding weights
    with pytest.raises(ConfigError):
        SpecGD([tiny_model.embed.weight], lr=0.1)


def test_foreign_group_needs_lr(tiny_model):
    with pytest.raises(ConfigError, match="lr"):
        Muon([{"params": [tiny_model.up.weight]}, {"params": [tiny_model.up.bias], "algorithm": "adamw"}], lr=0.02)


def _steps(params, opt, steps=5):
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


def test_adamw_group_matches_torch_adamw():
    torch.manual_seed(0)
    w = [torch.randn(7, 5), torch.randn(5)]
    a = [torch.nn.Parameter(x.clone()) for x in w]
    b = [torch.nn.Parameter(x.clone()) for x in w]
    kw = dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    ours = _steps(a, Hybrid([{"params": a, "algorithm": "adamw", **kw}]))
    theirs = _steps(b, torch.optim.AdamW(b, foreach=False, **kw))
    for x, y in zip(ours, theirs):  # same formulas; only the order of one division differs (float32 ulps)
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_sgd_group_matches_torch_sgd():
    a = [torch.nn.Parameter(torch.ones(4, 3))]
    b = [torch.nn.Parameter(torch.ones(4, 3))]
    ours = _steps(a, Hybrid(a, algorithm="sgd", lr=0.1, momentum=0.9, nesterov=True))
    theirs = _steps(b, torch.optim.SGD(b, lr=0.1, momentum=0.9, nesterov=True, foreach=False))
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-6)


def test_each_group_has_its_own_schedule(tiny_model):
    opt = Muon(spectral_param_groups(tiny_model, 0.02, 3e-4))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5**s, lambda s: 1.0])
    for p in tiny_model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01) and opt.param_groups[1]["lr"] == pytest.approx(3e-4)
    before = tiny_model.up.weight.detach().clone()
    opt.step()  # Muon moves the weight by lr·(1·wd·W + polar) with the scheduled lr
    assert not torch.equal(before, tiny_model.up.weight)
