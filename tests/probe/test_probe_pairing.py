"""Each recorded st(A) is the stable rank of the matrix the weight really multiplied (REFERENCE §2)."""

import gc
import itertools
import math
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from specscope import linalg
from specscope.errors import ConfigError
from specscope.probe import Monitor, input_matrix, pairing


# st from a float32 Gram vs a float64 SVD: relative error ~1e-6 (linalg.stable_rank_from_gram docs)
RTOL = {"exact": 1e-9, "gram": 1e-5}


def by(records, metric):
    return {r.layer: r for r in records if r.metric == metric}


def exact_st(A: torch.Tensor, groups: int = 1) -> float:
    """‖A‖_F² / max_g ‖A_g‖₂² in float64, A's rows g·rows:(g+1)·rows being group g's (one group: st(A))."""
    A = A.detach().double().reshape(-1, A.shape[-1])
    return float(A.square().sum() / torch.linalg.matrix_norm(A.unflatten(0, (groups, -1)), 2).square().max())


@pytest.mark.parametrize("estimator", ["exact", "gram"])
def test_linear_with_and_without_bias(estimator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3, bias=False))
    x = torch.randn(4, 6, 5) + 0.5
    mon = Monitor(model, estimator=estimator)
    with mon.step(0):
        model(x).square().sum().backward()
    st = by(mon.pop_records(), "stable_rank")
    hidden = torch.relu(model[0](x))
    assert st["0"].rows == 24 and st["0"].shape == "24x5" and st["2"].rows == 24
    assert st["0"].value == pytest.approx(exact_st(x), rel=RTOL[estimator])
    assert st["2"].value == pytest.approx(exact_st(hidden), rel=RTOL[estimator])
    assert st["0"].estimator == estimator and not mon.unpaired


def test_gradient_metrics_are_exact():
    torch.manual_seed(0)
    model = nn.Linear(12, 5)
    mon = Monitor(model, estimator="gram")
    with mon.step(3):
        model(torch.randn(40, 12)).pow(3).sum().backward()
    recs = mon.pop_records()
    G = model.weight.grad.double()
    nr = float(linalg.nuclear_rank(G))
    r = {x.metric: x for x in recs if x.layer == "weight"}
    assert r["nuclear_rank"].value == pytest.approx(nr, rel=1e-5) and r["nuclear_rank"].shape == "5x12"
    assert r["grad_fro_norm"].value == pytest.approx(float(G.norm()), rel=1e-6)
    assert r["grad_nuclear_norm"].value == pytest.approx(float(linalg.nuclear_norm(G)), rel=1e-5)
    assert r["spectral_advantage"].value == pytest.approx(r["nuclear_rank"].value / r["stable_rank"].value)
    assert all(x.step == 3 for x in recs)


@pytest.mark.parametrize("conv, x", [(nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 9, 8)),
                                     (nn.Conv1d(3, 5, 4, dilation=2, padding="same"), (2, 3, 11)),
                                     (nn.Conv2d(2, 3, (2, 3), padding="valid"), (3, 2, 5, 6))])
def test_conv_patches_are_the_rows_the_kernel_multiplies(conv, x):
    torch.manual_seed(0)
    if conv.padding == "same" and conv.dilation[0] * (conv.kernel_size[0] - 1) % 2:
        pytest.skip("asymmetric same padding")
    x = torch.randn(*x)
    A = input_matrix(conv, x)
    y = conv(x)
    W = conv.weight.reshape(conv.out_channels, -1)
    # conv output = A Wᵀ + b, positions in row-major order of the output map
    expected = y.flatten(2).transpose(1, 2).reshape(-1, conv.out_channels)
    torch.testing.assert_close(A @ W.T + conv.bias, expected, rtol=1e-5, atol=1e-5)
    mon = Monitor(conv, estimator="exact")
    with mon.step(0):
        conv(x).sum().backward()
    st = by(mon.pop_records(), "stable_rank")["weight"]
    assert st.rows == A.shape[0] and st.value == pytest.approx(exact_st(A), rel=1e-9)


def patches_by_slicing(x, weight_shape, stride, padding, dilation, groups):
    """The patches built another way: one strided slice of the padded input per kernel offset, stacked."""
    k = weight_shape[2:]
    d = len(k)
    x = x.unsqueeze(0) if x.dim() == d + 1 else x
    x = F.pad(x, [p for pd in reversed(padding) for p in (pd, pd)])
    P = [(x.shape[2 + i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(d)]
    cols = [x[(..., *[slice(o[i] * dilation[i], o[i] * dilation[i] + stride[i] * (P[i] - 1) + 1, stride[i]) for i in range(d)])]
            for o in itertools.product(*map(range, k))]
    T = torch.stack(cols, -1)  # [B, C, *P, K]
    B, C = T.shape[:2]
    return T.reshape(B, groups, C // groups, math.prod(P), len(cols)).permute(1, 0, 3, 2, 4).reshape(-1, C // groups * len(cols))


@settings(max_examples=150, deadline=None)
@given(d=st.integers(1, 3), groups=st.integers(1, 3), per_group=st.integers(1, 2), batch=st.integers(0, 2), data=st.data(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), layout=st.sampled_from(["plain", "channels_last", "unbatched"]))
def test_patches_are_every_kernel_offsets_slice_of_the_input(d, groups, per_group, batch, data, dtype, layout):
    """`patches` (one copy from a strided view) equals the patches stacked offset by offset, bit for bit, for any
    dimension, groups, stride, dilation and padding, an empty batch, an unbatched or channels-last input."""
    k = data.draw(st.lists(st.integers(1, 3), min_size=d, max_size=d))
    stride = data.draw(st.lists(st.integers(1, 2), min_size=d, max_size=d))
    dilation = data.draw(st.lists(st.integers(1, 2), min_size=d, max_size=d))
    padding = data.draw(st.lists(st.integers(0, 2), min_size=d, max_size=d))
    size = [data.draw(st.integers(max(1, dilation[i] * (k[i] - 1) + 1 - 2 * padding[i]), 6)) for i in range(d)]
    x = torch.randn(max(batch, 1) if layout == "unbatched" else batch, groups * per_group, *size).to(dtype)
    if layout == "channels_last" and d == 2:
        x = x.to(memory_format=torch.channels_last)
    if layout == "unbatched":
        x = x[0]
    shape = (groups * per_group, per_group, *k)
    A = pairing.patches(x, shape, stride, padding, dilation, groups)
    assert A.is_contiguous() and A.dtype == dtype
    assert pairing.patches_shape(x.shape, shape, stride, padding, dilation, groups) == tuple(A.shape)
    assert torch.equal(A, patches_by_slicing(x, shape, stride, padding, dilation, groups))


@pytest.mark.parametrize("estimator", ["gram", "power", "exact"])
def test_no_convs_patches_live_from_its_forward_to_the_steps_end(monkeypatch, estimator):
    """A conv's patches are prod(k) times its input. None of them is alive between the forward pass and the step's
    end — the held-input route builds them where its solve reads them — and every st(A) is still the exact one (a
    576-feature conv on the held route, a 27-feature one on the Gram route, two steps: cold and warm)."""
    from specscope.probe import watch as W

    made = []

    def tracked(*args):
        A = pairing.patches(*args)
        made.append(weakref.ref(A))
        return A

    monkeypatch.setattr(W, "patches", tracked)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
    mon = Monitor(model, estimator=estimator)
    for step in range(2):
        x = torch.randn(4, 3, 12, 12)
        model.zero_grad()
        with mon.step(step):
            model(x).square().mean().backward()
            gc.collect()
            alive = [r for r in made if r() is not None]
        assert made and not alive, (len(made), len(alive))
        st = by(mon.pop_records(), "stable_rank")
        if estimator == "power":  # σ₁² from below, from a cold block: not a value to compare at a tolerance
            continue
        hidden = torch.relu(model[0](x)).detach()
        assert st["0"].value == pytest.approx(exact_st(input_matrix(model[0], x)), rel=RTOL[estimator])
        assert st["2"].value == pytest.approx(exact_st(input_matrix(model[2], hidden)), rel=RTOL[estimator])


@pytest.mark.parametrize("groups, channels", [(64, 64), (4, 128)])
def test_a_grouped_convs_patches_are_built_a_chunk_of_groups_at_a_time(monkeypatch, groups, channels):
    """A grouped conv's Grams take its patches a cache-sized chunk of groups at a time (`GROUP_CHUNK_BYTES`; a
    depthwise conv's whole patches are k² times its input), and held ones (4 groups of 288 features) a group at a
    time; st(A) is the exact per-group one either way."""
    from specscope.probe import estimators as E
    from specscope.probe import watch as W

    sizes = []

    def tracked(*args):
        A = pairing.patches(*args)
        sizes.append(A.numel())
        return A

    monkeypatch.setattr(W, "patches", tracked)
    monkeypatch.setattr(E, "GROUP_CHUNK_BYTES", 16 << 10)
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1, groups=groups)
    mon = Monitor(conv)
    for step in range(2):
        x = torch.randn(4, channels, 12, 12)
        conv.zero_grad()
        with mon.step(step):
            conv(x).square().mean().backward()
        whole = input_matrix(conv, x)
        assert sizes and max(sizes) <= whole.numel() // 4, (max(sizes), whole.numel())
        sizes.clear()
        st = by(mon.pop_records(), "stable_rank")["weight"]
        assert st.value == pytest.approx(exact_st(whole, groups), rel=RTOL["gram"]) and st.rows == whole.shape[0]


@pytest.mark.parametrize("conv, x", [(nn.Conv2d(4, 6, 3, groups=2, padding=1), (2, 4, 7, 6)),
                                     (nn.Conv1d(4, 4, 3, groups=4, stride=2), (3, 4, 9)),
                                     (nn.Conv3d(2, 4, (2, 3, 2), groups=2, padding=(1, 0, 1), dilation=(1, 2, 1)), (2, 2, 4, 7, 5))])
def test_grouped_and_3d_convs_are_measured_exactly(conv, x):
    """A group's rows of W multiply that group's patches only: A stacks every group's patches, and st(A) is
    Σ_g ‖A_g‖_F² / max_g ‖A_g‖₂², the ratio of a spectral and a Euclidean step's second-order bounds."""
    torch.manual_seed(0)
    x = torch.randn(*x)
    A = input_matrix(conv, x)
    g, o = conv.groups, conv.out_channels
    W = conv.weight.reshape(o, -1)
    y = conv(x) - conv.bias.view(1, -1, *([1] * (x.dim() - 2)))
    P = A.shape[0] // g
    for j in range(g):  # group j's patches times group j's rows of W = group j's output channels
        yj = y[:, j * o // g : (j + 1) * o // g].flatten(2).transpose(1, 2).reshape(-1, o // g)
        torch.testing.assert_close(A[j * P : (j + 1) * P] @ W[j * o // g : (j + 1) * o // g].T, yj, rtol=1e-4, atol=1e-5)
    mon = Monitor(conv, estimator="exact")
    with mon.step(0):
        conv(x).sum().backward()
    st = by(mon.pop_records(), "stable_rank")["weight"]
    assert not mon.unmeasured and st.rows == A.shape[0] and st.value == pytest.approx(exact_st(A, g), rel=1e-9)


@pytest.mark.parametrize("estimator", ["gram", "power", "exact"])
@pytest.mark.parametrize("groups, channels, kernel", [(4, 16, 3), (16, 16, 3), (2, 64, 3)])
def test_a_grouped_convs_stable_rank_is_per_group_not_of_the_stacked_patches(estimator, groups, channels, kernel):
    """Each group's first channel 3× the others: the groups' top directions coincide, so the stacked patches'
    λ_max (of Σ_g A_gᵀA_g) is about `groups` times max_g λ_max(A_gᵀA_g), and st(A) read from it was too low. Two
    micro-batches and three steps: the groups' Grams add over micro-batches and their warm blocks carry over
    (64 channels in 2 groups: 288 features a group, the held-input route on the first micro-batch)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, kernel, groups=groups, padding=1)
    scale = (1 + 2 * (torch.arange(channels) % (channels // groups) == 0))[None, :, None, None]
    xs = [torch.randn(3, channels, 6, 6) * scale for _ in range(2)]
    mon = Monitor(conv, estimator=estimator)
    for step in range(3):
        with mon.step(step):
            for x in xs:
                conv(x).square().mean().backward()
        conv.zero_grad()
    st = {r.step: r for r in mon.pop_records() if r.metric == "stable_rank"}
    A = torch.cat([input_matrix(conv, x).unflatten(0, (groups, -1)) for x in xs], 1).flatten(0, 1)
    truth, stacked = exact_st(A, groups), exact_st(A)
    assert truth > 1.5 * stacked  # the case this test is about
    rel = {"power": 0.15, "gram": 1e-4, "exact": 1e-9}[estimator]  # power: σ₁² from below, so st from above
    assert st[2].value == pytest.approx(truth, rel=rel) and st[2].rows == A.shape[0] and not mon.unmeasured
    if estimator == "power":
        assert st[2].value >= truth * (1 - 1e-6)


@pytest.mark.parametrize("unverified", [False, True])
def test_a_wide_grouped_convs_groups_each_held_are_compared_at_their_own_scale(monkeypatch, unverified):
    """A grouped conv with 288 features a group, one micro-batch a step: each group's patches are held for the
    implicit route, and a group whose solve is not verified becomes its Gram at unit scale (A·2^-e). Its ‖A_g‖_F² and
    λ_max come back at A's own scale, so Σ_g ‖A_g‖_F² / max_g ‖A_g‖₂² compares the groups as they are (read at their
    unit scales, the ratio was 35–65 % low on the steps where some group fell back). `unverified`: every solve falls
    back."""
    from specscope.probe import estimators as E

    if unverified:
        monkeypatch.setattr(E, "VERIFIED", 0.0)
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, groups=2)
    model = nn.Sequential(conv, nn.ReLU())
    mon = Monitor(model)
    for step in range(6):
        x = torch.randn(2, 64, 10, 10) * (1 + 3 * (torch.arange(64) < 32))[None, :, None, None]  # groups at two scales
        model.zero_grad()
        with mon.step(step):
            model(x).pow(2).sum().backward()
        st = by(mon.pop_records(), "stable_rank")["0"]
        assert st.value == pytest.approx(exact_st(input_matrix(conv, x), 2), rel=1e-4), step


def test_grouped_power_iterates_every_groups_block_as_a_power_stats_of_its_own_would():
    """`power` on a grouped convolution iterates all groups' blocks at once (batched products, QR and Rayleigh–Ritz);
    each group's block and estimate are those of a `PowerStats` fed that group's rows alone, over micro-batches and
    steps — a zero group (its block kept, its λ 0) and a group of rank 1 among them; a NaN group is non-finite for the
    weight and keeps its block."""
    from specscope.probe.estimators import GroupedPowerStats, PowerStats, make_stats

    torch.manual_seed(0)
    G, n, rows = 6, 12, 9
    grouped, singles = make_stats("conv", n, "power", groups=G), [PowerStats(n) for _ in range(G)]
    assert isinstance(grouped, GroupedPowerStats)
    scale = torch.logspace(0, -3, n)

    def batch():
        A = torch.randn(G, rows, n) * scale * torch.logspace(0, 2, G)[:, None, None]
        A[2] = 0  # a zero group
        A[4] = torch.randn(rows, 1) @ torch.randn(1, n)  # rank 1
        return A

    for step in range(3):
        grouped.reset()
        for p in singles:
            p.reset()
        for _ in range(2):  # micro-batches
            A = batch()
            grouped.add(A.flatten(0, 1))
            for p, Ag in zip(singles, A):
                p.add(Ag)
        fro2, lam = grouped.finish()
        pairs = [p.finish() for p in singles]
        assert fro2.item() == pytest.approx(sum(f.item() for f, _ in pairs), rel=1e-6)
        assert lam.item() == pytest.approx(max(v.item() for _, v in pairs), rel=1e-6)
        for g, p in enumerate(singles):  # the same subspace in each group (of rank 1: its one direction in both)
            if g == 4:
                u = torch.linalg.svd(A[4])[2][0]
                assert (grouped.V[g].T @ u).norm() == pytest.approx(1, abs=1e-5) and (p.V.T @ u).norm() == pytest.approx(1, abs=1e-5)
            else:
                torch.testing.assert_close(grouped.V[g] @ grouped.V[g].T, p.V @ p.V.T, atol=1e-5, rtol=0)
    assert grouped.rows == 2 * G * rows and len(grouped.state()["V_groups"]) == G
    before = grouped.V.clone()
    grouped.reset()
    A = batch()
    A[1, 0, 0] = float("nan")
    grouped.add(A.flatten(0, 1))
    fro2, lam = grouped.finish()
    assert fro2.isnan() and lam.isnan() and torch.equal(grouped.V[1], before[1]) and grouped.V.isfinite().all()
    again = make_stats("conv", n, "power", groups=G)  # a state of the per-group layout loads into the batched one
    again.load_state({"V": singles[0].V, "V_groups": [p.V for p in singles]})
    torch.testing.assert_close(again.V, torch.stack([p.V for p in singles]))


def test_a_kernel_used_with_two_group_counts_in_one_step_is_unmeasured_with_the_reason():
    """F.conv2d with one kernel [8, 2, 3, 3] on 8 channels in 4 groups and on 2 channels in 1: the same features
    per group, two layouts of the input; no one st(A)."""
    w = nn.Parameter(torch.randn(8, 2, 3, 3))
    mon = Monitor(nn.ParameterDict({"w": w}))
    with warnings.catch_warnings(record=True), mon.step(0):
        (F.conv2d(torch.randn(2, 8, 5, 5), w, groups=4).sum() + F.conv2d(torch.randn(2, 2, 5, 5), w).sum()).backward()
    assert "groups=4 and groups=1" in mon.unmeasured["w"]


@pytest.mark.parametrize("estimator", ["gram", "power"])
def test_a_resumed_grouped_conv_measures_as_the_uninterrupted_one_and_a_tampered_state_is_refused(estimator):
    """Each group's warm block is saved (`V_groups`) and reloaded: the measurement after a resume is the same bits."""
    def run(resume: bool):
        torch.manual_seed(0)
        conv = nn.Conv2d(8, 8, 3, groups=4, padding=1)
        mon = Monitor(conv, estimator=estimator)
        for step in range(3):
            if step == 2 and resume:
                state = mon.state_dict()
                mon = Monitor(conv, estimator=estimator)
                mon.load_state_dict(state)
            with mon.step(step):
                conv(torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(step))).square().sum().backward()
            conv.zero_grad()
        return [(r.layer, r.metric, r.value) for r in mon.pop_records() if r.step == 2], mon.state_dict()
    (resumed, state), (uninterrupted, _) = run(True), run(False)
    assert resumed == uninterrupted and len(state["stats"]["weight"]["V_groups"]) == 4
    bad = state | {"stats": {"weight": state["stats"]["weight"] | {"V_groups": [torch.zeros(3, 2)] * 4}}}
    with pytest.raises(ConfigError, match=r"stats\['weight'\]\['V_groups'\] is a list of \[\(3, 2\), .*not a list of 2 or "
                                          r"more finite 18 × \d warm starts, one per group.*nothing was loaded"):
        Monitor(nn.Conv2d(8, 8, 3, groups=4, padding=1)).load_state_dict(bad)


def test_tied_linear_is_measured_once_with_all_inputs():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight
    model = nn.Sequential(a, nn.Tanh(), b)
    x = torch.randn(10, 6)
    mon = Monitor(model, estimator="exact")
    with mon.step(0):
        model(x).sum().backward()
    recs = mon.pop_records()
    st = by(recs, "stable_rank")
    assert set(st) == {"0"} and st["0"].rows == 20
    both = torch.cat([x, torch.tanh(a(x))])
    assert st["0"].value == pytest.approx(exact_st(both), rel=1e-9)
    assert by(recs, "nuclear_rank")["0"].value == pytest.approx(float(linalg.nuclear_rank(a.weight.grad)), rel=1e-5)


def test_embedding_closed_form(tokens, tiny_gpt, lm_step):
    model = tiny_gpt()
    mon = Monitor(model)
    with mon.step(0):
        lm_step(model, tokens).backward()
    st = by(mon.pop_records(), "stable_rank")["embed"]
    ids = tokens[:, :-1]
    assert st.estimator == "closed_form" and st.rows == ids.numel()
    assert st.value == pytest.approx(ids.numel() / torch.bincount(ids.flatten()).max().item(), rel=1e-12)
    assert st.value == pytest.approx(float(linalg.onehot_stable_rank(ids)), rel=1e-12)


def test_tied_embedding_and_head_measured_on_head_input(tokens, tiny_gpt, lm_step):
    model = tiny_gpt(tie_embeddings=True)
    final = {}
    model.final_norm.register_forward_hook(lambda m, i, o: final.setdefault("x", o))
    mon = Monitor(model, estimator="exact")
    with mon.step(0):
        lm_step(model, tokens).backward()
    st = by(mon.pop_records(), "stable_rank")
    assert "head" not in st and st["embed"].estimator == "exact"
    assert st["embed"].value == pytest.approx(exact_st(final["x"]), rel=1e-9)


@pytest.mark.parametrize("mlp", ["relu2", "swiglu"])
def test_gpt_pairing_follows_reference_table(tokens, mlp, tiny_gpt, lm_step):
    """Q,K,V <- attention RMS state; O <- attention output; up/gate <- MLP RMS state; down <- MLP
    post-activation; head <- final RMS state; all recomputed here independently of the probe's hooks."""
    model = tiny_gpt(mlp=mlp, n_layer=2)
    seen = {}
    for name in ("blocks.1.attn_norm", "blocks.1.mlp_norm", "final_norm"):
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, o))
    mon = Monitor(model, estimator="exact")
    with mon.step(0):
        lm_step(model, tokens).backward()
    st = by(mon.pop_records(), "stable_rank")
    blk = model.blocks[1]
    h_attn, h_mlp = seen["blocks.1.attn_norm"], seen["blocks.1.mlp_norm"]
    with torch.no_grad():
        B, T, C = h_attn.shape
        q, k, v = (m(h_attn).view(B, T, 2, C // 2).transpose(1, 2) for m in (blk.attn.q, blk.attn.k, blk.attn.v))
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
        from specscope.models.gpt import apply_rope

        att = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True)
        att = att.transpose(1, 2).reshape(B, T, C)
        u = blk.mlp.up(h_mlp)
        post = F.relu(u).square() if mlp == "relu2" else F.silu(blk.mlp.gate(h_mlp)) * u
    expect = {"attn.q": h_attn, "attn.k": h_attn, "attn.v": h_attn, "attn.o": att, "mlp.up": h_mlp, "mlp.down": post}
    if mlp == "swiglu":
        expect["mlp.gate"] = h_mlp
    for name, A in expect.items():
        assert st[f"blocks.1.{name}"].value == pytest.approx(exact_st(A), rel=1e-6), name
        assert st[f"blocks.1.{name}"].rows == B * T
    assert st["head"].value == pytest.approx(exact_st(seen["final_norm"]), rel=1e-6)


def test_fused_qkv_split_into_named_slices(tokens, tiny_gpt, lm_step):
    model = tiny_gpt(fused_qkv=True)
    seen = {}
    model.blocks[0].attn_norm.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    mon = Monitor(model, estimator="exact", split={"blocks.*.attn.qkv": ["q", "k", "v"]})
    with mon.step(0):
        lm_step(model, tokens).backward()
    recs = mon.pop_records()
    st, nr = by(recs, "stable_rank"), by(recs, "nuclear_rank")
    G = model.blocks[0].attn.qkv.weight.grad
    for i, part in enumerate("qkv"):
        name = f"blocks.0.attn.qkv.{part}"
        assert st[name].value == pytest.approx(exact_st(seen["x"]), rel=1e-9)
        assert nr[name].shape == "16x16"
        assert nr[name].value == pytest.approx(float(linalg.nuclear_rank(G[16 * i : 16 * (i + 1)])), rel=1e-6)
    assert "blocks.0.attn.qkv" not in st
    assert mon.stable_rank("blocks.0.attn.qkv.k") == st["blocks.0.attn.qkv.k"].value


def test_split_errors_name_the_problem():
    from specscope.errors import ConfigError

    with pytest.raises(ConfigError, match="match no"):
        Monitor(nn.Linear(4, 6), split={"nothing.*": ["a", "b"]})
    with pytest.raises(ConfigError, match="equal parts"):
        Monitor(nn.Linear(4, 7), split={"weight": ["a", "b"]})
    mon = Monitor(nn.Linear(4, 7), split={"weight": {"a": 3, "b": 4}})
    assert mon.layers == ["weight.a", "weight.b"]


class RawLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5))
        self.lin = nn.Linear(5, 3)
        self.u = nn.Parameter(torch.randn(4, 5))
        self.monitor = None

    def forward(self, x):
        z = torch.einsum("bi,ji->bj", torch.tanh(x), self.u)  # a product the probe does not pair
        if self.monitor is not None:
            self.monitor.observe("u", self.u, torch.tanh(x))
        return F.linear(x, self.w) + F.linear(x, self.lin.weight) + z[:, :3]  # lin's forward never runs


def test_raw_parameters_functional_linear_and_observe():
    torch.manual_seed(0)
    model = RawLinear()
    mon = Monitor(model, estimator="exact")
    x = torch.randn(9, 5)
    with pytest.warns(UserWarning, match="'u' is unmeasured"), mon.step(0):
        model(x).sum().backward()
    recs = mon.pop_records()
    st = by(recs, "stable_rank")
    assert st["w"].value == pytest.approx(exact_st(x), rel=1e-9) and st["lin"].value == pytest.approx(exact_st(x), rel=1e-9)
    assert set(mon.unmeasured) == {"u"} and "observe" in mon.unmeasured["u"]
    un = by(recs, "unmeasured")["u"]
    assert un.value == 1.0 and un.shape == "4x5" and un.flag == mon.unmeasured["u"]
    assert "u" in by(recs, "nuclear_rank")  # its gradient is still measured
    assert mon.advice().set_index("layer").loc["u", "verdict"] == "unmeasured"
    model.monitor = mon
    with mon.step(1):
        model(x).sum().backward()
    st = by(mon.pop_records(), "stable_rank")
    assert not mon.unmeasured and st["u"].value == pytest.approx(exact_st(torch.tanh(x)), rel=1e-9)


def test_padding_tokens_are_not_rows_of_an_embeddings_input():
    """nn.Embedding(padding_idx=0): the padding row gets no gradient, so st(A) is that of the one-hot matrix of
    the other tokens (float64 singular values), and `rows` counts them only."""
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(20, 8, padding_idx=0), torch.nn.Linear(8, 3)
    ids = torch.randint(1, 20, (8, 16))
    ids[:, 6:] = 0  # padded batch: 80 of 128 positions
    monitor = Monitor(torch.nn.ModuleDict({"emb": emb, "head": head}), every=1)
    with monitor.step(0):
        head(emb(ids).mean(1)).pow(2).sum().backward()
    assert float(emb.weight.grad[0].abs().sum()) == 0
    (rec,) = [r for r in monitor.pop_records() if r.layer == "emb" and r.metric == "stable_rank"]
    X = torch.nn.functional.one_hot(ids[ids != 0], 20).double()
    sv = torch.linalg.svdvals(X)
    assert rec.rows == 48 and rec.value == pytest.approx(float(sv.square().sum() / sv[0] ** 2), rel=1e-12)


def test_a_rejected_observe_leaves_the_monitor_as_it_was():
    """observe() with inputs of the wrong width raised after renaming the slot: layer '0' became 'custom' and stayed
    unmeasured. The check now comes first."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    monitor = Monitor(m, every=1)
    with monitor.step(0):
        with pytest.raises(Exception, match="inputs have 5 features, the weight takes 4"):
            monitor.observe("custom", m[0].weight, torch.randn(3, 5))
        m(torch.randn(16, 4)).sum().backward()
    assert monitor.layers == ["0", "2"] and not monitor.unmeasured
    assert {r.layer for r in monitor.pop_records() if r.metric == "stable_rank"} == {"0", "2"}


def test_a_state_from_when_grouped_st_was_stacked_drops_that_history_with_a_warning():
    """A Monitor state saved before st(A) was per group held the stacked value in its history, and advice() medians
    then mixed the two definitions after a resume."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4, padding=1), nn.Flatten(), nn.Linear(8 * 25, 2))
    mon = Monitor(model)
    for step in range(2):
        with mon.step(step):
            model(torch.randn(2, 8, 5, 5)).sum().backward()
        model.zero_grad()
    state = mon.state_dict()
    kept = Monitor(model)
    kept.load_state_dict(state)
    assert set(kept.state_dict()["history"]) == {"0", "2"}
    old = {k: v for k, v in state.items() if k != "grouped_st"}
    again = Monitor(model)
    with pytest.warns(UserWarning, match=r"history of the grouped convolution\(s\) \['0'\] .*dropped"):
        again.load_state_dict(old)
    assert set(again.state_dict()["history"]) == {"2"} and again.stable_rank("0") is None
