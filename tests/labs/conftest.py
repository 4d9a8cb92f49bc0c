"""Run a lab at a tiny size through the real runner, without rendering the HTML report (seconds, not minutes)."""

from __future__ import annotations

import json

import pandas as pd

import pytest

from specscope import store
from specscope.labs import run_lab, runner


@pytest.fixture
def smoke(monkeypatch, tmp_path):
    """smoke(lab, overrides) -> (claims by id, records, the names of the lab's figures)."""

    def run(lab: str, overrides: dict) -> tuple[dict, pd.DataFrame, list[str]]:
        return _smoke(monkeypatch, tmp_path, lab, overrides)

    return run


def _smoke(monkeypatch, tmp_path, lab: str, overrides: dict) -> tuple[dict, pd.DataFrame, list[str]]:
    figures: list[str] = []
    monkeypatch.setattr(runner.report, "write_report", lambda *a, **k: figures.extend(k["extra_figures"]))
    run_dir = run_lab(lab, overrides, out=tmp_path)
    claims = {c["id"]: c for c in json.loads((run_dir / "summary.json").read_text())["claims"]}
    return claims, store.load(run_dir), sorted(figures)


def measured_verdicts(lab: str, tmp_path) -> dict[str, str]:
    """The verdicts of the lab's default run (the slow reproductions compare them with the documented ones)."""
    run_dir = run_lab(lab, {}, out=tmp_path)
    return {c["id"]: c["verdict"] for c in json.loads((run_dir / "summary.json").read_text())["claims"]}


@pytest.fixture
def verdicts(tmp_path):
    return lambda lab: measured_verdicts(lab, tmp_path)
