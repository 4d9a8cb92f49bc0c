"""Bad input to a Monitor gets one ConfigError (or SpecscopeError for a misuse) naming the problem and the fix, before
anything changes: nested or repeated steps, foreign state, ill-typed options, a gradient callable's wrong tensor."""

import math

import pytest
import torch
from torch import nn

from specscope import linalg
from specscope.errors import ConfigError, SpecscopeError
from specscope.probe import Interleaved, Monitor


def by(records, metric):
    return {r.layer: r for r in records if r.metric == metric}


def mlp(*widths):
    torch.manual_seed(0)
    widths = widths or (6, 4, 3)
    layers = [m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())][:-1]
    return nn.Sequential(*layers)


def measure(mon, model, step, x):
    with mon.step(step):
        model(x).square().sum().backward()
    model.zero_grad()
    return mon.pop_records()


def test_a_step_entered_inside_an_open_one_is_refused_and_the_open_step_measures_all_its_batches():
    """Accepted, the inner step's watch replaced the open one's: both steps recorded the second batch's st(A)
    only, and the weights stayed WatchedParameter for every later step."""
    model = mlp()
    mon = Monitor(model)
    measure(mon, model, 0, torch.randn(10, 6))  # later measured steps are watched by the weights themselves
    x1, x2 = torch.randn(10, 6), torch.randn(10, 6) * torch.linspace(0.1, 3, 6)
    with mon.step(2):
        model(x1).sum().backward()
        with pytest.raises(SpecscopeError, match=r"monitor.step\(4\) entered while monitor.step\(2\) is still open"):
            with mon.step(4):
                pass
        model(x2).sum().backward()
    st = by(mon.pop_records(), "stable_rank")
    assert set(r.step for r in st.values()) == {2}
    assert st["0"].rows == 20
    assert st["0"].value == pytest.approx(float(linalg.stable_rank(torch.cat([x1, x2]).double())), rel=1e-4)
    assert all(type(p) is nn.Parameter for p in model.parameters())
    model.zero_grad()
    x3 = torch.randn(10, 6)
    assert by(measure(mon, model, 4, x3), "stable_rank")["0"].value == pytest.approx(float(linalg.stable_rank(x3.double())), rel=1e-4)


def test_a_measured_step_number_must_come_after_the_last_measured_one():
    """5, 3, 3 were all accepted: step 3 recorded twice, after step 5."""
    model = mlp()
    mon = Monitor(model)
    assert {r.step for r in measure(mon, model, 5, torch.randn(8, 6))} == {5}
    for step in (3, 5):
        with pytest.raises(ConfigError, match=rf"monitor.step\({step}\): step 5 was measured already"):
            with mon.step(step):
                pass
    assert mon.pop_records() == [] and mon.advice().set_index("layer").loc["0", "measurements"] == 1
    with pytest.raises(RuntimeError, match="data loader"), mon.step(6):  # a step that failed records nothing:
        raise RuntimeError("data loader")
    assert {r.step for r in measure(mon, model, 6, torch.randn(8, 6))} == {6}  # it may be taken again
    assert mon.advice().set_index("layer").loc["0", "measurements"] == 2
    from specscope.errors import NonFiniteError  # so may one the Monitor itself refused as non-finite (it was
    with pytest.raises(NonFiniteError, match="at step 7"):  # "step 7 was measured already", with nothing recorded)
        measure(mon, model, 7, torch.full((8, 6), math.nan))
    assert mon.pop_records() == [] and mon.last_step == 6
    model.zero_grad()  # the refused step's NaN gradients, which the retry must not accumulate onto
    assert {r.step for r in measure(mon, model, 7, torch.randn(8, 6))} == {7}
    assert mon.advice().set_index("layer").loc["0", "measurements"] == 3
    every = Monitor(model, every=2)
    measure(every, model, 4, torch.randn(8, 6))
    with every.step(3):  # not measured: nothing to record twice, nothing checked
        model(torch.randn(8, 6)).sum().backward()
    model.zero_grad()
    resumed = Monitor(model)  # a resumed run goes on from its checkpoint's step
    resumed.load_state_dict(mon.state_dict())
    assert {r.step for r in measure(resumed, model, 0, torch.randn(8, 6))} == {0}


def test_state_of_other_weights_is_refused_and_nothing_is_loaded():
    """A 6-4-3 Monitor loaded a 6-8-8-3 model's state: layer '2' was then unmeasured with a confusing reason and
    layer '0' carried the other weight's history into advice()."""
    small, big, wide = mlp(6, 4, 3), mlp(6, 8, 8, 3), mlp(6, 8, 3)
    mon = Monitor(small)
    measure(mon, small, 0, torch.randn(9, 6))
    before = mon.state_dict()
    for other, match in ((big, r"it has layers \['4'\] that this Monitor has not"),
                         (wide, r"'0' is \(8, 6\) there, \(4, 6\) here")):
        theirs = Monitor(other)
        for step in range(3):
            measure(theirs, other, step, torch.randn(9, 6))
        with pytest.raises(ConfigError, match=match):
            mon.load_state_dict(theirs.state_dict())
        assert str(mon.state_dict()) == str(before)  # unchanged
        assert mon.advice().set_index("layer").loc["0", "measurements"] == 1
    fused = Monitor(small, split={"0": ["a", "b"]})
    measure(fused, small, 0, torch.randn(9, 6))
    with pytest.raises(ConfigError, match=r"it records \['0.a', '0.b'\].*another split"):
        mon.load_state_dict(fused.state_dict())
    with pytest.raises(ConfigError, match=r"it records \['0'\].*another split"):  # the other way: it loaded, and
        fused.load_state_dict(before)                                          # the slices started with no history
    with pytest.raises(ConfigError, match=r"Monitor.load_state_dict\(NoneType\): pass the dict"):
        mon.load_state_dict(None)
    for other in (small.state_dict(), torch.optim.SGD(small.parameters(), lr=0.1).state_dict()):  # said "version None"
        with pytest.raises(ConfigError, match=r"this dict \(keys '.*\) is not a Monitor's state; pass the dict a Monitor's"):
            mon.load_state_dict(other)
    # a weight measured through observe() is observed again after a resume: its state loads
    extra = nn.Parameter(torch.randn(5, 6))
    seen = Monitor(small)
    with seen.step(0):
        h = torch.randn(9, 6)
        seen.observe("c", extra, h)
        (small(h).sum() + (h @ extra.T).sum()).backward()
    again = Monitor(small)
    again.load_state_dict(seen.state_dict())
    assert set(again.state_dict()["history"]) == {"0", "2", "c"}


def _tampered(state, part, value):
    import copy

    state = copy.deepcopy(state)
    key = next(k for k in state[part] if k == "0" or k.startswith("0"))
    state[part][key] = value(state[part][key])
    return state


@pytest.mark.parametrize("part, value, match", [
    ("history", lambda h: 5, r"history\['0'\] is not a list of \(step, st\(A\), nr\(G\)\)"),  # TypeError half-way
    ("history", lambda h: [[0]], r"history\['0'\]"),  # advice() then raised IndexError
    ("history", lambda h: [[0, 0.0, 1.0]], r"history\['0'\]"),  # advice() then divided by zero
    ("history", lambda h: [[0, float("nan"), 1.0]], r"history\['0'\]"),
    ("latest_st", lambda v: "3", r"latest_st\['0'\] is '3'"),
    ("stats", lambda st: {"V": torch.zeros(3, 2)}, r"stats\['0'\]\['V'\] is \(3, 2\), not a finite n × block warm start with n = 6"),
    ("stats", lambda st: {"V": torch.full((6, 2), float("nan"))}, r"stats\['0'\]\['V'\]"),
    ("stats", lambda st: [1], r"stats\['0'\] is a list, not a dict"),
    ("slots", lambda seen: seen | {"n_features": "6"}, r"slots\['0'\]"),
    ("slots", lambda seen: seen | {"role": "boss"}, r"slots\['0'\] is .*not a role of \['embedding', 'head', 'hidden'\]"),  # skipped
    ("slots", lambda seen: seen | {"kind": "boss"}, r"slots\['0'\] is .*and a kind of"),  # unmeasured at the next step
])
def test_a_tampered_state_is_refused_whole_and_nothing_is_loaded(part, value, match):
    """The checks ran entry by entry while assigning: a bad history value raised TypeError after the warm blocks were
    replaced, and values of the wrong form loaded and failed later in advice() or the next measured step."""
    model = mlp()
    mon = Monitor(model, estimator="power")
    for step in range(2):
        measure(mon, model, step, torch.randn(9, 6))
    good = mon.state_dict()
    fresh = Monitor(model, estimator="power")
    measure(fresh, model, 0, torch.randn(9, 6) * 3)
    before = str(fresh.state_dict())
    with pytest.raises(ConfigError, match=f"Monitor.load_state_dict: {match}.*nothing was loaded"):
        fresh.load_state_dict(_tampered(good, part, value))
    assert str(fresh.state_dict()) == before
    fresh.load_state_dict(good)  # the untouched state loads and measures on
    assert str(fresh.state_dict()) == str(good)
    measure(fresh, model, 5, torch.randn(9, 6))


def test_a_bare_string_exclude_is_refused_not_read_letter_by_letter():
    with pytest.raises(ConfigError, match=r"exclude='2': give a list of layer-name patterns"):
        Monitor(mlp(), exclude="2")  # read as the pattern '2' by luck; "fc1" became 'f', 'c', '1'
    with pytest.raises(ConfigError, match=r"exclude='fc1': give a list"):
        Monitor(mlp(), exclude="fc1")
    assert [s.name for s in Monitor(mlp(), exclude=None).slots.values()] == ["0", "2"]
    assert [s.name for s in Monitor(mlp(), exclude=["2"]).slots.values()] == ["0"]


@pytest.mark.parametrize("options, match", [
    (dict(every=None, log_spaced=0.5), r"log_spaced=0.5\) must be True"),  # int(0.5) == 0: it never measured
    (dict(every=None, log_spaced=-3), r"log_spaced=-3\) must be True"),
    (dict(log_spaced="yes"), r"log_spaced='yes'\) must be True"),
    (dict(estimator="power", power_block=0), r"power_block=0\) must be an int >= 1"),
    (dict(estimator="power", power_block=-2), r"power_block=-2\) must be an int >= 1"),
    (dict(power_iters=-1), r"power_iters=-1\) must be an int >= 0"),
    (dict(power_iters="a"), r"power_iters='a'\) must be an int >= 0"),
    (dict(extras=["topk"], topk="a"), r"topk='a'\) must be an int >= 1"),
    (dict(split={"0": []}), r"split=\{'0': \[\]\}\): give the slices as a non-empty list"),
    (dict(split={"0": "ab"}), r"split=\{'0': 'ab'\}\): give the slices as a non-empty list"),
    (dict(split=["0"]), r"split=\['0'\]\) must be a dict"),
    (dict(split={0: ["a", "b"]}), r"the pattern 0: patterns are layer names \(str\)"),
    (dict(grad_gram_dtype=torch.int32), r"grad_gram_dtype=torch.int32\) must be torch.float64"),
    (dict(grad_gram_dtype=torch.bfloat16), r"grad_gram_dtype=torch.bfloat16\) must be torch.float64"),
    # checked without a model too: a callback given them failed inside trainer.train()
    (dict(history=0), r"history=0\) must be an int >= 1"),
    (dict(include="0"), r"include='0': give a list of layer-name patterns"),
    (dict(exclude=5), r"exclude=5: give a list of layer-name patterns"),
])
def test_ill_typed_options_are_refused_when_the_monitor_is_made(options, match):
    """Each was accepted (or crashed in the first step with an IndexError, a RuntimeError, a TypeError, a
    ZeroDivisionError; int32 recorded nr(G) 1.507 for an exact 2.957)."""
    with pytest.raises(ConfigError, match=match):
        Monitor(mlp(), **options)
    with pytest.raises(ConfigError, match=match):  # a framework callback checks them before it has a model
        Monitor.check_options(**options)


@pytest.mark.parametrize("good, bad", [
    (dict(every=None, log_spaced=1), dict(every=1, log_spaced=0.9)),
    (dict(estimator="power", power_block=1, power_iters=0), dict(estimator="power", power_block=1, power_iters=-1)),
    (dict(estimator="power", power_block=1), dict(estimator="power", power_block=0)),
    (dict(extras=["topk"], topk=1), dict(extras=["topk"], topk=0)),
    (dict(split={"0": ("a", "b")}), dict(split={"0": ()})),
    (dict(grad_gram_dtype=torch.float32), dict(grad_gram_dtype=torch.float16)),
])
def test_each_options_domain_ends_where_it_stops_measuring_right(good, bad):
    model = mlp()
    x = torch.randn(9, 6)
    recs = measure(Monitor(model, **good), model, 1, x)
    st, nr = by(recs, "stable_rank"), by(recs, "nuclear_rank")
    assert st and all(math.isfinite(r.value) for r in [*st.values(), *nr.values()]), good
    assert st["2"].value > 1 and st["2"].rows == 9
    with pytest.raises(ConfigError, match=rf"Monitor\({list(bad)[-1]}="):  # the option named last is past its end
        Monitor(model, **bad)


def test_a_meta_device_model_is_refused_at_construction():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(ConfigError, match=r"weights \['0', '2'\] are on the meta device.*to_empty"):
        Monitor(model)


@pytest.mark.parametrize("gradient, match", [
    (lambda n, p: torch.randn(3, 3), r"returned shape \(3, 3\) for '0'; it must return a tensor of the parameter's shape \(5, 5\)"),
    (lambda n, p: "str", r"returned a str for '0'; it must return a tensor"),
])
def test_a_gradient_callable_must_return_a_tensor_of_the_parameters_shape(gradient, match):
    model = nn.Sequential(nn.Linear(5, 5))
    mon = Monitor(model, gradient=gradient)
    with mon.step(0):
        model(torch.randn(7, 5)).sum().backward()
    with pytest.raises(ConfigError, match=match):
        mon.after_optimizer_step()


def test_a_gradient_callable_may_return_none_for_a_weight_without_one():
    """The weight is unmeasured, and the callable named as the cause (the reason once said to run backward inside
    the block and zero_grad outside it, which the user had done)."""
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 2))
    mon = Monitor(model, gradient=lambda n, p: p.grad if n == "0" else None)
    with pytest.warns(UserWarning, match="'1' is unmeasured: .*gradient= callable returned None"):
        with mon.step(0):
            model(torch.randn(7, 5)).sum().backward()
        mon.after_optimizer_step()
    with pytest.raises(ConfigError, match="returned shape"):  # the same check on later steps
        bad = Monitor(model, gradient=lambda n, p: p.grad[:2] if p.grad is not None else None)
        with bad.step(0):
            model(torch.randn(7, 5)).sum().backward()
        bad.after_optimizer_step()
    assert by(mon.pop_records(), "nuclear_rank")["0"].value > 0


def test_observe_needs_tensors():
    """Also outside a measured step (Monitor(every=10)'s first nine steps), where it is otherwise a no-op: a wrong
    call fails where it is made, not ten steps later."""
    model = mlp()
    mon = Monitor(model, every=2)
    W = nn.Parameter(torch.randn(3, 4))
    with mon.step(1), pytest.raises(ConfigError, match=r"observe\('c', weight, inputs\): inputs is a list; pass"):
        mon.observe("c", W, [[1.0, 2.0]])
    with mon.step(2):
        with pytest.raises(ConfigError, match=r"observe\('c', weight, inputs\): inputs is a str; pass"):
            mon.observe("c", W, "str")
        with pytest.raises(ConfigError, match=r"weight is a list"):
            mon.observe("c", [[1.0]], torch.randn(2, 4))
        model(torch.randn(5, 6)).sum().backward()
    assert "c" not in mon.layers and by(mon.pop_records(), "stable_rank").keys() == {"0", "2"}


@pytest.mark.parametrize("kw, match", [
    (dict(window="5"), r"advice\(window='5'\) must be an int >= 1"),
    (dict(window=2.5), r"advice\(window=2.5\) must be an int >= 1"),
    (dict(window=True), r"advice\(window=True\) must be an int >= 1"),
    (dict(margin="x"), r"advice\(margin='x'\) must be a finite number >= 0"),
    (dict(margin=float("nan")), r"advice\(margin=nan\) must be a finite number >= 0"),
])
def test_advice_window_and_margin_are_checked(kw, match):
    model = mlp()
    mon = Monitor(model)
    measure(mon, model, 0, torch.randn(9, 6))
    with pytest.raises(ConfigError, match=match):
        mon.advice(**kw)
    with pytest.raises(ConfigError, match=match):
        mon.param_groups(**kw)


def test_stable_rank_asks_for_a_name():
    model = mlp()
    mon = Monitor(model)
    measure(mon, model, 0, torch.randn(9, 6))
    with pytest.raises(ConfigError, match=r"stable_rank\(0\): pass a weight's name \(a str\), one of \['0', '2'\]"):
        mon.stable_rank(0)
    assert mon.stable_rank("0") > 0


def test_an_empty_batch_is_named_as_such_not_as_a_forward_outside_the_step():
    """A 0-row batch was reported as "no product with it was seen … run the forward inside `with monitor.step`"."""
    model = mlp()
    mon = Monitor(model)
    with pytest.warns(UserWarning, match="is unmeasured: its inputs in this step had no rows"):
        unmeasured = by(measure(mon, model, 0, torch.randn(0, 6)), "unmeasured")
    assert set(unmeasured) == {"0", "2"} and all("no rows (an empty batch" in r.flag for r in unmeasured.values())
    assert set(by(measure(mon, model, 1, torch.randn(9, 6)), "stable_rank")) == {"0", "2"}  # the next batch measures
    verdicts = mon.advice().set_index("layer")["verdict"]
    measure(mon, model, 2, torch.randn(0, 6))  # like a weight that sat a step out, it keeps its measured window's verdict
    assert (mon.advice().set_index("layer")["verdict"] == verdicts).all() and "unmeasured" not in set(verdicts)


def test_numpy_ints_are_options_like_pythons():
    """every=np.int64(3) was refused as not an int, where step numbers and log_spaced took numpy's ints."""
    np = pytest.importorskip("numpy")
    model = mlp()
    mon = Monitor(model, every=np.int64(2), history=np.int64(5))
    assert mon.every == 2 and type(mon.every) is int
    assert {r.step for r in measure(mon, model, 0, torch.randn(9, 6)) + measure(mon, model, 1, torch.randn(9, 6))} == {0}


def test_an_empty_include_is_named_in_its_error():
    with pytest.raises(ConfigError, match=r"^include=\[\] leaves no weight to measure"):
        Monitor(mlp(), include=[])


def test_observe_keeps_a_tracked_weights_name():
    """observe('zz', weight) of a weight tracked as '0' renamed it: '0' left the Monitor's layers, its history split,
    and the next step without observe called it "no longer a weight of the model under the name 'zz'"."""
    model = mlp()
    mon = Monitor(model)
    measure(mon, model, 0, torch.randn(9, 6))
    with mon.step(1):
        model(torch.randn(9, 6)).square().sum().backward()
        with pytest.raises(ConfigError, match=r"observe\('zz', ...\): this weight is measured as '0'; pass that name"):
            mon.observe("zz", model[0].weight, torch.randn(10, 6))
        mon.observe("0", model[0].weight, torch.randn(10, 6))
    model.zero_grad()
    assert mon.layers == ["0", "2"] and not mon.unmeasured
    assert mon.advice().set_index("layer").loc["0", "measurements"] == 2


def test_a_layer_name_with_an_at_sign_reloads_its_own_state():
    """state_dict() keys an output block's statistics "layer@a:b"; a ModuleDict key "x@0:4" was read back as block 0:4
    of a layer 'd.x', and the Monitor's own state was refused as "another split"."""
    class H(nn.Module):
        def __init__(self):
            super().__init__()
            self.d = nn.ModuleDict({"x@0:4": nn.Linear(6, 6), "y": nn.Linear(6, 3)})

        def forward(self, x):
            return self.d["y"](self.d["x@0:4"](x))

    torch.manual_seed(0)
    model = H()
    mon = Monitor(model)
    measure(mon, model, 0, torch.randn(9, 6))
    fresh = Monitor(H())
    fresh.load_state_dict(mon.state_dict())
    assert str(fresh.state_dict()["stats"].keys()) == str(mon.state_dict()["stats"].keys())


def test_a_layer_whose_name_holds_brackets_is_picked_by_that_name():
    """fnmatch reads '[0]' as a character class: exclude=['d.a[0]'] matched nothing, while the error listed 'd.a[0]'
    among the names. A pattern now also matches the name it spells."""
    model = nn.Sequential()
    model.add_module("a[0]", nn.Linear(6, 4))
    model.add_module("b", nn.Linear(4, 3))
    assert Monitor(model, exclude=["a[0]"]).layers == ["b"]
    assert Monitor(model, include=["a[0]"]).layers == ["a[0]"]
    assert Monitor(model, exclude=["[ab]"]).layers == ["a[0]"]  # still fnmatch: '[ab]' matches 'b'


def test_an_embedding_whose_step_has_only_padding_keeps_its_verdict():
    """An all-padding_idx (or empty) batch left the embedding with the reason "has a gradient but no product with it was
    seen … run the forward inside the block", and its verdict 'unmeasured'; a Linear in the same step got the empty-batch
    reason and kept its measured window's verdict."""
    class E(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.lin = nn.Embedding(20, 8, padding_idx=0), nn.Linear(8, 2)

        def forward(self, ids):
            return self.lin(self.e(ids))

    for batch in (torch.zeros(1, 5, dtype=torch.long), torch.zeros(0, 5, dtype=torch.long)):
        torch.manual_seed(0)
        model = E()
        mon = Monitor(model)
        measure(mon, model, 0, torch.tensor([[1, 2, 3, 3, 5]]))
        with pytest.warns(UserWarning, match="'e' is unmeasured: its inputs in this step had no rows"):
            measure(mon, model, 1, batch)
        assert "only padding_idx tokens" in mon.unmeasured["e"]
        assert mon.advice().set_index("layer").loc["e", "verdict"] != "unmeasured"


def test_a_model_with_lazy_weights_is_one_error_saying_to_run_a_forward_first():
    """torch's own ValueError ("Attempted to use an uninitialized parameter") came out of the Monitor, and the CLI's
    diagnose exited 1 with its traceback."""
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises(ConfigError, match=r"parameters \['0', '0.bias'\] are not initialized yet .*run one forward pass"):
        Monitor(model)
    model(torch.randn(2, 8))
    assert set(Monitor(model).layers) == {"0", "2"}


def test_two_split_patterns_splitting_one_weight_differently_are_refused_not_resolved_by_their_order():
    model = nn.ModuleDict({"attn": nn.ModuleDict({"qkv": nn.Linear(4, 12)}), "mlp": nn.Linear(4, 4)})
    with pytest.raises(ConfigError, match=r"split patterns \['attn.qkv', 'attn.\*'\] all match weight 'attn.qkv'"):
        Monitor(model, split={"attn.qkv": ["q", "k", "v"], "attn.*": ["a", "b"]})
    same = Monitor(model, split={"attn.qkv": ["q", "k", "v"], "*.qkv": ("q", "k", "v")})  # agreeing patterns: fine
    assert same.layers == ["attn.qkv.q", "attn.qkv.k", "attn.qkv.v", "mlp"]


def test_interleaved_heads_and_param_groups_options_of_the_wrong_kind_are_named():
    for heads in (0, -2, 2.0, True):
        with pytest.raises(ConfigError, match=r"heads must be an int ≥ 1"):
            Interleaved(("q", "k", "v"), heads=heads)
    model = mlp(6, 8, 4)
    mon = Monitor(model)
    measure(mon, model, 0, torch.randn(9, 6))
    with pytest.raises(ConfigError, match=r"param_groups\(spectral_options='lr'\): pass a dict"):
        mon.param_groups(spectral_options="lr")


def test_an_observed_weight_given_no_rows_is_unmeasured_for_that_reason():
    """It read 'used by bmm (a torch.einsum runs as bmm) …, pass its inputs with monitor.observe', which it was."""
    import warnings

    W = nn.Parameter(torch.randn(8, 16))
    mon = Monitor(nn.ParameterDict({"w": W}))
    for step, rows in ((0, 4), (1, 0)):
        x = torch.randn(rows, 16)
        with warnings.catch_warnings(record=True), mon.step(step):
            mon.observe("w", W, x)
            torch.einsum("bd,ed->be", x, W).sum().backward()
    assert "had no rows" in mon.unmeasured["w"]
