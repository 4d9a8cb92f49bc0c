"""Hybrid groups: routing, the routing error, AdamW/SGD groups equal to torch's, per-group schedules."""

import pytest
import torch
from torch import nn

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


def test_sgd_group_weight_decay_is_decoupled_as_documented():
    """SGDW: p <- p·(1 − lr·wd) − lr·d with torch.optim.SGD's Nesterov momentum d (not wd·p in the gradient)."""
    a = [torch.nn.Parameter(torch.ones(4, 3))]
    ours = _steps(a, Hybrid(a, algorithm="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05))
    p, buf, g = torch.ones(4, 3), None, torch.Generator().manual_seed(3)
    for _ in range(5):
        grad = torch.randn(p.shape, generator=g)
        buf = grad.clone() if buf is None else buf * 0.9 + grad
        p = p * (1 - 0.1 * 0.05) - 0.1 * (grad + 0.9 * buf)
    torch.testing.assert_close(ours[0], p, rtol=0, atol=1e-6)


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


def test_roles_of_a_monitor_route_a_compiled_or_ddp_wrapped_model():
    """The Monitor names weights without torch.compile's `_orig_mod.` / DDP's `module.`; its head must still
    leave the spectral group of the wrapped model, and the groups name weights as the Monitor does."""
    import torch.nn.functional as F

    from specscope.probe import Monitor

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    monitor = Monitor(m, every=1)
    with monitor.step(0):
        F.cross_entropy(m(torch.randn(16, 8)), torch.randint(0, 3, (16,))).backward()
    assert monitor.roles["4"] == "head"
    compiled = spectral_param_groups(torch.compile(m), 0.02, 3e-4, roles=monitor)
    assert [n for n, _ in compiled[0]["params"]] == ["0.weight", "2.weight"]  # the Monitor's names: SpecGD/auto ask it by them
    assert [n for n, _ in spectral_param_groups(_Wrapped(m), 0.02, 3e-4, roles=monitor)[0]["params"]] == [
        "0.weight", "2.weight"]


class _Wrapped(nn.parallel.DistributedDataParallel):
    """DDP's naming (`module.`) without a process group: routing only reads the names."""

    def __init__(self, module):
        nn.Module.__init__(self)
        self.module = module


@pytest.mark.parametrize("kwargs, message", [
    (dict(exclude=["cls.*"]), r"exclude patterns \['cls.\*'\] match no parameter"),
    (dict(roles="monitor"), r"roles='monitor': pass a probe Monitor .* or a dict"),
    (dict(roles=["4"]), r"roles=\['4'\]: pass a probe Monitor"),
    (dict(lr_adamw="3e-4"), r"lr_adamw='3e-4' must be a finite number >= 0"),
    (dict(lr_spectral=None), r"lr_spectral=None must be a finite number >= 0"),
    (dict(adamw_weight_decay=-0.1), r"adamw_weight_decay=-0.1 must be a finite number >= 0"),
    (dict(roles={"4x": "head"}), r"roles: '4x' is not a parameter or layer of the model; did you mean '4'"),
    (dict(roles={"4": "output"}), r"roles\['4'\] = 'output' is not a role; use one of"),
    (dict(momentm=0.5), r"'momentm' is not an option of algorithm='muon'; did you mean 'momentum'"),
])
def test_routing_options_that_match_nothing_are_one_error(kwargs, message):
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    with pytest.raises(ConfigError, match=message):
        spectral_param_groups(m, **{"lr_spectral": 0.02, "lr_adamw": 3e-4, **kwargs})


def test_a_model_is_what_routing_and_the_st_source_take():
    from specscope.optim import AutoGeometry

    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    with pytest.raises(ConfigError, match="pass the model \\(an nn.Module\\), not generator"):
        spectral_param_groups(m.parameters(), 0.02, 3e-4)
    with pytest.raises(ConfigError, match=r"AutoGeometry\(monitor=Sequential\): that is a model, not a source of st\(A\)"):
        AutoGeometry(m.named_parameters(), lr=0.1, monitor=m)


@pytest.mark.parametrize("group, message", [
    ({"algorithm": "adamw", "lr": 0.1, "maximize": True}, "'maximize' is not an option of algorithm='adamw'"),
    ({"algorithm": "adamw", "lr": 0.1, "amsgrad": True}, "'amsgrad' is not an option of algorithm='adamw'"),
    ({"momentun": 0.5}, "'momentun' is not an option of algorithm='muon'; did you mean 'momentum'"),
])
def test_a_param_group_key_that_would_be_ignored_is_an_error(group, message):
    """A typo or a torch.optim option no algorithm here implements was stored and ignored (ascent ran as descent);
    other keys — a group's name, what a scheduler reads — stay, as in torch.optim."""
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ConfigError, match=message):
        Muon([{"params": [w], **group}], lr=0.02)
    opt = Muon([{"params": [w], "name": "hidden", "initial_lr": 0.02}], lr=0.02)
    assert opt.param_groups[0]["name"] == "hidden"


def test_exclude_takes_globs_and_module_prefixes_not_substrings():
    m = nn.Sequential(*[nn.Linear(8, 8) for _ in range(12)])
    spectral = lambda pats: [n for n, _ in spectral_param_groups(m, 0.02, 3e-4, exclude=pats)[0]["params"]]  # noqa: E731
    assert "10.weight" in spectral(["1"]) and "1.weight" not in spectral(["1"])  # "1" is module 1, not 10 and 11
    assert spectral(["1*"]) == [f"{i}.weight" for i in (0, 2, 3, 4, 5, 6, 7, 8, 9)]
    assert "0.weight" not in spectral(["0."])


def test_a_misspelt_hybrid_option_is_an_error_not_a_stored_key():
    with pytest.raises(ConfigError, match="'momentm' is not an option of algorithm='muon'; did you mean 'momentum'"):
        Hybrid([nn.Parameter(torch.randn(4, 4))], algorithm="muon", lr=0.02, momentm=0.5)


def test_compile_of_ddp_unwraps_as_ddp_of_compile():
    import torch.nn.functional as F

    from specscope.probe import Monitor

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    monitor = Monitor(torch.compile(_Wrapped(m)), every=1)
    assert monitor.layers == ["0", "2", "4"]  # no `_orig_mod.module.` in the names
    with monitor.step(0):
        F.cross_entropy(m(torch.randn(16, 8)), torch.randint(0, 3, (16,))).backward()
    groups = spectral_param_groups(torch.compile(_Wrapped(m)), 0.02, 3e-4, roles=monitor, exclude=["0"])
    assert [n for n, _ in groups[0]["params"]] == ["2.weight"]  # the Monitor's names, wrapped or not


def test_a_models_own_base_model_attribute_is_no_transformers_backbone():
    """Only a transformers model's `base_model` splits off a task head; any module with that attribute did."""
    class WithBase(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_model = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
            self.proj1, self.proj2 = nn.Linear(32, 64), nn.Linear(64, 64)

    names = [n for n, _ in spectral_param_groups(WithBase(), 0.02, 3e-4)[0]["params"]]
    assert names == ["base_model.0.weight", "proj1.weight", "proj2.weight"]


@pytest.mark.parametrize("options, message", [
    (dict(ns_steps=1000), "ns_steps must be an integer in 1..99"),
    (dict(ns_steps=2.5), "ns_steps must be an integer in 1..99"),
    (dict(nesterov="yes"), "nesterov must be True or False"),
    (dict(adjust_lr_fn="bogus"), "adjust_lr_fn='bogus' is unknown"),
    (dict(lr=5.0), "pass the spectral group's lr as lr_spectral"),
])
def test_option_values_passed_through_are_checked_as_the_constructor_checks_them(options, message):
    from specscope.integrations import spectral_optimizer

    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    with pytest.raises(ConfigError, match=message):
        spectral_optimizer(m, **options)


def test_a_tied_weight_is_known_by_each_of_its_names():
    emb = nn.Embedding(16, 8)
    head = nn.Linear(8, 16, bias=False)
    head.weight = emb.weight
    m = nn.ModuleDict({"emb": emb, "mid": nn.Linear(8, 8), "head": head})
    for kwargs in (dict(roles={"head": "head"}), dict(exclude=["head"]), dict(exclude=["head.weight"])):
        assert [n for n, _ in spectral_param_groups(m, 0.02, 3e-4, **kwargs)[0]["params"]] == ["mid.weight"]
    with pytest.raises(ConfigError, match=r"give a list of patterns, e.g. exclude=\['mid'\]"):
        spectral_param_groups(m, 0.02, 3e-4, exclude="mid")


def test_spectral_param_groups_of_a_frozen_model_names_the_cause():
    """Hybrid(spectral_param_groups(frozen)) raised torch's "optimizer got an empty parameter list"."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).requires_grad_(False)
    with pytest.raises(ConfigError, match="Sequential has no trainable parameter.*requires_grad_"):
        spectral_param_groups(model, 0.02, 3e-4)
    model[0].requires_grad_(True)
    assert [len(g["params"]) for g in spectral_param_groups(model, 0.02, 3e-4)] == [1, 1]


@pytest.mark.parametrize("group", [
    {"allow_non_hidden": True},  # the override the routing error offers admits embeddings and heads, not vectors
    {"algorithm": "auto", "token_dim": 0},  # an embedding group of AutoGeometry
])
@pytest.mark.parametrize("shape", [(4,), ()])
def test_a_vector_in_a_spectral_group_is_refused_when_the_group_is_made(group, shape):
    """A 1-D or 0-D parameter has no polar factor: with allow_non_hidden=True (or token_dim) it passed the routing check
    and the first step failed with an IndexError inside as_matrix; torch.optim.Muon refuses it up front too."""
    b = nn.Parameter(torch.randn(shape))
    with pytest.raises(ConfigError, match=r"'blk\.bias'.*algorithm='adamw'"):
        Hybrid([{"params": [("blk.bias", b)], "algorithm": "muon", "lr": 0.02, **group}], stable_rank=lambda layer: 2.0)
