"""Rank measures and norms vs a float64 SVD reference; invariances, bounds, edge cases."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from specscope import linalg as L

from _linalg_util import random_matrix

shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))
seeds = st.integers(0, 2**16)


def ref_sv(M):
    return torch.linalg.svdvals(M.double())


def rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-300)


@given(shapes, seeds)
def test_exact_methods_match_float64_svd(shape, seed):
    M = random_matrix(seed, *shape, decay=0.3)
    s = ref_sv(M)
    assert rel(L.stable_rank(M), (s**2).sum() / s[0] ** 2) < 1e-5
    assert rel(L.nuclear_rank(M), s.sum() ** 2 / (s**2).sum()) < 1e-5
    assert rel(L.nuclear_norm(M), s.sum()) < 1e-5
    assert rel(L.participation_ratio(M), (s**2).sum() ** 2 / (s**4).sum()) < 1e-5
    p = s / s.sum()
    assert rel(L.entropy_rank(M), torch.exp(-(p * p.log()).sum())) < 1e-5
    e = (s**2).cumsum(0) / (s**2).sum()
    assert int(L.energy_rank(M, 0.9)) == int((e < 0.9 * (1 - 1e-12)).sum()) + 1
    torch.testing.assert_close(L.singular_values(M), s, rtol=1e-10, atol=1e-12)
    C = L.gram(M)
    assert rel(L.stable_rank_from_gram(C), (s**2).sum() / s[0] ** 2) < 1e-5
    assert rel(L.nuclear_norm_from_gram(C), s.sum()) < 1e-5


@given(shapes, seeds, st.floats(1e-3, 1e3))
def test_invariances_scale_transpose_rotation(shape, seed, scale):
    M = random_matrix(seed, *shape, decay=0.2)
    g = torch.Generator().manual_seed(seed + 1)
    Q, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g, dtype=torch.float64))
    for f in (L.stable_rank, L.nuclear_rank, L.entropy_rank, L.participation_ratio):
        base = f(M)
        for variant in (scale * M, M.mT, Q @ M):
            assert rel(f(variant), base) < 1e-8, f.__name__


@given(shapes, seeds, st.integers(1, 12))
def test_bounds_one_to_rank(shape, seed, r):
    r = min(r, *shape)
    M = random_matrix(seed, *shape, rank=r)
    for f in (L.stable_rank, L.nuclear_rank, L.entropy_rank, L.participation_ratio):
        v = float(f(M))
        assert 1 - 1e-9 <= v <= r + 1e-6, (f.__name__, v, r)
    assert 1 <= int(L.energy_rank(M)) <= r


def test_rank_one_and_row_vector():
    x = torch.randn(1, 7, dtype=torch.float64)
    for f in (L.stable_rank, L.nuclear_rank, L.entropy_rank, L.participation_ratio):
        assert float(f(x)) == pytest.approx(1.0, abs=1e-12)
    assert float(L.nuclear_norm(x)) == pytest.approx(float(x.norm()), rel=1e-12)


def test_zero_matrix_is_rank_zero():
    z = torch.zeros(4, 6)
    for f in (L.stable_rank, L.nuclear_rank, L.entropy_rank, L.participation_ratio, L.nuclear_norm):
        assert float(f(z)) == 0.0
    assert int(L.energy_rank(z)) == 0
    assert float(L.stable_rank(z, method="power")) == 0.0
    assert float(L.spectral_advantage(z, torch.randn(3, 4))) == 0.0
    with pytest.raises(ValueError, match="st\\(A\\) = 0"):
        L.spectral_advantage(torch.randn(3, 6), z)


def test_spectral_advantage_is_ratio():
    G, A = random_matrix(1, 6, 9), random_matrix(2, 20, 6, decay=1.0)
    assert rel(L.spectral_advantage(G, A), L.nuclear_rank(G) / L.stable_rank(A)) < 1e-12


def test_batched_equals_looped():
    M = random_matrix(3, 5, 8, batch=(2, 3), decay=0.4)
    for f in (L.stable_rank, L.nuclear_rank, L.entropy_rank, L.participation_ratio, L.energy_rank,
              L.nuclear_norm, L.singular_values):
        out = f(M)
        looped = torch.stack([torch.stack([f(M[i, j]) for j in range(3)]) for i in range(2)])
        torch.testing.assert_close(out, looped, rtol=1e-12, atol=0)
    sig, v = L.spectral_norm(M, iters=200, tol=0)
    for i in range(2):
        for j in range(3):
            s1, _ = L.spectral_norm(M[i, j], iters=200, tol=0)
            assert rel(sig[i, j], s1) < 1e-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_computed_in_float32(dtype):
    M = random_matrix(4, 16, 24, decay=0.2).to(dtype)
    ref = M.double()
    for f in (L.stable_rank, L.nuclear_rank, L.entropy_rank):
        out = f(M)
        assert out.dtype == torch.float32
        assert rel(out, f(ref)) < 1e-6  # same exact value as the up-cast matrix


def test_spectral_norm_power_and_warm_start():
    M = random_matrix(5, 30, 50, decay=0.1)
    s1 = float(ref_sv(M)[0])
    sig, v = L.spectral_norm(M, iters=500, tol=1e-14)
    assert rel(sig, s1) < 1e-8
    assert v.shape == (30,)
    # warm start: a slightly changed matrix converges in a few iterations from the old vector
    M2 = M + 1e-3 * random_matrix(6, 30, 50)
    warm, _ = L.spectral_norm(M2, v, iters=3, tol=0)
    cold, _ = L.spectral_norm(M2, iters=3, tol=0)
    s2 = float(ref_sv(M2)[0])
    assert rel(warm, s2) < 1e-6 < rel(cold, s2)
    # tall matrix: v lives on the smaller (right) side
    _, vt = L.spectral_norm(M.mT)
    assert vt.shape == (30,)
    # power estimate of stable rank is within its stated bound
    est = float(L.stable_rank(M, method="power", iters=500))
    assert rel(est, L.stable_rank(M)) < 1e-6


def test_float32_measures_are_float32_inside_autocast():
    """`gram` and `spectral_norm` (and the power stable rank built on it) compute in float32 as documented: inside
    torch.autocast their products ran in bfloat16 (σ_1 4 % low, st(A) 9 % high on a 300×200 matrix)."""
    A = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    plain = (L.spectral_norm(A, iters=50)[0], L.stable_rank(A, method="power", iters=50), L.gram(A))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = (L.spectral_norm(A, iters=50)[0], L.stable_rank(A, method="power", iters=50), L.gram(A))
    for a, b in zip(plain, inside):
        assert b.dtype == a.dtype and torch.allclose(a, b, rtol=1e-6, atol=0)
    x = torch.randn(50, 20, requires_grad=True)  # autograd is left as it is
    L.spectral_norm(x)[0].backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_spectral_norm_does_not_touch_global_rng():
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    L.spectral_norm(torch.randn(4, 5, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(torch.rand(3), a)


def test_onehot_stable_rank_matches_explicit_matrix():
    g = torch.Generator().manual_seed(0)
    for vocab, n in [(5, 40), (50, 17), (3, 1)]:
        ids = torch.randint(0, vocab, (n,), generator=g)
        X = torch.nn.functional.one_hot(ids, vocab).double()
        counts = torch.bincount(ids)
        assert float(L.onehot_stable_rank(ids)) == n / int(counts.max())
        assert float(L.onehot_stable_rank(ids)) == pytest.approx(float(L.stable_rank(X)), rel=1e-12)
    ids = torch.tensor([[-3, 7], [7, 7]], dtype=torch.int32)  # any int tensor, negative ids fine
    assert float(L.onehot_stable_rank(ids)) == 4 / 3


@pytest.mark.parametrize("bad,msg", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_raises_naming_function(bad, msg):
    M = torch.randn(3, 4)
    M[1, 2] = bad
    for f in (L.stable_rank, L.nuclear_rank, L.entropy_rank, L.participation_ratio, L.energy_rank, L.nuclear_norm,
              L.singular_values, L.gram, L.polar, L.singular_value_soft_threshold):
        args = (M, 0.1) if f is L.singular_value_soft_threshold else (M,)
        with pytest.raises(ValueError, match=msg) as e:
            f(*args)
        assert f.__name__ in str(e.value)
    with pytest.raises(ValueError, match="spectral_norm"):
        L.spectral_norm(M)


def test_empty_and_bad_inputs_raise():
    for f in (L.stable_rank, L.nuclear_rank, L.polar, L.spectral_norm, L.nuclear_norm):
        with pytest.raises(ValueError, match="empty"):
            f(torch.zeros(0, 3))
        with pytest.raises(ValueError, match="at least 2 dims"):
            f(torch.ones(3))
    with pytest.raises(ValueError, match="empty"):
        L.onehot_stable_rank(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        L.onehot_stable_rank(torch.zeros(3))
    with pytest.raises(ValueError, match="q must be"):
        L.energy_rank(torch.ones(2, 2), q=1.5)
    with pytest.raises(ValueError, match="method"):
        L.stable_rank(torch.ones(2, 2), method="svd")
    with pytest.raises(ValueError, match="v0 has length"):
        L.spectral_norm(torch.ones(2, 5), torch.ones(5))
    assert math.isfinite(float(L.stable_rank(torch.ones(2, 2, dtype=torch.int64))))


def test_eigvalsh_batched_over_threads_equals_torch(monkeypatch):
    """The thread-pool path (≥ 2 CPU threads, ≥ 2 matrices) gives torch.linalg.eigvalsh's result, any batch shape."""
    from specscope.linalg import norms
    from specscope.linalg.norms import eigvalsh_batched
    monkeypatch.setattr(norms, "POOL_MIN", 1)  # the pool path even for these small matrices
    A = torch.randn(2, 3, 9, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    C = A @ A.mT
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        values = eigvalsh_batched(C)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(C))
    assert values.shape == (2, 3, 9)


@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 40), st.integers(1, 6), seeds)
def test_lower_gram_is_what_eigh_reads_of_the_gram(batch, m, n, blocks, seed):
    """lower_gram's lower triangle, trace and eigen-decomposition are the full smaller Gram's, any shape and
    block count (more blocks than rows included)."""
    from specscope.linalg._checks import lower_gram, smaller_gram
    X = torch.randn(batch, m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    C, full = lower_gram(X, blocks), smaller_gram(X)
    assert C.shape == full.shape
    torch.testing.assert_close(C.tril(), full.tril())
    torch.testing.assert_close(torch.linalg.eigvalsh(C), torch.linalg.eigvalsh(full))
    lam, Q = torch.linalg.eigh(C)
    torch.testing.assert_close(Q @ torch.diag_embed(lam) @ Q.mT, full)


@pytest.mark.parametrize("pool_min", [1, 10**9])  # the thread-pool path and the batched one
def test_the_nuclear_rank_of_a_rank_deficient_float64_gradient_is_at_most_its_rank(monkeypatch, pool_min):
    """The probe's route summed the square roots of every Gram eigenvalue: each round-off eigenvalue of an exact zero
    added ~1e-8·σ_1, so a rank-1 256 × 1024 float64 G read nr 1.0000011 and ‖G‖_* 5e-7 high. Eigenvalues at the
    eigensolver's noise floor (max(m, n)·eps·λ_max, as `linalg.spectra`) are now zeros."""
    from specscope.linalg import norms
    monkeypatch.setattr(norms, "POOL_MIN", pool_min)
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(256, r, generator=g, dtype=torch.float64) @ torch.randn(r, 1024, generator=g, dtype=torch.float64)
            for r in (1, 4)]
    mats += [mats[1].T.contiguous(), torch.randn(300, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 300, generator=g, dtype=torch.float64)]
    ranks = [1, 4, 4, 3]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fro, nuc = L.fro_nuclear_norms_later(mats)()
        alone = L.nuclear_norms(mats)
    finally:
        torch.set_num_threads(threads)
    ref = torch.stack([torch.linalg.svdvals(G).sum() for G in mats])
    torch.testing.assert_close(nuc, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(alone, ref, rtol=1e-12, atol=0)
    assert all(nr <= r * (1 + 1e-12) for nr, r in zip((nuc / fro).square().tolist(), ranks))
    # above the eigensolver's noise floor (k·eps·λ_1 of a k × k Gram) σ are summed: 255 σ of 5e-7 beside σ_1 = 1
    torch.manual_seed(0)
    U, V = torch.linalg.qr(torch.randn(256, 256, dtype=torch.float64))[0], torch.linalg.qr(torch.randn(4096, 256, dtype=torch.float64))[0]
    s = torch.full((256,), 5e-7, dtype=torch.float64)
    s[0] = 1
    G = U @ torch.diag(s) @ V.T
    assert float(L.nuclear_norms([G])[0]) == pytest.approx(1.0001275, rel=1e-9)


@pytest.mark.parametrize("pool_min", [1, 10**9])  # the thread-pool path and the batched one
def test_nuclear_norms_of_mixed_shapes_match_float64_svd(monkeypatch, pool_min):
    """‖G‖_* of a list of matrices of different shapes (wide, tall, square, rank-deficient, zero), in list
    order, on the thread pool and the batched path alike (one Gram product per shape, one eigvalsh per Gram
    size), and the pool leaves the caller's thread count."""
    from specscope.linalg import norms
    monkeypatch.setattr(norms, "POOL_MIN", pool_min)
    g = torch.Generator().manual_seed(3)
    mats = [torch.randn(7, 30, generator=g), torch.randn(30, 7, generator=g), torch.randn(12, 12, generator=g),
            torch.randn(16, 2, generator=g) @ torch.randn(2, 40, generator=g), torch.zeros(5, 9), torch.randn(9, 9, generator=g),
            torch.randn(11, 7, generator=g)]  # a Gram of 7 rows from a second shape: two products, one eigvalsh
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = L.nuclear_norms(mats)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    ref = torch.stack([torch.linalg.svdvals(G.double()).sum() for G in mats])
    assert got.dtype == torch.float64 and got.shape == (len(mats),)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)  # float32 inputs, float64 Grams: rounding of the inputs only
    with pytest.raises(ValueError, match=r"nuclear_norms: mats\[1\] has 1 NaN"):
        L.nuclear_norms([torch.ones(3, 3), torch.tensor([[1.0, float("nan")], [0.0, 1.0]])])
    assert L.nuclear_norms([]).shape == (0,)
    with pytest.raises(ValueError, match=r"mats\[0\] has shape \(2, 3, 3\); pass 2-D matrices"):
        L.nuclear_norms([torch.ones(2, 3, 3)])


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_eigensolve_pool_works_in_a_forked_child(monkeypatch):
    """A child forked after the pool ran gets a pool of its own (the parent's worker threads are not there)."""
    import os

    from specscope.linalg import norms
    monkeypatch.setattr(norms, "POOL_MIN", 1)
    C = torch.randn(4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    C = C @ C.mT
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = norms.eigvalsh_batched(C)  # the pool now exists in this process
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if the pool answers (a hung pool is killed by the alarm)
            import signal
            signal.alarm(60)
            try:
                ok = torch.allclose(norms.eigvalsh_batched(C), expected)
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        torch.set_num_threads(threads)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("lower,tol", [(1e-3, 1e-4), (2e-7, 5e-5), (0.05, 1e-2)])
def test_converging_schedule_maps_its_interval_to_one_and_below_it_into_unit_interval(lower, tol):
    """The composite polynomial, evaluated in float64 on a dense grid: within tol of 1 on [lower, 1],
    in [0, 1] below lower — the two facts the nuclear-norm bound rests on."""
    from specscope.linalg._coefficients import converging_schedule
    x0 = torch.cat([torch.logspace(math.log10(lower), 0, 20001, dtype=torch.float64), torch.tensor([lower, 1.0], dtype=torch.float64)])
    below = torch.logspace(-12, math.log10(lower), 2001, dtype=torch.float64)[:-1]
    xs, ys = x0.clone(), below.clone()
    for a, b, c in converging_schedule(lower, tol):
        xs, ys = a * xs + b * xs**3 + c * xs**5, a * ys + b * ys**3 + c * ys**5
    assert (xs - 1).abs().max() <= tol
    assert (ys >= 0).all() and (ys <= 1).all()


def test_minimax_quintic_equioscillates():
    """Remez result: |1 − p| reaches E at four points of [lo, hi] and nowhere exceeds it (Chebyshev's
    criterion: so no odd quintic does better)."""
    from specscope.linalg._coefficients import minimax_quintic
    (a, b, c), E = minimax_quintic(1e-3, 1.0)
    x = torch.linspace(1e-3, 1.0, 200001, dtype=torch.float64)
    err = 1 - (a * x + b * x**3 + c * x**5)
    assert err.abs().max() <= E * (1 + 1e-9)
    assert err[0] == pytest.approx(E, rel=1e-9) and err[-1] == pytest.approx(-E, rel=1e-9)
    assert 0.99 < E < 0.992  # ℓ = 1e-3: the first step can only lift 1e-3 to ≈ 8.5e-3


def _with_spectrum(s: torch.Tensor, m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0][:, : len(s)]
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0][:, : len(s)]
    return (U * s) @ V.T


@pytest.mark.parametrize("tol", [1e-4, 1e-2])
@given(st.integers(0, 2**16), st.sampled_from(["geometric", "cluster at ℓ", "one big + many at ℓ", "rank 3"]))
def test_nuclear_norms_polar_within_its_bound(tol, seed, kind):
    """|‖G‖_* − exact| ≤ tol·‖G‖_*, on spectra built to sit where the bound is loosest: many singular values
    at and just below ℓ·‖G‖_F (ℓ = tol/2k), where the iteration has not lifted them to 1."""
    g = torch.Generator().manual_seed(seed)
    m, n = int(torch.randint(20, 70, (1,), generator=g)), int(torch.randint(20, 70, (1,), generator=g))
    k = min(m, n)
    u = torch.rand(k, generator=g, dtype=torch.float64)
    ell = tol / (2 * k)
    if kind == "geometric":
        s = 10 ** (-12 * u)
    elif kind == "cluster at ℓ":
        s = torch.cat([torch.ones(1, dtype=torch.float64), ell * (0.3 + 2 * u[1:])])
    elif kind == "one big + many at ℓ":  # measured in units of ‖G‖_F ≈ 1: near the worst case of the bound
        s = torch.cat([torch.ones(1, dtype=torch.float64), ell * (1 - 0.5 * u[1:])])
    else:
        s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)[: k]
    G = _with_spectrum(s, m, n, seed)
    exact = s.sum()
    got = L.nuclear_norms([G, G.T.float()], method="polar", tol=tol)
    assert (got[0] - exact).abs() <= tol * exact
    assert (got[1] - exact).abs() <= tol * exact + 1e-6 * exact  # float32 input: its own rounding on top


def test_nuclear_norms_polar_matches_eigh_on_real_gradients():
    """Gradients of a tiny transformers GPT-2 after a few AdamW steps: the matmul-only route agrees with
    the float64 eigenvalue route within its 1e-4 bound, for every hidden matrix."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(128, (8, 32))
    for _ in range(3):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    mats = [p.grad for p in model.parameters() if p.ndim == 2]
    eig = L.nuclear_norms(mats, method="eigh")
    pol = L.nuclear_norms(mats, method="polar")
    assert ((pol - eig).abs() <= 1e-4 * eig).all(), ((pol - eig) / eig).abs().max()
    with pytest.raises(ValueError, match="unknown method 'qr'"):
        L.nuclear_norms(mats, method="qr")


def test_nuclear_norms_polar_in_chunks_equals_one_batch(monkeypatch):
    """Many matrices of one shape are iterated a chunk at a time (float64 copies of a whole model's weights
    would not fit on a device); the chunks give the same numbers as one batch, in list order."""
    from specscope.linalg import norms
    g = torch.Generator().manual_seed(5)
    mats = [torch.randn(12, 30, generator=g) for _ in range(5)] + [torch.randn(30, 12, generator=g), torch.randn(8, 8, generator=g)]
    whole = L.nuclear_norms(mats, method="polar")
    monkeypatch.setattr(norms, "POLAR_CHUNK", 2 * 12 * 30)  # two 12×30 matrices per chunk
    assert torch.equal(L.nuclear_norms(mats, method="polar"), whole)
    ref = torch.stack([torch.linalg.svdvals(G.double()).sum() for G in mats])
    assert ((whole - ref).abs() <= 1e-4 * ref).all()


def test_nuclear_norms_polar_keeps_list_order_across_shapes():
    """Shapes interleaved in the list are batched per shape and come back in list order, each as it is alone."""
    g = torch.Generator().manual_seed(6)
    mats = [torch.randn(12, 30, generator=g), torch.randn(8, 8, generator=g), torch.randn(30, 12, generator=g),
            torch.randn(5, 9, generator=g), torch.randn(8, 8, generator=g)]
    got = L.nuclear_norms(mats, method="polar")
    alone = torch.cat([L.nuclear_norms([G], method="polar") for G in mats])
    torch.testing.assert_close(got, alone, rtol=1e-12, atol=0)
    ref = torch.stack([torch.linalg.svdvals(G.double()).sum() for G in mats])
    assert ((got - ref).abs() <= 1e-4 * ref).all()


def test_inputs_without_values_or_of_the_wrong_kind_are_named():
    """Meta and sparse tensors reached torch internals ("item() cannot be called on meta tensors"); the raw polar
    kernels took NaN, complex and 1-D input silently or with an IndexError; fro_nuclear_norms_later took anything."""
    for x, message in [(torch.randn(3, 4, device="meta"), "on the meta device and has no values"),
                       (torch.randn(3, 4).to_sparse(), "sparse_coo tensor; pass a dense one")]:
        for f in (L.stable_rank, L.nuclear_rank, L.polar):
            with pytest.raises(ValueError, match=message):
                f(x)
    for f in (L.newton_schulz, L.polar_express, L.gram_newton_schulz):
        with pytest.raises(ValueError, match=f"{f.__name__}: G is complex"):
            f(torch.randn(4, 6, dtype=torch.cfloat))
        with pytest.raises(ValueError, match=f"{f.__name__}: G must have at least 2 dims"):
            f(torch.randn(5))
    with pytest.raises(ValueError, match=r"mats\[0\] has shape \(2, 6, 7\); pass 2-D matrices"):
        L.fro_nuclear_norms_later([torch.randn(2, 6, 7)])  # reported ‖B‖_F of the first matrix only
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        L.fro_nuclear_norms_later([torch.randn(6, 7)], method="bogus")
    fro, nuc = L.fro_nuclear_norms_later([torch.arange(6).reshape(2, 3)])()  # ints are computed as float32
    assert float(fro[0]) == pytest.approx(float(torch.arange(6.0).norm()))


def test_spectral_norm_from_a_zero_start_and_its_options():
    A = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    sigma, _ = L.spectral_norm(A, torch.zeros(6), iters=100, tol=0)  # was σ = 0: the power iteration never moved
    assert float(sigma) == pytest.approx(float(torch.linalg.matrix_norm(A.double(), 2)), rel=1e-6)
    for kw, message in [(dict(tol=float("nan")), "tol must be a number in"), (dict(iters=2.5), "iters must be an int")]:
        with pytest.raises(ValueError, match=message):
            L.spectral_norm(A, **kw)
    for kw, message in [(dict(iters=0), "iters must be an int ≥ 1, got 0"), (dict(v0=torch.ones(3)), "v0 has length 3")]:
        with pytest.raises(ValueError, match=rf"^stable_rank\(method='power'\): {message}"):  # the function the user called
            L.stable_rank(A, method="power", **kw)


@pytest.mark.parametrize("call, message", [
    (lambda: L.stable_rank_from_gram(torch.tensor([[1.0, 2.0], [0.0, 1.0]])), "C is not symmetric, so it is no Gram matrix"),
    (lambda: L.nuclear_norm_from_gram(-torch.eye(3)), "C has a negative diagonal entry"),
    (lambda: L.nuclear_norm_from_gram(torch.tensor([[1.0, 2.0], [2.0, 1.0]])), "negative eigenvalue well beyond rounding"),  # read 1.73
    (lambda: L.spectral_advantage(torch.full((3, 3), float("nan")), torch.randn(4, 3)), "^spectral_advantage: G has 9 NaN"),
    (lambda: L.singular_value_soft_threshold(torch.randn(2, 3, 3), torch.tensor([0.1, 0.2, 0.3])),
     r"tau of shape \(3,\) does not broadcast against the batch shape \(2,\)"),
])
def test_inputs_that_are_not_what_the_function_measures_are_named(call, message):
    """Each used to return a number (0.333 for a non-symmetric 'Gram', 0 for −I), name another function, or raise
    torch's broadcasting error."""
    with pytest.raises(ValueError, match=message):
        call()


def test_gram_functions_accept_grams_made_in_low_precision():
    A = torch.randn(64, 48)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        C = A.to(dtype).T @ A.to(dtype)
        assert float(L.stable_rank_from_gram(C)) == pytest.approx(float(L.stable_rank(A)), rel=0.05)


@given(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9), st.sampled_from(["ok", "nan", "inf", "-inf", "huge"]),
                          st.sampled_from([torch.float32, torch.float64, torch.bfloat16])), min_size=1, max_size=6),
       st.integers(0, 2**31 - 1))
def test_list_checks_raise_exactly_for_a_non_finite_entry_and_name_the_first(items, seed):
    """nuclear_norms and polar_later read a list's entries once (one sum per matrix, one host read): a NaN or Inf
    anywhere is reported with the index of the first matrix holding one and its exact counts; finite entries whose
    sum overflows (float32 near its largest value) are not an error."""
    g = torch.Generator().manual_seed(seed)
    mats, first = [], None
    for i, (m, n, kind, dtype) in enumerate(items):
        G = torch.randn(m, n, generator=g, dtype=torch.float64)
        if kind == "huge":
            G = torch.full((m, n), 3e38, dtype=torch.float64) if dtype == torch.float32 else G * 1e30
        elif kind != "ok":
            G[torch.randint(m, (1,), generator=g), torch.randint(n, (1,), generator=g)] = float(kind)
            first = i if first is None else first
        mats.append(G.to(dtype))
    if first is None:
        assert L.nuclear_norms(mats).isfinite().all() or any(k == "huge" for *_, k, _ in items)
        return
    bad = mats[first].float()
    n_nan, n_inf = int(bad.isnan().sum()), int(bad.isinf().sum())
    for call in (L.nuclear_norms, lambda ms: L.polar_later(ms, "gram")()):
        with pytest.raises(ValueError, match=rf"mats\[{first}\] has {n_nan} NaN and {n_inf} Inf entries"):
            call(mats)


def test_list_checks_scan_only_the_flagged_matrices(monkeypatch):
    """The exact scan (check_tensor) runs for a matrix whose sum is not finite, not for every matrix of the list."""
    from specscope.linalg import _checks

    scanned = []
    real = _checks.check_tensor
    monkeypatch.setattr(_checks, "check_tensor", lambda x, fn, name="input", **kw: scanned.append(name) or real(x, fn, name, **kw))
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(16, 24, generator=g) for _ in range(5)] + [torch.full((4, 4), 3e38)]  # the last sums to inf
    assert _checks.check_tensors(mats, "f") == mats
    assert scanned == ["mats[5]"]
