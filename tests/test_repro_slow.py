"""Paper-size reproductions over three seeds (tens of minutes each): `make test-slow` / `pytest -m slow`.

Each test runs a lab at its default size (or the named published setting) for seeds 0, 1, 2 and asserts the
verdict most seeds reach, as `specscope claims` reports it (mean and range of each rule's figure over the
seeds). Runs go to $SPECSCOPE_SLOW_ROOT when set (`make test-slow` sets runs/slow, so
`specscope claims --root runs/slow` tabulates them afterwards), else to a temporary directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from specscope.labs import run_lab
from specscope.records import Claim, over_seeds

pytestmark = [pytest.mark.slow, pytest.mark.timeout(4 * 3600)]  # three default-size runs each: past pyproject's 600 s

SEEDS = (0, 1, 2)


@pytest.fixture
def root(tmp_path) -> Path:
    return Path(os.environ.get("SPECSCOPE_SLOW_ROOT") or tmp_path)


def runs_over_seeds(lab: str, overrides: dict, root: Path) -> list[Path]:
    """Run `lab` once per seed; the run directories in seed order."""
    return [run_lab(lab, {**overrides, "seed": seed}, out=root) for seed in SEEDS]


def claims_over_seeds(lab: str, overrides: dict, root: Path, runs: list[Path] | None = None) -> dict[str, Claim]:
    """Each claim of `lab`'s per-seed runs combined over the seeds (records.over_seeds)."""
    per_seed: dict[str, list[Claim]] = {}
    for run_dir in runs or runs_over_seeds(lab, overrides, root):
        for c in json.loads((run_dir / "summary.json").read_text())["claims"]:
            per_seed.setdefault(c["id"], []).append(Claim(**c))
    return {cid: over_seeds(cs, SEEDS) for cid, cs in per_seed.items()}


def test_random_features_reproduces_rf_1_to_3(root):
    v = claims_over_seeds("random-features", {}, root)
    assert [v[k].verdict for k in ("RF-1", "RF-2", "RF-3")] == ["PASS"] * 3


def test_sparse_mlp_low_stable_rank_and_specgd_ahead_on_relu(root):
    v = claims_over_seeds("sparse-mlp", {}, root)
    assert v["MLP-1a"].verdict == v["MLP-1b"].verdict == "PASS"


def test_grokking_paper_003_baseline_groks_within_4000_steps(root):
    paper_003 = {"model": "enc003", "weight_decay": 1.0, "arms": ["l2"], "steps": 5000, "stop_after_grok": True}
    v = claims_over_seeds("grokking", paper_003, root)
    assert v["BASE-003"].verdict == "PASS" and v["BASE-003"].seeds == 3


def test_grokking_default_lrd_collapses_qk_rank_where_l2_does_not(root):
    """The lab's default (tf004, AdamW wd 0.1, LRD lr·λ = 5e-3 on W_Q, W_K): docs/lab-grokking.md. The rank
    half of LRD-1 (post-memorization median Q/K stable rank ≈ 2.6 for both LRD variants vs ≈ 27.6 for L2 at
    700 steps, seed 0) and the scale-free "keeps compressing" half: PASS in seeds 0, 1, FAIL in seed 2 (plain
    LRD's spectrum swings back up at the lr·λ floor), so PASS over the three seeds."""
    v = claims_over_seeds("grokking", {}, root)
    assert v["LRD-1"].verdict == "PASS" and v["LRD-1"].value < 0.2


@pytest.mark.timeout(6 * 3600)  # 9 points × two arms of ≈ 5 min on one core each, two workers
def test_grokking_lrd2_boundary_over_three_seeds(root):
    """LRD-2 (docs/lab-grokking.md): each arm at the strength that grokked on the one-seed 0.4–0.5 grid (AdamW
    decay 1 for L2, LRD λ 10), train fractions 0.2, 0.3, 0.4, seeds 0, 1, 2; the sweep's claim."""
    from specscope import sweep

    d = sweep.run_sweep("grokking", {"train_fraction": [0.2, 0.3, 0.4], "seed": list(SEEDS)},
                        {"arms": ["l2", "lrd"], "strength_grid": {"l2": [1], "lrd": [10]}},
                        out=root / "sweeps", workers=2, echo=lambda *_: None)
    (lrd2,) = [Claim(**c) for c in json.loads((d / "claims.json").read_text()) if c["id"] == "LRD-2"]
    assert lrd2.seeds == 3 and lrd2.verdict == LRD2_MEASURED


LRD2_MEASURED = "FAIL"  # docs/lab-grokking.md: both stable boundaries at 0.4; L2 reaches 0.98 at 0.3, LRD does not


def test_gpt_muon_reaches_adamw_loss_in_fewer_steps(root):
    v = claims_over_seeds("gpt", {}, root)
    assert v["GPT-2a"].verdict == "PASS" and v["GPT-1c"].verdict == "PASS"


def test_spiked_published_size_regimes(root):
    v = claims_over_seeds("spiked", {}, root)
    assert v["SPK-1"].verdict == "PASS"


@pytest.mark.timeout(4 * 3600)  # 73 min with one thread: ≈ 30 min of interventions, 3 × ≈ 14 min of multitask
def test_sed_reproduces_the_parts_of_sed_1_to_3_that_hold_here(root):
    """docs/lab-sed.md: gradient SED in the published range; over three seeds keeping a 3-D subspace speeds
    grokking and removing it does not; the per-task gradient SED of the multitask model couples ≥ 10× in every
    seed, and most seeds reach 0.98 within 12,000 steps (seed 0 stably at 10,450, seed 1 first at 11,500,
    seed 2 at most 0.953).
    SED-1 is measured on each seed's control arm (coupling_seeds), SED-3 on one multitask run per seed."""
    from specscope import store
    from specscope.labs import sed

    over = {"seeds": len(SEEDS), "coupling_seeds": len(SEEDS)}
    run_dir = run_lab("sed", over, out=root)
    cfg, df = sed.Config(**over), store.load(run_dir)
    assert all(sed.peak_rbar(df, f"control-s{s}", sed.GRADIENT) >= 30 for s in range(len(SEEDS)))
    sed1 = sed._sed1_claim(df, cfg)
    assert sed1.verdict == "PASS" and sed1.seeds == 3
    table = sed.intervention_table(df, cfg)
    speed = table.groupby("intervention")["speedup_stable"].mean()
    assert speed["keep_sed"] >= 1.2 and speed["keep_random"] >= 1.2
    assert 0.8 <= speed["remove_sed"] <= 1.25 and 0.8 <= speed["remove_random"] <= 1.25
    assert sed._sed2_claim(table, cfg).seeds == 3
    multitask = {"interventions": [], "multitask": ["add", "sub", "mul", "sum_sq"]}  # sed.MULTITASK_COMMAND
    mt_runs = runs_over_seeds("sed", multitask, root)
    sed3 = claims_over_seeds("sed", multitask, root, mt_runs)["SED-3"]
    assert sed3.seeds == 3 and "verdicts" in sed3.spread
    reached = 0
    for seed, mt_run in zip(SEEDS, mt_runs):  # every seed's per-task gradient SED couples; most reach 0.98
        mt_cfg, mt_df = sed.Config(**multitask, seed=seed), store.load(mt_run)
        assert (sed.multitask_table(mt_df, mt_cfg)["task-sed"] >= 10).all()
        reached += mt_df[(mt_df.arm == "multitask") & (mt_df.metric == "grok_first")]["value"].notna().any()
    assert reached >= 2
