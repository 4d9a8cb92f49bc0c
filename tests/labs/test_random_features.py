"""The quadratic check (REFERENCE §3) and the random-features lab.

Tolerances: every comparison is between float64 quantities of size O(f(0)); the one-step guarantees are
exact inequalities of a quadratic, so they may only fail by rounding, ~1e-12 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

from specscope.data.synthetic import rf_regression
from specscope.labs import random_features as rf

SMALL = dict(dim=32, width=256, samples=256, outputs=16)
RTOL = 1e-10


@pytest.fixture(scope="module", params=["relu", "swiglu"])
def problem(request):
    return request.param, rf_regression(**SMALL, activation=request.param, seed=1)


def test_constants_are_exact(problem):
    _, p = problem
    c = rf.constants(p.A)
    s = torch.linalg.svdvals(p.A.double())
    assert c.L_E == pytest.approx(float(s[0] ** 2), rel=1e-12)
    assert c.L_S == pytest.approx(float((s ** 2).sum()), rel=1e-12)
    assert c.st == pytest.approx(c.L_S / c.L_E, rel=1e-12)


@pytest.mark.parametrize("method", ["gd", "specgd", "auto"])
def test_each_step_decreases_at_least_the_guarantee(problem, method):
    """f(W_t) − f(W_{t+1}) ≥ ‖G‖_F²/(2L_E) for GD and ≥ ‖G‖_*²/(2L_S) for SpecGD; AutoGeometry ≥ the smaller."""
    _, p = problem
    c = rf.constants(p.A)
    tr = rf.descend(p, method, 8, c)
    for t in range(8):
        gd_bound = tr.grad_fro2[t] / (2 * c.L_E)
        spec_bound = tr.grad_nuclear[t] ** 2 / (2 * c.L_S)
        bound = {"gd": gd_bound, "specgd": spec_bound, "auto": min(gd_bound, spec_bound)}[method]
        assert tr.objective[t] - tr.objective[t + 1] >= bound - RTOL * tr.objective[t]
        assert tr.objective[t + 1] < tr.objective[t]


def test_autograd_gradient_is_the_closed_form():
    p = rf_regression(**SMALL, activation="relu", seed=2)
    model = rf.RFModel(p.A.shape[0], p.Y.shape[0])
    torch.nn.init.normal_(model.W.weight)
    rf.rf_loss(model, (p.A.T, p.Y.T)).backward()
    W = model.W.weight.detach()
    torch.testing.assert_close(model.W.weight.grad, (W @ p.A - p.Y) @ p.A.T, rtol=1e-12, atol=1e-9)


def test_wrong_spectral_constant_increases_loss_on_swiglu():
    """Using ‖A‖_2² for the spectral step (the known mistake) raises f on SwiGLU features; ‖A‖_F² does not."""
    p = rf_regression(**SMALL, activation="swiglu", seed=1)
    wrong = rf.descend(p, "specgd_wrong_L", 3)
    right = rf.descend(p, "specgd", 3)
    assert wrong.objective[1] > wrong.objective[0]
    assert wrong.objective[3] > 10 * wrong.objective[0]
    assert all(b < a for a, b in zip(right.objective, right.objective[1:]))


def test_relu_mean_spike_keeps_stable_rank_near_pi():
    """ReLU features: ‖A‖_F²/σ₁² → E[relu²]/E[relu]² = π as width and samples grow (finite-size bias below π)."""
    for width in (128, 512):
        p = rf_regression(dim=64, width=width, samples=512, outputs=4, activation="relu", seed=0)
        assert 2.5 < rf.constants(p.A).st < math.pi + 0.05


def test_swiglu_stable_rank_grows_with_width():
    sts = [rf.constants(rf_regression(64, w, 512, 4, "swiglu", 0).A).st for w in (64, 256)]
    assert sts[1] > 2.5 * sts[0]


def test_relu_nuclear_rank_jumps_after_one_gd_step():
    """nr(G) is O(1) at W = 0 (G = −W̄AAᵀ is dominated by the mean spike) and O(outputs) after one GD step."""
    nr = {}
    for k in (16, 64):
        p = rf_regression(dim=64, width=512, samples=512, outputs=k, activation="relu", seed=0)
        nr[k] = rf.first_step_ranks(p)
    assert nr[16][0] < 8 and nr[64][0] < 8
    assert nr[16][1] > 0.5 * 16 and nr[64][1] > 0.5 * 64  # grows with the dimension
    assert nr[64][1] > 2.5 * nr[16][1]


def test_predicted_geometry_matches_winner_on_relu_and_swiglu():
    for act, expected in (("relu", "spectral"), ("swiglu", "euclidean")):
        p = rf_regression(dim=32, width=512, samples=512, outputs=16, activation=act, seed=0)
        c = rf.constants(p.A)
        _, nr1 = rf.first_step_ranks(p, c)
        gd, spec = rf.descend(p, "gd", 10, c), rf.descend(p, "specgd", 10, c)
        won = "spectral" if spec.objective[-1] < gd.objective[-1] else "euclidean"
        assert rf.predicted(nr1, c.st) == expected == won


TINY = ["device=cpu", "dim=16", "width=64", "samples=64", "outputs=8", "steps=4", "activations=relu,swiglu",
        "sweep_widths=32,64", "sweep_samples=64", "sweep_dims=8,16"]


def test_lab_smoke_through_cli(tmp_path):
    """`specscope run random-features --set ...` at tiny size: report, claims, and claims recomputable from the store."""
    import json
    import re
    import subprocess
    import sys

    from specscope import store

    args = [sys.executable, "-m", "specscope", "run", "random-features", "--quiet", "--out", str(tmp_path)]
    for kv in TINY:
        args += ["--set", kv]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "random-features").iterdir()
    page = (run_dir / "report.html").read_text()
    run_table = re.sub(r"<[^>]+>", " ", page[page.index("<h2>Run</h2>"):page.index("<h2>Configuration</h2>")])
    # the sweeps' step column holds widths (32, 64) and dimensions (8, 16): not training steps
    assert re.search(r"steps\s+0 – 4\s", run_table) and re.search(r"sweep records\s+20 ", run_table), run_table
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [c["id"] for c in summary["claims"]] == ["RF-1", "RF-2", "RF-3"]
    cfg = rf.Config.model_validate(json.loads((run_dir / "config.json").read_text())["config"])
    df = store.load(run_dir)
    assert [c.verdict for c in rf.claims(df, cfg)] == [c["verdict"] for c in summary["claims"]]
    # AutoGeometry's own nr(G) beside the lab's exact one was a second record of each step
    auto = df[df.arm.str.endswith("/auto") & (df.metric == "nuclear_rank")]
    assert len(auto) and not auto.duplicated(["arm", "layer", "step"]).any() and set(auto.estimator) == {"exact"}
    assert not df.duplicated(["arm", "layer", "metric", "step"]).any()


def test_claims_follow_the_recorded_metrics():
    """Swap the GD and SpecGD objectives in a recorded frame: RF-3's verdict must flip from PASS to FAIL."""
    import pandas as pd

    cfg = rf.Config(activations=["relu", "swiglu"], steps=3)
    rows = []
    for act, ratio, gd, spec in (("relu", 10.0, 0.5, 0.1), ("swiglu", 0.3, 0.1, 0.5)):
        rows += [dict(step=1, layer="W", metric="nuclear_rank", value=ratio, arm=f"{act}/gd"),
                 dict(step=1, layer="W", metric="stable_rank", value=1.0, arm=f"{act}/gd"),
                 dict(step=3, layer="", metric="objective", value=gd, arm=f"{act}/gd"),
                 dict(step=3, layer="", metric="objective", value=spec, arm=f"{act}/specgd")]
    df = pd.DataFrame(rows)
    rf3 = rf.claims(df, cfg)[2]
    assert rf3.verdict == "PASS" and rf3.value == 1.0
    assert "d 128, width 1024" in rf3.setting and "the project's margin" in rf3.setting  # its regime and own threshold
    obj = df["metric"] == "objective"
    df.loc[obj, "arm"] = df.loc[obj, "arm"].map(lambda a: a.replace("gd", "X").replace("specX", "gd").replace("X", "specgd"))
    assert rf.claims(df, cfg)[2].verdict == "FAIL"
    assert rf.claims(df.iloc[0:0], cfg)[0].verdict == "INCONCLUSIVE"


def test_figures_whose_records_are_gone_are_left_out():
    """A salvaged run that lost its sweep records drew both sweep figures as empty axes with legends, and the report
    showed them; only the figures with data are drawn now."""
    import pandas as pd

    cfg = rf.Config(activations=["relu"], methods=["gd"], steps=2)
    loss = pd.DataFrame([dict(step=s, layer="", metric="loss", value=1.0 / (s + 1), arm="relu/gd") for s in range(3)])
    assert set(rf.figures(loss, cfg)) == {"rf_loss"}
    width = pd.DataFrame([dict(step=8, layer="relu", metric="stable_rank", value=2.0, arm="width-sweep")])
    assert set(rf.figures(pd.concat([loss, width]), cfg)) == {"rf_loss", "rf_stable_rank_vs_width"}
    assert rf.figures(loss.iloc[0:0], cfg) == {}


def test_a_width_of_one_gd_reaching_the_optimum_is_a_verdict_not_a_crash(monkeypatch, tmp_path):
    """width=1: A has rank one, GD's exact step reaches the optimum (objective 0): the claims divide by nothing."""
    from labsmoke import smoke

    claims, _, _ = smoke(monkeypatch, tmp_path, "random-features", dict(
        device="cpu", dim=16, width=1, samples=64, outputs=8, steps=4, activations=["relu", "swiglu"],
        sweep_widths=[32, 64], sweep_samples=64, sweep_dims=[8, 16]))
    assert {c["verdict"] for c in claims.values()} <= {"PASS", "FAIL", "INCONCLUSIVE"}


@pytest.mark.parametrize("lab, key, value", [("random-features", "decisive", 0.5), ("sparse-mlp", "margin", 1.5),
                                             ("sparse-mlp", "low_st", 2.0)])
def test_a_threshold_outside_its_meaning_is_refused(lab, key, value):
    """decisive=0.5 made RF-3 test every ratio as decisive ("> 0.5 or < 1/0.5" holds for all); a margin above 1
    would let a worse loss "beat" GD."""
    from pydantic import ValidationError

    from specscope.labs import sparse_mlp

    with pytest.raises(ValidationError, match=key):
        {"random-features": rf, "sparse-mlp": sparse_mlp}[lab].Config(**{key: value})
