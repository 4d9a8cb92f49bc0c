"""LowRankDecay: what each mode does to the singular values, schedules, composition, state_dict."""

import pytest
import torch
from torch import nn

from specscope.errors import ConfigError
from specscope.optim import LowRankDecay, Muon

TAU = 0.02 * 0.5  # lr · weight_decay


def _matrix(sv, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(10, len(sv), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(7, len(sv), generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(sv, dtype=torch.float64)) @ V.T


def _decayed_svs(mode, sv, **kw):
    w = torch.nn.Parameter(_matrix(sv))
    LowRankDecay([w], lr=0.02, weight_decay=0.5, mode=mode, **kw).step()
    s = torch.linalg.svdvals(w.detach())
    assert float(s[len(sv):].abs().sum()) < 1e-12  # no new directions appear
    return s[: len(sv)]


SV = [3.0, 1.0, 0.5, 0.1, 0.004]


def test_prox_subtracts_tau_and_clips():
    expected = torch.tensor([max(s - TAU, 0.0) for s in SV], dtype=torch.float64)
    torch.testing.assert_close(_decayed_svs("prox", SV), expected, rtol=0, atol=1e-12)


def test_polar_subtracts_tau_from_every_nonzero_sv():
    sv = SV[:4]  # all > tau: the exact polar step equals the prox step
    expected = torch.tensor([s - TAU for s in sv], dtype=torch.float64)
    torch.testing.assert_close(_decayed_svs("polar", sv), expected, rtol=0, atol=1e-12)


def test_l2_scales():
    expected = torch.tensor([s * (1 - TAU) for s in SV], dtype=torch.float64)
    torch.testing.assert_close(_decayed_svs("l2", SV), expected, rtol=0, atol=1e-12)


def test_elastic_is_both():
    sv = SV[:4]
    expected = torch.tensor([s - TAU - 0.02 * 0.3 * s for s in sv], dtype=torch.float64)
    torch.testing.assert_close(_decayed_svs("elastic", sv, l2=0.3), expected, rtol=0, atol=1e-12)


def test_ns_is_soft_polar_for_small_singular_values():
    # Frobenius-normalised σ/‖W‖_F = 0.1 reaches f⁵(0.1) ≈ 0.66 after 5 cubic steps (REFERENCE §3)
    sv = [0.99**0.5, 0.1]  # ‖W‖_F = 1
    f = lambda x: 1.5 * x - 0.5 * x**3  # noqa: E731
    x = 0.1
    for _ in range(5):
        x = f(x)
    assert x == pytest.approx(0.66, abs=0.005)
    x = 0.1  # linalg normalises by max(‖W‖_F, eps) = ‖W‖_F = 1 (torch.optim.Muon's clamp)
    for _ in range(5):
        x = f(x)
    got = _decayed_svs("ns", sv, ns_dtype=torch.float64)
    torch.testing.assert_close(got[1], torch.tensor(0.1 - TAU * x, dtype=torch.float64), rtol=0, atol=1e-12)


def test_lr_follows_a_schedule():
    w = torch.nn.Parameter(_matrix(SV))
    decay = LowRankDecay([w], lr=0.02, weight_decay=0.5, mode="prox")
    sched = torch.optim.lr_scheduler.LambdaLR(decay, lambda s: 0.0 if s >= 1 else 1.0)
    decay.step()
    sched.step()
    before = w.detach().clone()
    decay.step()  # lr is now 0
    assert torch.equal(before, w.detach())


def test_composes_after_muon_and_round_trips_state_dict():
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt, decay = Muon([w], lr=0.01, weight_decay=0.0), LowRankDecay([w], lr=0.01, weight_decay=1.0)
    w.grad = torch.randn(8, 6)
    nuc0 = torch.linalg.matrix_norm(w.detach(), "nuc")
    opt.step()
    nuc1 = torch.linalg.matrix_norm(w.detach(), "nuc")
    decay.step()  # full rank 6: ‖W‖_* drops by exactly 6·lr·λ
    torch.testing.assert_close(torch.linalg.matrix_norm(w.detach(), "nuc"), nuc1 - 6 * 0.01, rtol=0, atol=1e-5)
    assert nuc0 != nuc1
    d2 = LowRankDecay([w], lr=1.0, weight_decay=0.0, mode="l2")
    d2.load_state_dict(decay.state_dict())
    assert d2.param_groups[0]["mode"] == "polar" and d2.param_groups[0]["lr"] == 0.01


def test_bad_mode_and_vector_raise():
    with pytest.raises(ConfigError, match="mode"):
        LowRankDecay([torch.nn.Parameter(torch.ones(2, 2))], lr=0.1, weight_decay=0.1, mode="nuclear")
    with pytest.raises(ConfigError, match="matrices"):
        LowRankDecay([torch.nn.Parameter(torch.ones(2))], lr=0.1, weight_decay=0.1)


@pytest.mark.parametrize("mode", ["polar", "prox", "elastic", "ns"])
def test_stacked_decays_each_expert_matrix_on_its_own(mode):
    """stacked=True: an expert stack [E, out, in] is E matrices, each decayed as LowRankDecay decays a matrix of its
    own (without it, the stack is the one matrix W.flatten(1), rank ≤ E: 3×600 for (3, 20, 30))."""
    torch.manual_seed(0)
    stack = nn.Parameter(torch.randn(3, 20, 30))
    alone = [nn.Parameter(stack[e].detach().clone()) for e in range(3)]
    options = dict(lr=0.1, weight_decay=0.5, mode=mode, l2=0.1)
    LowRankDecay([stack], stacked=True, **options).step()
    LowRankDecay(alone, **options).step()
    torch.testing.assert_close(stack.detach(), torch.stack([a.detach() for a in alone]), rtol=1e-6, atol=1e-6)
    flat = nn.Parameter(torch.randn(3, 20, 30))
    before = flat.detach().clone()
    LowRankDecay([flat], **options).step()  # the default: one matrix [3, 600]
    one = nn.Parameter(before.flatten(1).clone())
    LowRankDecay([one], **options).step()
    torch.testing.assert_close(flat.detach().flatten(1), one.detach(), rtol=1e-6, atol=1e-6)


def test_stacked_refuses_a_matrix():
    with pytest.raises(ConfigError, match="stacked=True.*not a stack"):
        LowRankDecay([nn.Parameter(torch.randn(4, 5))], lr=0.1, weight_decay=0.1, stacked=True)
    with pytest.raises(ConfigError, match="stacked must be True or False"):
        LowRankDecay([nn.Parameter(torch.randn(2, 4, 5))], lr=0.1, weight_decay=0.1, stacked=1)


def test_stacked_over_matrices_is_refused_when_loaded_or_set_with_nothing_changed():
    """A saved stacked=True group loaded over 2-D weights, or the flag set on a group after construction, is one
    ConfigError with nothing loaded or decayed (the step crashed with an IndexError after the groups before it
    were decayed); an empty stack has nothing to decay."""
    saved = LowRankDecay([{"params": [nn.Parameter(torch.randn(3, 8, 6))]},
                          {"params": [nn.Parameter(torch.randn(3, 8, 6))], "stacked": True}], lr=0.1, weight_decay=0.5)
    a, b = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(8, 6))
    decay = LowRankDecay([{"params": [a]}, {"params": [b]}], lr=0.1, weight_decay=0.5)
    with pytest.raises(ConfigError, match="load_state_dict.*not a stack"):
        decay.load_state_dict(saved.state_dict())
    assert all(not g.get("stacked") for g in decay.param_groups)
    decay.param_groups[1]["stacked"] = True
    before = a.detach().clone()
    with pytest.raises(ConfigError, match="step.*not a stack"):
        decay.step()
    assert torch.equal(a, before)
    LowRankDecay([nn.Parameter(torch.randn(0, 4, 5))], lr=0.1, weight_decay=0.5, stacked=True).step()
