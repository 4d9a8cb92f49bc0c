"""ℓ₁→ℓ₂ steepest descent: the step is the norm's steepest descent, per-token normalization, groups, state."""

import io

import pytest
import torch
from torch import nn

from specscope.errors import ConfigError
from specscope.optim import AutoGeometry, Hybrid, L1ToL2, Muon
from specscope.optim.auto import choose_among
from specscope.optim.l1_to_l2 import colnorm, column_rank, dual_norm


def op_norm_1_to_2(M: torch.Tensor) -> torch.Tensor:
    """‖M‖_{1→2} for M used as y = M x (columns = tokens): the largest column norm."""
    return M.norm(dim=0).max()


def test_colnorm_maximizes_the_inner_product_over_the_unit_ball():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(6, 9, generator=g, dtype=torch.float64)
    P = colnorm(G, token_dim=1)  # tokens are columns
    assert torch.allclose(op_norm_1_to_2(P), torch.tensor(1.0, dtype=torch.float64))
    best = float((G * P).sum())
    assert best == pytest.approx(float(dual_norm(G, 1)), rel=1e-12)  # ⟨G, P⟩ = ‖G‖_{2,1}
    for _ in range(200):  # no point of the ball does better
        D = torch.randn(6, 9, generator=g, dtype=torch.float64)
        D = D / op_norm_1_to_2(D) * torch.rand((), generator=g, dtype=torch.float64)
        assert float((G * D).sum()) <= best + 1e-12
    # nor does the spectral direction scaled into the ball
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    S = U @ Vh
    assert float((G * (S / op_norm_1_to_2(S))).sum()) < best


def test_each_token_normalized_zero_tokens_stay_zero():
    G = torch.randn(5, 4, dtype=torch.float64)
    G[2] = 0.0
    P = colnorm(G, token_dim=0)  # nn.Embedding layout: one row per token
    norms = P.norm(dim=1)
    assert torch.allclose(norms[[0, 1, 3, 4]], torch.ones(4, dtype=torch.float64))
    assert float(norms[2]) == 0.0
    for j in (0, 1, 3, 4):  # each row along its own gradient
        assert torch.allclose(P[j] * G[j].norm(), G[j])
    assert column_rank(torch.ones(3, 2)) == pytest.approx(3.0)  # equal norms: cr = number of tokens
    assert column_rank(torch.tensor([[1.0, 0.0], [0.0, 0.0]])) == pytest.approx(1.0)


def test_matched_step_is_the_exact_steepest_descent_step_on_one_hot_least_squares():
    """f(E) = ½‖E X − Y‖², X one-hot: lr = 1/L_E with st = N/c_max gives ΔE = −(‖G‖_{2,1}/L_{1→2})·colnorm(G)
    and f decreases by at least ‖G‖_{2,1}²/(2 L_{1→2}) with L_{1→2} = N."""
    g = torch.Generator().manual_seed(1)
    V, d, N = 7, 5, 40
    tokens = torch.randint(0, V, (N,), generator=g)
    tokens[:10] = 3  # a frequent token
    counts = torch.bincount(tokens, minlength=V).double()
    X = nn.functional.one_hot(tokens, V).double().T  # V × N
    Y = torch.randn(d, N, generator=g, dtype=torch.float64)
    E = nn.Parameter(torch.randn(d, V, generator=g, dtype=torch.float64))  # y = E x: tokens are columns
    L_E, L_12 = float(counts.max()), float(N)
    opt = L1ToL2([("embed", E)], lr=1 / L_E, token_dim=1, stable_rank=lambda layer: L_12 / L_E)
    f = lambda: 0.5 * (E @ X - Y).square().sum()
    for _ in range(5):
        opt.zero_grad()
        loss = f()
        loss.backward()
        G = E.grad.clone()
        before = E.detach().clone()
        opt.step()
        expect = before - float(dual_norm(G, 1)) / L_12 * colnorm(G, 1)
        assert torch.allclose(E.detach(), expect, atol=1e-12)
        assert float(f().detach()) <= float(loss.detach()) - float(dual_norm(G, 1)) ** 2 / (2 * L_12) + 1e-9


def test_rms_scale_moves_every_token_by_the_same_rms():
    emb = nn.Embedding(6, 8)
    before = emb.weight.detach().clone()
    emb.weight.grad = torch.randn(6, 8)
    L1ToL2(emb.parameters(), lr=0.1, scale="rms", rms=0.5).step()
    rms = (emb.weight.detach() - before).pow(2).mean(dim=1).sqrt()
    assert torch.allclose(rms, torch.full((6,), 0.05), rtol=1e-5)


def test_state_dict_round_trip_with_momentum():
    torch.manual_seed(0)
    a, b = nn.Embedding(9, 4), nn.Embedding(9, 4)
    b.load_state_dict(a.state_dict())
    oa = L1ToL2(a.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    grads = [torch.randn(9, 4) for _ in range(6)]
    for G in grads[:3]:
        a.weight.grad = G.clone()
        oa.step()
    buf = io.BytesIO()
    torch.save({"m": a.state_dict(), "o": oa.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    b.load_state_dict(saved["m"])
    ob = L1ToL2(b.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    ob.load_state_dict(saved["o"])
    for G in grads[3:]:
        a.weight.grad, b.weight.grad = G.clone(), G.clone()
        oa.step()
        ob.step()
    assert torch.equal(a.weight, b.weight)


def test_works_as_a_hybrid_group_next_to_muon_and_adamw():
    torch.manual_seed(0)
    emb, hidden, gain = nn.Embedding(10, 8), nn.Linear(8, 8, bias=False), nn.Parameter(torch.ones(8))
    opt = Muon([{"params": [("hidden.weight", hidden.weight)]},
                {"params": [("embed.weight", emb.weight)], "algorithm": "l1_to_l2", "lr": 0.01, "scale": "rms"},
                {"params": [("norm.weight", gain)], "algorithm": "adamw", "lr": 1e-3}], lr=0.02)
    assert opt.param_groups[1]["momentum"] == 0.0 and opt.param_groups[1]["token_dim"] == 0  # l1_to_l2 defaults
    before = emb.weight.detach().clone()
    for p in (emb.weight, hidden.weight, gain):
        p.grad = torch.randn_like(p)
    opt.step()
    moved = (emb.weight.detach() - before).norm(dim=1)
    assert torch.allclose(moved, torch.full((10,), 0.01 * 0.2 * 8 ** 0.5), rtol=1e-5)
    with pytest.raises(ConfigError, match="scale"):
        Hybrid([{"params": [emb.weight], "algorithm": "l1_to_l2", "lr": 0.1, "scale": "spectral"}]).step()
    with pytest.raises(ConfigError, match="st\\(A\\)"):  # matched scale with a source that has no value
        emb.weight.grad = torch.randn_like(emb.weight)
        L1ToL2([("embed.weight", emb.weight)], lr=0.1, stable_rank=lambda layer: None).step()


def test_choose_among_three_with_hysteresis():
    assert choose_among(None, {1: 0.5, 2: 0.8}, 1.0, 0.1) == 0
    assert choose_among(None, {1: 3.0, 2: 5.0}, 1.0, 0.1) == 2
    assert choose_among(1, {1: 3.0, 2: 3.2}, 1.0, 0.1) == 1  # not 10 % better: stay
    assert choose_among(1, {1: 3.0, 2: 3.4}, 1.0, 0.1) == 2
    assert choose_among(2, {1: 0.5, 2: 0.95}, 1.0, 0.1) == 2  # Euclidean only 5 % better: stay


def _embedding_problem(seed: int, frequent: int):
    """One-hot least squares; `frequent` extra occurrences of token 0 skew the distribution (st = N/c_max)."""
    g = torch.Generator().manual_seed(seed)
    V, d, N = 32, 16, 256
    tokens = torch.randint(0, V, (N,), generator=g)
    tokens[:frequent] = 0
    X = nn.functional.one_hot(tokens, V).double()  # N × V (rows = samples)
    Y = torch.randn(N, d, generator=g, dtype=torch.float64)
    counts = torch.bincount(tokens, minlength=V).double()
    return X, Y, float(counts.max()), float(N) / float(counts.max())


def test_auto_geometry_picks_l1_to_l2_for_an_embedding_and_descends():
    X, Y, L_E, st = _embedding_problem(0, frequent=40)
    emb = nn.Embedding(32, 16, dtype=torch.float64)
    nn.init.zeros_(emb.weight)
    opt = AutoGeometry([{"params": [("embed.weight", emb.weight)], "token_dim": 0}], lr=1 / L_E,
                       monitor=lambda layer: st)
    f = lambda: 0.5 * (X @ emb.weight - Y).square().sum()
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = f()
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    recs = opt.pop_records()
    cr = [r.value for r in recs if r.metric == "l1_to_l2_advantage"]
    nr = [r.value for r in recs if r.metric == "spectral_advantage"]
    assert all(c > max(1.0, n) for c, n in zip(cr, nr))  # many tokens with gradients of similar norm
    assert opt.choices["embed"] == "l1_to_l2"
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))  # each step guaranteed to descend
    with pytest.raises(ConfigError, match="embedding"):  # without token_dim an embedding is refused
        AutoGeometry([("embed.weight", emb.weight)], lr=0.1)


def test_a_vector_is_refused_when_its_l1_to_l2_group_is_made():
    """ℓ₁→ℓ₂ steps one vector per token of a ≥ 2-D weight: a bias in its group is refused when the optimizer (or
    the group) is made, naming it and AdamW, not at the first step after training started."""
    emb, bias = nn.Parameter(torch.randn(10, 4)), nn.Parameter(torch.zeros(4))
    with pytest.raises(ConfigError, match=r"'b'.*1-D.*'l1_to_l2'.*algorithm='adamw'"):
        L1ToL2([("e", emb), ("b", bias)], lr=0.1, scale="rms")
    opt = Hybrid([{"params": [emb], "algorithm": "l1_to_l2", "lr": 0.1, "scale": "rms"}])
    with pytest.raises(ConfigError, match=r"1-D.*'l1_to_l2'"):
        opt.add_param_group({"params": [bias], "algorithm": "l1_to_l2", "lr": 0.1, "scale": "rms"})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("options, says", [
    (dict(scale="rms", rms=float("nan")), "rms=nan is not a finite number"),  # wrote NaN into every weight
    (dict(scale="rms", rms=-1.0), "rms must be >= 0"),  # stepped uphill
    (dict(scale="rms", rms="a"), "rms='a' is not a finite number"),  # a TypeError at the first step
    (dict(token_dim=2), r"token_dim=2 is not an axis of a parameter of shape \(10, 4\)"),  # stepped along axis 0
    (dict(token_dim=-3), r"token_dim=-3 is not an axis"),
    (dict(token_dim=1.0), "token_dim must be None or the integer axis .*got 1.0"),
    (dict(token_dim=None), "token_dim=None: algorithm='l1_to_l2' steps each token's vector")])
def test_rms_and_token_dim_are_checked_when_made_and_at_every_step(options, says):
    emb = nn.Parameter(torch.randn(10, 4))
    with pytest.raises(ConfigError, match=says):
        L1ToL2([emb], lr=0.1, **options)
    if set(options) == {"token_dim"} and options["token_dim"] is not None:  # an "auto" group of one-hot-input
        # weights takes token_dim, not rms (None there means a group of hidden weights)
        with pytest.raises(ConfigError, match=says):
            AutoGeometry([{"params": [("embed.weight", emb)], **options}], lr=0.1, monitor=lambda n: 2.0)
    opt = L1ToL2([emb], lr=0.1, token_dim=-1, scale="rms")  # the last axis, as -1 means in torch
    opt.param_groups[0].update(options)  # set after construction, as a scheduler would
    emb.grad, before = torch.randn(10, 4), emb.detach().clone()
    with pytest.raises(ConfigError, match="step: param group 0: .*Nothing was changed"):
        opt.step()
    assert torch.equal(emb, before)


@pytest.mark.parametrize("scale", ["rms", "matched"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gradient_whose_squares_overflow_steps_as_at_unit_scale(scale, dtype):
    """Token vectors of 1e18 over 768 features: ‖G_j‖² leaves float32 (and bfloat16), and the plain norm was inf —
    a zero step (rms) or NaN weights (matched). The direction is scale-free, so the step is the unit-scale one
    (rms) or c times it (matched, whose size is ‖G‖_{2,1})."""
    g = torch.randn(6, 768, generator=torch.Generator().manual_seed(0)).to(dtype)
    g[2] = 0  # a token with no gradient stays put
    c = 2.0**60  # ≈ 1.2e18, a power of two: G·c is exact
    steps = []
    for G in (g, g * c):
        w = nn.Parameter(torch.zeros(6, 768, dtype=dtype))
        w.grad = G
        L1ToL2([("e", w)], lr=0.1, scale=scale).step()
        steps.append(w.detach().float())
    assert torch.isfinite(steps[1]).all() and not steps[1][2].any()
    torch.testing.assert_close(steps[1] / (c if scale == "matched" else 1.0), steps[0], rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=0)
