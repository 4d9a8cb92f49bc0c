"""Helpers of the lab tests: a tiny run through the real runner without the HTML report (seconds, not minutes),
and the verdicts of a lab's default run (the slow reproductions)."""

from __future__ import annotations

import json

import pandas as pd

from specscope import store
from specscope.labs import run_lab, runner


def smoke(monkeypatch, tmp_path, lab: str, overrides: dict) -> tuple[dict, pd.DataFrame, list[str]]:
    """(claims by id, records, the names of the lab's figures); figures are built but not rendered."""
    figures: list[str] = []
    monkeypatch.setattr(runner.report, "write_report", lambda *a, **k: figures.extend(k["extra_figures"]))
    run_dir = run_lab(lab, overrides, out=tmp_path)
    claims = {c["id"]: c for c in json.loads((run_dir / "summary.json").read_text())["claims"]}
    return claims, store.load(run_dir), sorted(figures)


def verdicts(lab: str, tmp_path) -> dict[str, str]:
    """The verdicts of the lab's default run."""
    run_dir = run_lab(lab, {}, out=tmp_path)
    return {c["id"]: c["verdict"] for c in json.loads((run_dir / "summary.json").read_text())["claims"]}
