"""Polar backends vs the float64 SVD reference: orthogonality on the row/column space, zero singular
values mapped to 0, schedules, batching, error helpers."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from specscope import linalg as L

from _linalg_util import random_matrix

EXACT = ["svd", "gram"]


def ref_polar(G):
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    keep = (S > max(G.shape[-2:]) * 1e-12 * S[..., :1]).double()
    return (U * keep.unsqueeze(-2)) @ Vh


@given(st.integers(1, 10), st.integers(1, 10), st.integers(0, 2**16), st.sampled_from(EXACT))
def test_exact_backends_match_reference(m, n, seed, method):
    G = random_matrix(seed, m, n, decay=0.5)
    P = L.polar(G, method)
    torch.testing.assert_close(P, ref_polar(G), rtol=0, atol=1e-8)
    assert float(L.polar_error(G, P, 1e-3)) < 1e-8
    assert float(L.orthogonality_error(P)) < 1e-8
    # invariances: polar(cG) = polar(G), polar(Gᵀ) = polar(G)ᵀ, polar(QG) = Q polar(G)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    torch.testing.assert_close(L.polar(3.7 * G, method), P, rtol=0, atol=1e-8)
    torch.testing.assert_close(L.polar(G.mT, method), P.mT, rtol=0, atol=1e-8)
    torch.testing.assert_close(L.polar(Q @ G, method), Q @ P, rtol=0, atol=1e-8)


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("shape", [(8, 12), (12, 8), (9, 9)])
def test_rank_deficient_maps_null_space_to_zero(method, shape):
    G = random_matrix(7, *shape, rank=3)
    P = L.polar(G, method)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    # orthogonal on the row/column space: Pᵀ P = projector onto the row space
    torch.testing.assert_close(P.mT @ P, Vh[:3].mT @ Vh[:3], rtol=0, atol=1e-8)
    torch.testing.assert_close(P @ P.mT, U[:, :3] @ U[:, :3].mT, rtol=0, atol=1e-8)
    # null right-singular directions are mapped to 0
    assert float((P @ Vh[3:].mT).abs().max()) < 1e-8
    assert float(L.orthogonality_error(P)) == pytest.approx(1.0, abs=1e-8)
    P2, nuc = L.polar_with_nuclear_norm(G, method)
    torch.testing.assert_close(P2, P)
    assert float(nuc) == pytest.approx(float(S.sum()), rel=1e-10)


@pytest.mark.parametrize("method", ["svd", "gram", "newton_schulz", "polar_express", "auto"])
def test_zero_row_vector_and_half_precision(method):
    assert torch.equal(L.polar(torch.zeros(3, 5), method), torch.zeros(3, 5))
    x = torch.randn(1, 6)
    P = L.polar(x, method)
    exact = method in EXACT or method == "auto"  # auto picks gram for tiny matrices
    torch.testing.assert_close(P, x / x.norm(), rtol=0, atol=1e-6 if exact else 0.35)
    Gb = torch.randn(40, 48).bfloat16()
    Pb = L.polar(Gb, method)
    assert Pb.dtype == torch.bfloat16 and torch.isfinite(Pb.float()).all()
    tol = 1e-2 if method in EXACT else 0.4   # bf16 output rounding vs. the polynomial's own error
    assert float(L.polar_error(Gb.float(), Pb.float(), 0.1)) < tol


def test_newton_schulz_matches_torch_muon_update():
    G = torch.randn(24, 40)
    p = torch.nn.Parameter(torch.zeros_like(G))
    p.grad = G.clone()
    torch.optim.Muon([p], lr=1.0, weight_decay=0.0, nesterov=False, momentum=0.0).step()
    ours = L.polar(G, "newton_schulz")  # bf16, Keller coefficients, 5 steps: the same iteration
    torch.testing.assert_close(ours.float(), -p.detach(), rtol=0, atol=2e-2)


def test_coefficient_schedules():
    G = random_matrix(3, 30, 50, decay=0.05)
    one = L.polar(G, "newton_schulz", ns_coefficients=(1.5, -0.5, 0.0), ns_steps=3, dtype=torch.float64)
    listed = L.polar(G, "newton_schulz", ns_coefficients=[(1.5, -0.5, 0.0)] * 3, ns_steps=3, dtype=torch.float64)
    torch.testing.assert_close(one, listed)
    # per-step schedules against a hand-written float64 iteration (tall input is transposed to wide)
    def manual(X, sched, scale):
        X = X.double().mT / (scale * X.double().norm())
        for a, b, c in sched:
            A = X @ X.mT
            X = a * X + b * A @ X + c * A @ A @ X
        return X.mT
    pe = L.polar(G.mT, "polar_express", ns_steps=3, dtype=torch.float64, eps=0.0)
    torch.testing.assert_close(pe, manual(G.mT, L.POLAR_EXPRESS_COEFFICIENTS[:3], 1.01), rtol=0, atol=1e-10)
    two = [(2.0, -1.5, 0.5), (1.875, -1.25, 0.375)]
    ns = L.polar(G.mT, "newton_schulz", ns_coefficients=two, ns_steps=4, dtype=torch.float64, eps=0.0)
    torch.testing.assert_close(ns, manual(G.mT, two + [two[-1]] * 2, 1.0), rtol=0, atol=1e-10)
    pe = L.polar(G, "polar_express", ns_steps=10, dtype=torch.float64)
    # converged Polar Express in float64 is accurate down to 1e-3 σ1
    assert float(L.polar_error(G, pe, 1e-3)) < 1e-4
    with pytest.raises(ValueError, match="ns_coefficients"):
        L.polar(G, "newton_schulz", ns_coefficients=[(1.0, 2.0)])
    with pytest.raises(ValueError, match="unknown method"):
        L.polar(G, "qr")


def test_polar_express_beats_keller_at_equal_steps():
    G = torch.randn(64, 96) @ torch.diag(torch.logspace(0, -2, 96))
    ns = float(L.polar_error(G, L.polar(G, "newton_schulz", dtype=torch.float32), 0.1))
    pe = float(L.polar_error(G, L.polar(G, "polar_express", dtype=torch.float32), 0.1))
    assert pe < ns / 2


def test_auto_rule():
    G = torch.randn(64, 96)
    torch.testing.assert_close(L.polar(G), L.polar(G, "polar_express"))
    torch.testing.assert_close(L.polar(G, tol=1e-4), L.polar(G, "gram"))
    torch.testing.assert_close(L.polar(torch.randn(8, 9, generator=torch.Generator().manual_seed(0))),
                               L.polar(torch.randn(8, 9, generator=torch.Generator().manual_seed(0)), "gram"))


@pytest.mark.parametrize("method", ["svd", "gram", "newton_schulz", "polar_express"])
def test_batched_equals_looped(method):
    G = random_matrix(11, 6, 9, batch=(2, 3), dtype=torch.float32)
    out = L.polar(G, method)
    looped = torch.stack([torch.stack([L.polar(G[i, j], method) for j in range(3)]) for i in range(2)])
    torch.testing.assert_close(out, looped, rtol=0, atol=1e-6 if method in EXACT else 1e-2)
    err = L.polar_error(G, out)
    assert err.shape == (2, 3)


def test_polar_error_definition():
    G = random_matrix(5, 10, 10, decay=0.5)
    U, S, Vh = torch.linalg.svd(G)
    P = U @ torch.diag(torch.linspace(1.0, 0.0, 10, dtype=torch.float64)) @ Vh
    thresholds = S / S[0]
    # the error over triplets with σ_i ≥ t·σ1 equals the largest 1 − d_i among them
    for i in (0, 4, 9):
        expected = float(1 - torch.linspace(1.0, 0.0, 10)[i])
        assert float(L.polar_error(G, P, float(thresholds[i]) * (1 - 1e-12))) == pytest.approx(expected, abs=1e-6)
    assert float(L.polar_error(torch.zeros(3, 4), torch.zeros(3, 4))) == 0.0
    with pytest.raises(ValueError, match="same matrix shape"):
        L.polar_error(G, P[:, :3])
