"""Spiked data: the generator's spectrum matches the requested α and ν; measured splits are exact; loaders."""

import math

from pathlib import Path

import numpy as np
import pytest
import torch

from specscope.data.spiked import (
    bulk_eigenvalues,
    digits,
    estimate_spectrum,
    from_matrix,
    load_matrix,
    spiked_covariance,
)
from specscope.errors import ConfigError


@pytest.mark.parametrize("alpha", [0.0, 5 / 9, 8 / 9])
@pytest.mark.parametrize("nu", [0.25, 0.5])
def test_generator_spectrum_matches_request(alpha, nu):
    # n ≫ d so the sample second moment is close to the population one: Marchenko–Pastur spreads the sorted
    # eigenvalues over a factor (1 ± 2√(d/n)), which tilts the log-log fit over k = 1..d by at most
    # 4√(d/n)/ln d = 0.034 for n = 40000, d = 40.
    n, d = 40000, 40
    data = spiked_covariance(n, d, alpha, nu, seed=3)
    est = estimate_spectrum(data.X_B, fit_range=(1, d))
    assert abs(est.alpha - alpha) < 4 * math.sqrt(d / n) / math.log(d)
    full = estimate_spectrum(data.X)
    # λ_1 = ζ²·mean(z²) + O(λ_max(bulk)) with mean(z²) = 1 ± 4√(2/n) (4σ): the bulk adds ≤ (1+√(d/n))²+ζ·O(1) to ζ²;
    # for ν ≥ 1/4 (ζ² ≥ 141) that is < 3 % of λ_1, i.e. |ν̂ − ν| < log(1.03)/(2 log n) ≈ 0.0015.
    assert abs(full.nu - nu) < 0.005
    assert abs(full.zeta - data.zeta) / data.zeta < 0.03
    assert abs(torch.dot(full.q, data.q).item()) > 0.99


def test_generator_is_seeded_and_uses_common_random_numbers():
    a = spiked_covariance(40, 30, 0.5, 0.25, seed=1)
    b = spiked_covariance(40, 30, 0.5, 0.25, seed=1)
    c = spiked_covariance(40, 30, 0.0, 0.5, seed=1)
    assert torch.equal(a.X, b.X) and torch.equal(a.y, b.y)
    # the same Gaussians for every (α, ν): only the scaling changes
    assert torch.allclose(c.X_B * bulk_eigenvalues(30, 0.5).sqrt(), a.X_B, rtol=1e-12, atol=1e-14)
    assert torch.equal(a.q, c.q) and torch.equal(a.z, c.z)
    assert c.zeta == pytest.approx(40**0.5)
    assert not torch.equal(spiked_covariance(40, 30, 0.5, 0.25, seed=2).X, a.X)


@pytest.mark.parametrize("target", ["teacher", "multi-index"])
def test_targets_are_standardised(target):
    data = spiked_covariance(500, 20, 0.0, 0.25, target=target, seed=0)
    assert abs(data.y.mean().item()) < 1e-12 and abs(data.y.std().item() - 1) < 1e-12
    assert set(data.labels().unique().tolist()) == {-1.0, 1.0}


def test_from_matrix_split_is_exact():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(80, 30, generator=gen, dtype=torch.float64) + 3.0  # a mean spike, not centred
    data = from_matrix(X)
    assert torch.allclose(data.X, X, rtol=0, atol=1e-12)
    assert (data.X_B @ data.q).abs().max().item() < 1e-10
    assert data.z.square().mean().item() == pytest.approx(1.0, rel=1e-12)
    assert abs(data.q.norm().item() - 1) < 1e-12
    # the mean is the spike: q̂ ≈ 1/√d
    assert abs(data.q.sum().item()) / math.sqrt(30) > 0.99


def test_digits_loads_and_embeds():
    data = digits()
    assert (data.n, data.d) == (1797, 64) and torch.isfinite(data.X).all()
    assert set(data.y.unique().tolist()) == {-1.0, 1.0}
    emb = digits(embed_dim=128, seed=0)
    assert emb.d == 128 and (emb.X >= -1e-12).all()  # ReLU features, uncentred
    assert estimate_spectrum(emb.X).nu > estimate_spectrum(data.X).nu  # the mean of ReLU features is a spike


def test_load_matrix_npy_npz_and_errors(tmp_path):
    X = np.random.default_rng(0).normal(size=(25, 12))
    np.save(tmp_path / "x.npy", X)
    np.savez(tmp_path / "xy.npz", X=X, y=np.arange(25.0))
    a = load_matrix(tmp_path / "x.npy")
    assert torch.allclose(a.X, torch.as_tensor(X), atol=1e-12) and a.y.shape == (25,)
    b = load_matrix(tmp_path / "xy.npz")
    assert torch.equal(b.y, torch.arange(25.0, dtype=torch.float64))
    with pytest.raises(ConfigError, match="does not exist"):
        load_matrix(tmp_path / "missing.npy")
    (tmp_path / "folder.npy").mkdir()
    for there in (tmp_path / "folder.npy", Path("/dev/zero")):  # it said "does not exist"
        with pytest.raises(ConfigError, match="is not a regular file"):
            load_matrix(there)
    np.save(tmp_path / "v.npy", np.ones(5))
    with pytest.raises(ConfigError, match="2-D"):
        load_matrix(tmp_path / "v.npy")
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        from_matrix(bad)
    with pytest.raises(ConfigError, match="rows"):
        from_matrix(X, np.ones(3))


def test_load_matrix_refuses_bad_targets_and_files(tmp_path):
    X = np.random.default_rng(0).normal(size=(10, 6))
    np.savez(tmp_path / "y2d.npz", X=X, y=np.ones((5, 2)))  # 10 values, but not one per row
    with pytest.raises(ConfigError, match=r"\(5, 2\)"):
        load_matrix(tmp_path / "y2d.npz")
    np.savez(tmp_path / "ycol.npz", X=X, y=np.arange(10.0)[:, None])  # an (n, 1) column is fine
    assert load_matrix(tmp_path / "ycol.npz").y.shape == (10,)
    for bad in (np.nan, np.inf):
        y = np.arange(10.0)
        y[3] = bad
        np.savez(tmp_path / "ynan.npz", X=X, y=y)
        with pytest.raises(ConfigError, match="NaN or Inf"):
            load_matrix(tmp_path / "ynan.npz")
    np.save(tmp_path / "c.npy", X + 1j * X)
    with pytest.raises(ConfigError, match="complex"):
        load_matrix(tmp_path / "c.npy")
    with pytest.raises(ConfigError, match="complex"):
        from_matrix(X, np.arange(10.0) + 1j)
    np.save(tmp_path / "s.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(ConfigError, match="numeric"):
        load_matrix(tmp_path / "s.npy")
    np.save(tmp_path / "o.npy", np.array([[1, "a"], [None, 2]], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="o.npy"):
        load_matrix(tmp_path / "o.npy")
    np.save(tmp_path / "t.npy", X)
    raw = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(ConfigError, match="t.npy"):
        load_matrix(tmp_path / "t.npy")
    (tmp_path / "g.npy").write_bytes(b"not a numpy file at all")
    with pytest.raises(ConfigError, match="g.npy"):
        load_matrix(tmp_path / "g.npy")
    (tmp_path / "g.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="g.npz"):
        load_matrix(tmp_path / "g.npz")
    np.save(tmp_path / "k.npy", np.ones((10, 6)))  # constant: no bulk to fit α on
    with pytest.raises(ConfigError, match="constant") as e:
        load_matrix(tmp_path / "k.npy")
    assert "fit_range" not in str(e.value)


@pytest.mark.parametrize("kw, word", [
    (dict(alpha=float("nan")), "alpha"), (dict(alpha=float("inf")), "alpha"), (dict(nu=float("nan")), "nu"),
    (dict(nu=float("-inf")), "nu"), (dict(nu=1e6), "nu"), (dict(label_noise=float("nan")), "label_noise"),
    (dict(label_noise=float("inf")), "label_noise"), (dict(label_noise=-0.1), "label_noise"),
    (dict(n=20.5), "n="), (dict(d=8.0), "d="), (dict(n=1), "n="), (dict(teacher_width=0), "teacher_width"),
    (dict(teacher_width=-2), "teacher_width"), (dict(teacher_width=1.5), "teacher_width")])
def test_spiked_covariance_refuses_bad_parameters(kw, word):
    with pytest.raises(ConfigError, match=word):
        spiked_covariance(**{**dict(n=20, d=8), **kw})


@pytest.mark.parametrize("fit_range", [(0, 5), (5, 2), (3, 3), (2, 41), (1.5, 4), (True, 4)])
def test_estimate_spectrum_refuses_a_fit_range_outside_the_eigenvalues(fit_range):
    """(0, 5) read λ_0 as the smallest eigenvalue (index −1) and fitted log 0; (2, 41) of 40 fitted a shorter range."""
    X = spiked_covariance(200, 40, 0.5, 0.5, seed=0).X
    with pytest.raises(ValueError, match=r"fit_range=.* must be two whole numbers 1 ≤ lo < hi ≤ min\(n, d\) = 40"):
        estimate_spectrum(X, fit_range=fit_range)
    assert math.isfinite(estimate_spectrum(X, fit_range=(1, 40)).alpha)  # the whole range is allowed


@pytest.mark.parametrize("scale", [1e160, 1e-170])
def test_a_matrix_of_extreme_but_finite_scale_keeps_its_spectrum(scale):
    """XᵀX of an X of 1e160 overflowed float64 (eigh's LinAlgError, a traceback from `run spiked --set data=`); of
    1e-170 it underflowed ("constant or nearly rank one"). α̂ does not depend on the scale, ζ̂ scales with it."""
    X = torch.randn(30, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    at_one, at_scale = estimate_spectrum(X), estimate_spectrum(X * scale)
    assert at_scale.alpha == pytest.approx(at_one.alpha, rel=1e-12)
    assert at_scale.zeta == pytest.approx(at_one.zeta * scale, rel=1e-12)
    assert from_matrix(X * scale).zeta == pytest.approx(from_matrix(X).zeta * scale, rel=1e-12)


def test_a_npy_whose_header_claims_more_than_the_file_holds_is_named_as_corrupt(tmp_path):
    """A 200-byte file declaring (1e8, 1e5) float64 entries was "out of memory … with m=8: lower these sizes"."""
    import struct

    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (100000000, 100000), }"
    header = header + " " * (118 - len(header)) + "\n"
    bad = tmp_path / "claims.npy"
    bad.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64)
    with pytest.raises(ConfigError, match=r"claims.npy could not be read as .npy .*truncated, corrupt"):
        load_matrix(bad)
