"""`specscope demo` at a tiny size: it runs, prints both tables, and its numbers are the lab's numbers."""

from __future__ import annotations

import subprocess
import sys

from specscope.cli.commands.demo import quadratic_check, report_steps
from specscope.data.synthetic import rf_regression
from specscope.labs import random_features as rf

TINY = dict(dim=16, width=128, samples=128, outputs=8, steps=3, seed=0)


def test_demo_cli_tiny():
    args = [sys.executable, "-m", "specscope", "demo"] + [f"--{k}={v}" for k, v in TINY.items()]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    for word in ("relu", "swiglu", "st(A)", "nr(G) step 1", "predicted", "won", "SpecGD", "t=3"):
        assert word in proc.stdout, word


def test_quadratic_check_uses_the_lab_math():
    (row,) = quadratic_check(["relu"], **TINY)
    p = rf_regression(TINY["dim"], TINY["width"], TINY["samples"], TINY["outputs"], "relu", 0)
    c = rf.constants(p.A)
    gd = rf.descend(p, "gd", TINY["steps"], c)
    assert row.st == c.st and row.nr1 == gd.nuclear_rank[1]
    assert row.gd[-1] == gd.objective[-1] / gd.objective[0]
    assert row.winner == ("spectral" if row.specgd[-1] < row.gd[-1] else "euclidean")


def test_report_steps():
    assert report_steps(30) == [0, 1, 2, 5, 10, 20, 30]
    assert report_steps(1) == [0, 1]
