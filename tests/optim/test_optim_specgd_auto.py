"""SpecGD's step formula, AutoGeometry's switch, records, and the random-feature check."""

import pytest
import torch

from specscope.errors import ConfigError
from specscope.optim import AutoGeometry, SpecGD, checks
from specscope.optim.auto import choose


def _exact(G):  # float64 SVD reference: (polar(G), ‖G‖_*), zero singular values mapped to 0
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    keep = (S > 1e-6 * S[0]).double()
    return ((U * keep) @ Vh).float(), float(S.sum())


@pytest.mark.parametrize("st", [None, 4.0])
def test_specgd_step_is_nuclear_norm_times_polar(st):
    w = torch.nn.Parameter(torch.zeros(12, 20))
    w.grad = torch.randn(12, 20)
    P, nuc = _exact(w.grad)
    SpecGD([("blk.weight", w)], lr=0.1, stable_rank=None if st is None else {"blk": st}.get).step()
    torch.testing.assert_close(w.detach(), -0.1 * nuc / (st or 1.0) * P, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1e36, 1e-30])
def test_specgd_steps_a_gradient_whose_nuclear_norm_leaves_float32_when_its_step_does_not(scale):
    """Entries ≈ 1e36 on a 64×96: ‖G‖_* ≈ 6e38 is beyond float32 while lr·‖G‖_*/st is not; it came back from the
    float32 norm as inf and the weights became inf (or NaN). Tiny gradients step as the rule says too."""
    w = torch.nn.Parameter(torch.zeros(64, 96))
    w.grad = scale * torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    U, S, Vh = torch.linalg.svd(w.grad.double(), full_matrices=False)
    SpecGD([("blk.weight", w)], lr=1e-3, stable_rank={"blk": 4.0}.get).step()
    assert torch.isfinite(w).all()
    length = 1e-3 * float(S.sum()) / 4.0  # the step's length: each entry within float32 rounding of the polar's
    torch.testing.assert_close(w.detach().double(), -length * (U @ Vh), rtol=1e-4, atol=1e-5 * length)


def test_specgd_missing_stable_rank_names_layer():
    w = torch.nn.Parameter(torch.zeros(4, 4))
    w.grad = torch.randn(4, 4)
    with pytest.raises(ConfigError, match="blocks.0.mlp.down"):
        SpecGD([("blocks.0.mlp.down.weight", w)], lr=0.1, stable_rank=lambda layer: None).step()


def test_specgd_steps_past_a_layer_whose_input_was_always_zero():
    """Behind ReLUs that are all dead a layer's input is zero: the probe has no st(A) for it (flag zero_input) and
    its gradient is zero, so SpecGD has nothing to scale there — it steps the other layers, that one only by its
    weight decay; a layer with no st(A) and a non-zero direction is still an error naming it."""
    from specscope.probe import Monitor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3, bias=False))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every unit dead for these inputs: the second layer's input is all zeros
    monitor = Monitor(model, every=1)
    opt = SpecGD([(n, p) for n, p in model.named_parameters() if p.ndim == 2], lr=0.1, stable_rank=monitor, weight_decay=0.5)
    dead = model[2].weight.detach().clone()
    for step in range(2):
        with monitor.step(step):
            model(torch.randn(5, 6)).square().mean().backward()
        assert monitor.stable_rank("2") is None
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(model[2].weight.detach(), dead * (1 - 0.1 * 0.5) ** 2)
    w = torch.nn.Parameter(torch.zeros(4, 4))
    w.grad = torch.zeros(4, 4)
    SpecGD([("blk.weight", w)], lr=0.1, stable_rank=lambda layer: None).step()  # zero direction: no error
    w.grad = torch.randn(4, 4)
    with pytest.raises(ConfigError, match="blk"):
        SpecGD([("blk.weight", w)], lr=0.1, stable_rank=lambda layer: None).step()


def test_specgd_momentum_is_sgd_buffer():
    w = torch.nn.Parameter(torch.zeros(6, 5))
    opt = SpecGD([w], lr=1.0, momentum=0.5)
    g1, g2 = torch.randn(6, 5), torch.randn(6, 5)
    w.grad = g1
    opt.step()
    w0 = w.detach().clone()
    w.grad = g2
    opt.step()
    P, nuc = _exact(0.5 * g1 + g2)
    torch.testing.assert_close(w.detach() - w0, -nuc * P, rtol=1e-5, atol=1e-5)


def test_choose_hysteresis():
    assert choose(None, 1.05, 1.0, 0.1) == 1
    assert choose(0, 1.05, 1.0, 0.1) == 0  # inside the band: stay Euclidean
    assert choose(0, 1.11, 1.0, 0.1) == 1
    assert choose(1, 0.95, 1.0, 0.1) == 1  # inside the band: stay spectral
    assert choose(1, 0.89, 1.0, 0.1) == 0


def test_auto_picks_by_nr_over_st_and_records():
    # rank-4 gradient of equal singular values: nr = 4. st = 2 -> advantage 2 (spectral); st = 16 -> 0.25 (Euclidean)
    u, v = torch.linalg.qr(torch.randn(8, 4))[0], torch.linalg.qr(torch.randn(6, 4))[0].T
    a = torch.nn.Parameter(torch.zeros(8, 6))
    b = torch.nn.Parameter(torch.zeros(8, 6))
    c = torch.nn.Parameter(torch.zeros(8, 6))
    st = {"a": 2.0, "b": 16.0, "c": None}
    opt = AutoGeometry([("a.weight", a), ("b.weight", b), ("c.weight", c)], lr=0.1, monitor=st.get)
    for p in (a, b, c):
        p.grad = u @ v
    opt.step()
    assert opt.choices == {"a": "spectral", "b": "euclidean", "c": "euclidean"}
    P, nuc = _exact(u @ v)
    torch.testing.assert_close(a.detach(), -0.1 * nuc / 2.0 * P, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.detach(), -0.1 * u @ v)
    recs = {(r.layer, r.metric): r for r in opt.pop_records()}
    assert recs[("a", "geometry")].value == 1.0 and recs[("b", "geometry")].value == 0.0
    assert recs[("a", "spectral_advantage")].value == pytest.approx(2.0, rel=1e-5)
    assert recs[("c", "geometry")].flag == "no_stable_rank"
    assert opt.pop_records() == []


def test_auto_every_k_keeps_choice_between_decisions():
    w = torch.nn.Parameter(torch.zeros(5, 5))
    st = {"w": 1.0}
    opt = AutoGeometry([("w.weight", w)], lr=0.01, monitor=st.get, every=3)
    metrics = []
    for k in range(6):
        st["w"] = 1.0 if k < 1 else 100.0  # after step 0 the advantage collapses
        w.grad = torch.randn(5, 5)
        opt.step()
        metrics.append(opt.choices["w"])
    assert metrics == ["spectral"] * 3 + ["euclidean"] * 3


@pytest.mark.parametrize("euclidean", ["momentum", "adamw"])
def test_auto_wraps_euclidean_variants(euclidean):
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = AutoGeometry([("w.weight", w)], lr=0.01, monitor=lambda layer: 1e6, euclidean=euclidean)
    ref = torch.nn.Parameter(w.detach().clone())
    torch_opt = (torch.optim.SGD([ref], lr=0.01, momentum=0.9, foreach=False) if euclidean == "momentum"
                 else torch.optim.AdamW([ref], lr=0.01, weight_decay=0.0, foreach=False))
    for _ in range(3):  # st huge -> always Euclidean, which must equal torch's optimizer
        g = torch.randn(6, 4)
        w.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_random_features_auto_within_10pct_of_best(activation):
    A, Y = checks.random_features(activation, d=16, width=128, n=256, d_out=8, seed=0)
    loss = {o: checks.run(o, A, Y, steps=15) for o in ("gd", "specgd", "auto")}
    best = min(loss["gd"], loss["specgd"])
    assert loss["auto"] <= 1.1 * best, loss
    # the two geometries really differ here (RF-1/RF-2), so the check can fail
    winner = "specgd" if activation == "relu" else "gd"
    assert loss[winner] < 0.9 * max(loss["gd"], loss["specgd"]), loss


def _monitored_mlp(every=1, **monitor_options):
    from specscope.probe import Monitor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3, bias=False))
    return model, Monitor(model, every=every, **monitor_options)


def _train(model, monitor, opt, steps=3):
    for step in range(steps):
        with monitor.step(step):
            (model(torch.randn(5, 6)) - 1).square().mean().backward()
        opt.step()
        opt.zero_grad()
        monitor.pop_records()


@pytest.mark.parametrize("options", [{"exclude": ["2"]}, {"include": ["0"]}])
def test_auto_steps_a_layer_the_monitor_leaves_out_euclidean(options):
    """A Monitor measuring some layers only (include= / exclude=) raised "no tracked weight named '2'" from inside the
    step; AutoGeometry takes such a layer as one the probe could not pair: Euclidean, warned about once, with the
    reason. SpecGD, which needs st(A) there, names the layer and the Monitor's options."""
    model, monitor = _monitored_mlp(**options)
    named = [(n, p) for n, p in model.named_parameters() if p.ndim == 2]
    opt = AutoGeometry(named, lr=0.05, monitor=monitor)
    with pytest.warns(UserWarning, match="'2' is unmeasured.*include=/exclude="):
        _train(model, monitor, opt)
    assert opt.choices["2"] == "euclidean"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model, monitor = _monitored_mlp(**options)
    opt = SpecGD([(n, p) for n, p in model.named_parameters() if p.ndim == 2], lr=0.05, stable_rank=monitor)
    with pytest.raises(ConfigError, match="layer '2'.*include=/exclude="):
        _train(model, monitor, opt)


def test_unnamed_parameters_with_a_monitor_name_the_fix():
    """Parameters passed without names are 'param0', … which no Monitor knows: the error says to pass named ones."""
    model, monitor = _monitored_mlp()
    opt = AutoGeometry([p for p in model.parameters() if p.ndim == 2], lr=0.05, monitor=monitor)
    with pytest.raises(ConfigError, match="param0.*named_parameters"):
        _train(model, monitor, opt)


def test_specgd_names_the_cause_when_an_input_was_zero_on_every_measured_step():
    """Behind a zero-initialized layer the next one's input is zero at step 0 and not after: with Monitor(every=3) its
    gradient is non-zero at step 1 with no st(A) yet. The error told the user to measure before the first step, which
    they had; it names the cause and the fix (measure every step)."""
    model, monitor = _monitored_mlp(every=3)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    model[1] = torch.nn.GELU()  # gelu(0) = 0, and the first layer still gets a gradient
    opt = SpecGD([(n, p) for n, p in model.named_parameters() if p.ndim == 2], lr=0.05, stable_rank=monitor)
    with pytest.raises(ConfigError, match=r"layer '2'.*all zeros.*every=1"):
        _train(model, monitor, opt)


def test_auto_records_carry_the_optimizer_step_the_monitor_labels():
    """A layer without a gradient at step 0 (unused there) counted its own steps: from step 1 on its records were
    labelled one step early, so a store kept two nuclear_rank values for one (layer, step), the Monitor's and the
    optimizer's. Every record now carries the optimizer's step, and the two de-duplicate; so after a step the optimizer
    did not take (a GradScaler skips one whose gradients overflowed)."""
    from specscope.probe import Monitor
    from specscope.records import not_measured_in

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(6, 6, bias=False), "b": torch.nn.Linear(6, 6, bias=False)})
    monitor = Monitor(model, every=1)
    opt = AutoGeometry(list(model.named_parameters()), lr=0.01, monitor=monitor)
    stored = []
    for step in range(4):
        with monitor.step(step):
            x = model["a"](torch.randn(5, 6))
            (x if step == 0 else model["b"](x)).square().mean().backward()
        if step != 2:
            opt.step()
        opt.zero_grad()
        measured, made = monitor.pop_records(), opt.pop_records()
        assert {r.step for r in made} == ({step} if step != 2 else set())
        stored += measured + not_measured_in(measured, made)
    keys = [(r.layer, r.metric, r.step) for r in stored]
    assert ("b", "nuclear_rank", 1) in keys and len(keys) == len(set(keys))


def test_a_monitor_that_measured_no_step_is_named_with_its_fix():
    """A training loop that never enters `with monitor.step(step):` leaves the Monitor without any measurement:
    AutoGeometry stepped every layer Euclidean in silence, and SpecGD blamed inputs that were all zeros."""
    import warnings

    model, monitor = _monitored_mlp()
    named = [(n, p) for n, p in model.named_parameters() if p.ndim == 2]
    opt = AutoGeometry(named, lr=0.05, monitor=monitor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            (model(torch.randn(5, 6)) - 1).square().mean().backward()
            opt.step()
    said = [w for w in caught if "measured no step" in str(w.message)]
    assert len(said) == 1 and "with monitor.step(step):" in str(said[0].message) and said[0].filename == __file__
    opt = SpecGD(named, lr=0.05, stable_rank=monitor)
    with pytest.raises(ConfigError, match=r"measured no step.*with monitor.step\(step\):") as e:
        opt.step()
    assert "all zeros" not in str(e.value)


@pytest.mark.parametrize("options", [{"ns_steps": 3}, {"ns_coefficients": (3, -3, 1)}, {"eps": 0.5}])
def test_specgd_and_auto_refuse_iteration_options_their_polar_ignores(options):
    """With the default polar="gram" (an eigendecomposition) ns_steps, ns_coefficients and eps were stored and never
    read, as Muon refuses them; a backend that reads them takes them, and an AdamW-driven "auto" group its eps."""
    from specscope.optim import spectral_param_groups

    key = next(iter(options))
    w = torch.nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(ConfigError, match=f"{key}=.* has no effect with polar='gram'"):
        SpecGD([{"params": [w], **options}], lr=0.1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match=f"{key}=.* has no effect with polar='gram'"):
        SpecGD(spectral_param_groups(model, 0.1, 1e-3, algorithm="specgd", **options))
    with pytest.raises(ConfigError, match=f"{key}=.* has no effect with polar='gram'"):
        AutoGeometry([{"params": [("w.weight", w)], **options}], lr=0.1, monitor=lambda layer: 2.0)
    SpecGD([{"params": [w], **options}], lr=0.1, polar="newton_schulz")
    AutoGeometry([{"params": [("w.weight", w)], **options}], lr=0.1, monitor=lambda layer: 2.0, polar="newton_schulz")
    if key == "eps":
        AutoGeometry([("w.weight", w)], lr=0.1, monitor=lambda layer: 2.0, euclidean="adamw", eps=0.5)
