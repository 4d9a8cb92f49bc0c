"""RollingSVD against an explicit SVD of the stacked window; projections are orthogonal and idempotent."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specscope.subspace import GradientProjection, RollingSVD, project, random_basis


def explicit(rows: list[torch.Tensor], k: int):
    M = torch.stack(rows).double()
    _, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return S, Vh[:k]


@settings(max_examples=25, deadline=None)
@given(window=st.integers(2, 8), k=st.integers(1, 2), pushes=st.integers(1, 20), dim=st.integers(3, 40), seed=st.integers(0, 999))
def test_rolling_svd_matches_explicit_svd_of_the_window(window, k, pushes, dim, seed):
    k = min(k, window)
    g = torch.Generator().manual_seed(seed)
    sed = RollingSVD(window, k, dtype=torch.float64)
    vecs = [torch.randn(dim, generator=g, dtype=torch.float64) * (1 + i) for i in range(pushes)]
    for v in vecs:
        sed.push(v)
    S, V = explicit(vecs[-window:], k)
    n = len(S)
    assert torch.allclose(sed.singular_values()[:n], S, rtol=1e-8, atol=1e-8 * float(S[0]))
    got = sed.directions()
    kk = min(k, got.shape[0])
    # same subspace: compare the projectors (signs and rotations within ties do not matter)
    if kk < n and S[kk - 1] - S[kk] > 1e-6 * S[0]:
        assert torch.allclose(got[:kk].T @ got[:kk], V[:kk].T @ V[:kk], atol=1e-7)
    assert torch.allclose(got @ got.T, torch.eye(got.shape[0], dtype=torch.float64), atol=1e-8)


def test_rolling_svd_on_a_planted_subspace_finds_it_and_reports_gap_and_rotation():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(500, 3, generator=g))[0].T  # [3, 500]
    sed = RollingSVD(window=20, k=3)
    for _ in range(25):
        coeff = torch.randn(3, generator=g) * torch.tensor([10.0, 8.0, 6.0])
        sed.push(coeff @ basis + 0.01 * torch.randn(500, generator=g))
    assert sed.full and sed.gap() > 50
    V = sed.directions()
    assert torch.allclose(V.T @ V, basis.T @ basis, atol=1e-2)
    sed.rotation()
    sed.push(torch.randn(500, generator=g) * 0.01)
    assert sed.rotation() < 0.05


def test_rolling_svd_rejects_bad_input():
    with pytest.raises(ValueError, match="cannot exceed"):
        RollingSVD(window=2, k=3)
    sed = RollingSVD(4, 2)
    with pytest.raises(ValueError, match="no vectors"):
        sed.directions()
    sed.push(torch.ones(5))
    with pytest.raises(ValueError, match="holds vectors of 5"):
        sed.push(torch.ones(6))
    with pytest.raises(ValueError, match="NaN"):
        sed.push(torch.tensor([1.0, float("nan"), 0, 0, 0]))


@settings(max_examples=30, deadline=None)
@given(dim=st.integers(4, 60), k=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_keep_plus_remove_is_identity_and_both_are_idempotent(dim, k, seed):
    gen = torch.Generator().manual_seed(seed)
    Q = random_basis(dim, min(k, dim), gen, dtype=torch.float64)
    g = torch.randn(dim, generator=gen, dtype=torch.float64)
    keep, remove = project(g, Q, "keep"), project(g, Q, "remove")
    assert torch.allclose(keep + remove, g, atol=1e-12)
    assert torch.allclose(project(keep, Q, "keep"), keep, atol=1e-12)
    assert torch.allclose(project(remove, Q, "remove"), remove, atol=1e-12)
    assert abs(float(keep @ remove)) < 1e-10 * float(g @ g + 1)


def test_gradient_projection_on_a_model_keeps_only_the_subspace():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    params = list(model.parameters())
    proj = GradientProjection(params, "random", mode="keep", k=2, fixed=True, seed=1)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    assert proj.apply()
    Q = proj.basis()
    g = torch.cat([p.grad.reshape(-1) for p in params])
    assert torch.allclose(Q.T @ (Q @ g), g, atol=1e-5)  # g now lies in the subspace
    assert proj.basis() is Q  # fixed: the same subspace every step


def test_projection_waits_for_a_full_window():
    p = torch.nn.Parameter(torch.zeros(6))
    sed = RollingSVD(window=3, k=1)
    proj = GradientProjection([p], sed, mode="remove", k=1)
    p.grad = torch.ones(6)
    assert not proj.apply()
    for i in range(3):
        sed.push(torch.arange(6.0) + i)
    assert proj.apply()
    v = sed.directions(1)[0]
    assert abs(float(p.grad @ v)) < 1e-5


def test_coupling_is_exact_for_a_linear_centroid_map_and_restores_parameters():
    from specscope.subspace import coupling_ratios, directional_coupling

    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    X = torch.randn(10, 4, dtype=torch.float64)
    # μ_x(W) = W x is linear in W, so the central difference is exact: A(v) = mean_x ‖V x‖², V = v as 3×4.
    centroids = lambda: X @ W.T  # noqa: E731
    v = torch.randn(12, dtype=torch.float64)
    v = v / v.norm()
    expected = float((X @ v.view(3, 4).T).pow(2).sum(1).mean())
    before = W.detach().clone()
    assert directional_coupling(centroids, [W], v, eps=1e-3) == pytest.approx(expected, rel=1e-9)
    assert torch.equal(W.detach(), before)
    # the top right singular direction of X (as a row of V) couples most
    top = torch.linalg.svd(X)[2][0]
    d = torch.zeros(3, 4, dtype=torch.float64)
    d[0] = top
    ratios, base = coupling_ratios(centroids, [W], d.reshape(1, -1), n_random=20)
    assert base > 0 and ratios[0] > 2


@pytest.mark.parametrize("ratio", [1e-3, 3e-4])
def test_rolling_svd_of_float32_rows_is_their_svd_to_float64_accuracy(ratio):
    """The window's Gram was formed in float32: below ≈ sqrt(eps32)·σ₁ its singular values were rounding noise
    (σ₂ off by 49 % at σ₂/σ₁ = 3e-4) and the "orthonormal" directions had row norms down to 0.19."""
    g = torch.Generator().manual_seed(0)
    P, W = 4000, 12
    s = torch.tensor([1.0, ratio, 0.8 * ratio] + [0.5 * ratio * 0.9**i for i in range(W - 3)], dtype=torch.float64) * 100
    U = torch.linalg.qr(torch.randn(W, W, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(P, W, generator=g, dtype=torch.float64))[0]
    M = ((U * s) @ V.T).float()  # the rows the tracker stores, exactly
    sed = RollingSVD(window=W, k=3)
    for row in M:
        sed.push(row)
    ref = torch.linalg.svdvals(M.double())
    assert torch.allclose(sed.singular_values(), ref, rtol=1e-6, atol=1e-9 * float(ref[0]))
    D = sed.directions().double()
    assert float((D @ D.T - torch.eye(3, dtype=torch.float64)).abs().max()) < 1e-6


def test_subspace_arguments_out_of_range_are_errors_not_other_subspaces():
    from specscope.subspace import coupling_ratios

    w = torch.nn.Parameter(torch.randn(10, 8))
    sed = RollingSVD(window=4, k=3)
    for _ in range(4):
        sed.push(torch.randn(80))
    for k in (0, -1, 2.0):
        with pytest.raises(ValueError, match="k is the subspace's dimension, an int ≥ 1"):
            GradientProjection([w], sed, k=k)  # k=0 projected onto sed.k = 3 directions; "random" zeroed the gradient
        with pytest.raises(ValueError, match="k must be an int ≥ 1"):
            sed.directions(k)
    with pytest.raises(ValueError, match="floating-point dtype"):
        RollingSVD(4, 2, dtype=torch.int64)
    state = sed.state_dict()
    with pytest.raises(ValueError, match="make it with the saved window and dtype"):
        RollingSVD(window=6, k=3).load_state_dict(state)  # accepted, then push raised IndexError
    other = RollingSVD(window=4, k=3)
    other.load_state_dict(state)
    assert torch.equal(other.directions(), sed.directions())

    xi = torch.randn(5, 3)
    zero = [torch.nn.Parameter(torch.zeros(4, 3))]
    with pytest.raises(ValueError, match="the parameters' norm is 0.0"):
        coupling_ratios(lambda: xi @ zero[0].T, zero, torch.randn(2, 12))  # returned NaN ratios
    live = [torch.nn.Parameter(torch.randn(4, 3))]
    with pytest.raises(ValueError, match="the centroids do not move with these parameters"):
        coupling_ratios(lambda: xi.clone(), live, torch.randn(2, 12), n_random=3)  # ZeroDivisionError
    with pytest.raises(ValueError, match="n_random must be an int ≥ 1"):
        coupling_ratios(lambda: xi @ live[0].T, live, torch.randn(2, 12), n_random=0)
