"""Paper-size reproductions (minutes each): `make test-slow` / `pytest -m slow`. Excluded from the default run.

Each runs a lab at its default size and asserts the verdicts this repository reports in the README."""

from __future__ import annotations

import json

import pytest

from specscope.labs import run_lab

pytestmark = pytest.mark.slow


def verdicts(run_dir) -> dict[str, str]:
    return {c["id"]: c["verdict"] for c in json.loads((run_dir / "summary.json").read_text())["claims"]}


def test_random_features_reproduces_rf_1_to_3(tmp_path):
    v = verdicts(run_lab("random-features", {}, out=tmp_path))
    assert v["RF-1"] == v["RF-2"] == v["RF-3"] == "PASS"


def test_grokking_paper_003_baseline_groks_within_4000_steps(tmp_path):
    v = verdicts(run_lab("grokking", {"arms": ["l2"], "stop_after_grok": True}, out=tmp_path))
    assert v["BASE-003"] == "PASS"


def test_gpt_muon_reaches_adamw_loss_in_fewer_steps(tmp_path):
    v = verdicts(run_lab("gpt", {}, out=tmp_path))
    assert v["GPT-2a"] == "PASS" and v["GPT-1c"] == "PASS"


def test_spiked_published_size_regimes(tmp_path):
    v = verdicts(run_lab("spiked", {}, out=tmp_path))
    assert v["SPK-1"] == "PASS"
