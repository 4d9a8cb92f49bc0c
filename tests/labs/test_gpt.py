"""The gpt lab: CLI smoke run at a tiny size, REFERENCE §2 pairing checked against the real forward pass,
routing of the four arms, schedule and claims on hand-made records."""

from __future__ import annotations

import json
import math
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from specscope import linalg, store
from specscope.errors import ConfigError, RunStoreError
from specscope.labs import gpt
from specscope.labs.config import make_config
from specscope.models.gpt import apply_rope

TINY = dict(d_model=16, n_layer=1, n_head=2, seq_len=16, batch_size=4, steps=6, eval_every=3, eval_batches=1,
            probe_every=3, max_bytes=60_000, warmup=2, device="cpu")


def tiny(**kw) -> gpt.Config:
    return make_config(gpt.Config, {**TINY, **kw}, "gpt")


def test_cli_smoke_run_records_every_arm_and_the_claims(tmp_path, monkeypatch, capsys):
    from specscope.cli import main

    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    monkeypatch.setattr(sys, "argv", ["specscope", "run", "gpt", "--quiet", "--out", str(tmp_path), *sets])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None), capsys.readouterr()
    run_dir = next((tmp_path / "gpt").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [c["id"] for c in summary["claims"]] == ["GPT-1a", "GPT-1b", "GPT-1c", "GPT-1d", "GPT-2a", "GPT-2b"]
    df = store.load(run_dir)
    for arm in gpt.ARMS:
        val = df[(df.arm == arm) & (df.metric == "val_loss")]
        assert sorted(val.step) == [0, 3, 6]
        assert set(df[(df.arm == arm) & (df.metric == "time")].step) == {0, 3, 6}
        st = df[(df.arm == arm) & (df.metric == "stable_rank")]
        assert set(st.step) == {0, 3}
        assert {"embed", "head", "blocks.0.attn.q", "blocks.0.attn.o", "blocks.0.mlp.up", "blocks.0.mlp.down"} <= set(st.layer)
    assert df[df.metric == "unigram_loss"].value.iloc[0] > 0
    check = df[df.metric == "onehot_stable_rank"]
    assert len(check) and set(check.estimator) == {"svd"}  # the dense one-hot's singular values, not the counts
    (c1c,) = [c for c in summary["claims"] if c["id"] == "GPT-1c"]
    assert c1c["verdict"] == "PASS" and 0 <= c1c["value"] < 1e-9, c1c
    assert (run_dir / "figures" / "lab_gpt_val_loss.png").is_file()


def test_gpt1c_fails_when_the_recorded_embedding_st_is_not_the_one_hot_matrixs():
    """The check is independent of the closed form: an embedding st recorded from the wrong tokens fails."""
    rows = [dict(arm="muon", step=s, layer="embed", metric=m, value=v) for s in (0, 5)
            for m, v in (("stable_rank", 3.2), ("onehot_stable_rank", 3.2 if s == 0 else 3.5))]
    c = {c.id: c for c in gpt.claims(pd.DataFrame(rows), tiny(arms=["muon"]))}["GPT-1c"]
    assert c.verdict == "FAIL" and c.value == pytest.approx(0.3 / 3.5)


def _capture(model: torch.nn.Module) -> tuple[dict, dict, list]:
    """Inputs of every Linear/Embedding and outputs of the norms and projections during one forward."""
    inputs, outputs, handles = {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            handles.append(m.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0].detach())))
        if isinstance(m, (torch.nn.Linear, torch.nn.RMSNorm)):
            handles.append(m.register_forward_hook(lambda m, a, y, n=name: outputs.__setitem__(n, y.detach())))
    return inputs, outputs, handles


@pytest.mark.parametrize("mlp", ["relu2", "swiglu"])
def test_each_recorded_st_is_that_of_the_tensor_the_weight_multiplied(mlp):
    cfg = tiny(arms=["adamw"], probe_estimator="gram", mlp=mlp, n_layer=2)
    arm = gpt.build(cfg, torch.device("cpu"))[1]
    model, monitor = arm.model, arm.monitor
    inputs, outputs, handles = _capture(model)
    x, y = arm.batch(0)
    with monitor.step(0):
        arm.loss(model, (x, y)).backward()
    for h in handles:
        h.remove()
    recs = {r.layer: r for r in monitor.pop_records() if r.metric == "stable_rank"}
    B, T = x.shape
    # REFERENCE §2: which tensor each weight multiplies, recomputed from the forward pass itself
    for i in range(cfg.n_layer):
        b, blk = f"blocks.{i}", model.blocks[i]
        for w in ("q", "k", "v"):
            assert torch.equal(inputs[f"{b}.attn.{w}"], outputs[f"{b}.attn_norm"])  # attention RMS state
        q, k, v = (outputs[f"{b}.attn.{w}"].view(B, T, cfg.n_head, -1).transpose(1, 2) for w in "qkv")
        q, k = blk.attn.q_norm(q), blk.attn.k_norm(k)
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
        att = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True)
        torch.testing.assert_close(inputs[f"{b}.attn.o"], att.transpose(1, 2).reshape(B, T, -1))  # attention output
        assert torch.equal(inputs[f"{b}.mlp.up"], outputs[f"{b}.mlp_norm"])  # MLP RMS state
        up = outputs[f"{b}.mlp.up"]
        post = F.relu(up).square() if mlp == "relu2" else F.silu(outputs[f"{b}.mlp.gate"]) * up
        torch.testing.assert_close(inputs[f"{b}.mlp.down"], post)  # MLP post-activation
    assert torch.equal(inputs["head"], outputs["final_norm"])  # final RMS state
    assert torch.equal(inputs["embed"], x)  # token ids: the one-hot matrix
    # the recorded st(A) is that tensor's, with B·T rows; gram is exact up to float32 Gram rounding
    assert set(recs) == set(inputs)
    for layer, A in inputs.items():
        r = recs[layer]
        assert r.rows == B * T, layer
        if layer == "embed":
            assert r.estimator == "closed_form" and r.value == float(linalg.onehot_stable_rank(x))
            continue
        exact = float(linalg.stable_rank(A.reshape(B * T, -1).double()))
        assert r.value == pytest.approx(exact, rel=1e-4), layer


def test_power_estimate_never_underestimates_st():
    """The lab's default estimator: σ_1² from a Rayleigh quotient is a lower bound, so st is never below exact."""
    cfg = tiny(arms=["adamw"])
    arm = gpt.build(cfg, torch.device("cpu"))[1]
    inputs, _, handles = _capture(arm.model)
    with arm.monitor.step(0):
        arm.loss(arm.model, arm.batch(0)).backward()
    for h in handles:
        h.remove()
    for r in arm.monitor.pop_records():
        if r.metric == "stable_rank" and r.layer != "embed":
            exact = float(linalg.stable_rank(inputs[r.layer].reshape(r.rows, -1).double()))
            assert r.value >= exact * (1 - 1e-5), r.layer


def test_routing_of_the_four_arms():
    cfg = tiny()
    arms = {a.name: a for a in gpt.build(cfg, torch.device("cpu"))[1:]}
    algos = {}
    for name, arm in arms.items():
        algos[name] = {n: g["algorithm"] for g in arm.optimizer.param_groups for n in g["param_names"]}
    assert set(algos["adamw"].values()) == {"adamw"}
    spectral = {n for n, a in algos["muon"].items() if a == "muon"}
    assert spectral == {f"blocks.0.{m}.weight" for m in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down")}
    assert {n for n, a in algos["muon-down"].items() if a == "muon"} == {"blocks.0.mlp.down.weight"}
    assert {n for n, a in algos["auto"].items() if a == "auto"} == spectral
    for a in algos.values():
        assert a["embed.weight"] == a["head.weight"] == a["final_norm.weight"] == "adamw"
    # same initialization for every arm
    w = [arm.model.blocks[0].mlp.down.weight for arm in arms.values()]
    assert all(torch.equal(w[0], x) for x in w)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = tiny(steps=100, warmup=10, min_lr_ratio=0.1)
    f = [gpt.lr_factor(s, cfg) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[100] == pytest.approx(0.1)
    assert gpt.lr_factor(55, tiny(steps=100, warmup=10, decay="linear")) == pytest.approx(0.1 + 0.9 * 0.5)


def _records(final: dict[str, list[float]], st_down: float) -> pd.DataFrame:
    rows = []
    for arm, vals in final.items():
        for i, v in enumerate(vals):
            rows += [(arm, i * 10, "", "val_loss", v), (arm, i * 10, "", "train_loss", v), (arm, i * 10, "", "time", float(i))]
        for step in (0, 10):
            rows += [(arm, step, "blocks.0.mlp.down", "stable_rank", st_down),
                     (arm, step, "blocks.0.mlp.down", "nuclear_rank", 8.0),
                     (arm, step, "blocks.0.mlp.down", "spectral_advantage", 8.0 / st_down),
                     (arm, step, "head", "spectral_advantage", 1.5), (arm, step, "embed", "spectral_advantage", 1.1)]
    return pd.DataFrame(rows, columns=["arm", "step", "layer", "metric", "value"])


def test_claims_follow_the_records():
    cfg = tiny(steps=20)
    good = _records({"adamw": [5, 3, 2.0], "muon-down": [5, 2.5, 1.9], "muon": [5, 1.9, 1.5]}, st_down=2.0)
    c = {x.id: x for x in gpt.claims(good, cfg.model_copy(update={"arms": ["adamw", "muon-down", "muon"]}))}
    assert c["GPT-1a"].verdict == "PASS" and c["GPT-1b"].verdict == "PASS" and c["GPT-1d"].verdict == "PASS"
    assert "project's reading" in c["GPT-1a"].setting and c["GPT-1a"].value == 2.0
    assert "bound 5: PASS, 10: PASS, 20: PASS (passes for any bound ≥ 2.00)" in c["GPT-1a"].measured
    assert c["GPT-2a"].verdict == "PASS" and "step 10" in c["GPT-2a"].measured
    assert c["GPT-2b"].verdict == "PASS"
    assert c["GPT-2a"].value == 0.5 and all("steps of" in c[k].setting for k in ("GPT-1b", "GPT-1d", "GPT-2a", "GPT-2b"))
    assert c["GPT-1c"].verdict == "INCONCLUSIVE"  # no embedding st recorded here
    bad = _records({"adamw": [5, 3, 1.5], "muon-down": [5, 2.5, 1.9], "muon": [5, 1.9, 1.7]}, st_down=20.0)
    c = {x.id: x for x in gpt.claims(bad, cfg.model_copy(update={"arms": ["adamw", "muon-down", "muon"]}))}
    assert [c[k].verdict for k in ("GPT-1a", "GPT-1b", "GPT-2a", "GPT-2b")] == ["FAIL"] * 4
    assert "bound 5: FAIL, 10: FAIL, 20: PASS" in c["GPT-1a"].measured  # st 20: the verdict turns on the bound
    assert math.isnan(gpt.steps_to_reach(pd.Series([3.0, 2.0], index=[0, 10]), 1.0))


def test_bad_config_names_the_problem():
    with pytest.raises(ConfigError, match="arms"):
        tiny(arms=[])
    with pytest.raises(ConfigError, match="repeats"):
        gpt.build(tiny(arms=["muon", "muon"]), torch.device("cpu"))


@pytest.mark.parametrize("losses, says", [
    ({"adamw": 2.0, "muon-down": 1.8, "muon": 1.5}, "W_down captures 40% of the AdamW→Muon gain"),
    ({"adamw": 1.5, "muon-down": 1.6, "muon": 1.7}, "Muon(all) does not improve on AdamW here"),  # never "-50%"
])
def test_gpt2b_states_the_w_down_share_only_where_there_is_a_gain(monkeypatch, losses, says):
    cfg = make_config(gpt.Config, {}, "gpt")
    monkeypatch.setattr(gpt, "summarize", lambda df, cfg: [{"arm": a, "final_val_loss": v} for a, v in losses.items()])
    claim = gpt._gpt2b(pd.DataFrame(), cfg)
    assert says in claim.measured and claim.verdict == ("PASS" if losses["adamw"] > losses["muon"] else "FAIL")


def test_summary_json_holds_null_where_a_claims_figure_is_not_a_number(monkeypatch, tmp_path):
    """GPT-2a's figure is Muon's step to AdamW's final loss over the steps: NaN when it never gets there. The
    summary.json the runner writes is strict JSON (null), which `jq` and browsers read."""
    from specscope.labs import runner

    monkeypatch.setattr(runner.report, "write_report", lambda *a, **k: None)
    run_dir = runner.run_lab("gpt", {**TINY, "arms": ["adamw", "muon"]}, out=tmp_path)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=refuse)
    claims = {c["id"]: c for c in summary["claims"]}
    assert "never reaches it" in claims["GPT-2a"]["measured"] and claims["GPT-2a"]["value"] is None


def test_the_warmup_range_shown_is_the_one_accepted():
    """`specscope list gpt` shows warmup's range; 0 (refused by the schedule) is refused when the config is made."""
    with pytest.raises(ConfigError, match="'warmup' = 0"):
        make_config(gpt.Config, {"warmup": 0}, "gpt")


def test_gpt1c_is_inconclusive_with_tied_embeddings():
    """The tied weight is recorded as "embed" but measured on the head's product (the final RMS state): compared
    with the one-hot check recorded under the same name, GPT-1c read FAIL (a difference of 0.15)."""
    rows = [dict(arm="muon", step=s, layer="embed", metric=m, value=v) for s in (0, 5)
            for m, v in (("stable_rank", 3.0), ("onehot_stable_rank", 3.54))]
    c = {c.id: c for c in gpt.claims(pd.DataFrame(rows), tiny(arms=["muon"], tie_embeddings=True))}["GPT-1c"]
    assert c.verdict == "INCONCLUSIVE" and "tied embedding" in c.measured


def test_gpt1d_and_gpt1a_read_a_tied_embedding_as_the_head():
    """With tied embeddings GPT-1d ruled an "embedding" nr/st measured on the head's product (PASS on the head's
    numbers alone), and GPT-1a left that weight's final-RMS-state st(A) out as "one-hot tokens"."""
    rows = [dict(arm="muon", step=5, layer=layer, metric=m, value=v)
            for layer, adv, st in (("blocks.0.attn.q", 8.0, 2.0), ("blocks.0.mlp.down", 9.0, 3.0), ("embed", 2.0, 7.5))
            for m, v in (("spectral_advantage", adv), ("stable_rank", st), ("nuclear_rank", adv * st))]
    cfg = tiny(arms=["muon"], tie_embeddings=True)
    c = {c.id: c for c in gpt.claims(pd.DataFrame(rows), cfg)}
    assert c["GPT-1d"].verdict == "INCONCLUSIVE" and "head 2.00" in c["GPT-1d"].measured
    assert "embedding's half is not measured" in c["GPT-1d"].measured
    assert "final RMS state: max 7.50" in c["GPT-1a"].measured
    untied = {c.id: c for c in gpt.claims(pd.DataFrame(rows), tiny(arms=["muon"]))}
    assert untied["GPT-1d"].verdict == "PASS" and "embed 2.00" in untied["GPT-1d"].measured


def test_report_salvage_of_a_run_that_lost_its_time_records(tmp_path):
    """`report --salvage`, the fix a database that lost records is told, ended in an IndexError traceback: the
    summary read each arm's last `time`. Now the arm's seconds are NaN, and the report is written."""
    import sqlite3
    import warnings

    from specscope.labs.runner import finish, run_lab

    run_dir = run_lab("gpt", {**TINY, "arms": ["adamw"]}, out=tmp_path)
    with sqlite3.connect(run_dir / "metrics.sqlite") as con:
        con.execute("DELETE FROM metrics WHERE metric = 'time'")
    con.close()
    run = store.Run.open(run_dir)
    cfg = make_config(gpt.Config, run.config, "gpt")
    with pytest.raises(RunStoreError, match="lost records"):
        finish(run, gpt, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        claims = finish(run, gpt, cfg, salvage=True)
    assert claims and "SALVAGED" in (run_dir / "report.html").read_text()
    (row,) = gpt.summarize(store.load(run_dir, salvage=True), cfg)
    assert math.isnan(row["seconds"]) and math.isnan(row["tokens_per_s"])
