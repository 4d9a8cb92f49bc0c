"""Non-finite gradients change nothing; state_dict round trip; N + save + load (new process) + N == 2N."""

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

from specscope.errors import ConfigError, NonFiniteError
from specscope.optim import AutoGeometry, Hybrid, L1ToL2, LowRankDecay, Muon, SpecGD, spectral_param_groups
from specscope.probe import Monitor

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


@pytest.mark.parametrize("saved, loaded", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                           (torch.bfloat16, torch.float64), (torch.float32, torch.bfloat16)])
def test_a_state_loads_into_parameters_of_another_dtype_in_the_dtype_a_step_keeps(saved, loaded):
    """Each buffer in the dtype a step keeps it in — the parameter's, float32 for bf16 — converted from the saved
    values: restoring the saved dtype crashed the next AdamW step (float32 moments of float64 parameters) or kept a
    float32 momentum for float64 weights."""
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(8, 16, dtype=saved)), nn.Parameter(torch.randn(16, dtype=saved))

    def make(w, b):
        return Muon([{"params": [w]}, {"params": [b], "algorithm": "adamw", "lr": 1e-3}], lr=0.02)

    opt = make(w, b)
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()
    w2, b2 = nn.Parameter(w.detach().to(loaded)), nn.Parameter(b.detach().to(loaded))
    opt2 = make(w2, b2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    want = torch.float32 if loaded == torch.bfloat16 else loaded
    for p, buffers in ((w2, ("momentum_buffer",)), (b2, ("exp_avg", "exp_avg_sq"))):
        for k in buffers:
            before = opt.state[w if p is w2 else b][k]
            assert opt2.state[p][k].dtype == want and torch.equal(opt2.state[p][k], before.to(want)), k
    w2.grad, b2.grad = torch.randn_like(w2), torch.randn_like(b2)
    opt2.step()
    assert w2.dtype == loaded and opt2.state[w2]["momentum_buffer"].dtype == want and torch.isfinite(w2).all()


def test_a_torch_muon_state_of_bf16_parameters_loads_as_float32_momentum():
    w = nn.Parameter(torch.randn(8, 16).bfloat16())
    ref = torch.optim.Muon([w], lr=0.02)
    w.grad = torch.randn_like(w)
    ref.step()
    mine = Muon([w], lr=0.02)
    mine.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert mine.state[w]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(mine.state[w]["momentum_buffer"], ref.state[w]["momentum_buffer"].float())


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


# ---------------------------------------------------------------- loading, group options after construction, dtypes


def _params(n=2):
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(8, 6)) for _ in range(n)]


def _stepped(opt, params):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def _same_state(a, b):
    """Two state_dicts equal: groups (params included) and every buffer."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for key, v in a["state"][k].items():
            assert torch.equal(v, b["state"][k][key]) if torch.is_tensor(v) else v == b["state"][k][key], (k, key)


_MINE = {
    "Muon": lambda ps: Muon(ps, lr=0.02),
    "Hybrid": lambda ps: Hybrid(ps, lr=1e-3),
    "SpecGD": lambda ps: SpecGD(ps, lr=0.1, momentum=0.9),
    "AutoGeometry": lambda ps: AutoGeometry(ps, lr=0.1, monitor=lambda layer: 2.0),
    "LowRankDecay": lambda ps: LowRankDecay(ps, lr=0.1, weight_decay=0.1),
}
_THEIRS = {
    "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "torch SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "torch Muon": lambda ps: torch.optim.Muon(ps, lr=0.02),
    "Muon": lambda ps: Muon(ps, lr=0.02),
    "LowRankDecay": lambda ps: LowRankDecay(ps, lr=0.1, weight_decay=0.1),
}


@pytest.mark.parametrize("mine, theirs", [
    ("Muon", "torch AdamW"), ("Muon", "torch SGD"), ("Muon", "LowRankDecay"), ("Hybrid", "torch AdamW"),
    ("Hybrid", "Muon"), ("SpecGD", "torch Muon"), ("SpecGD", "torch SGD"), ("AutoGeometry", "torch AdamW"),
    ("LowRankDecay", "torch AdamW"), ("LowRankDecay", "Muon"),
])
@pytest.mark.parametrize("stepped", [False, True])
def test_another_optimizers_state_is_refused_and_changes_nothing(mine, theirs, stepped):
    """Muon took torch.optim.AdamW's state: its groups then carried amsgrad/betas/foreach/fused and its state exp_avg."""
    from specscope.errors import ConfigError

    ps = _params()
    opt = _stepped(_MINE[mine](ps), ps)
    other = _THEIRS[theirs](ps)
    if stepped:
        _stepped(other, ps)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ConfigError, match=f"{mine}.load_state_dict: .*Nothing was loaded"):
        opt.load_state_dict(copy.deepcopy(other.state_dict()))
    _same_state(before, opt.state_dict())
    torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5)  # a scheduler's initial_lr in every group
    again = _MINE[mine](ps)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))  # the state of its own kind loads
    _same_state(opt.state_dict(), again.state_dict())
    if mine == "Muon":  # and torch.optim.Muon's, scheduler keys included
        ref = torch.optim.Muon(ps, lr=0.02)
        torch.optim.lr_scheduler.LambdaLR(ref, lambda k: 0.5)
        again.load_state_dict(copy.deepcopy(_stepped(ref, ps).state_dict()))
        assert again.param_groups[0]["lr"] == 0.01 and again.param_groups[0]["initial_lr"] == 0.02


_LOADED_GROUP_CASES = [
    ("lr", float("nan"), "lr.*nan"),
    ("lr", -1.0, "lr must be"),
    ("weight_decay", float("inf"), "weight_decay.*inf"),
    ("momentum", 1.5, r"momentum must be in \[0, 1\), got 1.5"),
    ("ns_coefficients", (1, 2), r"ns_coefficients=\(1, 2\): give \(a, b, c\)"),
    ("algorithm", "bogus", "algorithm='bogus' is unknown"),
    ("amsgrad", False, "'amsgrad' is not an option"),
]
_LACKS = {"LowRankDecay": {"momentum", "algorithm"}}  # LowRankDecay has no momentum and no algorithm (it keeps "name")


@pytest.mark.parametrize("name, key, value, message", [
    (name, *case) for name in ("Muon", "LowRankDecay", "AutoGeometry") for case in _LOADED_GROUP_CASES
    if case[0] not in _LACKS.get(name, ())])
def test_a_loaded_group_is_checked_as_a_new_group_is(name, key, value, message):
    """A state_dict with lr=nan turned the weights NaN at the next step; momentum=1.5 and algorithm='bogus' loaded."""
    from specscope.errors import ConfigError

    ps = _params()
    opt = _stepped(_MINE[name](ps), ps)
    assert key in opt.param_groups[0] or key == "amsgrad", f"{name} has no {key}: list it in _LACKS"
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(before)
    bad["param_groups"][0][key] = value
    with pytest.raises(ConfigError, match=f"load_state_dict: param group 0 of the state_dict: .*{message}"):
        opt.load_state_dict(bad)
    _same_state(before, opt.state_dict())
    _stepped(opt, ps)
    assert all(torch.isfinite(p).all() for p in ps)


def test_a_state_of_other_parameters_or_no_state_dict_is_one_clear_error_at_load():
    """A buffer of another shape raised 'The size of tensor a (6) must match ...' at the next step; None a TypeError;
    an unknown state key a KeyError."""
    from specscope.errors import ConfigError

    ps = _params()
    saved = _stepped(Muon(ps, lr=0.02), ps).state_dict()
    wide = [nn.Parameter(torch.randn(8, 5)), nn.Parameter(torch.randn(8, 6))]
    opt = Muon(wide, lr=0.02)
    with pytest.raises(ConfigError, match=r"state 'momentum_buffer' of parameter 'param0' has shape \(8, 6\), the "
                                          r"parameter \(8, 5\).*Nothing was loaded"):
        opt.load_state_dict(copy.deepcopy(saved))
    assert not opt.state
    for bad, message in ((None, "pass an optimizer's state_dict .*got None"),
                         (nn.Linear(2, 2).state_dict(), r"got a dict with keys \['weight', 'bias'\]"),
                         (Muon(ps[:1]).state_dict(), r"param groups hold \[1\] parameters, this optimizer's \[2\]"),
                         ({**saved, "state": {**saved["state"], 7: {}}}, "state for parameter 7, which none of its")):
        for target in (Muon(ps, lr=0.02), LowRankDecay(ps, lr=0.1, weight_decay=0.1)):
            if isinstance(target, LowRankDecay) and isinstance(bad, dict) and 7 in bad.get("state", {}):
                message = "holds per-parameter state, which LowRankDecay does not keep"
            with pytest.raises(ConfigError, match=message):
                target.load_state_dict(bad)


@pytest.mark.parametrize("make, key", [(lambda ps: Muon(ps, lr=0.02), "momentum_buffer"),
                                       (lambda ps: Hybrid(ps, lr=1e-3), "exp_avg_sq")])
@pytest.mark.parametrize("damage", ["nan", "inf", "int64"])
def test_a_damaged_state_buffer_is_refused_at_load_not_written_into_the_weights(make, key, damage):
    """A buffer of the right shape with NaN loaded and then stepped NaN into the weights; an integer one failed at
    the next step with lerp's NotImplementedError."""
    from specscope.errors import ConfigError

    ps = _params()
    saved = _stepped(make(ps), ps).state_dict()
    buffer = saved["state"][1][key]
    saved["state"][1][key] = (buffer.long() if damage == "int64" else
                              buffer.index_fill(0, torch.tensor([2]), float(damage)))
    opt, before = make(ps), [p.detach().clone() for p in ps]
    says = "is torch.int64, not floating point" if damage == "int64" else f"holds {buffer.shape[1]} NaN or infinite entries"
    with pytest.raises(ConfigError, match=rf"state '{key}' of parameter 'param1' {says}: the state_dict is damaged.*Nothing was loaded"):
        opt.load_state_dict(saved)
    assert not opt.state and all(torch.equal(p, b) for p, b in zip(ps, before))


@pytest.mark.parametrize("make, key, value, says", [
    (lambda ps: Muon(ps, lr=0.02), "momentum_buffer", torch.tensor(float("nan")), r"has shape \(\), the parameter \(8, 6\)"),
    (lambda ps: SpecGD(ps, lr=0.1, momentum=0.9), "momentum_buffer", torch.tensor(1.0), r"has shape \(\)"),
    (lambda ps: Muon(ps, lr=0.02), "momentum_buffer", None, "is a NoneType, not a tensor"),
    (lambda ps: Muon(ps, lr=0.02), "momentum_buffer", [1, 2], "is a list, not a tensor"),
    (lambda ps: Muon(ps, lr=0.02), "momentum_buffer", torch.ones(8, 6).to_sparse(), "is a torch.sparse_coo tensor, not a dense one"),
    (lambda ps: Hybrid(ps, lr=1e-3), "adam_step", "x", "is 'x', not a whole number ≥ 0"),
    (lambda ps: Hybrid(ps, lr=1e-3), "adam_step", -1, "is -1, not a whole number ≥ 0"),
    (lambda ps: Hybrid(ps, lr=1e-3), "adam_step", 1.5, "is 1.5, not a whole number"),
    (lambda ps: AutoGeometry(ps, lr=0.1, monitor=lambda name: 2.0), "geometry", 7, "is 7, not 0, 1 or 2"),
])
def test_a_state_entry_of_another_kind_is_refused_at_load_not_at_the_next_step(make, key, value, says):
    """A 0-d buffer, None, a list, a sparse buffer or a counter that is no whole number loaded, and the next step
    raised a RuntimeError, AttributeError, NotImplementedError or TypeError from inside torch."""
    from specscope.errors import ConfigError

    ps = _params()
    saved = _stepped(make(ps), ps).state_dict()
    assert key in saved["state"][1]
    saved["state"][1][key] = value
    opt = make(ps)
    with pytest.raises(ConfigError, match=rf"state '{key}' of parameter 'param1' {says}.*Nothing was loaded"):
        opt.load_state_dict(saved)
    assert not opt.state
    saved["state"][1][key] = torch.tensor(3) if key in ("adam_step", "geometry") else saved["state"][0][key]
    if key != "geometry":
        opt.load_state_dict(saved)  # a whole number held in a 0-d tensor is a counter too
        _stepped(opt, ps)


@pytest.mark.parametrize("make", [lambda ps: Muon(ps, lr=0.02), lambda ps: LowRankDecay(ps, lr=0.1, weight_decay=0.1)])
def test_a_checkpoints_param_names_never_rename_the_parameters(make):
    """The saved names replaced the loading optimizer's: a shorter list stopped the parameters past its end from
    stepping in silence (Muon), or raised IndexError at the step (LowRankDecay)."""
    ps = _params()
    named = lambda: make([(f"layer{i}.weight", p) for i, p in enumerate(ps)])  # noqa: E731
    saved = _stepped(named(), ps).state_dict()
    saved["param_groups"][0]["param_names"] = ["other.weight"]
    opt = named()
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["param_names"] == ["layer0.weight", "layer1.weight"]
    before = [p.detach().clone() for p in ps]
    _stepped(opt, ps)
    assert all(not torch.equal(p, b) for p, b in zip(ps, before))  # both stepped


@pytest.mark.parametrize("make", [
    lambda ps: Muon(ps, lr=0.02),
    lambda ps: Hybrid(ps, lr=1e-3),
    lambda ps: SpecGD(ps, lr=0.1),
    lambda ps: LowRankDecay(ps, lr=0.1, weight_decay=0.1),
])
@pytest.mark.parametrize("how", ["scheduler", "by hand"])
def test_a_group_option_set_after_construction_is_checked_at_every_step(make, how):
    """A LambdaLR returning NaN (or param_groups[0]["lr"] = nan) wrote NaN into every weight, silently."""
    from specscope.errors import ConfigError

    ps = _params()
    opt = make(ps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 if k == 0 else float("nan"))
    _stepped(opt, ps)
    if how == "scheduler":
        scheduler.step()
    else:
        opt.param_groups[0]["lr"] = float("nan")
    weights, state = [p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict()["state"])
    for p in ps:
        p.grad = torch.randn_like(p)
    with pytest.raises(ConfigError, match=r"\.step: param group 0: .*lr.*nan.*Nothing was changed"):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(ps, weights))
    _same_state({"param_groups": [], "state": state}, {"param_groups": [], "state": opt.state_dict()["state"]})


@pytest.mark.parametrize("coefficients", [(float("nan"), 1, 1), (1, 2), [], [(3.4445, -4.775, 2.0315), (1, 2)],
                                          [(1.5, float("inf"), 0.0)], "abc"])
def test_ns_coefficients_are_checked_when_the_group_is_made(coefficients):
    """(nan, 1, 1) made Muon's newton_schulz step write NaN; (1, 2) was accepted and the first step raised from linalg."""
    from specscope.errors import ConfigError

    ps = _params()
    message = r"ns_coefficients=.*: give \(a, b, c\) or a non-empty list of \(a, b, c\) triples, all finite numbers"
    with pytest.raises(ConfigError, match=message):
        Muon(ps, lr=0.1, polar="newton_schulz", ns_coefficients=coefficients)
    opt = Muon(ps[:1], lr=0.1, polar="newton_schulz")
    with pytest.raises(ConfigError, match=message):
        opt.add_param_group({"params": ps[1:], "ns_coefficients": coefficients})
    assert len(opt.param_groups) == 1
    with pytest.raises(ConfigError, match=message):
        LowRankDecay(ps, lr=0.1, weight_decay=0.1, mode="ns", ns_coefficients=coefficients)
    schedule = [(3.4445, -4.775, 2.0315), (1.5, -0.5, 0)]  # a per-step list (linalg's rule) still goes
    _stepped(Muon(ps, lr=0.1, polar="newton_schulz", ns_coefficients=schedule), ps)
    assert all(torch.isfinite(p).all() for p in ps)


@pytest.mark.parametrize("make", [lambda ps: Muon(ps), lambda ps: Hybrid(ps, lr=1e-3),
                                  lambda ps: LowRankDecay(ps, lr=0.1, weight_decay=0.1)])
def test_non_floating_parameters_are_refused_at_construction_and_meta_ones_at_step(make):
    """An int64 weight raised 'linalg.vector_norm: Expected a floating point ...' at the first step, a meta one
    'Cannot copy out of meta tensor'."""
    from specscope.errors import ConfigError

    with pytest.raises(ConfigError, match=r"parameter 'param0' \(shape \(4, 3\)\) has dtype torch.int64; .*floating-point"):
        make([torch.zeros(4, 3, dtype=torch.int64)])
    meta = nn.Parameter(torch.empty(4, 3, device="meta"))
    meta.grad = torch.empty(4, 3, device="meta")
    opt = make([meta])
    with pytest.raises(ConfigError, match="parameter 'param0.*' is on the meta device .*model.to_empty"):
        opt.step()


@pytest.mark.parametrize("key", ["foreach", "maximize"])
def test_lowrank_decay_refuses_group_keys_as_hybrid_does(key):
    """LowRankDecay caught only near-misspellings: torch.optim's options it does not implement (foreach, maximize)
    were stored and ignored, where Muon and Hybrid refuse them. Other keys (a "name") stay, in both."""
    from specscope.errors import ConfigError

    ps = _params()
    with pytest.raises(ConfigError, match=f"'{key}' is not an option"):
        Muon([{"params": ps, key: True}])
    with pytest.raises(ConfigError, match=f"LowRankDecay param group key '{key}' is not an option"):
        LowRankDecay([{"params": ps, key: True}], lr=0.1, weight_decay=0.1)
    assert LowRankDecay([{"params": ps, "name": "decay"}], lr=0.1, weight_decay=0.1).param_groups[0]["name"] == "decay"


@pytest.mark.parametrize("make, says", [
    (lambda ps: Muon(ps, lrr=0.1), "'lrr' is not an option of Muon; did you mean 'lr'"),
    (lambda ps: Muon(ps, momentun=0.9), "'momentun' is not an option of Muon; did you mean 'momentum'"),
    (lambda ps: SpecGD(ps, lr=0.1, betas=(0.9, 0.9)), r"'betas' is not an option of SpecGD; its options are \['params', 'lr'"),
    (lambda ps: LowRankDecay(ps, lr=0.1, weight_decay=0.1, foreach=True), "'foreach' is not an option of LowRankDecay"),
    (lambda ps: L1ToL2(ps, lr=0.1, toke_dim=0), "'toke_dim' is not an option of L1ToL2; did you mean 'token_dim'"),
    (lambda ps: AutoGeometry(ps, lr=0.1, treshold=2.0), "'treshold' is not an option of AutoGeometry; did you mean 'threshold'"),
    (lambda ps: Monitor(nn.Linear(6, 8), evry=10), "'evry' is not an option of Monitor; did you mean 'every'")])
def test_a_misspelt_constructor_keyword_names_the_closest_option(make, says):
    """It was Python's bare TypeError, while the same typo in a param group, Hybrid or a callback got a did-you-mean."""
    from specscope.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        make(_params())


def test_a_group_option_set_after_construction_is_checked_before_the_step_changes_anything():
    """A polar name, an algorithm or a vector put into a group after construction: one ConfigError at the step, the
    momentum as it was (an unknown polar name advanced the momentum, then raised linalg's ValueError; an algorithm
    changed after construction raised KeyError 'betas' or an IndexError from inside the step)."""
    p = nn.Parameter(torch.randn(8, 6))
    opt = Muon([p], lr=0.02)
    p.grad = torch.randn(8, 6)
    opt.step()
    buf, before = opt.state[p]["momentum_buffer"].clone(), p.detach().clone()
    opt.param_groups[0]["polar"] = "gramm"
    with pytest.raises(ConfigError, match=r"param group 0: polar='gramm' is unknown.*Nothing was changed"):
        opt.step()
    opt.param_groups[0]["polar"] = "gram"
    opt.param_groups[0]["algorithm"] = "adamw"
    with pytest.raises(ConfigError, match=r"algorithm='adamw' has no \['betas'\] in the group: an algorithm set after construction"):
        opt.step()
    assert torch.equal(buf, opt.state[p]["momentum_buffer"]) and torch.equal(before, p)
    b = nn.Parameter(torch.randn(8))
    hybrid = Hybrid([{"params": [b], "algorithm": "adamw", "lr": 1e-3}], "muon")
    hybrid.param_groups[0] |= {k: v for k, v in Muon([nn.Parameter(torch.randn(3, 3))]).param_groups[0].items() if k != "params"}
    b.grad = torch.randn(8)
    with pytest.raises(ConfigError, match=r"param group 0: parameter 'param0' \(shape \(8,\)\) is 1-D and was put in a spectral"):
        hybrid.step()


@pytest.mark.parametrize("make, key, hint", [
    (lambda g: Muon([g], lr=0.02), "polar_method", "did you mean 'polar'"),
    (lambda g: Muon([g], lr=0.02), "wd", "did you mean 'weight_decay'"),
    (lambda g: Muon([g], lr=0.02), "learning_rate", "did you mean 'lr'"),
    (lambda g: Hybrid([g | {"algorithm": "adamw", "lr": 1e-3}], "muon"), "mom", "its options are"),
    (lambda g: LowRankDecay([g], lr=0.1, weight_decay=0.1), "polar", "did you mean 'polar_method'"),
])
def test_another_name_of_an_option_is_refused_not_stored_and_ignored(make, key, hint):
    """LowRankDecay's `polar_method` in a Muon group, Muon's `polar` in a LowRankDecay group, `wd`, `learning_rate`:
    taken as metadata and ignored (the step ran with svd where gram was asked for). Other keys stay, as in torch.optim."""
    with pytest.raises(ConfigError, match=rf"key '{key}' is not an option.*{hint}"):
        make({"params": [nn.Parameter(torch.randn(8, 6))], key: 0.5 if key != "polar" else "gram"})
    Muon([{"params": [nn.Parameter(torch.randn(8, 6))], "name": "blocks"}], lr=0.02)  # metadata


@pytest.mark.parametrize("value, message", [(1e-300, ">= 1 by definition"), (0.5, ">= 1 by definition"),
                                            ("3", "as a number"), (True, "as a number"), (float("inf"), "finite number")])
def test_a_stable_rank_source_giving_no_stable_rank_is_refused_before_a_weight_changes(value, message):
    """st(A) >= 1 by definition; 1e-300 made SpecGD's step 1/st(A) long and wrote Inf into the weight, "3" was
    float()-ed."""
    from specscope.errors import NonFiniteError
    from specscope.optim import SpecGD

    p = nn.Parameter(torch.randn(8, 6))
    p.grad, before = torch.randn(8, 6), p.detach().clone()
    with pytest.raises((ConfigError, NonFiniteError), match=message):
        SpecGD([("w", p)], lr=0.1, stable_rank=lambda layer: value).step()
    assert torch.equal(p, before)
    SpecGD([("w", p)], lr=0.1, stable_rank=lambda layer: 1 - 1e-5).step()  # a float32 estimate a rounding below 1


def test_routing_options_are_checked_where_they_are_given_and_sgd_nesterov_needs_momentum():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    for kwargs, message in ((dict(include_frozen="no"), "include_frozen='no' must be True or False"),
                            (dict(betas=(float("nan"), 0.9)), r"betas=\(nan, 0.9\)"), (dict(momentum=1.5), r"momentum must be in \[0, 1\)")):
        with pytest.raises(ConfigError, match=message):
            spectral_param_groups(model, 0.02, 1e-3, **kwargs)
    with pytest.raises(ConfigError, match="nesterov=True needs momentum > 0"):  # as torch.optim.SGD refuses it
        Hybrid([{"params": [nn.Parameter(torch.randn(3))], "algorithm": "sgd", "lr": 0.1, "nesterov": True}], "muon")


def test_numpy_values_are_numbers_where_a_number_is_asked():
    """A 0-d numpy array from an st(A) source, np.bool_ for include_frozen and numpy floats in betas were refused."""
    import numpy as np

    from specscope.optim import SpecGD

    p = nn.Parameter(torch.randn(8, 6))
    p.grad = torch.randn(8, 6)
    SpecGD([("w", p)], lr=0.1, stable_rank=lambda layer: np.array(3.0)).step()
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    groups = spectral_param_groups(model, 0.02, 1e-3, include_frozen=np.bool_(True), betas=(np.float64(0.9), np.float32(0.95)))
    Muon(groups).step()
    with pytest.raises(ConfigError, match="as a number"):
        SpecGD([("w", p)], lr=0.1, stable_rank=lambda layer: np.bool_(True)).step()


def test_a_saved_state_with_a_key_now_refused_names_how_to_load_it():
    p = nn.Parameter(torch.randn(8, 6))
    state = Muon([p], lr=0.02).state_dict()
    state["param_groups"][0]["wd"] = 0.1  # kept by specscope before such keys were refused
    with pytest.raises(ConfigError, match=r"drop it from the saved groups, `for g in sd\['param_groups'\]: g.pop\('wd', None\)`"):
        Muon([p], lr=0.02).load_state_dict(state)


@pytest.mark.parametrize("algorithm, options, bad", [("specgd", {"momentum": 0.9}, None), ("specgd", {"momentum": 0.9}, 0.5),
                                                     ("specgd", {}, float("nan")), ("auto", {"euclidean": "adamw"}, 0.5),
                                                     ("auto", {"euclidean": "momentum", "momentum": 0.9}, "2"),
                                                     ("l1_to_l2", {"token_dim": 0}, 0.5)])
def test_a_bad_stable_rank_raises_before_any_group_steps(algorithm, options, bad):
    """st(A) is read for every group before any group changes: a missing or bad value raises with the weights of
    every group (a Muon group stepped before it included) and the buffers as they were — a retry after measuring the
    layer does not add the same gradient to the momentum twice."""
    torch.manual_seed(0)
    A, B = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8))
    values = {"a": 2.0, "b": 2.0}
    opt = Hybrid([{"params": [("a.weight", A)], "algorithm": "muon", "lr": 0.02},
                  {"params": [("b.weight", B)], "algorithm": algorithm, "lr": 0.01, **options}], stable_rank=lambda layer: values[layer])
    A.grad, B.grad = torch.randn(8, 8), torch.randn(8, 8)
    opt.step()
    values["b"] = bad
    before = copy.deepcopy([A.detach(), B.detach(), opt.state_dict()["state"]])
    with pytest.raises((ConfigError, NonFiniteError)):
        opt.step()
    after = [A.detach(), B.detach(), opt.state_dict()["state"]]
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert before[2].keys() == after[2].keys()
    for k in before[2]:
        for key, value in before[2][k].items():
            assert (torch.equal(value, after[2][k][key]) if torch.is_tensor(value) else value == after[2][k][key]), (k, key)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_buffers_follow_a_model_moved_to_another_dtype_after_steps(dtype):
    """model.double() (or .bfloat16()) after steps: the next step keeps every buffer as a step in that dtype would
    (float32 for bf16 parameters) and equals the step of an optimizer that loaded the state into the moved model,
    instead of failing part-way with torch's dtype error after the Muon group had stepped."""
    def build(model):
        return Muon(spectral_param_groups(model, 0.02, 1e-3))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = build(model)
    x = torch.randn(3, 8)
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    model.to(dtype)
    twin = copy.deepcopy(model)
    twin_opt = build(twin)
    twin_opt.load_state_dict(opt.state_dict())
    for m, o in ((model, opt), (twin, twin_opt)):
        m(x.to(dtype)).sum().backward()
        o.step()
    want = torch.float32 if dtype == torch.bfloat16 else dtype
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert {v.dtype for v in opt.state[p].values() if torch.is_tensor(v) and v.ndim} == {want}


@pytest.mark.parametrize("opt_class", [Muon, SpecGD])
@pytest.mark.parametrize("bad", [lambda X: X.mT, lambda X: X.flatten(-2), lambda X: None])
def test_a_polar_callable_of_the_wrong_shape_is_refused_with_nothing_changed(opt_class, bad):
    """A user's polar callable that returns another shape (a transpose of a wide batch has the same number of entries,
    which a reshape would have applied scrambled) is one ConfigError naming the shapes, the weights untouched."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(8, 16))
    opt = opt_class([W], lr=0.02, polar=bad, **({"stable_rank": lambda layer: 2.0} if opt_class is SpecGD else {}))
    W.grad = torch.randn(8, 16)
    before = W.detach().clone()
    with pytest.raises(ConfigError, match="same shape"):
        opt.step()
    assert torch.equal(W, before)


def test_a_step_with_no_gradient_anywhere_warns_once_naming_the_replaced_parameters():
    """An optimizer built before the model's parameters were replaced (here load_state_dict(assign=True); fully_shard
    and to_empty do the same) steps parameters the backward pass never reaches: every step changed nothing, silently.
    The first such step warns, naming the cause; later ones do not repeat it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = Muon(spectral_param_groups(model, 0.02, 1e-3))
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    for k in range(2):
        model(torch.randn(3, 8)).sum().backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        said = [w for w in caught if "no gradient" in str(w.message)]
        assert len(said) == (1 if k == 0 else 0) and (k or "build it after fully_shard" in str(said[0].message)), said
        assert all(w.filename == __file__ for w in said)  # the user's opt.step() line, not torch's step wrapper


@pytest.mark.parametrize("opt_class", [Muon, SpecGD])
def test_a_polar_callable_of_the_wrong_shape_is_refused_before_any_group_steps(opt_class):
    """The callable's result was checked inside its group's step: the groups before it had stepped and its momentum
    was made when the ConfigError came. Its shape is now checked before any group changes."""
    torch.manual_seed(0)
    A, B = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 16))
    extra = {"stable_rank": lambda layer: 2.0} if opt_class is SpecGD else {}
    opt = opt_class([{"params": [("a.weight", A)]}, {"params": [("b.weight", B)], "polar": lambda X: X.mT}],
                    lr=0.02, momentum=0.9, **extra)
    A.grad, B.grad = torch.randn(8, 8), torch.randn(8, 16)
    before = [A.detach().clone(), B.detach().clone()]
    with pytest.raises(ConfigError, match="same shape.*[Nn]othing was changed"):
        opt.step()
    assert torch.equal(A, before[0]) and torch.equal(B, before[1]) and not opt.state


def test_a_tensor_lr_steps_as_its_number_and_other_tensor_options_are_refused_at_construction():
    """A one-element tensor lr is torch.optim's convention (an LR scheduler's lambda may return one): every algorithm
    steps with its value, where an AdamW group beside a Muon one raised a TypeError after the Muon weight had stepped.
    A tensor eps or weight_decay passed the checks and failed inside the step, after the momentum was made: refused
    where it is given."""
    def run(lr):
        torch.manual_seed(0)
        A, B, C = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6, 4))
        opt = Muon([{"params": [A]}, {"params": [B], "algorithm": "adamw", "lr": lr},
                    {"params": [C], "algorithm": "sgd", "lr": lr, "momentum": 0.9}], lr=0.02)
        for _ in range(2):
            for p in (A, B, C):
                p.grad = torch.randn_like(p)
            opt.step()
        return [A.detach(), B.detach(), C.detach()]

    for a, b in zip(run(torch.tensor([1e-2])), run(1e-2)):
        assert torch.equal(a, b)
    p = nn.Parameter(torch.randn(8, 6))
    for options in ({"eps": torch.tensor(1e-7), "polar": "newton_schulz"}, {"weight_decay": torch.tensor([0.1])}):
        with pytest.raises(ConfigError, match=f"{next(iter(options))}=tensor.*pass a float"):
            Muon([p], lr=0.02, **options)
    opt = Muon([p], lr=0.02)
    opt.param_groups[0]["momentum"] = torch.tensor(0.9)
    p.grad = torch.randn_like(p)
    with pytest.raises(ConfigError, match="momentum=tensor"):
        opt.step()
    assert not opt.state


def test_numpy_integers_and_bools_are_taken_as_python_ones():
    """ns_steps=np.int64(3) was refused as "not an integer in 1..99", numpy floats were taken; numpy integers and
    bools are now taken where an integer or a flag is asked, and stored as Python's."""
    import numpy as np

    p = nn.Parameter(torch.randn(8, 6))
    muon = Muon([p], lr=0.02, polar="newton_schulz", ns_steps=np.int64(3), nesterov=np.bool_(True))
    assert type(muon.param_groups[0]["ns_steps"]) is int and muon.param_groups[0]["nesterov"] is True
    auto = AutoGeometry([("w.weight", p)], lr=0.02, monitor=lambda layer: 2.0, every=np.int64(2))
    assert type(auto.param_groups[0]["every"]) is int
    embed = nn.Parameter(torch.randn(10, 4))
    l12 = L1ToL2([embed], lr=0.1, token_dim=np.int64(0), scale="rms")
    assert type(l12.param_groups[0]["token_dim"]) is int
    for opt, params in ((muon, [p]), (auto, [p]), (l12, [embed])):
        for q in params:
            q.grad = torch.randn_like(q)
        opt.step()
    with pytest.raises(ConfigError, match="ns_steps must be an integer in 1..99, got np.float64"):
        Muon([p], lr=0.02, polar="newton_schulz", ns_steps=np.float64(3))
