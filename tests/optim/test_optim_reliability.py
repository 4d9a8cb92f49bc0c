"""Non-finite gradients change nothing; state_dict round trip; N + save + load (new process) + N == 2N."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from specscope.errors import NonFiniteError
from specscope.optim import AutoGeometry, Hybrid, LowRankDecay, Muon, SpecGD, spectral_param_groups

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from specscope.optim import Muon, LowRankDecay, spectral_param_groups

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.LayerNorm(8))
        opt = Muon(spectral_param_groups(model, 0.02, 1e-3, exclude=("0.",)), polar="newton_schulz")
        decay = LowRankDecay([model[3].weight], lr=0.02, weight_decay=0.05)
        return model, opt, decay

    def train(model, opt, decay, start, n):
        for step in range(start, start + n):
            torch.manual_seed(1000 + step)  # batches are a function of the step
            x = torch.randint(0, 10, (32,))
            loss = model(x).square().mean()
            opt.zero_grad(); loss.backward(); opt.step(); decay.step()

    mode, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model, opt, decay = build()
    if mode == "first":  # 2N straight, then (fresh objects) N steps and a checkpoint
        train(model, opt, decay, 0, 2 * n)
        torch.save(model.state_dict(), path + ".straight")
        model, opt, decay = build()
        train(model, opt, decay, 0, n)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "decay": decay.state_dict()}, path + ".ckpt")
    else:  # a new process: load and train N more
        ck = torch.load(path + ".ckpt")
        model.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"]); decay.load_state_dict(ck["decay"])
        train(model, opt, decay, n, n)
        torch.save(model.state_dict(), path + ".second")
    """
)


def test_resume_in_new_process_is_bitwise(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    base = str(tmp_path / "run")
    for mode in ("first", "second"):
        subprocess.run([sys.executable, str(script), mode, base, "4"], check=True, timeout=120)
    straight, resumed = torch.load(base + ".straight"), torch.load(base + ".second")
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()["state"])


@pytest.mark.parametrize("algorithm", ["muon", "specgd", "auto"])
def test_non_finite_grad_raises_and_changes_nothing(tiny_model, algorithm):
    groups = spectral_param_groups(tiny_model, 0.02, 1e-3, algorithm=algorithm)
    opt = Hybrid(groups, algorithm=algorithm, lr=0.02, stable_rank=lambda layer: 2.0)
    for step in range(2):
        for p in tiny_model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    params, state = _snapshot(tiny_model, opt)
    for p in tiny_model.parameters():
        p.grad = torch.randn_like(p)
    tiny_model.norm.weight.grad[0] = float("nan")
    with pytest.raises(NonFiniteError, match="norm.weight"):
        opt.step()
    params2, state2 = _snapshot(tiny_model, opt)
    for k in params:
        assert torch.equal(params[k], params2[k]), k
    for i in state:
        for key, v in state[i].items():
            assert (torch.equal(v, state2[i][key]) if torch.is_tensor(v) else v == state2[i][key]), (i, key)


def test_state_dict_round_trip(tiny_model):
    opt = Muon(spectral_param_groups(tiny_model, 0.02, 1e-3), polar="gram")
    for p in tiny_model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    model2 = copy.deepcopy(tiny_model)
    opt2 = Muon(spectral_param_groups(model2, 0.5, 0.5), polar="gram")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["lr"] == 0.02
    for p, q in zip(tiny_model.parameters(), model2.parameters()):
        q.grad = p.grad.clone()
    opt.step()
    opt2.step()
    for p, q in zip(tiny_model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def _weights():
    return [("blocks.0.fc.weight", torch.nn.Parameter(torch.randn(8, 6)))]


@pytest.mark.parametrize("make, message", [
    (lambda: Muon(_weights(), lr=float("nan")), "lr=nan is not a finite number"),
    (lambda: Muon(_weights(), lr="0.02"), "lr='0.02' is not a finite number"),
    (lambda: Muon(_weights(), lr=-1.0), "lr must be >= 0, got -1.0"),
    (lambda: Muon(_weights(), momentum=1.5), r"momentum must be in \[0, 1\), got 1.5"),
    (lambda: Muon(_weights(), weight_decay=-1), "weight_decay must be >= 0, got -1"),
    (lambda: Hybrid(_weights(), lr=1e-3, betas=(0.9, 1.0)), r"betas=\(0.9, 1.0\): give two numbers in \[0, 1\)"),
    (lambda: SpecGD(_weights(), lr=0.1, momentum=float("inf")), "momentum=inf is not a finite number"),
    (lambda: AutoGeometry(_weights(), lr=0.1, monitor=lambda layer: 2.0, threshold=-1), "threshold must be a finite number > 0 .*, got -1"),
    (lambda: AutoGeometry(_weights(), lr=0.1, monitor=lambda layer: 2.0, hysteresis=1.0), r"hysteresis must be in \[0, 1\)"),
    (lambda: AutoGeometry(_weights(), lr=0.1), "AutoGeometry\\(monitor=None\\): pass the st\\(A\\) source"),
    (lambda: AutoGeometry(_weights(), lr=0.1, monitor=42), "AutoGeometry\\(monitor=42\\)"),
    (lambda: LowRankDecay([torch.nn.Parameter(torch.randn(4, 4))], lr=-1, weight_decay=0.1), "lr must be a finite number >= 0, got -1"),
    (lambda: LowRankDecay([torch.nn.Parameter(torch.randn(4, 4))], lr=0.1, weight_decay=0.1, polar_method="bogus"),
     "polar_method='bogus': modes 'polar' and 'elastic' take the exact polar factor"),
    (lambda: LowRankDecay([torch.nn.Parameter(torch.randn(4, 4))], lr=0.1, weight_decay=0.1, polar_method="newton_schulz"),
     r"use one of \('svd', 'gram'\)"),
    (lambda: Muon(_weights(), ns_steps="5"), "ns_steps must be an integer in 1..99, got '5'"),
    (lambda: Muon(_weights(), shardwise="no"), "shardwise must be True or False, got 'no'"),
    (lambda: SpecGD(_weights(), lr=0.1, momentum="0.9"), "momentum='0.9' is not a finite number"),
    (lambda: SpecGD(_weights(), lr=0.1, stable_rank=3.0), r"SpecGD\(stable_rank=3.0\): pass a probe Monitor"),
    (lambda: LowRankDecay([torch.nn.Parameter(torch.randn(4, 4))], lr=0.1, weight_decay=0.1, mode="ns", ns_steps=0),
     "ns_steps must be an integer in 1..99, got 0"),
    (lambda: LowRankDecay([torch.nn.Parameter(torch.randn(4, 4))], lr=0.1, weight_decay=0.1, ns_dtype="float32"),
     "ns_dtype='float32': pass a torch dtype"),
    (lambda: LowRankDecay([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "wieght_decay": 0.5}], lr=0.1, weight_decay=0.1),
     "'wieght_decay' is not an option; did you mean 'weight_decay'"),
])
def test_bad_hyperparameters_are_one_error_naming_the_value(make, message):
    from specscope.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        make()


def test_specgd_and_autogeometry_take_the_lrs_of_their_groups():
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    groups = spectral_param_groups(model, lr_spectral=0.05, lr_adamw=1e-3, algorithm="specgd")
    opt = SpecGD(groups)
    assert sorted(g["lr"] for g in opt.param_groups) == [1e-3, 0.05]
    model(torch.randn(4, 6)).square().sum().backward()
    opt.step()
    auto = AutoGeometry([{"params": list(model[0].parameters())[:1], "lr": 0.1}], monitor=lambda layer: 3.0)
    assert auto.param_groups[0]["lr"] == 0.1


def test_a_rejected_param_group_leaves_the_optimizer_as_it_was():
    """torch.optim appends a group before the checks run: a NaN lr that raised must not stay behind to write
    NaN into the weights on the next step."""
    from specscope.errors import ConfigError

    w, w2 = (torch.nn.Parameter(torch.randn(8, 6)) for _ in range(2))
    v = torch.nn.Parameter(torch.randn(6))
    for opt, bad in ((Muon([w], lr=0.02), {"params": [w2], "lr": float("nan")}),
                     (Muon([w], lr=0.02), {"params": [v], "lr": 0.02}),  # a vector in a spectral group
                     (Hybrid([w], lr=1e-3), {"params": [w2], "lr": 1e-3, "betas": (1.5, 0.9)}),
                     (LowRankDecay([w], lr=0.1, weight_decay=0.1), {"params": [w2], "lr": -1.0})):
        with pytest.raises(ConfigError):
            opt.add_param_group(bad)
        assert len(opt.param_groups) == 1
        for p in (w, w2, v):
            p.grad = torch.randn_like(p)
        opt.step()
        assert torch.isfinite(w).all()


def test_an_auto_group_without_a_source_of_st_refuses_to_start():
    """Without st(A) every layer would read st = 1 and "auto" would always choose spectral."""
    from specscope.errors import ConfigError
    from specscope.integrations.common import spectral_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with pytest.raises(ConfigError, match=r"Hybrid\(stable_rank=None\): pass the st\(A\) source"):
        Hybrid(spectral_param_groups(model, lr_spectral=0.05, lr_adamw=1e-3, algorithm="auto"))
    with pytest.raises(ConfigError, match="algorithm='auto' chooses each layer's geometry by its measured st.A.: pass monitor="):
        spectral_optimizer(model, algorithm="auto")
    opt = spectral_optimizer(model, algorithm="auto", monitor=lambda layer: 3.0)  # with one: starts
    assert {g["algorithm"] for g in opt.param_groups} == {"auto", "adamw"}


@pytest.mark.parametrize("algorithm", ["muon", "specgd", "adamw", "auto", "sgd", "LowRankDecay"])
def test_zero_size_parameters_are_left_alone_as_torch_leaves_them(algorithm):
    """A zero-size weight (a layer of width 0, an empty conv kernel) crashed the step (ZeroDivisionError,
    reshape(0, -1)); torch.optim.AdamW steps past it. The others still step."""
    empty = [nn.Parameter(torch.randn(*s)) for s in ((5, 0), (4, 0, 3, 3), (0, 3, 3, 3))]
    full = nn.Parameter(torch.randn(6, 4))
    for p in (*empty, full):
        p.grad = torch.ones_like(p)
    named = [("w", full), *((f"e{i}", p) for i, p in enumerate(empty))]
    if algorithm == "LowRankDecay":
        opt = LowRankDecay([p for _, p in named], lr=0.01, weight_decay=0.1)
    else:
        opt = Hybrid(named, algorithm=algorithm, lr=0.01,
                     **({"stable_rank": lambda layer: 2.0} if algorithm in ("auto", "specgd") else {}))
    before = full.detach().clone()
    opt.step()
    assert not torch.equal(full, before) and all(p.numel() == 0 for p in empty)


def test_a_sparse_gradient_is_named_before_anything_reads_it():
    """It died inside torch._foreach_norm (a backend NotImplementedError) before the intended message."""
    from specscope.errors import ConfigError

    emb = nn.Embedding(10, 4, sparse=True)
    opt = Hybrid([{"params": emb.parameters(), "algorithm": "adamw", "lr": 0.1}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ConfigError, match="parameter 'param0' has a sparse gradient"):
        opt.step()


def _linear_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


@pytest.mark.parametrize("options, message", [
    ({"euclidean": "adam"}, "euclidean='adam' is unknown"),
    ({"every": 0}, "every must be an integer >= 1"),
    ({"every": 1.5}, "every must be an integer >= 1"),
    ({"threshold": 0.0}, "threshold must be a finite number > 0"),
    ({"token_dim": "rows"}, "token_dim must be None or the integer axis"),
])
def test_auto_options_given_in_a_group_are_checked_as_the_constructor_checks_them(options, message):
    """The documented route puts AutoGeometry's options in a param group (spectral_param_groups(..., algorithm="auto")):
    a misspelt euclidean="adam" used to train with plain SGD and every=0 to fail at the first step."""
    from specscope.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        Hybrid(spectral_param_groups(_linear_model(), 1e-2, 1e-3, algorithm="auto", **options), stable_rank=lambda layer: 4.0)


def test_specgd_nesterov_without_momentum_is_refused_in_a_group_too():
    from specscope.errors import ConfigError

    with pytest.raises(ConfigError, match="nesterov=True needs momentum > 0"):
        Hybrid(spectral_param_groups(_linear_model(), 1e-2, 1e-3, algorithm="specgd", nesterov=True))


def test_records_nobody_pops_are_bounded(monkeypatch):
    from specscope.optim import hybrid

    monkeypatch.setattr(hybrid, "MAX_UNPOPPED_RECORDS", 50)
    model = _linear_model()
    opt = AutoGeometry(spectral_param_groups(model, 1e-2, 1e-3, algorithm="auto"), monitor=lambda layer: 4.0)
    with pytest.warns(UserWarning, match="records were not popped; keeping the newest 50"):
        for _ in range(20):  # 2 weights × 3 records per step
            model(torch.randn(8, 16)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    records = opt.pop_records()
    assert len(records) == 50 and records[-1].step == 19 and records[0].step > 0


def test_a_torch_muon_state_loads_into_muon_and_steps_like_it():
    """torch.optim.Muon's state_dict has no algorithm / polar keys: they come from the loading optimizer."""
    torch.manual_seed(0)
    W = [nn.Parameter(torch.randn(8, 6)) for _ in range(2)]
    ref = torch.optim.Muon(W, lr=0.02)
    for _ in range(2):
        for w in W:
            w.grad = torch.randn_like(w)
        ref.step()
    mine = Muon([nn.Parameter(w.detach().clone()) for w in W], lr=0.5, polar="newton_schulz")
    mine.load_state_dict(copy.deepcopy(ref.state_dict()))  # as from a checkpoint file: no buffer shared with ref
    assert mine.param_groups[0]["lr"] == 0.02 and mine.param_groups[0]["algorithm"] == "muon"
    g = [torch.randn_like(w) for w in W]
    for w, p, gi in zip(W, mine.param_groups[0]["params"], g):
        w.grad, p.grad = gi.clone(), gi.clone()
    ref.step()
    mine.step()
    for w, p in zip(W, mine.param_groups[0]["params"]):
        assert torch.equal(w, p)  # newton_schulz reproduces torch's step bit for bit, from the loaded momentum


def _my_polar(X):
    from specscope import linalg

    return linalg.polar(X, method="svd")


def test_a_callable_polar_checkpoint_loads_with_weights_only(tmp_path):
    """A function in the state_dict made the checkpoint unloadable with weights_only=True (the HF Trainer's load)."""
    from specscope.errors import ConfigError

    model = _linear_model()
    opt = Muon(spectral_param_groups(model, 1e-2, 1e-3), polar=_my_polar)
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    again = Muon(spectral_param_groups(_linear_model(), 1e-2, 1e-3), polar=_my_polar)
    again.load_state_dict(state)
    assert again.param_groups[0]["polar"] is _my_polar
    with pytest.raises(ConfigError, match="saved with a callable polar=; build the optimizer with the same callable"):
        Muon(spectral_param_groups(_linear_model(), 1e-2, 1e-3)).load_state_dict(state)


def test_stacked_expert_weights_routed_to_adamw_are_named():
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(8, 8)
            self.gate_up_proj = nn.Parameter(torch.randn(4, 16, 8))  # [experts, out, in]
            self.pos = nn.Parameter(torch.zeros(1, 10, 8))            # a position table: no warning for it

    with pytest.warns(UserWarning, match=r"1 parameter\(s\) of ≥ 3 dims .* 'gate_up_proj' \(4, 16, 8\)"):
        groups = spectral_param_groups(Experts(), 1e-2, 1e-3)
    assert [n for g in groups if g["algorithm"] == "adamw" for n, _ in g["params"]] == ["gate_up_proj", "pos", "up.bias"]
