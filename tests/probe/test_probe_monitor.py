"""Monitor behaviour: accumulation, schedule, gradient sources, no effect on training, bad input, state."""

import math
import warnings

import pytest
import torch
from torch import nn

from specscope import linalg
from specscope.errors import ConfigError, NonFiniteError, SpecscopeError
from specscope.probe import Monitor, is_log_step


def by(records, metric):
    return {r.layer: r for r in records if r.metric == metric}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_accumulation_covers_all_micro_batches():
    x, y = torch.randn(12, 8) + 0.3, torch.randn(12, 4)
    loss = lambda m, a, b: (m(a) - b).square().sum()  # noqa: E731 - a sum, so micro-batch grads add exactly
    one, two = mlp(), mlp()
    m1, m2 = Monitor(one, estimator="gram"), Monitor(two, estimator="gram")
    with m1.step(0):
        loss(one, x, y).backward()
    with m2.step(0):
        for sl in (slice(0, 5), slice(5, 12)):
            loss(two, x[sl], y[sl]).backward()
    r1, r2 = m1.pop_records(), m2.pop_records()
    for metric in ("stable_rank", "nuclear_rank", "grad_fro_norm", "grad_nuclear_norm"):
        a, b = by(r1, metric), by(r2, metric)
        for layer in ("0", "2"):
            assert b[layer].value == pytest.approx(a[layer].value, rel=1e-5), (metric, layer)
    assert by(r2, "stable_rank")["0"].rows == 12
    assert by(r1, "stable_rank")["0"].value == pytest.approx(float(linalg.stable_rank(x.double())), rel=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv", "grouped conv"])
def test_an_input_buffer_reused_across_micro_batches_is_measured(kind):
    """A loop that copies each micro-batch into one buffer (`buf.copy_(next)`: pinned host buffers, the static inputs
    of CUDA-graph loops) was refused as an in-place change: the probe held the first micro-batch's wide input to the
    step's end and found it overwritten. An input outside autograd is now copied when held; st(A) is the one of
    every micro-batch's rows, as with fresh tensors."""
    torch.manual_seed(0)
    if kind == "linear":  # 300 features: wide enough to be held
        make, shape = (lambda: nn.Sequential(nn.Linear(300, 16), nn.ReLU(), nn.Linear(16, 4))), (6, 300)
    else:  # 32 channels × 3×3 = 288 features a group, one or two groups
        groups = 2 if kind == "grouped conv" else 1
        make = lambda: nn.Sequential(nn.Conv2d(32 * groups, 8, 3, padding=1, groups=groups), nn.Flatten(), nn.Linear(8 * 25, 4))  # noqa: E731
        shape = (3, 32 * groups, 5, 5)
    parts = [torch.randn(*shape) * (1 + k) for k in range(3)]
    records = []
    for reused in (False, True):
        torch.manual_seed(1)
        model = make()
        mon = Monitor(model, estimator="gram")
        buf = torch.empty(shape)
        with mon.step(0):
            for x in parts:
                if reused:
                    buf.copy_(x)
                model(buf if reused else x.clone()).square().mean().backward()
        records.append(by(mon.pop_records(), "stable_rank")["0"])
    fresh, reused = records
    assert reused.rows == fresh.rows and reused.value == pytest.approx(fresh.value, rel=1e-5)
    if kind == "linear":
        assert reused.value == pytest.approx(float(linalg.stable_rank(torch.cat(parts).double())), rel=1e-4)


def test_a_weight_unfrozen_after_the_monitor_was_built_is_named_once():
    """Frozen weights are not tracked; one unfrozen later for training was never measured, without a word."""
    model = mlp()
    model[0].weight.requires_grad_(False)
    mon = Monitor(model)
    model[0].weight.requires_grad_(True)
    x = torch.randn(6, 8)
    with pytest.warns(UserWarning, match=r"weights \['0'\] were frozen when the Monitor was built and are trained now"):
        with mon.step(0):
            model(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        with mon.step(1):
            model(x).sum().backward()
    excluded = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    excluded[0].weight.requires_grad_(False)
    quiet = Monitor(excluded, exclude=["[02]"])  # a frozen weight the patterns leave out is not named
    excluded[0].weight.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with quiet.step(0):
            excluded(x).sum().backward()


def test_eval_passes_without_grad_are_not_counted():
    model = mlp()
    mon = Monitor(model)
    with mon.step(0):
        with torch.no_grad():
            model(torch.randn(100, 8))
        model(torch.randn(7, 8)).sum().backward()
    assert by(mon.pop_records(), "stable_rank")["0"].rows == 7


def test_schedule_every_and_log_spaced():
    model = mlp()
    mon = Monitor(model, every=3)
    assert [s for s in range(10) if mon.is_measured(s)] == [0, 3, 6, 9]
    mon = Monitor(model, every=None, log_spaced=True)
    measured = [s for s in range(1001) if mon.is_measured(s)]
    assert measured[:6] == [0, 1, 2, 3, 4, 5] and 7 not in measured and 1000 in measured
    assert 25 <= len(measured) <= 35  # about 10 per decade over three decades
    assert is_log_step(100) and not is_log_step(101)
    for step in range(8):
        with mon.step(step):
            model(torch.randn(3, 8)).sum().backward()
    assert sorted({r.step for r in mon.pop_records()}) == [0, 1, 2, 3, 4, 5, 6]


def test_unmeasured_step_records_nothing_and_arms_nothing():
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    def armed():
        return bool(_get_current_function_mode_stack()) or _get_current_dispatch_mode() is not None

    model = mlp()
    mon = Monitor(model, every=2)
    with mon.step(1):
        assert not armed()
        model(torch.randn(3, 8)).sum().backward()
    assert mon.pop_records() == [] and not model[0]._forward_pre_hooks
    with mon.step(2):
        assert armed()
        model(torch.randn(3, 8)).sum().backward()
    assert mon.pop_records() and not armed()


def train(model, steps, monitor=None, micro=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for step in range(steps):
        opt.zero_grad()
        ctx = monitor.step(step) if monitor else torch.enable_grad()
        with ctx:
            for _ in range(micro):
                x = torch.randn(6, 8, generator=g)
                nn.functional.dropout(model(x), 0.2).square().mean().backward()  # dropout draws global RNG
        opt.step()
        if monitor:
            monitor.after_optimizer_step()
            monitor.pop_records()
    return [p.detach().clone() for p in model.parameters()], torch.get_rng_state()


@pytest.mark.parametrize("kw", [dict(), dict(gradient="update", estimator="gram", extras=("topk", "entropy_rank", "weight_stable_rank")),
                                dict(every=2, estimator="exact")])
def test_probe_does_not_change_training_bitwise(kw):
    torch.manual_seed(3)
    ref, rng_ref = train(mlp(), 5)
    torch.manual_seed(3)
    model = mlp()
    got, rng = train(model, 5, Monitor(model, **kw))
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert torch.equal(rng_ref, rng)


def test_gradient_update_and_callable():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = Monitor(model, gradient="update", estimator="gram")
    with mon.step(0):
        model(torch.randn(5, 8)).sum().backward()
    assert mon.pop_records() == []  # the update is read after the optimizer step
    before = model[0].weight.detach().clone()
    opt.step()
    mon.after_optimizer_step()
    nr = by(mon.pop_records(), "nuclear_rank")["0"].value
    assert nr == pytest.approx(float(linalg.nuclear_rank(model[0].weight.detach() - before)), rel=1e-4)
    with mon.step(1):
        model(torch.randn(5, 8)).sum().backward()
    with pytest.raises(SpecscopeError, match="after_optimizer_step"), mon.step(2):
        pass

    buf = lambda name, p: opt.state[p]["momentum_buffer"]  # noqa: E731
    mon = Monitor(model, gradient=buf, estimator="gram")
    with mon.step(0):
        model(torch.randn(5, 8)).sum().backward()
    opt.step()
    mon.after_optimizer_step()
    nr = by(mon.pop_records(), "nuclear_rank")["2"].value
    assert nr == pytest.approx(float(linalg.nuclear_rank(opt.state[model[2].weight]["momentum_buffer"])), rel=1e-4)


def nan_model():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")  # NaN gradient of layer 0, finite input to layer 2
    return model


def test_nonfinite_raise_names_layer_and_step():
    model = mlp()
    mon = Monitor(model)
    x = torch.randn(4, 8)
    x[1, 2] = float("inf")
    with pytest.raises(NonFiniteError, match=r"activation entering '0' at step 7"), mon.step(7):
        model(x).sum().backward()
    model = nan_model()
    mon = Monitor(model)
    with pytest.raises(NonFiniteError, match=r"gradient of '0' at step 2"), mon.step(2):
        model(torch.randn(4, 8)).sum().backward()


def test_nonfinite_raise_names_the_first_input_in_forward_order_not_the_first_weight():
    """A tied embedding is the model's first weight and its input — the head's — the forward's last: a NaN made in a
    middle layer must be named where it enters, not at the tied head downstream of it."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid, self.out = nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, ids):
            h = self.out(self.mid(self.emb(ids)))
            return h @ self.emb.weight.T  # the head, tied to the embedding

    torch.manual_seed(0)
    model = Tied()
    with torch.no_grad():
        model.mid.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"activation entering 'out' at step 0"), Monitor(model).step(0):
        model(torch.randint(0, 16, (4, 5))).sum().backward()


def test_nonfinite_warn_records_flag_and_recovers():
    model = mlp()
    mon = Monitor(model, nonfinite="warn")
    x = torch.randn(4, 8)
    x[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="activation entering '0' at step 0"), mon.step(0):
        model(x).sum().backward()
    recs = mon.pop_records()
    bad = [r for r in recs if r.flag == "nonfinite"]
    assert {r.layer for r in bad} >= {"0"} and all(math.isnan(r.value) for r in bad if r.metric == "stable_rank")
    model.zero_grad()
    with mon.step(1):  # the warm-start state was not poisoned
        model(torch.randn(4, 8)).sum().backward()
    assert all(math.isfinite(r.value) and r.flag == "" for r in mon.pop_records())


def test_power_estimator_bounds_and_converges_with_warm_start():
    torch.manual_seed(0)
    model = nn.Linear(64, 8)
    mon = Monitor(model, estimator="power", power_iters=1, power_block=2)
    scale = torch.linspace(1, 2, 64)
    scale[-1] = 3.0  # σ_2/σ_1 ≈ 2/3: each subspace iteration shrinks the error of σ_1² by ≈ (2/3)²
    base = torch.randn(256, 64) @ torch.diag(scale)
    errs = []
    for step in range(12):  # consecutive steps: one subspace iteration each (no refinement once warm)
        x = base + 0.01 * torch.randn(256, 64)
        with mon.step(step):
            model(x).sum().backward()
        st = by(mon.pop_records(), "stable_rank")["weight"].value
        exact = float(linalg.stable_rank(x.double()))
        assert st >= exact * (1 - 1e-5)  # σ_1² is estimated from below, so st from above
        errs.append(st / exact - 1)
    assert errs[-1] < 1e-3 and errs[-1] < errs[0]
    # state_dict carries the warm block: a fresh monitor resumes with the same estimate
    fresh = Monitor(model, estimator="power", power_iters=1, power_block=2)
    fresh.load_state_dict(mon.state_dict())
    x = base.clone()
    for m in (mon, fresh):
        with m.step(13):  # after mon's last step (11), not next to it: neither is warm
            model(x).sum().backward()
    assert by(mon.pop_records(), "stable_rank")["weight"].value == by(fresh.pop_records(), "stable_rank")["weight"].value
    assert fresh.stable_rank("weight") == mon.stable_rank("weight")


def test_extras_records_and_bad_options():
    model = mlp()
    mon = Monitor(model, extras=("topk", "entropy_rank", "weight_stable_rank"), topk=2)
    with mon.step(0):
        model(torch.randn(9, 8)).sum().backward()
    recs = by(mon.pop_records(), "grad_sigma_1")
    assert recs["0"].value == pytest.approx(float(linalg.singular_values(model[0].weight.grad)[0]), rel=1e-5)
    from specscope.errors import ConfigError

    for kw in (dict(every=0), dict(estimator="svd"), dict(gradient="momentum"), dict(extras=("x",)), dict(nonfinite="ignore")):
        with pytest.raises(ConfigError):
            Monitor(model, **kw)
    with pytest.raises(ConfigError, match="known"):
        mon.stable_rank("nope")


def test_include_exclude_select_weights_and_reject_patterns_that_select_nothing():
    from specscope.errors import ConfigError

    model = mlp()
    assert [s.name for s in Monitor(model, exclude=("0",)).slots.values()] == ["2"]
    assert [s.name for s in Monitor(model, include=("0",)).slots.values()] == ["0"]
    with pytest.raises(ConfigError, match=r"exclude patterns \['.\*'\] match no weight"):  # a regex, not fnmatch
        Monitor(model, exclude=(".*",))
    with pytest.raises(ConfigError, match=r"include patterns \['fc'\] match no weight"):
        Monitor(model, include=("fc",))
    with pytest.raises(ConfigError, match="leaves no weight to measure"):
        Monitor(model, exclude=("*",))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("estimator", ["power", "gram"])
def test_cuda_records_match_cpu(tiny_gpt, lm_step, tokens, estimator):
    out = {}
    for dev in ("cpu", "cuda"):
        model = tiny_gpt(n_layer=2).to(dev)
        mon = Monitor(model, estimator=estimator)
        for step in range(2):
            model.zero_grad()
            with mon.step(step):
                lm_step(model, tokens.to(dev)).backward()
        out[dev] = {(r.layer, r.metric): r.value for r in mon.pop_records()}
    assert out["cpu"].keys() == out["cuda"].keys()
    for k, v in out["cpu"].items():  # TF32 is off by default for matmuls, so float32 agreement
        assert out["cuda"][k] == pytest.approx(v, rel=2e-3), k


def test_accelerator_nuclear_route_records_within_its_bound(monkeypatch, tiny_gpt, lm_step, tokens):
    """The route a CUDA Monitor takes for ‖G‖_* (matmuls only), forced on the CPU: records say `polar`,
    and nr(G) is within 2·10⁻⁴ (twice ‖G‖_*'s bound) of the float64-eigenvalue route on the same steps."""
    from specscope.probe import estimators as E
    out = {}
    for method in ("eigh", "polar"):
        monkeypatch.setattr(E, "NUCLEAR_METHOD", method)
        model = tiny_gpt(n_layer=2)
        mon = Monitor(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(3):
            opt.zero_grad()
            with mon.step(step):
                lm_step(model, tokens).backward()
            opt.step()
        out[method] = [r for r in mon.pop_records() if r.metric == "nuclear_rank"]
    assert {r.estimator for r in out["eigh"]} == {"gram"} and {r.estimator for r in out["polar"]} == {"polar"}
    assert [(r.step, r.layer) for r in out["eigh"]] == [(r.step, r.layer) for r in out["polar"]]
    for a, b in zip(out["eigh"], out["polar"]):
        assert b.value == pytest.approx(a.value, rel=2e-4), (a.layer, a.step)


def test_accelerator_route_needs_no_large_eigendecomposition(monkeypatch, tiny_gpt, lm_step, tokens):
    """What makes a measured step latency-bound on a GPU — symmetric eigensolves of Gram-sized matrices and
    QR factorizations, each one solver call per matrix there — is absent from the accelerator's route
    (forced here on the CPU): counted at the dispatcher, a warm measured step asks for no QR and no
    eigendecomposition larger than the Krylov/Ritz problems (≤ 32, one batched call on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from specscope.probe import estimators as E

    class Eigs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "eigh" in func.__name__ or "eigvalsh" in func.__name__:
                self.sizes.append(args[0].shape[-1])
            if func.__name__.split(".")[0] in ("linalg_qr", "geqrf", "orgqr", "householder_product"):
                self.sizes.append("qr")
            return func(*args, **(kwargs or {}))

    sizes = {}
    for method in ("eigh", "polar"):
        monkeypatch.setattr(E, "NUCLEAR_METHOD", method)
        monkeypatch.setattr(E, "IMPLICIT_MIN", 64)  # both st(A) routes: the 48-wide inputs by the Gram, 192 by Krylov
        monkeypatch.setattr(E, "DIRECT_MAX", 0)  # the 48-wide Grams by the certified iterations, as on a GPU
        if method == "polar":
            monkeypatch.setattr(E, "orthonormal", E.cholesky_qr)
        model = tiny_gpt(n_layer=2, d_model=48)  # Grams of 48 and 192: above the batched-solver size
        mon = Monitor(model)
        for step in range(3):
            model.zero_grad()
            with Eigs() as count:
                with mon.step(step):
                    lm_step(model, tokens).backward()
            sizes.setdefault(method, []).append(count.sizes)
    # the CPU's routes, over the three steps (the cold first one solves larger Ritz problems on any CPU; which warm
    # solves reach the dispatcher depends on the CPU: an AMD one's nr(G) eigensolves run in OpenBLAS through ctypes)
    cpu = [n for step in sizes["eigh"] for n in step]
    assert any(n != "qr" and n > 32 for n in cpu) and "qr" in cpu, sizes["eigh"]
    warm = [n for step in sizes["polar"][1:] for n in step]
    assert warm and "qr" not in warm and max(warm) <= 32, sizes["polar"]


def test_accelerator_finish_launches_do_not_grow_with_the_number_of_layers(monkeypatch, tiny_gpt, lm_step, tokens):
    """On a GPU a measured step's finish is bound by kernel launches: on the accelerator's route (forced here on the
    CPU) the ops it dispatches stay the same from 2 to 4 layers — a check and a norm per input grew them by ~60 a
    layer (one `(bound <= tol) & isfinite(θ)` and one ‖A‖_F² product per input, one float64 cast per gradient)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from specscope.probe import estimators as E

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.namespace == "aten" and not func.is_view and func.__name__ != "_unsafe_view.default"
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(E, "NUCLEAR_METHOD", "polar")
    monkeypatch.setattr(E, "orthonormal", E.cholesky_qr)
    monkeypatch.setattr(E, "solves_in_batches", lambda device: True)
    monkeypatch.setattr(E, "IMPLICIT_MIN", 64)  # the 64- and 256-wide inputs held for the batched Krylov solves
    ops = {}
    for n_layer in (2, 4):  # (1 layer has one input of a shape: solved alone, not as a batch)
        model = tiny_gpt(n_layer=n_layer, d_model=64)
        mon = Monitor(model)
        for step in range(3):  # warm blocks from the second step on
            model.zero_grad()
            with mon.step(step):
                lm_step(model, tokens).backward()
        model.zero_grad()
        ctx = mon.step(3)
        ctx.__enter__()
        lm_step(model, tokens).backward()
        with Count() as count:
            ctx.__exit__(None, None, None)
        ops[n_layer] = count.n
        assert {r.metric for r in mon.pop_records()} >= {"stable_rank", "nuclear_rank"}
    assert ops[4] == ops[2], ops


def test_a_compiled_submodule_keeps_the_names_it_has_uncompiled():
    """`self.model = torch.compile(model)` (Lightning's usual pattern) put `_orig_mod.` into every name: the
    Monitor's layers, the optimizer's routing and `exclude` patterns written for the plain model stopped matching."""
    from specscope.optim import Hybrid, spectral_param_groups

    class Wrapper(nn.Module):
        def __init__(self, compiled: bool):
            super().__init__()
            torch.manual_seed(0)
            body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
            self.model = torch.compile(body, backend="eager") if compiled else body

        def forward(self, x):
            return self.model(x)

    plain, compiled = Wrapper(False), Wrapper(True)
    assert "model._orig_mod.0.weight" in dict(compiled.named_parameters())
    assert Monitor(compiled).layers == Monitor(plain).layers == ["model.0", "model.2", "model.4"]
    groups = {m: spectral_param_groups(m, 0.02, 3e-4, exclude=["model.2"]) for m in (plain, compiled)}
    names = {m: [[n for n, _ in g["params"]] for g in gs] for m, gs in groups.items()}
    assert names[plain] == names[compiled] and "model.2.weight" not in names[plain][0]
    opt = Hybrid(groups[compiled])
    monitor = Monitor(compiled, exclude=["model.4"])
    x = torch.randn(32, 8)
    with monitor.step(0):
        compiled(x).square().mean().backward()
    opt.step()
    assert {r.layer for r in monitor.pop_records()} == {"model.0", "model.2"}


def test_a_gradient_cleared_inside_the_block_is_named_not_read_as_undecided():
    """optimizer.step() and zero_grad() inside `with monitor.step()` left nothing to measure: no record, no
    warning, and advice() called every weight "undecided" (a verdict about nr/st) with 0 measurements."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model)
    x = torch.randn(32, 8)
    with pytest.warns(UserWarning, match="had no gradient when the `with monitor.step"), monitor.step(0):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()  # set_to_none: .grad is None when the block ends
    assert set(monitor.unmeasured) == {"0", "2"}
    assert set(monitor.advice().verdict) == {"unmeasured"}
    with monitor.step(1):  # zero_grad(set_to_none=False): a zero gradient, whose nr is undefined
        model(x).square().mean().backward()
        opt.zero_grad(set_to_none=False)
    nr = [r for r in monitor.pop_records() if r.step == 1 and r.metric == "nuclear_rank"]
    assert len(nr) == 2 and all(r.flag == "zero_gradient" and math.isnan(r.value) for r in nr)


def test_an_unmeasured_weight_names_no_estimator_in_the_advice():
    """`diagnose` showed estimator "gram" on the row of a weight that no estimator ever measured."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(8, 4), "unused": nn.Linear(8, 4)})
    monitor = Monitor(model)
    with pytest.warns(UserWarning), monitor.step(0):
        model["used"](torch.randn(16, 8)).square().mean().backward()
    table = monitor.advice().set_index("layer")
    assert table.loc["unused", "verdict"] == "unmeasured" and table.loc["unused", "estimator"] == ""
    assert table.loc["used", "estimator"] == "gram"


def test_a_restored_monitor_keeps_what_its_measured_steps_learned():
    """The HF/Lightning callbacks restore a Monitor with load_state_dict on resume: every weight read as 'unseen' with
    0 rows, the head lost its role and roles=monitor sent it (and an added position table) to Muon."""
    from specscope.optim import spectral_param_groups

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(8, 16) * 0.1)  # added to the input: an embedding by use
            self.body, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x):
            return self.head(torch.relu(self.body(x + self.pos)).mean(1))

    def routes(model, monitor):
        groups = spectral_param_groups(model, lr_spectral=0.02, lr_adamw=3e-4, roles=monitor)
        return {g["algorithm"]: sorted(n for n, _ in g["params"]) for g in groups}

    torch.manual_seed(0)
    model = Net()
    monitor = Monitor(model, every=1)
    with pytest.warns(UserWarning, match="'pos' is unmeasured"):
        for step in range(3):
            with monitor.step(step):
                model(torch.randn(32, 8, 16)).square().sum().backward()
            model.zero_grad()
    again = Net()
    again.load_state_dict(model.state_dict())
    restored = Monitor(again, every=1)
    restored.load_state_dict(monitor.state_dict())
    columns = ["layer", "kind", "rows", "measurements", "verdict"]
    assert restored.advice()[columns].equals(monitor.advice()[columns])
    assert restored.roles == monitor.roles and restored.unmeasured == monitor.unmeasured
    assert routes(again, restored) == routes(model, monitor) == {"muon": ["body.weight"],
                                                                "adamw": ["body.bias", "head.bias", "head.weight", "pos"]}


@pytest.mark.parametrize("make, message", [
    (lambda: Monitor(lambda x: x), r"Monitor\(model=function\): pass the nn.Module"),
    (lambda: Monitor(nn.Sequential(nn.ReLU(), nn.LayerNorm(4))), "has no trainable weight of ≥ 2 dims to measure"),
    (lambda: Monitor(nn.Linear(4, 4), history=0), r"Monitor\(history=0\) must be an int >= 1"),
])
def test_a_monitor_that_could_measure_nothing_is_refused(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_a_step_that_is_not_an_int_is_named():
    import numpy as np

    monitor = Monitor(nn.Linear(4, 4), every=1)
    with pytest.raises(ConfigError, match=r"monitor.step\('a'\): pass the optimizer step"):
        with monitor.step("a"):
            pass
    with monitor.step(np.int64(0)):  # a numpy step counter is an int
        monitor.model(torch.randn(3, 4)).sum().backward()
    assert {r.metric for r in monitor.pop_records()} >= {"stable_rank", "nuclear_rank"}


def test_a_stack_of_expert_matrices_gets_no_nuclear_rank_of_its_flattening():
    """MoE experts stored as one [experts, out, in] tensor (transformers' Mixtral) and multiplied by a grouped or
    batched product: the probe cannot pair it, and nr(G) of its [experts, out·in] flattening was recorded as if it
    were a weight's."""

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(8, 8)
            self.stack = nn.Parameter(torch.randn(4, 8, 8) / 8)

        def forward(self, x):  # every expert on every token, summed
            return torch.einsum("ni,eoi->no", self.up(x), self.stack)

    model = Experts()
    monitor = Monitor(model, every=1)
    with pytest.warns(UserWarning, match="'stack' is unmeasured"):
        with monitor.step(0):
            model(torch.randn(16, 8)).square().sum().backward()
    metrics = {(r.layer, r.metric) for r in monitor.pop_records()}
    assert ("stack", "grad_fro_norm") in metrics and ("stack", "nuclear_rank") not in metrics
    assert ("up", "nuclear_rank") in metrics and "stack" in monitor.unmeasured


@pytest.mark.parametrize("lapack_choice", ["openblas", "torch"])
def test_gradient_norms_of_a_transformers_gpt2_match_float64_svd_on_either_lapack(monkeypatch, lapack_choice):
    """transformers' GPT-2 at a width where nr(G)'s Grams go to the one-thread workers (256 and 1024 wide), after
    two AdamW steps: ‖G‖_F and ‖G‖_* of every weight on the measured step equal the float64 SVD of its gradient, with
    the Grams and eigenvalues on numpy's OpenBLAS (ctypes) or on torch's LAPACK; the OpenBLAS run must take that route."""
    T = pytest.importorskip("transformers")
    from specscope.linalg import lapack
    if lapack_choice == "openblas" and lapack._openblas() is None:
        pytest.skip("numpy's LAPACK here is not an OpenBLAS with per-thread thread counts")
    monkeypatch.setenv(lapack.ENV, lapack_choice)
    solves = []
    monkeypatch.setattr(lapack, "_syevd", lambda C, *a, _f=lapack._syevd, **k: solves.append(C.shape) or _f(C, *a, **k))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the workers' pool
    try:
        torch.manual_seed(0)
        model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=256, n_head=4, vocab_size=64, n_positions=32))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mon = Monitor(model, every=2)  # steps 0 and 2 measured
        ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(2))
        for step in range(3):
            opt.zero_grad()
            with mon.step(step):
                model(input_ids=ids, labels=ids).loss.backward()
            records = mon.pop_records()
            if step < 2:
                opt.step()
    finally:
        torch.set_num_threads(threads)
    fro, nuc = by(records, "grad_fro_norm"), by(records, "grad_nuclear_norm")
    params = dict(model.named_parameters())
    checked = 0
    for layer, r in nuc.items():
        G = params[f"{layer}.weight"].grad.double()
        S = torch.linalg.svdvals(G)
        # 128 tokens: rank-deficient gradients. A float64 Gram leaves each null direction an eigenvalue of at most
        # ~k·eps·σ₁², a singular value of sqrt(k·eps)·σ₁: the sum is off by at most k·sqrt(k·eps)·σ₁
        k = min(G.shape)
        tol = k * (k * torch.finfo(torch.float64).eps) ** 0.5 * float(S[0])
        assert r.value == pytest.approx(float(S.sum()), abs=tol), layer
        assert fro[layer].value == pytest.approx(float(S.square().sum().sqrt()), rel=1e-12), layer
        checked += min(G.shape) >= 256
    assert checked >= 4, f"the 256-wide weights reached the workers' route: {sorted(nuc)}"
    assert sum(s[-1] == 256 for s in solves) == (8 if lapack_choice == "openblas" else 0), solves  # 2 steps × 4 weights


def test_a_float64_model_with_wide_inputs_is_measured():
    """A float64 model whose inputs have ≥ 256 features (the implicit route) crashed in the first measured step:
    torch's multi-tensor norm refused to narrow float64 to the float32 it accumulated in."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 4).double()
    mon = Monitor(model)
    for step in range(3):
        x = torch.randn(64, 256, dtype=torch.float64) @ torch.diag(torch.linspace(0.1, 3, 256, dtype=torch.float64))
        with mon.step(step):
            model(x).square().mean().backward()
        (rec,) = [r for r in mon.pop_records() if r.metric == "stable_rank"]
        exact = float(x.square().sum() / torch.linalg.matrix_norm(x, 2) ** 2)
        assert rec.value == pytest.approx(exact, rel=1e-4)


def _lm(tie: bool):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                            tie_word_embeddings=tie))


def _measure(model, mon, step, *batches):
    with warnings.catch_warnings(record=True) as said, mon.step(step):
        warnings.simplefilter("always")
        for ids in batches:
            model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad()
    return {r.layer: r for r in mon.pop_records() if r.metric == "stable_rank"}, [str(w.message) for w in said]


def test_weights_replaced_after_the_monitor_was_built_are_followed():
    """load_state_dict(assign=True) swaps every weight for a new tensor: the Monitor went on reporting the old ones as
    'not used in this step' (keeping their verdicts) and never measured the new ones."""
    model = _lm(tie=False)
    mon = Monitor(model)
    ids = torch.randint(0, 128, (2, 16))
    before, _ = _measure(model, mon, 0, ids)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    after, _ = _measure(model, mon, 1, ids)
    assert not mon.unmeasured and after.keys() == before.keys()
    assert all(after[k].value == pytest.approx(before[k].value, rel=1e-6) for k in after)  # the same values, new tensors
    assert set(mon.advice().measurements) == {2}


def test_a_resized_vocabulary_is_measured_at_its_new_size():
    """resize_token_embeddings after the Monitor was built: a measured step of two micro-batches crashed (token counts
    of the old vocabulary size against the new), and records kept the old shape."""
    model = _lm(tie=True)
    mon = Monitor(model)
    _measure(model, mon, 0, torch.randint(0, 128, (2, 16)))
    model.resize_token_embeddings(160)
    x1, x2 = torch.full((2, 8), 5), torch.full((2, 8), 7)
    x1[0, 0], x2[0, 0] = 140, 159
    records, _ = _measure(model, mon, 1, x1, x2)
    assert not mon.unmeasured and "model.embed_tokens" in records


def test_a_weight_gone_from_the_model_is_named_and_new_ones_are_announced():
    """weight_norm applied after the Monitor was built replaces '2.weight' by two new tensors: the old weight read
    'not used in this step' (keeping its verdict) and the new ones went unmentioned."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    mon = Monitor(model)
    x = torch.randn(32, 8)
    with mon.step(0):
        model(x).square().mean().backward()
    torch.nn.utils.parametrizations.weight_norm(model[2])
    with pytest.warns(UserWarning, match=r"weights \['2.parametrizations.weight.original0', '2.parametrizations.weight.original1'\] "
                                         "appeared in the model after the Monitor was built") as caught, mon.step(1):
        model(x).square().mean().backward()
    assert {w.filename for w in caught if "appeared" in str(w.message)} == {__file__}  # the user's line, not contextlib's
    assert set(mon.unmeasured) == {"2"} and "no longer a weight of the model under the name '2'" in mon.unmeasured["2"]
    assert mon.advice().set_index("layer").verdict["2"] == "unmeasured"


def test_close_inside_a_measured_step_measures_nothing_more():
    """close() says the Monitor measures nothing afterwards; called inside an open measured step, that step was still
    recorded on leaving the block."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    mon = Monitor(model)
    with mon.step(0):
        model(torch.randn(16, 8)).square().mean().backward()
        mon.close()
    assert mon.pop_records() == [] and all(type(p) is torch.nn.Parameter for p in model.parameters())
    with mon.step(1):
        model(torch.randn(16, 8)).square().mean().backward()
    assert mon.pop_records() == []


def test_weights_observed_by_hand_each_get_their_own_inputs_stable_rank():
    """Twelve einsum weights of one width, each passed to monitor.observe after the forward: the inputs' statistics were
    keyed by id(A), which a later input reuses once A is freed, and the Grams of weights with equal keys were solved as
    one — 8 to 23 of 240 st(A) values were another weight's (7.78 against 1.30)."""
    torch.manual_seed(0)
    ws = nn.ParameterList([nn.Parameter(torch.randn(16, 16) / 4) for _ in range(12)])
    monitor = Monitor(ws, every=1)
    for step in range(6):
        ws.zero_grad()
        with monitor.step(step):
            x, inputs = torch.randn(64, 16), []
            for i, w in enumerate(ws):
                inputs.append(x)
                x = torch.tanh(torch.einsum("bi,oi->bo", x, w)) * torch.linspace(0.1, 2, 16) ** (i % 4)
            for i, w in enumerate(ws):
                monitor.observe(str(i), w, inputs[i])
            x.square().mean().backward()
        st = {r.layer: r.value for r in monitor.pop_records() if r.metric == "stable_rank"}
        for i, A in enumerate(inputs):
            s = torch.linalg.svdvals(A.double())
            assert st[str(i)] == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-4), (step, i)


def test_an_embedding_bag_is_an_embedding_not_a_hidden_matrix():
    """nn.EmbeddingBag (a fastText-style classifier): its role read 'hidden', so spectral_param_groups(roles=monitor)
    sent the table to Muon, and its reason said to pass one-hot inputs of 1000 features to monitor.observe."""
    from specscope.optim import spectral_param_groups

    class Bags(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.bag, self.fc, self.out = nn.EmbeddingBag(1000, 32, mode="mean"), nn.Linear(32, 32), nn.Linear(32, 4)

        def forward(self, ids, offsets):
            return self.out(torch.relu(self.fc(self.bag(ids, offsets))))

    model = Bags()
    monitor = Monitor(model, every=1)
    for step in range(2):  # step 1 is watched by the weights themselves
        model.zero_grad()
        with warnings.catch_warnings(record=True), monitor.step(step):
            torch.nn.functional.cross_entropy(model(torch.randint(0, 1000, (40,)), torch.arange(0, 40, 5)),
                                              torch.randint(0, 4, (8,))).backward()
        assert monitor.roles["bag"] == "embedding" and "nn.EmbeddingBag" in monitor.unmeasured["bag"]
        assert set(monitor.unmeasured) == {"bag"}
    for roles in (monitor, None):
        routed = {n: g["algorithm"] for g in spectral_param_groups(model, 0.02, 3e-4, roles=roles) for n, _ in g["params"]}
        assert routed["bag.weight"] == "adamw" and routed["fc.weight"] == "muon"


@pytest.mark.parametrize("n, scale", [(512, 1e18), (512, 1e-25), (128, 9e17), (32, 1e20), (8, 1e-22), (8, 1e-23)])
def test_inputs_near_the_ends_of_float32_are_measured_or_flagged_never_a_crash(n, scale):
    """st(A) does not depend on A's scale, but the probe's Grams and products are float32: a finite input of 1e18 raised
    LinAlgError from eigh (past nonfinite='warn'), one of 1e-25 read as a zero input. A held wide input (512) is now
    solved at unit scale, a finite Gram near float32's range at unit scale before its solve and its trace summed in
    float64 (128 features of 9e17 read non-finite); a narrow input whose float32 Gram itself
    overflowed (32 features of 1e20) is flagged non-finite."""
    lin = nn.Linear(n, 8)
    monitor = Monitor(lin, every=1, nonfinite="warn")
    A = scale * torch.randn(64, n, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True), monitor.step(0):
        lin(A).sum().backward()
    record = {r.metric: r for r in monitor.pop_records()}["stable_rank"]
    if n == 32:
        assert record.flag == "nonfinite"
        return
    if n == 8:  # a Gram of subnormal squares: it read 4.82 and 2.00 for a true 4.84, unflagged
        assert record.flag == "zero_input" and math.isnan(record.value)
        return
    s = torch.linalg.svdvals(A.double())
    assert record.flag == "" and record.value == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-4)


@pytest.mark.parametrize("scale", [1e12, 1e15])
def test_the_power_estimator_measures_finite_inputs_whose_block_products_pass_float32(scale):
    """estimator="power" (the gpt lab's default) formed ZᵀZ of its finite float32 block Z = AᵀA·V in float32, which
    overflowed for inputs near 1e12: eigh's LinAlgError ended a diverging gpt run with a traceback."""
    lin = nn.Linear(16, 4)
    monitor = Monitor(lin, every=1, estimator="power")
    A = scale * torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    with monitor.step(0):
        lin(A).sum().backward()
    record = {r.metric: r for r in monitor.pop_records()}["stable_rank"]
    s = torch.linalg.svdvals(A.double())
    exact = float((s**2).sum() / s[0] ** 2)
    assert record.flag == "" and exact <= record.value <= 1.25 * exact  # a lower bound on λ_max: st from above


def test_a_monitor_on_a_model_that_a_copy_of_trains_says_so():
    """A Monitor built on `model` while a deep copy runs the forward: every weight read 'not used in this step's forward
    pass', each warned about alone, with nothing pointing at the copy."""
    import copy

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    monitor = Monitor(model, every=1)
    trained = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="none of the 2 weights .* used in step 0: is the model that ran the forward the one"):
        with monitor.step(0):
            trained(torch.randn(8, 4)).sum().backward()
    with warnings.catch_warnings():  # once per Monitor
        warnings.simplefilter("error")
        with monitor.step(1):
            trained(torch.randn(8, 4)).sum().backward()


def test_autocast_copies_of_the_weights_are_not_held_across_micro_batches():
    """Under autocast each micro-batch's forward makes bfloat16 copies of the weights; the watch kept every one of them
    until the step ended — the weights' size again per micro-batch of gradient accumulation."""
    import gc

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    monitor = Monitor(model, every=1)

    def live_copies() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.dtype == torch.bfloat16 and o.shape == (64, 64))

    with monitor.step(0):
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(torch.randn(16, 64)).float().square().mean()
            loss.backward()
            assert live_copies() == 0
    assert {r.metric for r in monitor.pop_records()} >= {"stable_rank", "nuclear_rank"}


def test_a_resumed_power_monitor_makes_the_next_measurement_as_the_uninterrupted_one():
    """estimator='power' skips its refinement when the step measured before was the one just before; a Monitor loaded
    from state_dict() did not know which step that was and refined again (3.30 against 3.46 uninterrupted)."""
    def third(resume: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
        monitor = Monitor(model, every=1, estimator="power")
        for step in range(3):
            if step == 2 and resume:
                state = monitor.state_dict()
                monitor = Monitor(model, every=1, estimator="power")
                monitor.load_state_dict(state)
            with monitor.step(step):
                model(torch.randn(32, 16, generator=torch.Generator().manual_seed(step))).square().sum().backward()
            model.zero_grad()
        return [(r.layer, r.metric, r.value) for r in monitor.pop_records() if r.step == 2]
    assert third(resume=True) == third(resume=False)


def test_a_finite_input_whose_gram_overflows_is_named_so_when_it_raises():
    lin = nn.Linear(8, 4)
    monitor = Monitor(lin, every=1)
    with pytest.raises(NonFiniteError, match="or a finite one whose float32 Gram overflowed"), monitor.step(0):
        lin(1e20 * torch.randn(64, 8)).sum().backward()


def test_an_unknown_weight_name_gets_the_closest_names_not_every_name():
    """stable_rank('<unknown>') listed every tracked name (hundreds on a large model, per expert on an MoE one)."""
    monitor = Monitor(nn.ModuleDict({f"layer{i}": nn.Linear(4, 4) for i in range(40)}))
    with pytest.raises(ConfigError, match=r"closest: \['layer17', 'layer7', 'layer1'\] and 37 more \(monitor.layers\)"):
        monitor.stable_rank("layer17x")
    with pytest.raises(ConfigError, match=r"known: \['layer0', .*'layer5'\] and 34 more"):
        monitor.stable_rank("q")
