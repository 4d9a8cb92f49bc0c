"""`specscope demo --quick`: both labs, diagnose and one report; its tables are the labs' recorded numbers."""

from __future__ import annotations

import sys

import pytest

from specscope.cli.commands.demo import RF_QUICK, report_steps, rf_rows


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """Run `specscope demo --quick --out TMP` in-process once; returns (exit code, stdout, demo run dir)."""
    from specscope.cli import main

    out = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["specscope", "demo", "--quick", "--out", str(out)])
    mp.setenv("COLUMNS", "200")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit) as e:
        main()
    mp.undo()
    (run_dir,) = (out / "demo").iterdir()
    return e.value.code, buf.getvalue(), run_dir


def test_demo_prints_the_tables_and_writes_one_report(quick_demo):
    code, text, run_dir = quick_demo
    assert code in (0, None), text
    for word in ("nr(G) step 1", "predicted", "won", "t=4",  # the quadratic-check tables
                 "Sparse-function MLP", "SpecGD/GD",  # sparse-mlp
                 "blocks.0.mlp.down", "verdict",  # diagnose's per-weight table
                 "RF-1", "RF-3", "MLP-1a", "MLP-1c"):  # the claims table
        assert word in text, word
    page = run_dir / "report.html"
    assert str(page) in text.replace("\n", "")
    html = page.read_text()
    assert "MLP-1b" in html and "RF-2" in html and "<script" not in html and "data:image/png;base64" in html
    assert {p.parent.parent.name for p in run_dir.glob("*/*/report.html")} == {"random-features", "sparse-mlp"}


def test_quadratic_check_rows_are_the_lab_math(quick_demo):
    """The printed RF rows equal rf.descend on the same problem (same optimizers, float64)."""
    from specscope import store
    from specscope.data.synthetic import rf_regression
    from specscope.labs import random_features as rf

    _, _, run_dir = quick_demo
    (lab_dir,) = (run_dir / "random-features").iterdir()
    rows = rf_rows(store.load(lab_dir), ["relu", "swiglu"], RF_QUICK["steps"])
    assert [r.activation for r in rows] == ["relu", "swiglu"]
    cfg = rf.Config(**RF_QUICK)
    for r in rows:
        p = rf_regression(cfg.dim, cfg.width, cfg.samples, cfg.outputs, r.activation, cfg.seed)
        c = rf.constants(p.A)
        gd, spec = rf.descend(p, "gd", cfg.steps, c), rf.descend(p, "specgd", cfg.steps, c)
        assert r.st == pytest.approx(c.st, rel=1e-12)
        assert r.nr1 == pytest.approx(gd.nuclear_rank[1], rel=1e-9)
        assert r.gd == pytest.approx([v / gd.objective[0] for v in gd.objective], rel=1e-9)
        assert r.specgd == pytest.approx([v / spec.objective[0] for v in spec.objective], rel=1e-9)


def test_report_steps():
    assert report_steps(30) == [0, 1, 2, 5, 10, 20, 30]
    assert report_steps(1) == [0, 1]
