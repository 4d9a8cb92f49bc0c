"""What the subspace tools are given and give back: the parameter list (distinct trainable leaves), a tracker's
state (a fork shares nothing), the cut-off of a float64 tracker, the projection's k, the coupling baseline's median
— each once silently wrong."""

from __future__ import annotations

import pytest
import torch

from specscope.subspace import GradientProjection, RollingSVD, SEDTracker, coupling_ratios, flatten
from specscope.subspace import coupling as coupling_module


def _window(rank: int, p: int = 300, pushes: int = 6, dtype=torch.float32, seed: int = 0) -> RollingSVD:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, p, generator=g, dtype=torch.float64)
    sed = RollingSVD(window=pushes, k=3, dtype=dtype)
    for _ in range(pushes):
        sed.push((torch.randn(rank, generator=g, dtype=torch.float64) @ basis).to(dtype))
    return sed


def test_a_tracker_loaded_from_anothers_state_is_a_fork():
    """`b.load_state_dict(a.state_dict())` kept a's tensors: pushing to b rewrote a's window under a's count."""
    a = _window(4, pushes=8)
    before = a.singular_values().clone()
    b = RollingSVD(window=8, k=3)
    b.load_state_dict(a.state_dict())
    for _ in range(8):
        b.push(100 * torch.randn(300))
    a._cache = None  # nothing of a's may have changed: decompose it again
    torch.testing.assert_close(a.singular_values(), before, rtol=0, atol=0)
    assert not torch.equal(b.singular_values(), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_rank_deficient_window_has_only_its_real_directions(dtype):
    """A float64 tracker of a rank-2 window with k=3 returned a third "direction" of norm 1.6e-8 (its cut-off,
    4.4e-15·σ₁, lay below the float64 Gram's noise), gap() was finite and σ₃ read 1.4e-5 for a true 1e-14."""
    sed = _window(2, dtype=dtype)
    V = sed.directions()
    assert V.shape[0] == 2
    torch.testing.assert_close(V.double() @ V.double().T, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-6)
    s = sed.singular_values()
    assert bool((s[:2] > 0).all()) and bool((s[2:] == 0).all())
    assert sed.gap() != sed.gap()  # NaN: fewer than k directions
    exact = _window(3, dtype=dtype)
    assert exact.gap() == float("inf")  # rank exactly k: σ_{k+1} = 0


def test_the_projection_takes_the_trackers_k():
    """GradientProjection's own default k=3 replaced a RollingSVD(k=5)'s: "remove" left 2 of its 5 directions."""
    sed = _window(5, p=60, pushes=8)
    sed.k = 5
    p = torch.nn.Parameter(torch.zeros(60))
    p.grad = sed.directions(5).sum(0).clone()
    proj = GradientProjection([p], sed, mode="remove")
    assert proj.k == 5 and proj.apply()
    assert float((sed.directions(5) @ p.grad).abs().max()) < 1e-5
    assert GradientProjection([p], sed, mode="remove", k=2).k == 2
    assert GradientProjection([p], "random").k == 3


def _frozen():
    m = torch.nn.Linear(4, 4)
    m.bias.requires_grad_(False)
    return [m.weight, m.bias]


@pytest.mark.parametrize("make, message", [
    (lambda: torch.nn.Parameter(torch.randn(10, 10)), r"params is one tensor \(10, 10\); pass a list of parameters"),
    (lambda: torch.nn.Linear(4, 4), r"params is a Linear module; pass its parameters, e.g. list\(model.parameters\(\)\)"),
    (lambda: (lambda w: [w, w])(torch.nn.Parameter(torch.randn(5))), r"parameter 1 \(5,\) is parameter 0 again \(a tied weight"),
    (lambda: [torch.nn.Parameter(torch.randn(4, 3)).T], r"parameter 0 \(3, 4\) is not a leaf tensor"),
    (_frozen, r"parameter 1 \(4,\) is frozen \(requires_grad=False\); leave it out"),
    (lambda: 3, r"params must be a non-empty list of tensors .* got int"),
])
def test_every_tool_refuses_a_parameter_list_it_would_get_wrong(make, message):
    """One tensor was read row by row (apply() wrote to views: a silent no-op); a tied weight listed twice made
    "keep" no projection; a frozen parameter got a gradient and the optimizer moved it (SEDTracker: torch's raw
    autograd error)."""
    with pytest.raises(ValueError, match=f"GradientProjection: {message}"):
        GradientProjection(make(), "random", k=1)
    with pytest.raises(ValueError, match=f"SEDTracker: {message}"):
        SEDTracker(make(), {"g": lambda: torch.zeros((), requires_grad=True)})
    if "frozen" not in message:  # coupling perturbs frozen weights as well as trained ones
        with pytest.raises(ValueError, match=f"coupling_ratios: {message}"):
            coupling_ratios(lambda: torch.zeros(2, 3), make(), torch.randn(1, 5))


def test_coupling_normalises_by_the_median_of_an_even_count(monkeypatch):
    """torch.median of 20 random couplings is the 10th value, not the mean of the 10th and 11th: R_k was biased."""
    seen = []
    real = coupling_module.directional_coupling

    def recorded(centroids, params, v, eps):
        seen.append(real(centroids, params, v, eps))
        return seen[-1]

    monkeypatch.setattr(coupling_module, "directional_coupling", recorded)
    lin = torch.nn.Linear(6, 3)
    x = torch.randn(32, 6)
    centroids = lambda: torch.tanh(lin(x)).detach()  # noqa: E731
    _, baseline = coupling_ratios(centroids, [lin.weight], torch.randn(1, 18), n_random=4)
    ordered = sorted(seen[:4])
    assert baseline == pytest.approx((ordered[1] + ordered[2]) / 2, rel=1e-12)


def test_a_bfloat16_step_size_error_suggests_one_that_works():
    """The error said to use "the default 0.005", the value that had just been refused for bfloat16 weights."""
    lin = torch.nn.Linear(8, 3).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"bfloat16's rounding \(0.00781\).*e\.g\. 0\.031"):
        coupling_ratios(lambda: lin(torch.ones(4, 8, dtype=torch.bfloat16)), [lin.weight], torch.randn(1, 24))


@pytest.mark.parametrize("key, value, message", [
    ("gram", lambda s: s["gram"].float(), r"'gram' is torch.float32 .* float64"),
    ("previous", lambda s: torch.zeros(2, 7), r"'previous' \(2, 7\) is not the last directions"),
])
def test_a_tracker_state_that_does_not_fit_is_refused(key, value, message):
    """A float32 Gram was taken (later pushes rounded it), a wrong-shaped `previous` made rotation() NaN."""
    a = _window(3)
    a.rotation()
    state = dict(a.state_dict())
    state[key] = value(state)
    with pytest.raises(ValueError, match=message):
        RollingSVD(window=6, k=3).load_state_dict(state)


@pytest.mark.parametrize("key, value, message", [
    ("generator", None, r"'generator' must be the uint8 tensor .* got NoneType"),
    ("applied", None, r"'applied' must be an int ≥ 0, got None"),
    ("applied", -1, r"'applied' must be an int ≥ 0, got -1"),
])
def test_a_projection_state_with_bad_values_is_one_clear_error(key, value, message):
    p = torch.nn.Parameter(torch.randn(12))
    proj = GradientProjection([p], "random", k=2)
    state = {**proj.state_dict(), key: value}
    with pytest.raises(ValueError, match=f"GradientProjection.load_state_dict: {message}"):
        GradientProjection([p], "random", k=2).load_state_dict(state)


def test_a_basis_tensor_is_named_with_the_fix():
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match=r"subspace=a tensor \(2, 10\): .* subspace=lambda: Q"):
        GradientProjection([p], torch.eye(10)[:2])
    Q = torch.eye(10)[:2]
    p.grad = torch.arange(10.0)
    assert GradientProjection([p], lambda: Q).apply() and torch.equal(p.grad, flatten([torch.tensor([0.0, 1] + [0] * 8)], [p]))


@pytest.mark.parametrize("change", ["nan gram", "inf rows", "gram of other rows"])
def test_a_changed_state_is_refused_not_turned_into_wrong_directions(change):
    """A NaN in the saved Gram loaded, gave singular values [2.40, 0] for [3.31, 1.13] and NaN directions, and a
    GradientProjection then wrote NaN into the gradient; a Gram not of its rows gave directions of norm 0.27."""
    import copy

    a = RollingSVD(window=3, k=2)
    for v in torch.randn(2, 5, generator=torch.Generator().manual_seed(0)):
        a.push(v)
    state = copy.deepcopy(a.state_dict())
    if change == "nan gram":
        state["gram"][0, 0] = float("nan")
    elif change == "inf rows":
        state["rows"][0, 0] = float("inf")
    else:
        state["gram"][0, 1] = state["gram"][1, 0] = state["gram"][0, 1] + 1.0
    b = RollingSVD(window=3, k=2)
    with pytest.raises(ValueError, match="it was changed after it was saved"):
        b.load_state_dict(state)
    assert len(b) == 0
    b.load_state_dict(a.state_dict())  # the unchanged one loads
    torch.testing.assert_close(b.singular_values(), a.singular_values())


def test_exclude_decay_refuses_an_optimizer_whose_decay_is_in_the_gradient():
    """With torch.optim.Adam(weight_decay=0.5) the pushed step had lr·wd·θ taken out although Adam adds the decay to
    the gradient (no decoupled decay to remove): a wrong row, no error. AdamW's is removed, as before."""
    from specscope.optim import Muon

    for make, ok in ((lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.5), False),
                     (lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.5), True),
                     (lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.5, decoupled_weight_decay=True), True),
                     (lambda ps: Muon(ps, lr=0.1, weight_decay=0.5), True),
                     (lambda ps: torch.optim.SGD(ps, lr=0.1), True)):  # no decay: nothing to remove
        model = torch.nn.Linear(4, 3, bias=False)
        opt = make(list(model.parameters()))
        tracker = SEDTracker(list(model.parameters()), {}, window=2, k=1, every=1, update_delta="step", exclude_decay=True)
        tracker.after_backward(0, model, opt)
        model(torch.randn(5, 4)).square().sum().backward()
        tracker.after_backward(0, model, opt)
        opt.step()
        if ok:
            tracker.after_step(0, model, opt)
        else:
            with pytest.raises(ValueError, match="Adam adds its weight_decay to the gradient"):
                tracker.after_step(0, model, opt)
