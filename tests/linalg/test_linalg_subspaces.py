"""Nuclear-norm proximal step and principal angles."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from specscope import linalg as L

from _linalg_util import random_matrix


@given(st.integers(1, 10), st.integers(1, 10), st.integers(0, 2**16), st.floats(0.0, 2.0))
def test_soft_threshold_shrinks_singular_values(m, n, seed, tau):
    W = random_matrix(seed, m, n, decay=0.3)
    out = L.singular_value_soft_threshold(W, tau)
    s = torch.linalg.svdvals(W)
    torch.testing.assert_close(torch.linalg.svdvals(out), (s - tau).clamp(min=0), rtol=0, atol=1e-10)
    # it is the proximal point: minimiser of τ‖X‖_* + ½‖X − W‖_F², check optimality vs a perturbation
    obj = lambda X: tau * float(torch.linalg.svdvals(X).sum()) + 0.5 * float((X - W).square().sum())
    g = torch.Generator().manual_seed(seed)
    assert obj(out) <= obj(out + 1e-3 * torch.randn(m, n, generator=g, dtype=torch.float64)) + 1e-12


def test_soft_threshold_batched_tau_and_errors():
    W = random_matrix(1, 5, 7, batch=(3,))
    tau = torch.tensor([0.0, 0.1, 10.0])
    out = L.singular_value_soft_threshold(W, tau)
    torch.testing.assert_close(out[0], W[0])
    assert float(out[2].abs().max()) == 0.0
    with pytest.raises(ValueError, match="tau"):
        L.singular_value_soft_threshold(W, -1.0)


def test_principal_angles_known_values():
    e = torch.eye(4, dtype=torch.float64)
    th = 0.3
    U = e[:, :2]
    V = torch.stack([e[:, 0], math.cos(th) * e[:, 1] + math.sin(th) * e[:, 2]], dim=1)
    torch.testing.assert_close(L.principal_angles(U, V), torch.tensor([0.0, th], dtype=torch.float64))
    # tiny angles are resolved (arccos would return 0)
    W = torch.stack([e[:, 0], e[:, 1] + 1e-10 * e[:, 3]], dim=1)
    torch.testing.assert_close(L.principal_angles(U, W), torch.tensor([0.0, 1e-10], dtype=torch.float64),
                               rtol=1e-6, atol=1e-14)
    # orthogonal spaces; non-orthonormal inputs; symmetric in the arguments; different widths
    assert torch.allclose(L.principal_angles(U, e[:, 2:]), torch.full((2,), math.pi / 2, dtype=torch.float64))
    A = random_matrix(2, 8, 3) @ torch.randn(3, 3, dtype=torch.float64)
    B = random_matrix(3, 8, 2)
    torch.testing.assert_close(L.principal_angles(A, B), L.principal_angles(B, A))
    assert L.principal_angles(A, B).shape == (2,)
    with pytest.raises(ValueError, match="linearly dependent"):
        L.principal_angles(torch.ones(5, 2), B[:5])


@given(st.integers(0, 2**16))
def test_principal_angles_rotation_invariant(seed):
    A, B = random_matrix(seed, 9, 3), random_matrix(seed + 1, 9, 4)
    Q, _ = torch.linalg.qr(torch.randn(9, 9, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    torch.testing.assert_close(L.principal_angles(Q @ A, Q @ B), L.principal_angles(A, B), rtol=0, atol=1e-10)
    th = L.principal_angles(A, B)
    assert bool(((th >= 0) & (th <= math.pi / 2 + 1e-12)).all())
