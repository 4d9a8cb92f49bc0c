"""Helpers of the lab tests: a tiny run through the real runner without the HTML report (seconds, not minutes),
and the verdicts of a lab's default run (the slow reproductions)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from specscope import store
from specscope.labs import run_lab, runner


def smoke(monkeypatch, tmp_path, lab: str, overrides: dict) -> tuple[dict, pd.DataFrame, list[str]]:
    """(claims by id, records, the names of the lab's figures); figures are built but not rendered."""
    figures: list[str] = []
    monkeypatch.setattr(runner.report, "write_report", lambda *a, **k: figures.extend(k["extra_figures"]))
    run_dir = run_lab(lab, overrides, out=tmp_path)
    claims = {c["id"]: c for c in json.loads((run_dir / "summary.json").read_text())["claims"]}
    df = store.load(run_dir)
    twice = df[df.duplicated(["arm", "layer", "metric", "step"], keep=False)]
    assert twice.empty, f"{lab}: a quantity recorded twice at one step:\n{twice.head(8)}"
    return claims, df, sorted(figures)


def verdicts(lab: str, tmp_path, overrides: dict | None = None) -> dict[str, str]:
    """The verdicts of the lab's default run (or of the run with `overrides`); the run goes to
    $SPECSCOPE_SLOW_ROOT when set (`make test-slow`: runs/slow, for `specscope claims`)."""
    run_dir = run_lab(lab, overrides or {}, out=Path(os.environ.get("SPECSCOPE_SLOW_ROOT") or tmp_path))
    return {c["id"]: c["verdict"] for c in json.loads((run_dir / "summary.json").read_text())["claims"]}


def seeded_records(finals: dict[str, list[float]], step: int, per_arm=lambda variant: []) -> pd.DataFrame:
    """Records of a multi-seed lab for its claim rules: arm `<variant>/s<seed>` ends at `step` with the given
    val_loss (and a unit time); `per_arm(variant)` adds that arm's own (step, layer, metric, value) rows."""
    rows = []
    for variant, vals in finals.items():
        for seed, v in enumerate(vals):
            arm = f"{variant}/s{seed}"
            rows += [dict(arm=arm, step=step, layer="", metric="val_loss", value=v),
                     dict(arm=arm, step=step, layer="", metric="time", value=1.0)]
            rows += [dict(arm=arm, step=s, layer=layer, metric=m, value=x) for s, layer, m, x in per_arm(variant)]
    return pd.DataFrame(rows)
