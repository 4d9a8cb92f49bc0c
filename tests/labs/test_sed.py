"""SED lab: centroids against per-input autograd and finite differences, θ_attn selection, grok tables and
verdicts from synthetic records, and a tiny run through the CLI."""

from __future__ import annotations

import json
import math
import sys

import pandas as pd
import pytest
import torch

from specscope import store
from specscope.labs import sed
from specscope.models.modular import enc003

TINY = dict(p=5, d_model=8, d_ff=16, n_heads=2, steps=16, multitask_steps=16, eval_every=4, grok_window=2,
            window=3, k=2, snapshot_every=2, fixed_batch=8, n_probe=8, n_random=3, coupling_every=4, multitask_coupling_every=4,
            batch_size=8, device="cpu", multitask=["add", "sub"], interventions=["control", "keep_random", "keep_sed"])


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared; intra-op threads only contend
    yield
    torch.set_num_threads(n)


def tiny_model(n_tasks: int = 1):
    torch.manual_seed(0)
    return enc003(7, n_tasks, d_model=8, n_heads=2, d_ff=16).double()


def test_forward_from_embeddings_is_the_model_forward():
    model = tiny_model(2)
    x = torch.randint(0, 7, (6, 2))
    heads = sed.forward_from_embeddings(model, sed.embed(model, x))
    assert torch.allclose(torch.stack(heads, 1), model(x), atol=1e-12)


def test_centroids_are_per_input_gradients_of_the_correct_logit():
    model = tiny_model(2)
    x = torch.randint(0, 7, (5, 2))
    y = torch.randint(0, 7, (5,))
    mu = sed.centroids(model, x, y, task=1)
    assert mu.shape == (5, 2 * 8)
    for i in range(5):  # one input at a time: no cross-talk through the batch
        h = sed.embed(model, x[i:i + 1]).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(model.heads[1](model.norm(_blocks(model, h)[:, 0]))[0, y[i]], h)
        assert torch.allclose(mu[i], g.reshape(-1), atol=1e-12)
    # central finite difference on one embedding coordinate, float64: error O(δ²) ≈ 1e-10
    i, j, delta = 2, 5, 1e-5
    h = sed.embed(model, x[i:i + 1]).detach().reshape(-1)
    def logit(v):
        return sed.forward_from_embeddings(model, v.reshape(1, 2, 8))[1][0, y[i]]
    e = torch.zeros_like(h)
    e[j] = delta
    with torch.no_grad():
        fd = (logit(h + e) - logit(h - e)) / (2 * delta)
    assert abs(fd.item() - mu[i, j].item()) < 1e-7


def _blocks(model, h):
    for block in model.blocks:
        h = block(h)
    return h


def test_attention_weights_are_the_four_projections_of_every_block_without_biases():
    names = list(sed.attention_weights(enc003(7, n_layers=2)))
    assert names == [f"blocks.{i}.attn.{m}" for i in range(2) for m in "qkvo"]
    with pytest.raises(Exception, match="attn"):
        sed.attention_weights(torch.nn.Linear(3, 3))


def _records(rows):
    return pd.DataFrame([dict(step=s, layer=layer, metric=m, value=v, arm=a) for a, m, layer, s, v in rows])


def _accs(arm, grok_at, steps=400, every=50):
    return [(arm, "test_acc", "", s, 1.0 if s >= grok_at else 0.1) for s in range(0, steps + 1, every)]


def test_a_window_of_zero_updates_gives_no_coupling_and_no_crash():
    """With no parameter change between snapshots (lr 0, a warm-up from 0, frozen weights) the update window has
    no SED directions: the second full window's rotation raised from principal_angles, and R̄ of no ratios was NaN."""
    torch.manual_seed(0)
    W, x = torch.nn.Parameter(torch.randn(4, 3)), torch.randn(5, 3)
    opt = torch.optim.SGD([W], lr=0.0)
    tracker = sed.SEDTracker([W], {"gradient-sed": lambda: (x @ W.T).pow(2).sum()}, window=2, k=1, every=1)
    coupling = sed.Coupling([W], tracker, {"": lambda: x @ W.T}, {"": ["gradient-sed", "update-sed"]}, every=1,
                            n_random=3, eps_rel=0.01, seed=0)
    records = []
    for step in range(4):
        tracker.after_backward(step, None, opt)
        opt.step()
        records += tracker.after_step(step, None, opt) + coupling.after_step(step, None, opt)
    got = {(r.layer, r.metric) for r in records if r.step == 3}
    assert ("gradient-sed", "coupling_Rbar") in got and ("update-sed", "coupling_baseline") in got
    assert not any(layer == "update-sed" and metric.startswith(("coupling_R", "sed_rotation")) for layer, metric in got)
    assert all(math.isfinite(r.value) for r in records if r.metric.startswith("coupling"))


def test_intervention_table_speedups_and_sed2_verdicts():
    cfg = sed.Config(seeds=1, grok_window=2, eval_every=50)
    rows = _accs("control-s0", 300) + _accs("keep_sed-s0", 150) + _accs("keep_random-s0", 100)
    rows += _accs("remove_sed-s0", 300) + _accs("remove_random-s0", 300)
    table = sed.intervention_table(_records(rows), cfg)
    speed = table.set_index("intervention")["speedup_stable"]
    assert speed["keep_sed"] == 2.0 and speed["keep_random"] == 3.0 and speed["remove_sed"] == 1.0
    assert sed._sed2_claim(table, cfg).verdict == "PASS"
    rows = [r for r in rows if r[0] != "remove_sed-s0"] + _accs("remove_sed-s0", 10**9)  # never groks
    table = sed.intervention_table(_records(rows), cfg)
    r = table.set_index("intervention").loc["remove_sed"]
    assert r["speedup_stable_bound"] and r["speedup_stable"] == 300 / 400
    assert sed._sed2_claim(table, cfg).verdict == "FAIL"
    no_ctrl = [r for r in rows if r[0] != "control-s0"] + _accs("control-s0", 10**9)
    assert sed._sed2_claim(sed.intervention_table(_records(no_ctrl), cfg), cfg).verdict == "INCONCLUSIVE"


def test_sed2_reports_both_grok_definitions_and_the_fresh_random_subspace():
    cfg = sed.Config(seeds=1, grok_window=2, eval_every=50, interventions=[*sed.CORE, "keep_random_fresh"])
    rows = _accs("control-s0", 300) + _accs("keep_sed-s0", 150) + _accs("keep_random-s0", 100)
    rows += _accs("remove_sed-s0", 300) + _accs("remove_random-s0", 300) + _accs("keep_random_fresh-s0", 200)
    claim = sed._sed2_claim(sed.intervention_table(_records(rows), cfg), cfg)
    assert "keep_random_fresh 1.50× [1.50–1.50] (first 1.50× [1.50–1.50])" in claim.measured
    assert "'first'" in claim.setting and "'stable'" in claim.setting and "project, then clip" in claim.setting
    assert claim.value == 2.0


def test_projection_options_clip_first_and_from_step_one(tmp_path):
    from specscope.labs.runner import run_lab

    cfg = sed.Config(**dict(TINY, interventions=["control", "keep_random", "keep_random_fresh", "keep_sed"],
                            multitask=[], project_after_clip=True, project_from="start", stop_after_grok=False))
    arms = {a.name: a for a in sed.build(cfg, torch.device("cpu"))}
    kinds = [type(cb).__name__ for cb in arms["keep_sed-s0"].callbacks]
    assert kinds.index("Clip") < kinds.index("GradientProjection") and arms["keep_sed-s0"].grad_clip is None
    fresh = next(cb for cb in arms["keep_random_fresh-s0"].callbacks if type(cb).__name__ == "GradientProjection")
    assert not torch.equal(fresh.basis(), fresh.basis())  # a new subspace every step
    run_dir = run_lab("sed", cfg.model_dump(), out=tmp_path)
    df = store.load(run_dir, metric="projected")
    first = df[df.value == 1].groupby("arm")["step"].min()
    # random arms from step 0; the SED arm once the window holds k = 2 snapshots (pushed at steps 0 and 2,
    # before the projection of step 2)
    assert first["keep_random-s0"] == 0 and first["keep_random_fresh-s0"] == 0 and first["keep_sed-s0"] == 2


def test_sed1_over_coupling_seeds_takes_the_verdict_most_seeds_reach():
    from specscope.errors import ConfigError

    cfg = sed.Config(seeds=3, coupling_seeds=3)
    rb = lambda arm, layer, vals: [(arm, "coupling_Rbar", layer, 100 * i, v) for i, v in enumerate(vals)]  # noqa: E731
    rows = rb("control-s0", "gradient-sed", [150]) + rb("control-s0", "update-sed", [5])  # 30×: PASS
    rows += rb("control-s1", "gradient-sed", [60]) + rb("control-s1", "update-sed", [3])  # 20×: PASS
    rows += rb("control-s2", "gradient-sed", [20]) + rb("control-s2", "update-sed", [4])  # < 30: FAIL
    c = sed._sed1_claim(_records(rows), cfg)
    assert (c.verdict, c.seeds) == ("PASS", 3) and c.value == pytest.approx((30 + 20 + 5) / 3)
    assert "verdicts PASS, PASS, FAIL" in c.spread and "control-s0…s2" in c.setting
    assert "seeds 0..2" in c.setting and "seeds 0..2, 1..3" not in c.setting  # one run's arms, not a run per seed
    assert sed._sed1_claim(_records(rows), sed.Config(seeds=3)).seeds == 1  # default: control-s0 only
    with pytest.raises(ConfigError, match="seeds=3"):
        sed.check(sed.Config(coupling_seeds=3))


def test_sed1_and_sed3_verdicts_follow_the_recorded_peaks():
    cfg = sed.Config(multitask=["add", "sub"])
    rb = lambda arm, layer, vals: [(arm, "coupling_Rbar", layer, 100 * i, v) for i, v in enumerate(vals)]  # noqa: E731
    df = _records(rb("control-s0", "gradient-sed", [5, 150, 40]) + rb("control-s0", "update-sed", [2, 6, 3]))
    assert sed.peak_rbar(df, "control-s0", "gradient-sed") == 150
    assert sed._sed1_claim(df, cfg).verdict == "PASS"
    df = _records(rb("control-s0", "gradient-sed", [5, 15]) + rb("control-s0", "update-sed", [2, 6]))
    assert sed._sed1_claim(df, cfg).verdict == "FAIL"
    assert sed._sed1_claim(_records(rb("x", "gradient-sed", [1])), cfg).verdict == "INCONCLUSIVE"
    good = []
    for t in cfg.multitask:
        good += rb("multitask", f"update-sed:{t}", [0.5, 0.9]) + rb("multitask", f"task-{t}-sed:{t}", [10, 30])
        good += rb("multitask", f"gradient-sed:{t}", [3, 4])
    assert sed._sed3_claim(_records(good), cfg).verdict == "PASS"
    table = sed.multitask_table(_records(good), cfg).set_index("task")
    assert table.loc["add", "task-sed"] == 30 and table.loc["add", "gradient-sed"] == 4
    assert table.loc["sub", "update-sed last"] == 0.9 and table.loc["sub", "last step"] == 100
    bad = good + rb("multitask", "update-sed:sub", [5])
    assert sed._sed3_claim(_records(bad), cfg).verdict == "FAIL"


@pytest.mark.parametrize("bad", [dict(k=5, window=3), dict(multitask=["add"]), dict(interventions=[], multitask=[]),
                                 dict(k=0), dict(n_probe=0), dict(eps_rel=0), dict(eps_rel=1e-9), dict(snapshot_every=0),
                                 dict(task="foo"), dict(p=10), dict(n_heads=3), dict(d_model=1, n_heads=1)])
def test_bad_configs_are_config_errors_and_make_no_run_directory(tmp_path, bad):
    from specscope.errors import ConfigError
    from specscope.labs.runner import run_lab

    with pytest.raises(ConfigError):
        run_lab("sed", dict(TINY, **bad), out=tmp_path)
    assert not (tmp_path / "sed").exists()


def test_tiny_run_through_the_cli(monkeypatch, capsys, tmp_path):
    from specscope.cli import main

    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={','.join(v) if isinstance(v, list) else v}")]
    monkeypatch.setattr(sys, "argv", ["specscope", "run", "sed", *sets, "--out", str(tmp_path), "--quiet"])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    assert e.value.code in (0, None), out.out + out.err
    run_dir = next((tmp_path / "sed").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [c["id"] for c in summary["claims"]] == ["SED-1", "SED-2", "SED-3"]
    df = store.load(run_dir)
    assert set(df.arm) >= {"control-s0", "keep_random-s0", "keep_sed-s0", "multitask"}
    rbar = df[df.metric == "coupling_Rbar"]
    assert set(rbar[rbar.arm == "control-s0"].layer) == {"gradient-sed", "update-sed"}
    assert set(rbar[rbar.arm == "multitask"].layer) == {f"{s}:{t}" for t in ("add", "sub")
                                                         for s in ("update-sed", "gradient-sed", f"task-{t}-sed")}
    assert rbar["value"].map(math.isfinite).all() and (rbar["value"] > 0).all()
    # projection starts when the window is full: snapshots at 0, 2, 4 -> full after step 4
    proj = df[(df.arm == "keep_sed-s0") & (df.metric == "projected")]
    assert proj.step.min() == 4 and (proj.value == 1).all()
    for name in ("sed_coupling", "sed_interventions", "sed_multitask"):
        assert any(name in p.name for p in (run_dir / "figures").iterdir())

    # `specscope report` rebuilds the report from the records and leaves the run complete
    (run_dir / "report.html").unlink()
    monkeypatch.setattr(sys, "argv", ["specscope", "report", str(run_dir)])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None), capsys.readouterr().err
    assert (run_dir / "report.html").exists()
    assert store.Run.open(run_dir).status == "complete"
    assert json.loads((run_dir / "summary.json").read_text()) == summary


class _Interrupt:
    """Sends SIGINT to this process after update `at` (the loop checkpoints and stops)."""

    every = 1

    def __init__(self, at: int):
        self.at = at

    def after_step(self, step, model, optimizer):
        if step == self.at:
            import os
            import signal

            self.at = -1
            os.kill(os.getpid(), signal.SIGINT)
        return []


@pytest.mark.parametrize("arm,at", [("control-s0", 9), ("keep_sed-s0", 6), ("multitask", 11)])
def test_interrupted_run_resumes_to_the_same_metrics(tmp_path, monkeypatch, arm, at):
    """SED windows, the projection's subspace, the coupling baseline and the grok tracker survive a
    checkpoint: an interrupted and resumed run records what the straight run records."""
    from specscope.labs.runner import run_lab

    cfg = dict(TINY, steps=14, multitask_steps=14, stop_after_grok=False)
    straight = run_lab("sed", cfg, out=tmp_path / "straight")
    build = sed.build

    def build_with_interrupt(c, device):
        arms = build(c, device)
        next(a for a in arms if a.name == arm).callbacks.append(_Interrupt(at))
        return arms

    monkeypatch.setattr(sed, "build", build_with_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_lab("sed", cfg, out=tmp_path / "cut")
    monkeypatch.setattr(sed, "build", build)
    cut = next((tmp_path / "cut" / "sed").iterdir())
    assert store.Run.open(cut).status == "interrupted"
    resumed = run_lab("", resume=cut)
    assert store.Run.open(resumed).status == "complete"

    def metrics(run_dir):
        df = store.load(run_dir)
        df = df[~df.metric.isin({"time", "lab_seconds", "coupling_seconds"})].drop(columns=["run_id"])
        return df.sort_values(["arm", "metric", "layer", "step"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(metrics(straight), metrics(resumed))


@pytest.mark.parametrize("part", ["multitask only", "interventions only"])
def test_either_part_alone_completes_with_its_figures(tmp_path, part):
    """`interventions=[]` (no control arm, so no coupling curve) and `multitask=[]` each finish with a
    report: the claims whose data is missing are INCONCLUSIVE, the figures with no data are left out."""
    from specscope.labs.runner import run_lab

    cfg = dict(TINY, interventions=[]) if part == "multitask only" else dict(TINY, multitask=[])
    run_dir = run_lab("sed", cfg, out=tmp_path)
    assert store.Run.open(run_dir).status == "complete"
    verdicts = {c["id"]: c["verdict"] for c in json.loads((run_dir / "summary.json").read_text())["claims"]}
    figures = {name for name in ("sed_coupling", "sed_interventions", "sed_multitask")
               if any(name in p.name for p in (run_dir / "figures").iterdir())}
    assert (run_dir / "report.html").exists()
    if part == "multitask only":
        assert verdicts["SED-1"] == verdicts["SED-2"] == "INCONCLUSIVE" != verdicts["SED-3"]
        assert figures == {"sed_multitask"}
    else:
        assert verdicts["SED-3"] == "INCONCLUSIVE" != verdicts["SED-1"]
        sed3 = next(c for c in json.loads((run_dir / "summary.json").read_text())["claims"] if c["id"] == "SED-3")
        assert sed.MULTITASK_COMMAND in sed3["measured"]  # says how to run the multitask comparison
        assert figures == {"sed_coupling", "sed_interventions"}
