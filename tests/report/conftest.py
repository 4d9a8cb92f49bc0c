"""Synthetic metrics in the store's long format: several layers and arms, NaNs, missing metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from specscope.records import Claim, Record

LAYERS = ["blocks.0.attn.q", "blocks.0.mlp.down", "blocks.1.attn.q", "blocks.1.mlp.down", "head"]


def synthetic_metrics(layers=LAYERS, arms=("gd", "specgd"), steps=range(0, 50, 5), seed=0,
                      run_id="run-1") -> pd.DataFrame:
    """Loss falls, st(A) drifts down, nr(G) varies per layer; a NaN st and a non-finite nr included."""
    rng = np.random.default_rng(seed)
    records = []
    for ai, arm in enumerate(arms):
        for step in steps:
            loss = 2.0 * np.exp(-0.05 * step * (1 + ai)) + 0.01
            records.append(Record(step, "", "loss", loss, arm=arm))
            records.append(Record(step, "", "val_loss", 1.1 * loss, arm=arm))
            records.append(Record(step, "", "test_acc", 1 - loss / 2.1, arm=arm))
            for li, layer in enumerate(layers):
                st = (2 + 3 * li) * (1 + 1 / (1 + step)) * rng.uniform(0.9, 1.1)
                nr = (1.5 + 4 * (len(layers) - li)) * rng.uniform(0.9, 1.1)
                records.append(Record(step, layer, "stable_rank", st, arm=arm, estimator="power",
                                      rows=256, shape="256x64"))
                records.append(Record(step, layer, "nuclear_rank", nr, arm=arm, estimator="gram"))
                records.append(Record(step, layer, "grad_fro_norm", rng.uniform(), arm=arm))
    df = pd.DataFrame([r.as_dict() for r in records])
    df.insert(0, "run_id", run_id)
    df.loc[(df["metric"] == "stable_rank") & (df["step"] == 10), "value"] = np.nan
    df.loc[(df["metric"] == "nuclear_rank") & (df["step"] == 20) & (df["layer"] == "head"), "value"] = np.inf
    return df


CLAIMS = [
    Claim("RF-1", "st(A) of ReLU features stays O(1) as width grows.", "st ≈ 2", "st = 2.3", "PASS"),
    Claim("RF-2", "nr(G) grows with dimension at step 1.", "nr ∝ d", "slope 0.4", "FAIL"),
    Claim("RF-3", "SpecGD beats GD on SwiGLU features & <b>bold</b> claims.", "2×", "n/a", "INCONCLUSIVE"),
]


@pytest.fixture
def metrics() -> pd.DataFrame:
    return synthetic_metrics()


@pytest.fixture
def claims() -> list[Claim]:
    return list(CLAIMS)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium for the browser tests: found, or installed with apt-get when running as root
    (as CI does); the tests skip, saying why, only when it is missing and cannot be installed."""
    from specscope.report.browser import chromium as find

    exe = find(install=True)
    if exe is None:
        pytest.skip("no chromium: install Debian's `chromium` package (apt-get install -y chromium, as root)")
    return exe
