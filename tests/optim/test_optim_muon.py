"""Muon: torch.optim.Muon equivalence, fp32 momentum for bf16, conv flattening, batching by shape."""

import copy
import importlib
import threading

import pytest
import torch

from specscope import linalg
from specscope.linalg import gram_ns
from specscope.optim import Muon

SHAPES = [(64, 32), (32, 64), (48, 48), (48, 48)]


def _run(make_opt, steps=8, seed=0, scale=1.0, dtype=torch.float32, shapes=SHAPES):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    opt = make_opt(params)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:
            p.grad = scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    return [p.detach() for p in params]


def _ns64(X):  # the same Newton–Schulz map in float64: the rounding-free reference
    return linalg.polar(X.double(), method="newton_schulz", dtype=torch.float64).float()


@pytest.mark.parametrize("kw", [{}, {"nesterov": False, "adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.3}])
def test_matches_torch_muon_within_bf16_rounding(kw):
    kw = dict(lr=0.02, **kw)
    ours = _run(lambda ps: Muon(ps, polar="newton_schulz", **kw))
    theirs = _run(lambda ps: torch.optim.Muon(ps, **kw))
    ref = _run(lambda ps: Muon(ps, polar=_ns64, **kw))
    for a, b, r in zip(ours, theirs, ref):
        torch_rounding = float((b - r).abs().max())
        assert torch_rounding > 0  # bf16 really differs from float64, so the bound below is meaningful
        # ours is a bf16 evaluation of the same map: its distance to the float64 map may differ from torch's by the
        # order of rounding, not by more than torch's own. (On CPU with torch 2.13 the two are in fact bitwise equal.)
        assert float((a - r).abs().max()) <= 2 * torch_rounding
        assert float((a - b).abs().max()) <= 3 * torch_rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_decay_of_low_precision_params_is_the_one_asked_for(dtype):
    """lr·wd = 0.002: a zero gradient leaves p·0.998 per step, rounded to p's dtype, as torch.optim.Muon's mul_. The
    multi-tensor multiply rounded 0.998 itself to bf16's 0.99609375 first (after 100 steps ‖p‖ 0.584× where 0.998¹⁰⁰ = 0.819, torch's 0.9994:
    bf16's spacing, 2⁻⁸, is wider than the step, so most entries round back)."""
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    ours, theirs = torch.nn.Parameter(w.to(dtype)), torch.nn.Parameter(w.to(dtype))
    a = Muon([ours, torch.nn.Parameter(torch.randn(8, 8))], lr=0.02, weight_decay=0.1)  # a float32 one beside it
    b = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1)
    for _ in range(20):
        ours.grad, theirs.grad = torch.zeros_like(ours), torch.zeros_like(theirs)
        a.step()
        b.step()
    assert torch.equal(ours, theirs)
    shrink = float(ours.float().norm() / w.norm())
    assert shrink > 0.99 if dtype == torch.bfloat16 else shrink == pytest.approx(0.998 ** 20, rel=0.002)


def test_bf16_params_keep_fp32_momentum_through_state_dict():
    p = torch.nn.Parameter(torch.randn(16, 8).bfloat16())
    opt = Muon([p], lr=0.01)
    g = torch.Generator().manual_seed(0)
    expected = torch.zeros(16, 8)
    for _ in range(3):
        p.grad = torch.randn(16, 8, generator=g).bfloat16()
        expected.lerp_(p.grad.float(), 1 - 0.95)
        opt.step()
    buf = opt.state[p]["momentum_buffer"]
    assert buf.dtype == torch.float32 and torch.equal(buf, expected)
    opt2 = Muon([p], lr=0.01)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    buf2 = opt2.state[p]["momentum_buffer"]
    assert buf2.dtype == torch.float32 and torch.equal(buf2, expected)  # torch's load would cast to bf16


def test_conv_weight_is_flattened_and_scaled_by_matrix_shape():
    w = torch.nn.Parameter(torch.randn(3, 2, 3, 3))
    w0 = w.detach().clone()
    w.grad = torch.randn(3, 2, 3, 3)
    Muon([w], lr=0.1, momentum=0.0, weight_decay=0.0, polar="svd").step()
    # rows=3 < cols=18: scale sqrt(max(1, 3/18)) = 1
    expected = w0 - 0.1 * linalg.polar(w.grad.reshape(3, 18), method="svd").reshape(3, 2, 3, 3)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-6)


def test_tall_matrix_scale_original():
    w = torch.nn.Parameter(torch.zeros(32, 8))
    w.grad = torch.randn(32, 8)
    Muon([w], lr=0.1, momentum=0.0, weight_decay=0.0, polar="svd").step()
    expected = -0.1 * 2.0 * linalg.polar(w.grad, method="svd")  # sqrt(32/8) = 2
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-6)


def test_same_shape_params_share_one_batched_call():
    """One call per shape; the first step also probes each shape once with one matrix (its result's shape is checked
    before any weight changes)."""
    calls = []

    def polar(X):
        calls.append(tuple(X.shape))
        return linalg.polar(X, method="gram")

    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = Muon(params, polar=polar)
    for _ in range(2):
        calls.clear()
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert sorted(calls) == [(1, 32, 64), (1, 64, 32), (2, 48, 48)]


def test_fast_backends_batch_a_tall_matrix_with_the_wide_ones_of_its_shape(monkeypatch):
    """d×4d and 4d×d gradients are one gram_newton_schulz call (the tall one transposed), and each parameter's step
    is the one it takes alone, to bf16 rounding."""
    calls = []
    real = linalg.gram_newton_schulz
    monkeypatch.setattr(linalg, "gram_newton_schulz", lambda X, **kw: calls.append(tuple(X.shape)) or real(X, **kw))
    shapes = [(32, 128), (128, 32), (32, 32)]
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(s, generator=g) for s in shapes]

    def step(indices):
        ps = [torch.nn.Parameter(torch.zeros(shapes[i])) for i in indices]
        for p, i in zip(ps, indices):
            p.grad = grads[i].clone()
        Muon(ps, lr=1.0, weight_decay=0.0).step()
        return ps

    together = step([0, 1, 2])
    assert sorted(calls) == [(1, 32, 32), (2, 32, 128)]
    for i, p in enumerate(together):
        alone = step([i])[0]
        assert float((p - alone).abs().max()) <= 2e-2 * float(alone.abs().max())  # bf16 products in another order
        assert float(linalg.polar_error(grads[i], -p.detach() / max(1.0, shapes[i][0] / shapes[i][1]) ** 0.5, 0.1)) < 0.05


def _dispatched(fn) -> int:
    """aten ops fn() dispatches that run a kernel (views not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"view", "_unsafe_view", "expand", "transpose", "permute", "select", "slice", "t", "alias", "unsqueeze",
             "squeeze", "as_strided", "diagonal", "detach", "unbind", "promote_types"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.namespace == "aten" and func.__name__.split(".")[0] not in views
            return func(*args, **(kwargs or {}))

    with Count() as c:
        fn()
    return c.n


def test_default_step_dispatches_under_half_of_torch_muons_kernels():
    """On a GPU a Muon step of a few milliseconds is bound by kernel launches: the default's step (one multi-tensor
    momentum and update, one polar call per wide shape) dispatches fewer than half of torch.optim.Muon's ops on a
    GPT block's matrices on a CPU, under 0.6 of them with an accelerator's scaled start, and the count does not grow
    with the number of layers."""
    def ops(make, layers):
        shapes = ([(128, 128)] * 4 + [(512, 128), (128, 512)]) * layers
        ps = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = make(ps)
        opt.step()
        return _dispatched(opt.step)

    ours = ops(lambda ps: Muon(ps, lr=0.01), 1)
    theirs = ops(lambda ps: torch.optim.Muon(ps, lr=0.01), 1)
    assert ours < 0.5 * theirs, (ours, theirs)
    assert ops(lambda ps: Muon(ps, lr=0.01), 3) == ours
    # an accelerator scales each polar call's input without reading its norm on the host (docs/linalg.md "Scale"):
    # seven kernels a call in place of the CPU's three-op host check, for the two calls here; still under 0.6 of torch's
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gram_ns, "needs_scaling", lambda X: True)
        accelerator = ops(lambda ps: Muon(ps, lr=0.01), 1)
    assert accelerator == ours + 2 * (7 - 3) and accelerator < 0.6 * theirs, (accelerator, ours, theirs)


@pytest.mark.parametrize("method", ["gram", "svd", "polar_express", "gram_newton_schulz", "auto"])
def test_each_backend_steps(method):
    p = torch.nn.Parameter(torch.randn(40, 24))
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    Muon([p], lr=0.01, polar=method).step()
    assert torch.isfinite(p).all() and not torch.equal(p, before)


@pytest.mark.parametrize("scale, dtype, adjust", [(1.0, torch.float32, None), (1e-6, torch.float32, None),
                                                  (1.0, torch.float64, "match_rms_adamw")])
def test_newton_schulz_equals_torch_muon_bit_for_bit(scale, dtype, adjust):
    """Small gradients too (‖G‖_F ≈ 1e-4 here): dividing by ‖X‖ + eps instead of torch's max(‖X‖, eps) shrank
    their update by up to 23 %. float64 with "match_rms_adamw": lr·0.2·√n rounds otherwise than torch's lr·(0.2·√n)."""
    kw = dict(lr=0.05, weight_decay=0.1, adjust_lr_fn=adjust)
    ours = _run(lambda ps: Muon(ps, polar="newton_schulz", **kw), scale=scale, dtype=dtype)
    theirs = _run(lambda ps: torch.optim.Muon(ps, **kw), scale=scale, dtype=dtype)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype, shape, count, seed", [(torch.float32, (7, 13), 6, 11), (torch.float64, (7, 13), 6, 2),
                                                       (torch.float64, (13, 7), 4, 2)])
def test_newton_schulz_equals_torch_muon_bit_for_bit_on_same_shape_matrices(dtype, shape, count, seed):
    """Same-shape matrices were iterated as one batch (baddbmm), whose bf16 products round otherwise than torch's
    per-matrix addmm now and then (these seeds); each matrix is now iterated on its own, as torch iterates it."""
    kw = dict(lr=0.05, weight_decay=0.1)
    ours = _run(lambda ps: Muon(ps, polar="newton_schulz", **kw), steps=2, seed=seed, dtype=dtype, shapes=[shape] * count)
    theirs = _run(lambda ps: torch.optim.Muon(ps, **kw), steps=2, seed=seed, dtype=dtype, shapes=[shape] * count)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("polar", ["gram_newton_schulz", "newton_schulz", "polar_express"])
def test_the_update_does_not_depend_on_the_gradients_scale(polar):
    """polar(cG) = polar(G): gradients scaled by 2⁻²⁰ (exact in every dtype here) give the same steps, bit for bit,
    down to where eps takes over (it was added to the scale, shrinking a small gradient's update)."""
    big = _run(lambda ps: Muon(ps, lr=0.02, polar=polar))
    small = _run(lambda ps: Muon(ps, lr=0.02, polar=polar), scale=2.0**-20)
    for a, b in zip(big, small):
        assert torch.equal(a, b)


def test_default_backend_is_more_accurate_than_torch_muon():
    """Default polar (gram_newton_schulz, 4 bf16 steps): smaller polar error at 0.1·σ_1 than torch.optim.Muon's
    5 Keller steps, on a wide, a tall and a square gradient with a decaying spectrum."""
    g = torch.Generator().manual_seed(0)
    for shape in [(32, 128), (128, 32), (64, 64)]:
        U, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g))
        V, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g))
        G = (U * torch.logspace(0, -3, min(shape))) @ V.mT
        steps = {}
        for name, opt_cls, kw in [("torch", torch.optim.Muon, {}), ("ours", Muon, {})]:
            p = torch.nn.Parameter(torch.zeros(shape))
            p.grad = G.clone()
            opt_cls([p], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, **kw).step()
            steps[name] = -p.detach() / max(1.0, shape[0] / shape[1]) ** 0.5
        ours, theirs = (float(linalg.polar_error(G, steps[k], 0.1)) for k in ("ours", "torch"))
        assert ours < 0.05 < 0.25 < theirs


@pytest.mark.parametrize("opt", ["muon", "specgd"])
def test_exact_steps_on_the_workers_equal_the_bucketed_steps_on_gpt2(monkeypatch, opt):
    """transformers' GPT-2 (tiny random-init config), two threads: with its matrices' exact polar jobs started
    together on the one-thread workers (forced here for these small sizes) a Muon / SpecGD step moves every
    weight as the one-call-per-shape route on the calling thread does."""
    transformers = pytest.importorskip("transformers")
    polar_module = importlib.import_module("specscope.linalg.polar")  # the package's `polar` is the function
    from specscope.optim import SpecGD

    monkeypatch.setenv("SPECSCOPE_EIGH", "torch")  # one LAPACK for both routes: this compares the routes

    def run(pool_min: int) -> list[torch.Tensor]:
        monkeypatch.setattr(polar_module, "POOL_MIN", pool_min)
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64,
                                                                     n_positions=16))
        hidden = [(n, p) for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("transformer.h.")]
        if opt == "muon":
            optim = Muon([p for _, p in hidden], lr=0.02, polar="gram")
        else:
            optim = SpecGD(hidden, lr=0.02)
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            for _ in range(2):
                optim.zero_grad()
                model(ids, labels=ids).loss.backward()
                optim.step()
        finally:
            torch.set_num_threads(before)
        return [p.detach().clone() for p in model.parameters()]

    jobs = []
    real = polar_module._gram_job
    monkeypatch.setattr(polar_module, "_gram_job",
                        lambda *a, **k: jobs.append(threading.current_thread().name) or real(*a, **k))
    pooled = run(pool_min=1)
    assert len(jobs) == 2 * 8 and all(name.startswith("specscope-worker") for name in jobs)  # 8 matrices, 2 steps
    jobs.clear()
    bucketed = run(pool_min=10**9)
    assert jobs and not any(name.startswith("specscope-worker") for name in jobs)
    for a, b in zip(pooled, bucketed):  # equal bit for bit here; the slack is for products threaded differently
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # a step is 0.02·polar: a mix-up moves ≥ 1e-3
