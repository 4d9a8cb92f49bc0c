"""gated-width: arms and routing, a tiny seeded run, the gain and mechanism rules, the measured run."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from specscope.errors import ConfigError
from specscope.labs import gated_width as gw
from specscope.labs.config import make_config

from labsmoke import seeded_records, smoke, verdicts

TINY = dict(d_model=16, n_layer=1, n_head=2, seq_len=16, batch_size=4, steps=4, eval_every=2, eval_batches=1,
            probe_every=2, max_bytes=60_000, warmup=2, device="cpu", seeds=[0])


def test_smoke_run_has_both_mlps_and_optimizers_and_per_layer_ranks(monkeypatch, tmp_path):
    claims, df, figs = smoke(monkeypatch, tmp_path, "gated-width", TINY)
    for v in ("relu2-adamw", "relu2-muon", "swiglu-adamw", "swiglu-muon"):
        assert sorted(df[(df.arm == f"{v}/s0") & (df.metric == "val_loss")].step) == [0, 2, 4]
    swiglu = df[(df.arm == "swiglu-muon/s0") & (df.metric == "spectral_advantage")]
    assert {"blocks.0.mlp.gate", "blocks.0.mlp.down"} <= set(swiglu.layer)
    assert set(claims) == {"GW-1", "GW-2"}
    assert figs == ["gated_width_spectral_advantage", "gated_width_val_loss"]


def _records(finals: dict[str, list[float]], down: dict[str, tuple[float, float]]) -> pd.DataFrame:
    def mlp_down(variant: str) -> list[tuple]:
        adv, st = down[variant.split("-")[0]]
        return [(0, "blocks.0.mlp.down", "spectral_advantage", adv), (0, "blocks.0.mlp.down", "stable_rank", st)]

    return seeded_records(finals, 9, mlp_down)


def test_claim_rules():
    cfg = make_config(gw.Config, {})
    down = {"relu2": (8.0, 4.0), "swiglu": (2.0, 20.0)}
    kept = _records({"relu2-adamw": [2.0, 2.0, 2.0], "relu2-muon": [1.8, 1.8, 1.8],
                     "swiglu-adamw": [2.0, 2.0, 2.0], "swiglu-muon": [1.9, 1.95, 1.9]}, down)
    c1, c2 = gw.claims(kept, cfg)
    assert c1.verdict == "FAIL" and c2.verdict == "PASS" and "keeps 42%" in c1.measured
    assert (c1.seeds, c2.seeds) == (3, 3) and c1.spread == "0.0833 [0.05–0.1]" and "d_model 192" in c1.setting
    removed = _records({"relu2-adamw": [2.0] * 3, "relu2-muon": [1.8] * 3,
                        "swiglu-adamw": [2.0] * 3, "swiglu-muon": [2.0, 2.1, 2.05]}, down)
    assert gw.claims(removed, cfg)[0].verdict == "PASS"
    mixed = _records({"swiglu-adamw": [2.0] * 3, "swiglu-muon": [1.9, 2.1, 2.0]}, down)
    assert gw.claims(mixed, cfg)[0].verdict == "INCONCLUSIVE"
    # nothing to remove: Muon no better than AdamW with ReLU² either (a tiny run), or no ReLU² arms: was PASS
    neither = _records({"relu2-adamw": [2.0] * 3, "relu2-muon": [2.1] * 3,
                        "swiglu-adamw": [2.0] * 3, "swiglu-muon": [2.1] * 3}, down)
    c1 = gw.claims(neither, cfg)[0]
    assert c1.verdict == "INCONCLUSIVE" and "no advantage shown to remove" in c1.measured
    alone = _records({"swiglu-adamw": [2.0] * 3, "swiglu-muon": [2.1] * 3}, down)
    assert gw.claims(alone, cfg)[0].verdict == "INCONCLUSIVE"


def test_bad_config_is_one_clear_error():
    with pytest.raises(ConfigError, match="mlps"):
        make_config(gw.Config, {"mlps": ["gelu"]})
    with pytest.raises(ConfigError, match="n_head"):
        gw.build(make_config(gw.Config, {**TINY, "n_head": 3}), torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_measured_run(tmp_path):
    assert verdicts("gated-width", tmp_path) == MEASURED


MEASURED = {"GW-1": "FAIL", "GW-2": "FAIL"}  # the verdicts of the measured default run (docs/lab-gated-width.md)



@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
def test_measured_wide_run(tmp_path):
    assert verdicts("gated-width", tmp_path, gw.WIDE) == MEASURED_WIDE


MEASURED_WIDE = {"GW-1": "FAIL", "GW-2": "PASS"}  # the verdicts of the measured WIDE run (docs/lab-gated-width.md)
