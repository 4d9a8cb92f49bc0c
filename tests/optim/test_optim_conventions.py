"""torch.optim conventions a training script relies on, where they meet specscope's own checks: what LR schedulers
write into param groups survives a checkpoint, and load_state_dict pre-hooks run before anything reads the dict."""

import io

import pytest
import torch
from torch import nn

from specscope.errors import ConfigError
from specscope.optim import Hybrid, L1ToL2, LowRankDecay, Muon

OPTIMIZERS = {
    "Muon": lambda ps: Muon(ps, lr=0.02),
    "Hybrid": lambda ps: Hybrid([{"params": ps[:1], "algorithm": "muon", "lr": 0.02}, {"params": ps[1:], "lr": 3e-3}]),
    "L1ToL2": lambda ps: L1ToL2(ps, lr=0.02),
}


def params():
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(24, 16, generator=g)), nn.Parameter(torch.randn(16, 8, generator=g))]


def train(opt, sched, ps, steps, start=0):
    for k in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + k)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        sched.step()


@pytest.mark.parametrize("schedule", ["OneCycleLR", "CyclicLR"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_checkpoint_taken_under_a_momentum_cycling_scheduler_resumes_exactly(name, schedule):
    """OneCycleLR and CyclicLR write max_momentum and base_momentum into every group; load_state_dict took
    'max_momentum' for a typo of 'momentum' and refused the checkpoint (torch.optim.Muon and AdamW load it)."""
    make = {"OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=20),
            "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=0.02, step_size_up=3)}[schedule]
    full_ps, part_ps = params(), params()
    full = OPTIMIZERS[name](full_ps)
    train(full, make(full), full_ps, 6)
    part = OPTIMIZERS[name](part_ps)
    sched = make(part)
    train(part, sched, part_ps, 3)
    buf = io.BytesIO()
    torch.save({"opt": part.state_dict(), "sched": sched.state_dict() if schedule == "OneCycleLR" else None}, buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    resumed_ps = [nn.Parameter(p.detach().clone()) for p in part_ps]
    resumed = OPTIMIZERS[name](resumed_ps)
    sched = make(resumed)
    resumed.load_state_dict(saved["opt"])
    if saved["sched"] is not None:  # CyclicLR's own state_dict fails in torch itself (its _scale_fn_custom)
        sched.load_state_dict(saved["sched"])
        train(resumed, sched, resumed_ps, 3, start=3)
        assert all(torch.equal(a, b) for a, b in zip(resumed_ps, full_ps))
    assert {"max_momentum", "base_momentum"} <= set(resumed.param_groups[0])


def test_a_typo_of_an_option_is_still_refused_on_load():
    ps = params()
    opt = Muon(ps, lr=0.02)
    state = opt.state_dict()
    state["param_groups"][0]["momentm"] = 0.9
    with pytest.raises(ConfigError, match="did you mean 'momentum'"):
        Muon(params(), lr=0.02).load_state_dict(state)


@pytest.mark.parametrize("name", ["Muon", "LowRankDecay"])
def test_load_state_dict_pre_hooks_run_before_the_checks_and_once(name):
    """A pre-hook that rewrites the dict (converting another optimizer's state) never ran: the checks refused the
    dict first. torch runs pre-hooks before anything reads it."""
    make = {"Muon": lambda ps: Muon(ps, lr=0.02), "LowRankDecay": lambda ps: LowRankDecay(ps, lr=0.02, weight_decay=0.1)}[name]
    ps = params()
    opt = make(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state_dict()
    for g in state["param_groups"]:
        g["amsgrad"] = False  # torch.optim's option, no specscope one: refused unless the hook removes it
    fresh = make(params())
    with pytest.raises(ConfigError, match="amsgrad"):
        fresh.load_state_dict(state)
    calls = []

    def drop_foreign(optimizer, state_dict):
        calls.append(optimizer)
        return {**state_dict, "param_groups": [{k: v for k, v in g.items() if k != "amsgrad"} for g in state_dict["param_groups"]]}

    handle = fresh.register_load_state_dict_pre_hook(drop_foreign)
    fresh.load_state_dict(state)
    assert calls == [fresh] and "amsgrad" not in fresh.param_groups[0]
    handle.remove()  # the handle still removes it
    with pytest.raises(ConfigError, match="amsgrad"):
        fresh.load_state_dict(state)
    assert calls == [fresh]


def test_a_step_inside_autocast_is_the_step_outside_it():
    """torch.autocast turned the exact backend's float32 products into bfloat16 ones (error 4.9e-3 against 1.8e-7
    for SpecGD and Muon(polar="gram")); a step now runs with autocast off, as does `linalg.polar`."""
    import specscope.linalg as L
    from specscope.optim import LowRankDecay, Muon, SpecGD
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    makers = [lambda w: SpecGD([w], lr=0.1), lambda w: Muon([w], lr=0.1, polar="gram"),
              lambda w: LowRankDecay([w], lr=0.1, weight_decay=0.5, polar_method="gram")]
    for make in makers:
        after = []
        for autocast in (False, True):
            w = torch.nn.Parameter(torch.ones(64, 32) + g)
            w.grad = g.clone()
            opt = make(w)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                opt.step()
            after.append(w.detach().clone())
        assert torch.equal(after[0], after[1]), type(opt).__name__
    with torch.autocast("cpu", dtype=torch.bfloat16):
        P = L.polar(g, "gram")
    U, _, Vh = torch.linalg.svd(g.double(), full_matrices=False)
    assert (P.double() - U @ Vh).abs().max() < 1e-5


def test_another_algorithms_option_in_a_param_group_is_refused():
    """SpecGD took {"stacked": True} (Muon's option) and stepped the stack as one flattened matrix (0.55 off the
    per-expert update); "stackd" passed too. Keys that are no algorithm's option (a "name") still stay."""
    from specscope.errors import ConfigError
    from specscope.optim import SpecGD
    w = torch.nn.Parameter(torch.zeros(4, 16, 8))
    with pytest.raises(ConfigError, match="'stacked' is not an option of algorithm='specgd' but of muon"):
        SpecGD([{"params": [w], "stacked": True}], lr=0.1)
    with pytest.raises(ConfigError, match="'stacked' is one of muon"):
        SpecGD([{"params": [w], "stackd": True}], lr=0.1)
    SpecGD([{"params": [w], "name": "experts"}], lr=0.1)


def test_an_option_the_group_ignores_is_refused_even_where_the_optimizer_has_it():
    """An AdamW group in a Muon took momentum=0.5 and polar="svd" (Muon's defaults, so skipped) and ignored them; a
    token_dim in a Muon or SpecGD group was taken and turned the embedding guard off. A group taken from another
    optimizer's param_groups, whose keys torch filled with the defaults, still loads."""
    from specscope.optim import SpecGD
    W, bias, E = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(64, 16))
    for key, value in (("momentum", 0.5), ("polar", "svd"), ("nesterov", False)):
        with pytest.raises(ConfigError, match=f"'{key}' is not an option of algorithm='adamw' but of"):
            Muon([{"params": [W]}, {"params": [bias], "algorithm": "adamw", "lr": 1e-3, key: value}], lr=0.1)
    with pytest.raises(ConfigError, match="'betas' is not an option of algorithm='muon' but of adamw"):
        Hybrid([{"params": [bias]}, {"params": [W], "algorithm": "muon", "lr": 0.02, "betas": (0.5, 0.9)}], lr=1e-3, algorithm="adamw")
    for make in (Muon, SpecGD):
        with pytest.raises(ConfigError, match="'token_dim' is not an option of algorithm='(muon|specgd)' but of auto, l1_to_l2"):
            make([{"params": [("transformer.wte.weight", E)], "token_dim": 0}], lr=0.1)
    first = Muon([{"params": [W]}, {"params": [bias], "algorithm": "adamw", "lr": 1e-3}], lr=0.1)
    again = Muon(first.param_groups, lr=0.1)
    assert [g["algorithm"] for g in again.param_groups] == ["muon", "adamw"]


@pytest.mark.parametrize("kind", ["auto", "auto tokens", "l1_to_l2"])
def test_a_step_whose_length_overflows_float32_is_taken_as_lr_times_it(kind):
    """‖D‖_* (‖D‖_{2,1}) of a float32 64×64 gradient of entries ≈ 1e36 is beyond float32's range and lr·it is not:
    AutoGeometry and L1ToL2 wrote inf into the weights (SpecGD did not). The step at gradient scale 1e36 and lr
    1e-40 is the step at scale 1 and lr 1e-4: these steps' lengths scale with the gradient."""
    from specscope.optim import AutoGeometry

    def step(scale, lr):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(64, 64) * 0.1)
        w0 = w.detach().clone()
        if kind == "l1_to_l2":
            opt = L1ToL2([("e.weight", w)], lr=lr, stable_rank=lambda layer: 2.0)
        else:
            group = {"params": [("e.weight", w)], **({"token_dim": 0} if kind == "auto tokens" else {})}
            opt = AutoGeometry([group], lr=lr, monitor=lambda layer: 1.0)
        w.grad = torch.randn(64, 64) * scale
        opt.step()
        return (w - w0).detach(), {r.metric: r.value for r in opt.pop_records()}

    big, big_records = step(1e36, 1e-40)
    small, small_records = step(1.0, 1e-4)
    assert torch.isfinite(big).all() and big.abs().max() > 0
    torch.testing.assert_close(big, small, rtol=1e-4, atol=1e-7)
    assert big_records.keys() == small_records.keys()
    for metric, value in small_records.items():
        assert big_records[metric] == pytest.approx(value, rel=1e-5), metric


def test_autogeometry_measures_nr_at_any_finite_scale():
    """‖D‖_F² of a 1e36 gradient overflowed float32, so nr read 0 and the geometry flipped to euclidean."""
    from specscope.optim import AutoGeometry
    seen = []
    for scale in (1.0, 1e36):
        w = torch.nn.Parameter(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)))
        w.grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)) * scale
        opt = AutoGeometry([("l.weight", w)], lr=0.1, monitor=lambda layer: 1.0, threshold=0.5)
        opt.step()
        seen.append({r.metric: r.value for r in opt.pop_records()})
        assert torch.isfinite(w).all()
    assert seen[1]["nuclear_rank"] == pytest.approx(seen[0]["nuclear_rank"], rel=1e-5)
    assert seen[1]["geometry"] == seen[0]["geometry"] == 1.0


def test_a_parameter_twice_is_refused_naming_it():
    """In two groups torch.optim raised a ValueError naming no parameter; twice in one group it only warned and the
    parameter was stepped twice per step."""
    W, V = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(8, 16))
    with pytest.raises(ConfigError, match="'b.weight' is in param group 0 already"):
        Muon([{"params": [("a.weight", W)]}, {"params": [("b.weight", W)]}], lr=0.1)
    with pytest.raises(ConfigError, match="at position 2 of the group is listed twice in one param group"):
        Muon([W, V, W], lr=0.1)
    with pytest.raises(ConfigError, match="listed twice in one param group"):
        LowRankDecay([W, W], lr=0.1, weight_decay=0.1)
    opt = Muon([W], lr=0.1)
    with pytest.raises(ConfigError, match="is in param group 0 already"):
        opt.add_param_group({"params": [V, W]})
    assert len(opt.param_groups) == 1


def test_lowrank_decay_takes_a_tensor_lr_and_names_a_vector():
    """A LambdaLR whose lambda returns a tensor drives every optimizer here; LowRankDecay refused it at its step."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    with pytest.raises(ConfigError, match="got '0.bias' of shape \\(16,\\)"):
        LowRankDecay(model.named_parameters(), lr=0.1, weight_decay=0.1)
    decay = LowRankDecay([model[0].weight, model[1].weight], lr=1e-3, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(decay, lambda k: torch.tensor(0.5) ** k)
    before = model[0].weight.detach().clone()
    for _ in range(3):
        decay.step()
        schedule.step()
    assert not torch.equal(model[0].weight, before) and torch.isfinite(model[0].weight).all()


def test_an_auto_group_in_a_muon_names_the_optimizers_that_take_st():
    from specscope.optim import spectral_param_groups
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 16))
    with pytest.raises(ConfigError, match=r"Muon takes no st\(A\) source: give the groups to AutoGeometry"):
        Muon(spectral_param_groups(model, 0.05, 1e-3, algorithm="auto"))
