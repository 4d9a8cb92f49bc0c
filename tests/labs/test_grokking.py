"""Grokking lab: models, grok step, Low-Rank Decay's prox rule, optimizer routing, a tiny run via the CLI."""

import json
import math

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from specscope.data.modular import modular_dataset
from specscope.errors import ConfigError
from specscope.labs import grokking as g
from specscope.models.modular import enc003, qk_weights, tf004

TINY = ["--set", "p=5", "--set", "steps=12", "--set", "eval_every=4", "--set", "d_model=16", "--set", "d_ff=32",
        "--set", "n_heads=2", "--set", "grok_window=2", "--set", "batch_size=8", "--set", "device=cpu"]


def test_lrd_prox_lowers_each_singular_value_by_exactly_lr_lambda():
    from specscope.optim import LowRankDecay

    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    s = torch.tensor([2.0, 1.0, 0.3, 0.02], dtype=torch.float64)
    W = torch.nn.Parameter(U[:, :4] @ torch.diag(s) @ V.T)
    lr, lam = 0.1, 0.5  # lr·λ = 0.05 clips the smallest singular value to 0
    LowRankDecay([W], lr=lr, weight_decay=lam, mode="prox").step()
    got = torch.linalg.svdvals(W.detach())
    assert torch.allclose(got, (s - lr * lam).clamp_min(0), atol=1e-12)
    # singular vectors unchanged: W is still U diag(.) Vᵀ
    assert torch.allclose(U[:, :4].T @ W.detach() @ V, torch.diag((s - lr * lam).clamp_min(0)), atol=1e-12)


def test_tf004_loss_is_invariant_to_the_scale_of_wq_wk():
    torch.manual_seed(0)
    d = modular_dataset("add", 7, 0.5, eq_token=True)
    model = tf004(7, d_model=32, n_heads=4, d_ff=64).double()
    x = d.x_train
    before = model(x)
    with torch.no_grad():
        for w in qk_weights(model).values():
            w.mul_(5.0)
    assert torch.allclose(model(x), before, rtol=1e-6, atol=1e-8)  # RMSNorm eps leaves ~1e-6·(1/25 - 1)
    enc = enc003(7, d_model=32, n_heads=4, d_ff=64).double()
    y0 = enc(d.x_train[:, :2])
    with torch.no_grad():
        enc.blocks[0].attn.q.weight.mul_(5.0)
    assert not torch.allclose(enc(d.x_train[:, :2]), y0, atol=1e-3)  # no QK-norm: not invariant


def test_qk_weights_select_by_name():
    names = list(qk_weights(enc003(7, n_layers=3)))
    assert names == [f"blocks.{i}.attn.{m}" for i in range(3) for m in ("q", "k")]
    assert list(qk_weights(enc003(7), ("v",))) == ["blocks.0.attn.v", "blocks.1.attn.v"]


def test_grok_steps_first_hit_and_stable_window():
    steps = [0, 10, 20, 30, 40, 50, 60]
    accs = [0.1, 0.99, 0.5, 0.98, 0.99, 1.0, 0.99]
    assert g.grok_steps(steps, accs, 0.98, 3) == (10.0, 30.0)
    first, stable = g.grok_steps(steps, accs, 0.98, 5)  # streak of 4 cut off by the end: not stable
    assert first == 10.0 and math.isnan(stable)
    assert all(math.isnan(v) for v in g.grok_steps(steps, [0.1] * 7))


def test_batches_are_a_function_of_the_step():
    d = modular_dataset("add", 11, 0.5)
    a, b = g.Batches(d, 16, seed=3), g.Batches(d, 16, seed=3)
    for step in (0, 5, 100, 7):  # out of order, as after a resume
        assert torch.equal(a(step)[0], b(step)[0])
    full = g.Batches(d, 0, seed=3)(9)
    assert full[0].shape[0] == len(d.x_train)


def test_lrd_arms_move_targets_out_of_l2():
    cfg = g.Config(p=7, d_model=16, d_ff=32, n_heads=2, weight_decay=1.0)
    d = g.make_data(cfg, torch.device("cpu"))
    model = g.make_model(cfg, d)
    targets = {id(w) for w in qk_weights(model).values()}
    for reg, target_wd, n_steppers in (("l2", 1.0, 0), ("lrd", 0.0, 1), ("elastic", 1.0, 1), ("none", 0.0, 0)):
        opt, steppers = g.make_optimizer(cfg, model, reg)
        wd = {id(p): grp["weight_decay"] for grp in opt.param_groups for p in grp["params"]}
        assert {wd[t] for t in targets} == {target_wd} and len(steppers) == n_steppers
        others = {v for k, v in wd.items() if k not in targets}
        assert others == ({0.0} if reg == "none" else {1.0})


def _sweep_rows(points):
    """points: (arm, λ, fraction, stable grok step or None) -> sweep-table rows (first grok = stable)."""
    return pd.DataFrame([{"arm": arm, "strength": lam, "train_fraction": f, "grok_step_stable": step,
                          "grok_step_first": step} for arm, lam, f, step in points])


def test_sweep_claims_compare_phase_boundaries():
    points = []
    for frac, l2, lrd in ((0.3, None, None), (0.4, None, 900.0), (0.5, 1500.0, 700.0)):
        points += [("l2", 1.0, frac, l2), ("lrd", 1.0, frac, lrd)]
    (claim,) = g.sweep_claims(_sweep_rows(points))
    assert claim.verdict == "PASS" and "l2 best λ 1 → ≥ 0.5" in claim.measured and "lrd best λ 1 → ≥ 0.4" in claim.measured
    assert claim.spread == "boundary stable l2 ≥ 0.5, lrd ≥ 0.4; first l2 ≥ 0.5, lrd ≥ 0.4"
    swapped = _sweep_rows(points).replace({"arm": {"l2": "lrd", "lrd": "l2"}})
    assert g.sweep_claims(swapped)[0].verdict == "FAIL"


def test_sweep_claims_compare_each_arm_at_its_own_best_strength():
    """The audit's table: L2 (λ 0.1) never groks, LRD (λ 5) groks at 0.3 and 0.5 — no shared λ, still PASS."""
    points = [("l2", 0.1, f, None) for f in (0.3, 0.5)] + [("lrd", 5.0, f, 800.0) for f in (0.3, 0.5)]
    (claim,) = g.sweep_claims(_sweep_rows(points))
    assert claim.verdict == "PASS" and "l2 best λ 0.1 → none" in claim.measured
    # a grid per arm: L2 groks only at λ 1 (fraction 0.5), LRD best at λ 5 (0.3), worse at λ 20
    points = [("l2", lam, f, 1200.0 if (lam, f) == (1.0, 0.5) else None) for lam in (0.1, 1.0) for f in (0.3, 0.5)]
    points += [("lrd", 5.0, f, 900.0) for f in (0.3, 0.5)] + [("lrd", 20.0, 0.3, None), ("lrd", 20.0, 0.5, 900.0)]
    (claim,) = g.sweep_claims(_sweep_rows(points))
    assert claim.verdict == "PASS" and "l2 best λ 1 → ≥ 0.5" in claim.measured and "lrd best λ 5 → ≥ 0.3" in claim.measured
    nothing = _sweep_rows([(a, 1.0, f, None) for a in ("l2", "lrd") for f in (0.3, 0.5)])
    assert g.sweep_claims(nothing)[0].verdict == "INCONCLUSIVE"


def test_lrd2_rules_the_best_lrd_variant_swept_not_plain_lrd_alone():
    """The proximal variant moved the boundary to 0.3 against L2's 0.5 and LRD-2 read FAIL (only `lrd` was ruled);
    a sweep of l2 and lrd_prox alone read INCONCLUSIVE ("needs arms l2 and lrd")."""
    bounds = {"l2": 0.5, "lrd": 0.5, "lrd_prox": 0.3}
    points = [(a, 1.0, f, 1000.0 if f >= b else None) for a, b in bounds.items() for f in (0.3, 0.4, 0.5)]
    (claim,) = g.sweep_claims(_sweep_rows(points))
    assert claim.verdict == "PASS" and claim.spread.startswith("boundary stable l2 ≥ 0.5, lrd_prox ≥ 0.3")
    without_plain = [p for p in points if p[0] != "lrd"]
    assert g.sweep_claims(_sweep_rows(without_plain))[0].verdict == "PASS"
    only_l2 = [p for p in points if p[0] == "l2"]
    assert "needs arm l2 and one of lrd, lrd_prox, lrd_ns" in g.sweep_claims(_sweep_rows(only_l2))[0].measured


def test_sweep_claims_tie_at_the_grids_floor_is_not_a_fail():
    """Both arms grok at the smallest fraction of the grid: where either boundary lies below it is unmeasured
    (INCONCLUSIVE, with the advice to extend the grid down); a tie above the floor is a FAIL."""
    points = [("l2", 1.0, f, 1500.0) for f in (0.4, 0.5)] + [("lrd", 10.0, f, 1200.0) for f in (0.4, 0.5)]
    (claim,) = g.sweep_claims(_sweep_rows(points))
    assert claim.verdict == "INCONCLUSIVE" and "extend the grid down" in claim.measured
    assert "fractions 0.4, 0.5" in claim.setting
    points = [("l2", 1.0, 0.3, None), ("lrd", 10.0, 0.3, None)] + points
    assert g.sweep_claims(_sweep_rows(points))[0].verdict == "FAIL"


def test_grok_status_tells_a_cut_off_streak_from_no_grok():
    steps = list(range(0, 100, 10))
    assert g.grok_status(steps, [0.1] * 8 + [0.99, 0.99], 0.98, 5) == "cut off"
    assert g.grok_status(steps, [0.1] * 10, 0.98, 5) == "no grok"
    assert g.grok_status(steps, [0.1, 0.99] + [0.5] * 8, 0.98, 5) == "unstable"
    assert g.grok_status(steps, [0.1] * 3 + [0.99] * 7, 0.98, 5) == "grokked"


def test_strength_grid_builds_one_arm_per_strength():
    cfg = g.Config(p=5, d_model=16, d_ff=32, n_heads=2, arms=["l2", "lrd"], strength_grid={"lrd": [2, 5]}, device="cpu")
    specs = g.arm_specs(cfg)
    assert [(n, r) for n, r, _ in specs] == [("l2", "l2"), ("lrd@2", "lrd"), ("lrd@5", "lrd")]
    assert [g.arm_strength(c, r) for _, r, c in specs] == [0.1, 2.0, 5.0]
    arms = g.build(cfg, torch.device("cpu"))
    assert [a.extra_steppers[0].param_groups[0]["weight_decay"] for a in arms[1:]] == [2.0, 5.0]
    with pytest.raises(Exception, match="not in arms"):
        g.arm_specs(cfg.model_copy(update={"strength_grid": {"lrd_prox": [1.0]}}))
    for grid in ([0.1, 0.1000001], [2, 2.0]):  # one arm name twice: refused with the fix, before anything runs
        with pytest.raises(ConfigError, match=r"two arms named 'lrd@(0\.1|2)'.*drop the repeat"):
            g.check(cfg.model_copy(update={"strength_grid": {"lrd": grid}}))


def _lrd1_frame(st_lrd, st_l2):
    """A recorded run: train acc 1 from step 100, Q/K stable rank and nuclear norm per arm every 100 steps."""
    rows = []
    for arm, st in (("lrd", st_lrd), ("l2", st_l2)):
        for i, v in enumerate(st):
            step = 100 * i
            rows += [{"step": step, "arm": arm, "layer": "", "metric": "train_acc", "value": float(i > 0)},
                     {"step": step, "arm": arm, "layer": "", "metric": "test_acc", "value": 0.5},
                     {"step": step, "arm": arm, "layer": "blocks.0.attn.q", "metric": "weight_stable_rank", "value": v},
                     {"step": step, "arm": arm, "layer": "blocks.0.attn.q", "metric": "weight_nuclear_norm",
                      "value": 50.0 / (1 + i) if arm == "lrd" else 50.0}]
    return pd.DataFrame(rows)


def test_lrd1_uses_the_median_over_the_post_memorization_window():
    cfg = g.Config(arms=["l2", "lrd"])
    oscillating = [33.9, 4.0, 3.0, 3.1, 2.9, 3.0, 3.2, 28.7]  # a last evaluation that spikes does not decide it
    claim = g._lrd1_claim(_lrd1_frame(oscillating, [33.9] + [22.8] * 7), cfg)
    assert claim.verdict == "PASS" and "median 3.10 [2.90–28.70]" in claim.measured and claim.value < 0.2
    assert g._lrd1_claim(_lrd1_frame([33.9] + [20.0] * 7, [33.9] + [22.8] * 7), cfg).verdict == "FAIL"
    assert "wd 0.1" in claim.setting and "median Q/K stable rank" in claim.setting


def test_lrd1_asks_the_spectrum_to_keep_compressing_after_memorization_where_l2s_does_not():
    """'Keeps shrinking singular values; L2 does not' (004) as a shape measure: the Q/K stable rank after
    memorization falls under LRD and not under L2. ‖W‖_* is a scale QK-norm leaves free: reported only."""
    cfg = g.Config(arms=["l2", "lrd"])
    l2 = [33.9] + [22.8] * 7
    keeps = g._lrd1_claim(_lrd1_frame([33.9, 4.0, 3.6, 3.3, 3.0, 2.8, 2.6, 2.5], l2), cfg)
    assert keeps.verdict == "PASS" and "stable rank ×0.70 (‖W‖_* ×0.33)" in keeps.measured
    stalls = g._lrd1_claim(_lrd1_frame([33.9, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0], l2), cfg)  # collapsed, then frozen
    assert stalls.verdict == "FAIL" and "stable rank ×1.00" in stalls.measured
    l2_too = g._lrd1_claim(_lrd1_frame([33.9, 4.0, 3.6, 3.3, 3.0, 2.8, 2.6, 2.5], [33.9, 22.8, 20, 18, 16, 14, 12, 11]), cfg)
    assert l2_too.verdict == "FAIL"  # L2 compresses faster: not the contrast the claim states
    assert "‖W‖_* is reported, not ruled on" in keeps.setting


def test_lrd1_from_a_sweep_over_arms_and_seeds():
    """`specscope sweep grokking --grid 'arms=[l2],[lrd]' --grid seed=0,1`: LRD-1 per seed, combined."""
    cfg = g.Config(arms=["l2", "lrd"])
    rows = []
    for seed, last in ((0, 3.0), (1, 20.0)):
        for r in g.summarize(_lrd1_frame([33.9, 4.0, 3.0, last, 3.0, 2.5, 2.8], [33.9] + [22.8] * 6), cfg):
            rows.append({"arms": '["' + r["arm"] + '"]', "seed": seed, **r, "run": f"r{seed}{r['arm']}"})
    (lrd1, lrd2) = g.sweep_claims(pd.DataFrame(rows))
    assert lrd1.id == "LRD-1" and lrd1.seeds == 2 and lrd1.verdict == "PASS" and "seed 0:" in lrd1.measured
    assert lrd2.id == "LRD-2" and lrd2.verdict == "INCONCLUSIVE"  # one train fraction
    more = pd.DataFrame([{**r, "train_fraction": f} for r in rows for f in (0.3, 0.4)])  # 4 points, 2 seeds
    lrd1 = g.sweep_claims(more)[0]
    assert lrd1.seeds == 2 and lrd1.setting.startswith("4 sweep points") and "arms l2 λ" in lrd1.setting


def test_tiny_run_through_the_cli(tmp_path):
    from specscope import store
    from specscope.cli import _register, app

    _register()
    args = ["run", "grokking", *TINY, "--set", "arms=l2,lrd", "--set", "model=tf004", "--out", str(tmp_path), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "grokking").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [c["id"] for c in summary["claims"]] == ["BASE-003", "LRD-1", "LRD-2"]
    groks = [c for c in summary["claims"] if c["id"] != "LRD-1"]  # LRD-1 does not use a grok step
    assert all("'first'" in c["setting"] and "'stable'" in c["setting"] for c in groks)
    base = summary["claims"][0]  # a tf004 run: the setting says what it had, not only what the claim needs
    assert base["verdict"] == "INCONCLUSIVE" and "model=tf004" in base["setting"].split("this run: ")[1]
    assert base["setting"].startswith("needs the paper-003 setup (--set model=enc003")
    df = store.load(run_dir)
    st = df[df.metric == "weight_stable_rank"]
    assert set(st.layer) == {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.1.attn.q", "blocks.1.attn.k"}
    assert sorted(df[(df.metric == "test_acc") & (df.arm == "lrd")].step) == [0, 4, 8, 12]
    assert sorted(st[st.arm == "l2"].step.unique()) == [0, 4, 8, 12]
    cos = df[df.metric == "grad_weight_cosine"]["value"].abs()
    assert len(cos) and cos.max() < 1e-3  # QK-norm: ∇L ⟂ W_Q, W_K


def test_a_diverging_run_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """lr=1e8 (inside the declared range): the spectra of NaN weights raised singular_values' ValueError, a
    60-line traceback and exit 1, before the loss of the next step could say what happened."""
    from specscope.cli import main

    sets = ["p=11", "steps=20", "eval_every=2", "d_model=16", "n_heads=2", "d_ff=32", "arms=l2", "lr=1e8", "device=cpu"]
    monkeypatch.setattr("sys.argv", ["specscope", "run", "grokking", *(a for s in sets for a in ("--set", s)),
                                     "--out", str(tmp_path), "--quiet"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "NaN or infinite" in err and "lower the learning rate" in err


def test_a_strength_grid_entry_out_of_range_or_empty_is_named():
    """strength_grid={"l2": [-1]} said "(expected table)" of a table; {"l2": []} ran l2 at its one strength in silence."""
    from specscope.labs.config import make_config

    with pytest.raises(ConfigError, match=r"'strength_grid.l2.0' = -1: .*greater than or equal to 0 \(an entry of 'strength_grid'"):
        make_config(g.Config, {"strength_grid": {"l2": [-1]}, "arms": ["l2"]}, "grokking")
    with pytest.raises(ConfigError, match=r"strength_grid\['l2'\] is empty"):
        g.arm_specs(make_config(g.Config, {"strength_grid": {"l2": []}, "arms": ["l2"]}, "grokking"))


def test_bad_config_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from specscope.cli import main

    monkeypatch.setattr("sys.argv", ["specscope", "run", "grokking", "--set", "p=12", "--set", "steps=1",
                                     "--out", str(tmp_path), "--quiet"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "not a prime" in capsys.readouterr().err


@pytest.mark.parametrize("factory, seq", [(enc003, 2), (tf004, 3)])
def test_single_position_last_block_equals_the_full_computation(factory, seq):
    torch.manual_seed(0)
    model = factory(7, d_model=32, n_heads=4, d_ff=64).double()
    x = torch.randint(0, 7, (20, seq))
    h = model.embed(x) + model.pos[:seq]
    for block in model.blocks:
        h = block(h)  # every position, as a plain encoder computes it
    ref = model.heads[0](model.norm(h[:, model.readout]))
    assert torch.allclose(model(x), ref, atol=1e-12)


def _lrd1_row(name: str, median: float, shrink: float) -> dict:
    return {"arm": name.split("@")[0], "name": name, "post_mem_qk_stable_rank": median, "stable_rank_shrink": shrink,
            "init_qk_stable_rank": 30.0, "post_mem_min": median, "post_mem_max": median, "memorized_step": 100.0,
            "final_qk_stable_rank": median, "nuclear_shrink": 0.5}


def test_lrd1_rules_every_strength_of_a_grid_whatever_its_order():
    """Only each arm's first row was ruled: strength_grid lrd [1, 5] read PASS and [5, 1] FAIL on the same runs."""
    l2 = [_lrd1_row("l2@0.1", 20.0, 1.1), _lrd1_row("l2@1", 18.0, 1.0)]
    collapses, does_not = _lrd1_row("lrd@1", 1.2, 0.5), _lrd1_row("lrd@5", 5.3, 1.0)
    verdicts = {g.lrd1_from_rows(l2 + lrd, "here").verdict for lrd in ([collapses, does_not], [does_not, collapses])}
    assert verdicts == {"FAIL"}
    assert g.lrd1_from_rows(l2 + [collapses], "here").verdict == "PASS"
    both = g.lrd1_from_rows(l2[::-1] + [collapses, _lrd1_row("lrd@2", 2.0, 0.6)], "here")
    assert both.verdict == "PASS" and "lrd@2" in both.measured and "l2@0.1" in both.measured
    assert both.value == pytest.approx(2.0 / 18.0)


def test_lrd2_is_ruled_at_each_setting_of_the_grids_other_keys():
    """An lr grid was pooled: each lr counted as a seed (seeds = 2 from one seed) and the boundaries mixed."""
    nan = math.nan
    rows = []
    for lr, grok in ((0.03, {("l2", 0.3): nan, ("l2", 0.7): 50.0, ("lrd", 0.3): 80.0, ("lrd", 0.7): 40.0}),
                     (0.003, {("l2", 0.3): nan, ("l2", 0.7): 110.0, ("lrd", 0.3): nan, ("lrd", 0.7): 90.0})):
        for (arm, fraction), step in grok.items():
            rows.append({"arm": arm, "name": arm, "strength": 1.0, "train_fraction": fraction, "seed": 0, "lr": lr,
                         "grok_step_stable": step, "grok_step_first": step})
    table = pd.DataFrame(rows)
    (claim,) = g._sweep_lrd2(table)
    assert claim.seeds == 1 and claim.verdict == "FAIL"  # lr 0.03: lrd ≥ 0.3 < l2 ≥ 0.7, PASS; lr 0.003: both ≥ 0.7
    assert "lr 0.003: FAIL" in claim.measured and "lr 0.03: PASS" in claim.measured
    (alone,) = g._sweep_lrd2(table[table["lr"] == 0.03].drop(columns="lr"))
    assert alone.verdict == "PASS" and alone.seeds == 1


@pytest.mark.parametrize("change", [dict(d_model=16), dict(n_layers=1), dict(lr=1e-4), dict(batch_size=0), dict(grad_clip=0.0),
                                    dict(betas=(0.9, 0.999)), dict(mlp="silu"), dict(grok_window=2), dict(eval_every=100)])
def test_base003_rules_only_the_paper_003_setting_in_full(change):
    """BASE-003 gave PASS/FAIL "for the paper-003 setup" on a 1-layer d_model 16 model at lr 1e-4, full batch: only the
    task, model name, optimizer and decay were compared. The published setting's width, depth, lr, betas, batch, clip
    and the grok rule are compared too; the paper's own setting (mlp "default" = enc003's gelu) is still ruled."""
    base = dict(model="enc003", weight_decay=1.0, arms=["l2"], steps=5000)
    rows = {"l2": {"grok_step_stable": 3000.0, "grok_step_first": 2900.0, "steps": 5000}}
    ruled = g._baseline_claim(pd.DataFrame(), g.Config(**base), rows)
    assert ruled.verdict == "PASS"
    claim = g._baseline_claim(pd.DataFrame(), g.Config(**base | change), rows)
    assert claim.verdict == "INCONCLUSIVE" and f"{next(iter(change))}" in claim.measured
