"""switching: the Switch optimizer, a tiny run of every setup, the crossing / best-T rules, the measured run."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from specscope.errors import ConfigError
from specscope.labs import switching as sw
from specscope.labs.config import make_config

from labsmoke import smoke, verdicts

TINY = dict(seeds=[0], rf_dim=8, rf_width=32, rf_samples=32, rf_outputs=4, rf_steps=4, rf_switch=[0, 2],
            mlp_dim=6, mlp_width=16, mlp_samples=16, mlp_steps=4, mlp_switch=[0, 2], device="cpu")


def test_switch_takes_gd_then_the_spectral_step_and_round_trips():
    W = torch.nn.Parameter(torch.zeros(3, 4))
    seen = []

    class Rec(torch.optim.Optimizer):
        def __init__(self, params, tag):
            super().__init__(params, {})
            self.tag = tag

        def step(self):
            seen.append(self.tag)

    opt = sw.Switch(Rec([W], "gd"), Rec([W], "spec"), at=2)
    for _ in range(4):
        opt.step()
    assert seen == ["gd", "gd", "spec", "spec"]
    other = sw.Switch(Rec([W], "gd"), Rec([W], "spec"), at=2)
    other.load_state_dict(opt.state_dict())
    assert other.k == 4


def test_smoke_run_every_setup_has_every_T_the_burn_in_and_auto(monkeypatch, tmp_path):
    claims, df, figs = smoke(monkeypatch, tmp_path, "switching", TINY)
    for setup in ("rf/relu", "rf/swiglu", "mlp/relu"):
        assert set(sw.final_losses(df, setup, 0)) == {"0", "2", "4", "auto"}
        assert not sw.burn_in(df, setup, 0, 4).empty
    assert set(claims) == {"SW-1", "SW-2"} and figs == ["switching_loss_vs_T"]
    for c in claims.values():  # each claim states its regime and seeds, and the figure its rule tests
        assert c["seeds"] == 1 and "T grid" in c["setting"] and c["value"] is not None


def test_crossing_and_the_rule():
    adv = pd.DataFrame({"a": [0.5, 0.9, 1.2, 2.0], "b": [0.4, 1.1, 0.9, 1.5]}, index=[0, 1, 2, 3])
    assert sw.crossing(adv, 10) == 3  # every spectral layer above 1
    assert sw.crossing(adv * 0.1, 10) == 10  # never: plain GD is the prediction
    cfg = make_config(sw.Config, {"setups": ["rf/relu"], "seeds": [0], "rf_steps": 4, "rf_switch": [0, 2]})
    rows = [dict(arm=f"rf/relu/s0/T{t}", step=4, layer="", metric="train_loss", value=v)
            for t, v in (("0", 3.0), ("2", 1.0), ("4", 2.0), ("auto", 1.02))]
    rows += [dict(arm="rf/relu/s0/T4", step=s, layer="W", metric="spectral_advantage", value=x)
             for s, x in ((0, 0.5), (1, 0.8), (2, 1.5), (3, 2.0))]
    rows += [dict(arm="rf/relu/s0/Tauto", step=s, layer="W", metric="geometry", value=g) for s, g in ((0, 0), (1, 1))]
    df = pd.DataFrame(rows)
    t = sw.table(df, cfg).iloc[0]
    assert (t.t_cross, t.t_pred, t.t_best, t.t_auto) == (2, 2, 2, 1)
    c1, c2 = sw.claims(df, cfg)
    assert c1.verdict == "PASS" and c2.verdict == "PASS"
    assert "rf/relu (an interior crossing)" in c1.measured
    at_once = df.assign(value=df.value.where(df.metric != "spectral_advantage", 1.5))  # above 1 from step 0
    assert "rf/relu (no interior crossing: tests the sign at the grid's ends)" in sw.claims(at_once, cfg)[0].measured
    df.loc[df.arm == "rf/relu/s0/T2", "value"] = 2.5  # now T = 2 is not the best
    assert sw.claims(df, cfg)[0].verdict == "FAIL"


def test_a_setup_with_no_finite_burn_in_leaves_the_claims_inconclusive_and_is_named():
    """mlp/relu dead at a tiny size (every nr(G)/st(A) NaN) was dropped in silence, and SW-1/SW-2 read PASS on the
    other setup alone, where the rule asks every setup to meet it."""
    cfg = make_config(sw.Config, {"setups": ["rf/relu", "mlp/relu"], "seeds": [0], "rf_steps": 4, "rf_switch": [0, 2],
                                  "mlp_steps": 4, "mlp_switch": [0, 2]})
    rows = []
    for setup, adv in (("rf/relu", 1.5), ("mlp/relu", float("nan"))):
        rows += [dict(arm=f"{setup}/s0/T{t}", step=4, layer="", metric="train_loss", value=v)
                 for t, v in (("0", 1.0), ("2", 2.0), ("4", 3.0), ("auto", 1.0))]
        rows += [dict(arm=f"{setup}/s0/T4", step=s, layer="W", metric="spectral_advantage", value=adv) for s in range(4)]
    c1, c2 = sw.claims(pd.DataFrame(rows), cfg)
    for c in (c1, c2):
        assert c.verdict == "INCONCLUSIVE" and "not ruled: mlp/relu" in c.measured
    rows = [r if not (r["arm"] == "rf/relu/s0/T0" and r["metric"] == "train_loss") else {**r, "value": 9.0} for r in rows]
    assert sw.claims(pd.DataFrame(rows), cfg)[0].verdict == "FAIL"  # a setup that fails decides it all the same


def test_bad_setup_is_one_clear_error():
    with pytest.raises(ConfigError, match="setup"):
        sw.build(make_config(sw.Config, {"setups": ["cnn/relu"]}), torch.device("cpu"))
    with pytest.raises(ConfigError, match="activation"):
        sw.build(make_config(sw.Config, {"setups": ["rf/nope"]}), torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_measured_run(tmp_path):
    assert verdicts("switching", tmp_path) == MEASURED


MEASURED = {"SW-1": "PASS", "SW-2": "PASS"}  # the verdicts of the measured default run (docs/lab-switching.md)
