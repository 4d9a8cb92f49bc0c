"""Finite matrices whose norms or Grams leave their dtype's range (float32 beyond ≈ 1e±19, float64 beyond ≈ 1e±154)
get the same polar factors, norms and ranks as at unit scale; and the options that would be ignored or would turn
the result into NaN are refused."""
import importlib
import math

import pytest
import torch

from specscope import linalg as L
from specscope.linalg import _scale, gram_ns
from specscope.optim import Muon

polar_module = importlib.import_module("specscope.linalg.polar")  # the package's `polar` is the function

ESTIMATORS = ("gram_newton_schulz", "polar_express", "newton_schulz")


def _matrix(m=40, n=60, dtype=torch.float32, seed=0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _reference(G):
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


@pytest.mark.parametrize("method", ESTIMATORS)
@pytest.mark.parametrize("shape", [(40, 60), (300, 768), (768, 300)])
def test_a_power_of_two_scale_changes_no_bit_of_an_estimate(method, shape):
    """Scaling by 2^k rounds nothing, so an input whose Frobenius norm or Gram overflows (2^100) or underflows
    (2^-100) float32 is computed at unit scale to the very bits of the unscaled input's estimate."""
    G = _matrix(*shape)
    at_one = L.polar(G, method)
    for k in (100, -100, 60, -60):
        assert torch.equal(L.polar(G * 2.0**k, method, eps=0.0 if k < 0 else 1e-7), at_one), k


@pytest.mark.parametrize("method", ESTIMATORS)
def test_a_float16_iteration_of_a_small_input_is_the_unit_scale_one(method):
    """newton_schulz / polar_express in float16 cast first and judged the norm against float32's range: entries of
    1e-7 (float16 subnormals, 2^-24 apart) gave polar_error 0.64 at 0.1·σ_1, 3e-8 a factor with one nonzero entry."""
    G = _matrix()
    at_one = L.polar(G, method, dtype=torch.float16, eps=0.0)
    for scale in (2.0**-20, 2.0**-23, 2.0**-25):
        assert torch.equal(L.polar(G * scale, method, dtype=torch.float16, eps=0.0), at_one), scale
    err = float(L.polar_error(G, at_one, 0.1))
    assert float(L.polar_error(G, L.polar(G * 1e-7, method, dtype=torch.float16, eps=0.0), 0.1)) <= 1.1 * err + 0.01


@pytest.mark.parametrize("method", ESTIMATORS)
def test_large_finite_gradients_give_the_polar_factor_not_zeros_or_nan(method):
    """1e18 and 3e18 float32 gradients once gave zeros and NaN (‖G‖_F² and G Gᵀ overflow float32 and bfloat16)."""
    G = _matrix()
    err = (L.polar(G, method).double() - _reference(G)).norm()
    for scale in (1e18, 3e18, 1e30, 3e37):
        P = L.polar(G * scale, method)
        assert torch.isfinite(P).all()
        assert (P.double() - _reference(G)).norm() <= 1.05 * err + 1e-3, scale


@pytest.mark.parametrize("method", ESTIMATORS)
def test_eps_zero_gives_the_polar_factor_at_any_small_scale_and_eps_keeps_torchs_clamp(method):
    """eps is torch.optim.Muon's clamp on the start's scale: below it the estimate shrinks with G (1e-12 · G); eps=0
    gives U Vᵀ at any scale, 1e-30 included, and 0 for the zero matrix (not 0/0)."""
    G = _matrix()
    at_one = L.polar(G, method)
    err = (at_one.double() - _reference(G)).norm()
    for scale in (1e-12, 1e-30):  # (not powers of two: bfloat16 rounds G·scale differently)
        assert (L.polar(G * scale, method, eps=0.0).double() - _reference(G)).norm() <= 1.2 * err + 1e-2
        assert L.polar(G * scale, method).norm() < 0.1 * at_one.norm()  # the clamp, as torch.optim.Muon
    assert torch.equal(L.polar(torch.zeros(40, 60), method, eps=0.0), torch.zeros(40, 60))


def test_the_scaled_start_an_accelerator_always_takes_is_bitwise_the_cpus(monkeypatch):
    """On an accelerator the start is scaled without looking (no host read); at ordinary scales that gives the same
    bits as the CPU's unscaled start, also for a batch and for tall matrices."""
    G = torch.stack([_matrix(300, 768, seed=s) * 10.0**s for s in range(-3, 3)])
    unscaled = {m: L.polar(G, m) for m in ESTIMATORS}
    monkeypatch.setattr(_scale, "needs_scaling", lambda X: True)
    monkeypatch.setattr(gram_ns, "needs_scaling", lambda X: True)
    monkeypatch.setattr(polar_module, "needs_scaling", lambda X: True)
    for m in ESTIMATORS:
        assert torch.equal(L.polar(G, m), unscaled[m]), m
        assert torch.equal(L.polar(G.mT, m), unscaled[m].mT), m


def test_muon_steps_on_a_1e19_gradient_as_on_a_unit_one():
    """A 1e19 gradient once wrote NaN into the weights with no error; its update is the unit gradient's, to the bit
    for 2^64 ≈ 1.8e19 (the polar factor does not depend on scale)."""
    updates = []
    for scale in (1.0, 2.0**64):
        p = torch.nn.Parameter(torch.zeros(256, 1024))
        p.grad = _matrix(256, 1024) * scale
        Muon([p], lr=0.02).step()
        updates.append(p.detach().clone())
    assert torch.equal(updates[1], updates[0])


@pytest.mark.parametrize("scale", [1e160, 1e-170])
def test_float64_beyond_the_grams_range_keeps_its_ranks_and_norms(scale):
    """float64 Grams of 1e160 entries overflow and of 1e-170 entries underflow: the exact routes once raised
    torch's eigh error or returned 0 ('A is the zero matrix'). Ranks equal the unit-scale ones, norms scale."""
    G = _matrix(6, 9, torch.float64)
    A = _matrix(6, 9, torch.float64, seed=1)
    for fn in (L.stable_rank, L.nuclear_rank):
        assert fn(G * scale).item() == pytest.approx(fn(G).item(), rel=1e-12)
    assert L.stable_rank(G * scale, method="power").item() == pytest.approx(L.stable_rank(G, method="power").item(), rel=1e-12)
    assert L.spectral_advantage(G * scale, A * scale).item() == pytest.approx(L.spectral_advantage(G, A).item(), rel=1e-12)
    assert (L.nuclear_norm(G * scale) / scale).item() == pytest.approx(L.nuclear_norm(G).item(), rel=1e-12)
    big = [_matrix(300, 400, torch.float64, seed=s) for s in range(3)]  # the pooled route (one job per matrix)
    for mats in ([G, G.mT, A], big):
        got = L.nuclear_norms([M * scale for M in mats]) / scale
        assert torch.allclose(got, L.nuclear_norms(mats), rtol=1e-12)
        fro, nuc = L.fro_nuclear_norms_later([M * scale for M in mats])()
        assert torch.allclose(nuc / scale, L.nuclear_norms(mats), rtol=1e-12)
        assert torch.allclose(fro / scale, torch.stack([M.norm() for M in mats]), rtol=1e-12)
    for method in ("gram", "svd"):
        assert torch.allclose(L.polar(G * scale, method), _reference(G), atol=1e-12)
    P, nuc = L.polar_with_nuclear_norm(G * scale)
    assert torch.allclose(P, _reference(G), atol=1e-12) and (nuc / scale).item() == pytest.approx(L.nuclear_norm(G).item())


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_float32_power_stable_rank_and_spectral_norm_at_extreme_scales(scale):
    """The power route squared float32 entries: 1e30 gave NaN, 1e-30 gave 0."""
    A = _matrix(6, 9)
    assert L.stable_rank(A * scale, method="power").item() == pytest.approx(L.stable_rank(A).item(), rel=1e-4)
    sigma, _ = L.spectral_norm(A * scale)
    assert (sigma.double() / scale).item() == pytest.approx(torch.linalg.matrix_norm(A.double(), 2).item(), rel=1e-4)


@pytest.mark.parametrize("call, says", [
    (lambda: L.nuclear_norms([_matrix()], dtype=torch.int32), "dtype=torch.int32 is not one a Gram is formed in"),
    (lambda: L.fro_nuclear_norms_later([_matrix()], dtype=torch.bfloat16), "not one a Gram is formed in"),
    (lambda: L.gram(_matrix(), dtype=torch.int32), "not one a Gram is formed in"),
    (lambda: L.nuclear_norms(_matrix()), r"must be a list of matrices, got one tensor of shape \(40, 60\); pass \[G\]"),
    (lambda: L.polar(_matrix(), "gram_newton_schulz", restart="a"), "restart must be an int ≥ 1"),
    (lambda: L.polar(_matrix(), "gram_newton_schulz", restart=0), "restart must be an int ≥ 1"),
    (lambda: L.polar(_matrix(), "polar_express", restart=2), "restart applies to method='gram_newton_schulz' only"),
    (lambda: L.polar(_matrix(), "svd", ns_steps=3), "ns_steps applies to the iterative methods; 'svd' is exact"),
    (lambda: L.polar(_matrix(), "newton_schulz", ns_coefficients=(math.nan, 1, 1)), "ns_coefficients must be finite"),
    (lambda: L.polar(_matrix(), "newton_schulz", ns_coefficients=[(3, -4, 2), (1, math.inf, 0)]), "must be finite"),
    (lambda: L.default_rcond(torch.int32, 3, 4), "dtype must be a floating torch.dtype"),
    (lambda: L.polar_error(torch.randn(2, 5, 6), torch.randn(3, 5, 6)), "batch shapes of P .* do not broadcast"),
    (lambda: L.spectral_advantage(torch.randn(2, 5, 6), torch.randn(3, 7, 5)), "batch shapes of G .* do not broadcast"),
    (lambda: L.spectral_advantage(torch.randn(4, 5), torch.randn(7, 3)), r"A's 3 features .* match neither side of G \(4, 5\)"),
    (lambda: L.singular_value_soft_threshold(_matrix(), "0.1"), "tau must be a real number ≥ 0 or a real tensor"),
    (lambda: L.singular_value_soft_threshold(_matrix(), None), "tau must be a real number ≥ 0 or a real tensor"),
    (lambda: L.energy_rank(_matrix(), q=".9"), r"q must be a number in \(0, 1\]"),
    # options a method would ignore: refused whatever the shape, and for auto per the backend it chose
    (lambda: L.polar(_matrix(), "gram", ns_coefficients=(math.nan, 1, 1)), "ns_coefficients apply to method='newton_schulz'"),
    (lambda: L.polar(_matrix(), "polar_express", ns_coefficients=(1.5, -0.5, 0.0)), "'polar_express' does not read them"),
    (lambda: L.polar(_matrix(20, 30), ns_coefficients=(1.5, -0.5, 0.0)), "'auto' does not read them"),
    (lambda: L.polar(_matrix(20, 30), ns_steps=3), r"method='auto' chose 'gram' here \(tol=None, shape \(20, 30\)\)"),
    (lambda: L.polar(_matrix(), tol=1e-4, ns_steps=3), "chose 'gram' here .* drop ns_steps"),
    (lambda: L.polar(_matrix(), "svd", tol=1e-3), "tol chooses the backend of method='auto'; method='svd' does not read it"),
    (lambda: L.polar(_matrix(), "newton_schulz", tol=1e-3), "method='newton_schulz' does not read it"),
    (lambda: L.polar_later([_matrix(256, 300)], "gram", ns_steps=3), "ns_steps applies to the iterative methods"),
    (lambda: L.polar_later([_matrix(256, 300)], "gram", restart=1), "restart applies to method='gram_newton_schulz' only"),
    (lambda: L.polar_later([_matrix(256, 300)], "gram", eps=math.nan), "eps must be a finite number"),
    (lambda: L.polar_later([_matrix(256, 300)], ns_steps=3, tol=1e-4), "chose 'gram' here"),
    (lambda: L.gram_newton_schulz(_matrix(), [(math.nan, 1.0, 1.0)]), "triples of finite numbers"),
])
def test_options_that_would_be_ignored_truncated_or_nan_are_refused(call, says):
    with pytest.raises(ValueError, match=says):
        call()


@pytest.mark.parametrize("method", ESTIMATORS)
def test_eps_zero_on_float64_gives_the_factor_or_zero_never_nan(method):
    """A float64 matrix's unit-scale factor (up to 2^1022 for the zero matrix) is beyond bfloat16's range: the
    clamp of the scaled start is formed in float64, so eps=0 gives 0 for the zero matrix and U Vᵀ for a tiny one."""
    assert torch.equal(L.polar(torch.zeros(3, 3, dtype=torch.float64), method, eps=0.0), torch.zeros(3, 3, dtype=torch.float64))
    for shape in ((3, 3), (130, 300)):
        G = _matrix(*shape, dtype=torch.float64)
        err = (L.polar(G, method) - _reference(G)).norm()  # the estimator's own error at unit scale
        P = L.polar(G * 1e-60, method, eps=0.0)
        assert torch.isfinite(P).all()
        assert (P - _reference(G)).norm() <= 1.2 * err + 1e-2


@pytest.mark.parametrize("scale", [2.0**-125, 1e-40, 3e37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_polar_of_tiny_or_huge_half_and_single_precision_is_the_unit_scale_one(scale, dtype):
    """The exact route's last two products run in float32: 1/σ_i of a gradient of 1e-38 overflows it (it returned
    inf, and `Muon(polar="gram")` wrote inf into the weights). They now see X·2^-e, so the factor is the svd's."""
    G = (_matrix(40, 70) * scale).to(dtype)
    ref = _reference(G)
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # bfloat16: the factor is returned in bfloat16 (≈ 1e-3 at unit scale)
    for P in (L.polar(G, "gram"), L.polar_with_nuclear_norm(G, "gram")[0], L.polar_later([G, G.clone()], "gram")()[1]):
        assert torch.isfinite(P).all()
        assert (P.double() - ref).abs().max() < tol
    p = torch.nn.Parameter(torch.zeros(40, 70))
    opt = Muon([p], lr=0.1, polar="gram")
    p.grad = (_matrix(40, 70) * 1e-38)
    opt.step()
    assert torch.isfinite(p).all() and p.abs().max() > 0


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_the_matmul_only_nuclear_norm_of_float64_beyond_its_range(scale):
    """The accelerator's route (‖G‖_* by a polar iteration) of a float64 matrix beyond 1e±154: its ‖G‖_F overflowed
    (NaN) or underflowed (0). It now runs at unit scale."""
    G = _matrix(6, 9, dtype=torch.float64)
    got = L.nuclear_norms([G * scale, G], method="polar")
    ref = torch.linalg.matrix_norm(G, "nuc")
    assert abs(float(got[0]) / scale / float(ref) - 1) < 1e-4
    assert abs(float(got[1]) / float(ref) - 1) < 1e-4


@pytest.mark.parametrize("tol", [1e-15, 0.0, 2.0, float("nan"), "1e-4", None, True])
def test_a_nuclear_tol_out_of_range_is_one_error_on_every_route(tol):
    """tol=1e-15 made the 'polar' route's schedule loop forever; a str or None raised a bare TypeError there, and the
    'eigh' route (a CPU's default) accepted anything."""
    for method in ("polar", "eigh", "auto"):
        with pytest.raises(ValueError, match=r"tol must be a number in \[1e-12, 1\)"):
            L.nuclear_norms([_matrix(3, 3)], method=method, tol=tol)
    with pytest.raises(ValueError, match="finer than float64 certifies"):  # tol/(2k) below float64's resolution: a hang
        L.nuclear_norms([torch.zeros(600, 601)], method="polar", tol=1e-12)


def test_the_polar_backends_and_nuclear_norms_build_no_autograd_graph():
    """The exact routes give the eigensolver a Gram's lower triangle only, so a derivative through them was wrong
    (0.047 off U Vᵀ for ‖G‖_* of a 130×300 matrix) and present or not by route; none is built now."""
    G = torch.randn(130, 300, dtype=torch.float64, requires_grad=True)
    outs = [L.nuclear_norms([G]), L.nuclear_norms_later([G])(), L.fro_nuclear_norms_later([G])()[1], L.polar(G),
            L.polar(G, "gram"), L.polar(G, "newton_schulz"), L.polar_with_nuclear_norm(G)[1], L.polar_later([G, 2 * G], "gram")()[0],
            L.polar_with_nuclear_norm_later([G])()[0][1]]
    assert not any(o.requires_grad for o in outs)
    assert L.newton_schulz(G).requires_grad  # the raw kernels are plain torch products: differentiable


def test_numpy_numbers_are_options_like_pythons():
    """np.int64 steps and np.float32 coefficients (read off an array or a config) were refused as not integers."""
    np = pytest.importorskip("numpy")
    G = _matrix()
    want = L.polar(G, "newton_schulz", ns_steps=3, ns_coefficients=(3.4445, -4.775, 2.0315))
    got = L.polar(G, "newton_schulz", ns_steps=np.int64(3), ns_coefficients=(np.float64(3.4445), -4.775, 2.0315))
    assert torch.equal(got, want)
    assert torch.equal(L.polar(G, "gram", ns_coefficients=(3.4445, -4.775, 2.0315)), L.polar(G, "gram"))  # the default
    assert torch.equal(L.spectral_norm(G, iters=np.int64(3))[0], L.spectral_norm(G, iters=3)[0])  # was refused


@pytest.mark.parametrize("method", ["svd", "gram"])
def test_eps_given_to_an_exact_method_is_refused_not_ignored(method):
    with pytest.raises(ValueError, match=rf"polar: eps clamps the scale .*{method!r} is exact and does not read it"):
        L.polar(_matrix(), method, eps=1e-3)
    assert torch.equal(L.polar(_matrix(), method, eps=1e-7), L.polar(_matrix(), method))  # the default, passed


@pytest.mark.parametrize("scale", [1e308, 1e-300])
def test_the_svd_reference_at_the_ends_of_float64(scale):
    """polar(G·1e308, "svd") was all zeros (σ_1 overflowed to inf, so no σ passed the cut-off) and its ‖G‖_* NaN; the
    SVD now sees G at unit scale, so the factor is the unit-scale one and a power-of-two scale changes no bit."""
    G = _matrix(48, 160, dtype=torch.float64)
    G = G / G.abs().max()
    P, nuc = L.polar_with_nuclear_norm(G * scale, "svd")
    assert (P - _reference(G)).abs().max() < 1e-13
    ref = torch.linalg.svdvals(G).sum() * scale
    assert nuc == pytest.approx(float(ref), rel=1e-13) if math.isfinite(ref) else nuc == math.inf
    assert torch.equal(L.polar(G * 2.0**600, "svd"), L.polar(G, "svd"))
    assert L.polar_error(G * scale, P) < 1e-12  # its own SVD at unit scale too (NaN at 1e308)


@pytest.mark.parametrize("scale", [3e38, 1e100, 1e-100])
def test_the_svd_reference_in_float32_at_scales_float32_cannot_hold(scale):
    """dtype=float32 SVD of a float64 G of 1e100 raised a LAPACK error; of 3e38 or 1e-100 it gave zeros."""
    G = _matrix(48, 160, dtype=torch.float64)
    G = G / G.abs().max()
    P = L.polar(G * scale, "svd", dtype=torch.float32)
    assert (P - _reference(G)).abs().max() < 1e-5


@pytest.mark.parametrize("dtype, work", [(torch.float16, None), (torch.bfloat16, torch.float64), (torch.float32, torch.float64)])
def test_eps_zero_on_a_zero_matrix_narrower_than_the_working_dtype_is_zero(dtype, work):
    """The clamp of eps=0 is the working dtype's tiny, which float16 (and float32, for float64 work) rounded to 0:
    1/sqrt(0)·0 gave NaN for the zero matrix, the default route's included."""
    for shape in ((5, 6), (200, 300)):
        Z = torch.zeros(*shape, dtype=dtype)
        for P in (L.polar(Z, "gram_newton_schulz", eps=0.0, dtype=work), L.polar(Z, eps=0.0, dtype=work)):
            assert torch.equal(P, torch.zeros_like(Z))


def test_the_soft_threshold_and_principal_angles_at_the_top_of_float64():
    """Both ran an unscaled float64 SVD / QR: NaN, or a LinAlgError, for a finite 1e308 matrix."""
    G = _matrix(48, 160, dtype=torch.float64)
    G = G / G.abs().max()
    assert torch.allclose(L.singular_value_soft_threshold(G * 1e308, 1e308 * 0.5) / 1e308,
                          L.singular_value_soft_threshold(G, 0.5), rtol=0, atol=1e-13)
    assert torch.allclose(L.singular_value_soft_threshold(G * 1e-300, 0.0) / 1e-300, G, rtol=0, atol=1e-13)
    B = (G * 1e308).mT[:, :3]
    assert L.principal_angles(B, B).abs().max() < 1e-7


@pytest.mark.parametrize("method", ESTIMATORS)
@pytest.mark.parametrize("shape", [(64, 64), (9, 1)])
def test_a_power_of_two_scale_changes_no_bit_of_a_float64_inputs_estimate(method, shape):
    """A float64 input iterates in float32: its scaled start's floor was kept in float64, so the scale 1/sqrt(row sum)
    of a matrix at 2^100 was taken in float64 and then rounded, 1 ulp off the unscaled one's in 13 of 50 draws."""
    for seed in range(12):
        G = _matrix(*shape, dtype=torch.float64, seed=seed)
        at_one = L.polar(G, method)
        for k in (100, 1000):
            assert torch.equal(L.polar(G * 2.0**k, method), at_one), (seed, k)


@pytest.mark.parametrize("scale", [1e-3, 1e-4, 1e-6])
def test_a_small_gradient_iterated_in_float16_gives_the_polar_factor_not_nan(scale):
    """float16 products are normal from 2^-14 only: a 1e-4 gradient's Gram row sums (~1e-6) were judged in range,
    its start scale 1/sum overflowed float16 and the whole factor was NaN. It now starts at unit scale."""
    G = _matrix(64, 256)
    err = (L.polar(G, "gram_newton_schulz", dtype=torch.float16).double() - _reference(G)).norm()
    P = L.polar(G * scale, "gram_newton_schulz", dtype=torch.float16)
    assert torch.isfinite(P).all()
    assert (P.double() - _reference(G)).norm() <= 1.5 * err


def test_the_gram_of_a_finite_input_that_overflows_is_named_not_inf():
    """linalg.gram of entries of 1e20 returned inf, and stable_rank_from_gram then blamed 'a diverged loss'."""
    A = _matrix(5, 7) * 1e20
    with pytest.raises(ValueError, match=r"gram: A is finite but its Gram overflows float32 .*dtype=torch.float64"):
        L.gram(A)
    assert torch.isfinite(L.gram(A, dtype=torch.float64)).all()


def test_the_gram_of_a_finite_input_that_underflows_is_named_not_zeros():
    """Entries of 1e-25 gave an all-zero float32 Gram (its squares 1e-50), whose st(A) then read 0; from ≈ 1e-22 it
    was off by 0.25 %. Refused like an overflow; float64 and unit scale stay exact, and the zero matrix is zero."""
    A = _matrix(50, 20)
    for scale in (1e-25, 1e-22):
        with pytest.raises(ValueError, match=r"gram: A is finite but its Gram underflows float32 .*dtype=torch.float64"):
            L.gram(A * scale)
        C = L.gram(A * scale, dtype=torch.float64)
        assert float(L.stable_rank_from_gram(C)) == pytest.approx(float(L.stable_rank(A)), rel=1e-6)
    assert float(L.gram(A * 1e-15).abs().max()) > 0 and torch.equal(L.gram(torch.zeros(5, 7)), torch.zeros(5, 5))


def test_float8_and_quantized_inputs_are_one_value_error_not_torchs():
    """float8 raised NotImplementedError ('isfinite' not implemented) or torch's promotion error; a quantized tensor
    'Creation of quantized tensor requires quantized dtype'."""
    import warnings

    f8 = _matrix(4, 5).to(torch.float8_e4m3fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantize_per_tensor
        q = torch.quantize_per_tensor(_matrix(4, 5), 0.1, 0, torch.qint8)
    for x, says in ((f8, r"is torch.float8_e4m3fn, .*pass A.float\(\)"), (q, r"is quantized \(torch.qint8\), .*dequantize\(\)")):
        with pytest.raises(ValueError, match="stable_rank: A " + says):
            L.stable_rank(x)
        with pytest.raises(ValueError, match=r"nuclear_norms: mats\[0\] is"):
            L.nuclear_norms([x])
        with pytest.raises(ValueError, match=r"polar: G is"):
            L.polar(x)
