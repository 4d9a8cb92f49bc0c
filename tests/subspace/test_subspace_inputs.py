"""Bad or degenerate input to the subspace tools: one clear error naming the argument, never a silently wrong
gradient (a zero window, a NaN entry, a misaligned flatten, a float64 gradient rounded to float32)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from specscope.labs import sed, sparse_mlp
from specscope.errors import ConfigError
from specscope.subspace import GradientProjection, RollingSVD, coupling_ratios, flatten
from specscope.subspace.project import unflatten_


def _param(n: int = 23, seed: int = 0, dtype=torch.float32) -> torch.nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(n, generator=g, dtype=dtype))
    p.grad = torch.randn(n, generator=g, dtype=dtype)
    return p


def test_a_window_of_zero_vectors_leaves_the_gradient_alone_and_says_so():
    s = RollingSVD(window=4, k=2)
    for _ in range(4):
        s.push(torch.zeros(23))
    assert s.directions().shape == (0, 23)
    assert s.gap() != s.gap()  # NaN: no SED-2 subspace, not "perfectly separated"
    p = _param()
    before = p.grad.clone()
    proj = GradientProjection([p], s, k=2)
    with pytest.warns(UserWarning, match="no direction"):
        assert proj.apply() is False
    assert torch.equal(p.grad, before)


def test_a_nan_gradient_is_refused_before_it_spreads():
    p, q = _param(seed=1), _param(seed=2)
    q.grad[3] = float("nan")
    before = p.grad.clone()
    with pytest.raises(ValueError, match=r"gradient of parameter 1 \(23,\) has NaN"):
        GradientProjection([p, q], "random", k=3).apply()
    assert torch.equal(p.grad, before)


def test_a_float64_gradient_is_projected_in_float64():
    p = _param(dtype=torch.float64)
    proj = GradientProjection([p], "random", k=3, mode="keep")
    proj.apply()
    once = p.grad.clone()
    proj.apply()
    assert (p.grad - once).abs().max() < 1e-13  # idempotent to float64 rounding (4e-7 when rounded to float32)


@pytest.mark.parametrize("subspace, match", [
    ("randm", "subspace='randm'"),
    (lambda: torch.randn(2, 50), r"returned \(2, 50\); it must return orthonormal rows \[k, 23\]"),
    (lambda: torch.randn(23), r"returned \(23,\)"),
    (lambda: 5 * torch.linalg.qr(torch.randn(23, 2))[0].T, "not orthonormal"),
])
def test_a_wrong_subspace_is_named(subspace, match):
    with pytest.raises(ValueError, match=match):
        GradientProjection([_param()], subspace, k=2).apply()


def test_flatten_and_unflatten_refuse_misaligned_lists():
    p, q = torch.zeros(4, 5), torch.zeros(3)
    with pytest.raises(ValueError, match="1 tensors for 2 parameters"):
        flatten([torch.ones(20)], [p, q])
    with pytest.raises(ValueError, match=r"tensor 0 has 7 elements, parameter 0 \(4, 5\) has 20"):
        flatten([torch.ones(7), torch.ones(3)], [p, q])
    with pytest.raises(ValueError, match="23 elements in all"):
        unflatten_(torch.ones(30), [p, q])
    with pytest.raises(ValueError, match="non-empty list"):
        GradientProjection([], "random")


@pytest.mark.parametrize("kw, match", [({"window": 2.5}, "window must be an int"), ({"k": True}, "k must be an int"),
                                       ({"window": "20"}, "window must be an int")])
def test_rolling_svd_checks_its_sizes(kw, match):
    with pytest.raises(ValueError, match=match):
        RollingSVD(**kw)
    with pytest.raises(ValueError, match="empty"):
        RollingSVD(window=2, k=1).push(torch.zeros(0))


def test_coupling_ratios_names_a_wrong_direction():
    lin = torch.nn.Linear(3, 4)
    params = list(lin.parameters())
    centroids = lambda: lin(torch.ones(5, 3))  # noqa: E731
    with pytest.raises(ValueError, match=r"directions \(16,\) must be rows \[k, 16\]"):
        coupling_ratios(centroids, params, torch.ones(16))
    with pytest.raises(ValueError, match="finite and nonzero"):
        coupling_ratios(centroids, params, torch.zeros(1, 16))


def test_lab_settings_that_used_to_fail_mid_run_are_refused_upfront():
    with pytest.raises(ValidationError, match="eps_rel"):
        sed.Config(eps_rel=2)  # the CLI: one line, exit 2, before any run directory
    with pytest.raises(ConfigError, match="early=20 must be between 1 and steps−1=19"):
        sparse_mlp.build(sparse_mlp.Config(steps=20, early=20), torch.device("cpu"))


def test_the_sed1_text_counts_the_probes_the_coupling_used():
    assert sed.probes(sed.Config(p=23, n_probe=100000)) == 23 * 23
    assert sed.probes(sed.Config(p=23, task="div", n_probe=100000)) == 23 * 22
    assert sed.probes(sed.Config()) == sed.Config().n_probe


def test_a_repeated_intervention_and_a_misspelt_claims_arm_are_refused():
    from specscope.labs import gpt

    with pytest.raises(ConfigError, match="repeats an arm"):
        sed.build(sed.Config(interventions=["control", "control"]), torch.device("cpu"))
    with pytest.raises(ValidationError, match="claims_arm"):
        gpt.Config(claims_arm="muonn")
    cfg = gpt.Config(arms=["adamw", "muon"])
    assert f"lr AdamW {cfg.lr_adamw:g}, Muon {cfg.lr_muon:g}, " in gpt.setting(cfg)  # only the arms run
