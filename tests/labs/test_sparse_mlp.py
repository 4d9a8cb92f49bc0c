"""The sparse-MLP lab (MLP-1): the optimizer split, a tiny CLI run, and claims read from the records.

Tolerances: the one-step check runs a float64 model against a float64 SVD reference; float64 rounding of
W − ΔW is ~1e-16·‖W‖, and directions with σ < 1e-6·σ_1 (weight ≤ 1e-6 of the step) are the only ambiguity,
so rtol 1e-6 / atol 1e-8 cannot hide a wrong step (a wrong st(A) or a missing ‖G‖_* changes it by O(1)).
"""

from __future__ import annotations

import json
import math
import sys

import pandas as pd
import pytest
import torch

from specscope import store
from specscope.labs import sparse_mlp as sm
from specscope.probe import Monitor


def _polar64(G: torch.Tensor) -> tuple[torch.Tensor, float]:
    """polar(G) and ‖G‖_* in float64. The hidden gradients are nearly rank-deficient (σ_min/σ_1 ≈ 1e-18 on
    ReLU), where float32 polar factors of the tiny directions are arbitrary; the test uses float64 models and a
    well-sampled batch and drops directions below 1e-6·σ_1, as the gram backend does."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    keep = S > 1e-6 * S[0]
    return U[:, keep] @ Vh[keep], float(S.sum())


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_specgd_is_spectral_on_layers_2_3_and_euclidean_elsewhere(activation):
    torch.manual_seed(0)
    model = sm.SparseMLP(dim=6, width=10, activation=activation, seed=3).double()
    monitor = Monitor(model, every=1, estimator="gram")
    lr = 0.05
    opt = sm.make_optimizer("specgd", model, lr, monitor)
    batch = tuple(t.double() for t in sm.sparse_regression(6, 40, seed=0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with monitor.step(0):
        sm.mse(model, batch).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        if layer.startswith(sm.SPECTRAL_LAYERS):
            P, nuc = _polar64(grads[name])
            expected = before[name].double() - lr * (nuc / monitor.stable_rank(layer)) * P
        else:
            expected = before[name].double() - lr * grads[name].double()
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-8)
    spectral = {n for g in opt.param_groups if g["algorithm"] == "specgd" for n in g["param_names"]}
    assert all(n.startswith(("layers.1.", "layers.2.")) for n in spectral) and len(spectral) >= 2


def test_model_shapes_and_post_activations():
    m = sm.SparseMLP(dim=5, width=7, activation="swiglu", seed=0)
    assert m.layers[1].gate is not None and m.head.weight.shape == (1, 7)
    x, _ = sm.sparse_regression(5, 9, seed=1)
    hs = m.post_activations(x)
    assert [tuple(h.shape) for h in hs] == [(9, 7)] * 3
    torch.testing.assert_close(m.head(hs[-1]), m(x))
    same = sm.SparseMLP(dim=5, width=7, activation="swiglu", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), same.parameters()))


TINY = ["device=cpu", "dim=8", "width=16", "samples=32", "steps=6", "early=3", "batch_sweep=16,64",
        "st_batches=16,32", "test_samples=32", "eval_every=3", "lr=0.002"]


def test_lab_smoke_through_cli(tmp_path, monkeypatch, capsys):
    """`specscope run sparse-mlp --set ...` at tiny size: report, figures, claims recomputable from the store."""
    from specscope.cli import main

    argv = ["specscope", "run", "sparse-mlp", "--quiet", "--out", str(tmp_path)]
    for kv in TINY:
        argv += ["--set", kv]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None), capsys.readouterr().err
    (run_dir,) = (tmp_path / "sparse-mlp").iterdir()
    assert (run_dir / "report.html").is_file()
    assert (run_dir / "figures" / "lab_mlp_loss_gd_vs_specgd.png").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [c["id"] for c in summary["claims"]] == ["MLP-1a", "MLP-1b", "MLP-1c"]
    cfg = sm.Config.model_validate(json.loads((run_dir / "config.json").read_text())["config"])
    df = store.load(run_dir)
    assert [c.verdict for c in sm.claims(df, cfg)] == [c["verdict"] for c in summary["claims"]]
    arms = set(df["arm"])
    assert {"relu/n32/gd", "relu/n32/specgd", "swiglu/n16/specgd", "swiglu/n64/gd", "init-st"} <= arms
    st = sm.hidden_stable_ranks(df, "relu/n32/specgd")
    assert list(st.index) == list(range(6)) and list(st.columns) == ["h1", "h2", "h3"]


def _frame(cfg: sm.Config, losses: dict[str, float], st: dict[str, float]) -> pd.DataFrame:
    """Records as the lab writes them: the loss at `early`, and st(A) of each post-activation at step 0."""
    rows = []
    for arm, loss in losses.items():
        rows.append(dict(step=0, layer="", metric="loss", value=1.0, arm=arm))
        rows.append(dict(step=cfg.early, layer="", metric="loss", value=loss, arm=arm))
        for layer in ("layers.1.up", "layers.2.up", "head"):
            rows.append(dict(step=0, layer=layer, metric="stable_rank", value=st[arm], arm=arm))
    return pd.DataFrame(rows)


CFG = sm.Config(activations=["relu"], samples=64, batch_sweep=[16, 256], width=256, steps=10, early=5)


def _losses(relu_spec: float, sw_small: float, sw_large: float) -> tuple[dict, dict]:
    losses = {"relu/n64/gd": 0.5, "relu/n64/specgd": relu_spec,
              "swiglu/n16/gd": 0.5, "swiglu/n16/specgd": sw_small,
              "swiglu/n256/gd": 0.5, "swiglu/n256/specgd": sw_large}
    st = {"relu/n64/gd": 2.0, "relu/n64/specgd": 2.5, "swiglu/n16/gd": 5.0, "swiglu/n16/specgd": 5.0,
          "swiglu/n256/gd": 30.0, "swiglu/n256/specgd": 30.0}
    return losses, st


def test_claims_follow_the_recorded_metrics():
    losses, st = _losses(relu_spec=0.1, sw_small=0.2, sw_large=0.49)
    claims = sm.claims(_frame(CFG, losses, st), CFG)
    assert [c.verdict for c in claims] == ["PASS", "PASS", "PASS"]
    assert all("project's threshold" in c.setting and c.value is not None for c in claims)  # regime, own thresholds, figure
    # SpecGD behind GD on ReLU: (b) flips
    losses_b, _ = _losses(relu_spec=0.6, sw_small=0.2, sw_large=0.49)
    assert sm.claims(_frame(CFG, losses_b, st), CFG)[1].verdict == "FAIL"
    # the advantage grows with the batch instead of fading: (c) flips
    losses_c, _ = _losses(relu_spec=0.1, sw_small=0.45, sw_large=0.1)
    assert sm.claims(_frame(CFG, losses_c, st), CFG)[2].verdict == "FAIL"
    fades = sm.claims(_frame(CFG, losses, st), CFG)[2]  # log-advantage log(0.5/0.2) -> log(0.5/0.49)
    assert "project's threshold" in fades.setting and fades.value == pytest.approx(math.log(0.5 / 0.49) / math.log(2.5))
    assert "'fades' at threshold 0.25: fades, 0.5: fades, 0.75: fades" in fades.measured
    # a high post-activation stable rank on ReLU: (a) flips (bound 0.05·min(256, 64) = 3.2)
    st_a = {**st, "relu/n64/gd": 40.0}
    assert sm.claims(_frame(CFG, losses, st_a), CFG)[0].verdict == "FAIL"


def test_claims_without_records_are_inconclusive():
    empty = pd.DataFrame(columns=["step", "layer", "metric", "value", "arm"])
    assert [c.verdict for c in sm.claims(empty, CFG)] == ["INCONCLUSIVE"] * 3


def test_bad_config_is_a_config_error():
    from specscope.errors import ConfigError

    with pytest.raises(ConfigError, match="early"):
        sm.build(sm.Config(steps=5, early=9), torch.device("cpu"))
    with pytest.raises(ConfigError, match="method"):
        sm.build(sm.Config(methods=["adam"]), torch.device("cpu"))


def test_mlp1c_without_an_early_advantage_says_fading_does_not_apply(monkeypatch):
    """SpecGD not ahead at the smallest batch (log-advantage ≤ 0): no ratio of advantages ('nan ×') and
    no 'fades / does not' per threshold, a FAIL on the premise."""
    rows = pd.DataFrame({"batch": [64, 256], "st0": [3.0, 6.0], "ratio": [1.001, 0.98]})
    monkeypatch.setattr(sm, "batch_rows", lambda df, cfg: rows)
    claim = sm._mlp1c(pd.DataFrame(), sm.Config())
    assert claim.verdict == "FAIL" and "nan" not in claim.measured
    assert "not ahead at the smallest n" in claim.measured and "does not apply" in claim.measured


def test_st_at_init_is_the_mean_over_h1_h2_h3_each_counted_once():
    """SwiGLU's up and gate multiply the same h₁ (and h₂): the mean over h₁..h₃ counts each input once,
    not each weight (which gave (2·st(h₁) + 2·st(h₂) + st(h₃))/5)."""
    cfg = sm.Config(activations=["relu"], sweep_activation="swiglu", samples=64, batch_sweep=[16], width=256,
                    steps=10, early=5)
    st = {"layers.1": 2.0, "layers.2": 4.0, "head": 9.0}
    rows = []
    for arm, loss in (("swiglu/n16/gd", 0.5), ("swiglu/n16/specgd", 0.2)):
        rows += [dict(step=s, layer="", metric="loss", value=v, arm=arm) for s, v in ((0, 1.0), (cfg.early, loss))]
        rows += [dict(step=0, layer=f"{w}.{p}" if w != "head" else w, metric="stable_rank", value=v, arm=arm)
                 for w, v in st.items() for p in (("up", "gate") if w != "head" else ("",))]
    (row,) = sm.batch_rows(pd.DataFrame(rows), cfg).to_dict("records")
    assert row["st0"] == pytest.approx((2.0 + 4.0 + 9.0) / 3)
    assert list(sm.hidden_stable_ranks(pd.DataFrame(rows), "swiglu/n16/gd").columns) == ["h1", "h2", "h3"]


def test_squared_relu_the_papers_fig1_activation_trains_at_the_default_lr():
    """At the N(0, 1/fan_in) init the degree-8 squared-ReLU network blew up (NaN by step 2 at lr 0.05); its
    INIT_GAIN keeps h₁..h₃ below 1 and the GD loss falls."""
    cfg = sm.Config(activations=["relu2"], batch_sweep=[], st_batches=[16], steps=10, early=5, device="cpu")
    arm = next(i for i in sm.build(cfg, torch.device("cpu")) if getattr(i, "name", "") == "relu2/n256/gd")
    x = arm.batch(0)
    with torch.no_grad():
        rms = [float(h.square().mean().sqrt()) for h in arm.model.post_activations(x[0])]
    assert all(r < 1 for r in rms), rms
    losses = []
    for _ in range(10):
        arm.optimizer.zero_grad()
        loss = arm.loss(arm.model, x)
        loss.backward()
        arm.optimizer.step()
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0], losses
