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
    assert "MLP-1b" in html and "RF-2" in html and "data:image/png;base64" in html
    assert {p.parent.parent.name for p in run_dir.glob("*/*/report.html")} == {"random-features", "sparse-mlp"}


def test_quick_claims_are_not_decided(quick_demo):
    """Quick sizes are far below the claims' sizes: every claim reads "not decidable at quick size", in the
    console, the demo page, and each lab run's own page and summary; the measured figures stay."""
    import json

    _, text, run_dir = quick_demo
    assert "not decidable at quick size" in text
    pages = [run_dir / "report.html", *run_dir.glob("*/*/report.html")]
    for page in pages:
        html = page.read_text()
        assert '<td class="UNDECIDABLE">not decidable at quick size</td>' in html, page
        assert not any(f'<td class="{v}">' in html for v in ("PASS", "FAIL", "INCONCLUSIVE")), page
    for summary in run_dir.glob("*/*/summary.json"):
        claims = json.loads(summary.read_text())["claims"]
        assert claims and {c["verdict"] for c in claims} == {"UNDECIDABLE"} and all(c["measured"] for c in claims)


def test_demo_and_compare_pages_in_a_browser(quick_demo):
    """Headless Chromium (installed with apt-get when missing and running as root, as in CI): the demo page
    and a comparison of its two lab runs load nothing from the network, every image decodes, no console
    error, nothing overflows the window, the per-weight table searches and sorts. Screenshots go into the
    demo's run directory: report.png and compare/comparison.png."""
    from specscope import report, store
    from specscope.report.browser import check_page, chromium

    exe = chromium(install=True)
    if exe is None:
        pytest.skip("no chromium: install Debian's `chromium` package (apt-get install -y chromium, as root)")
    _, _, run_dir = quick_demo
    check = check_page(run_dir / "report.html", run_dir / "report.png", exe=exe)
    assert check.problems == [], check.problems
    assert len(check.images) >= 8 and check.tables and check.tables[0]["sorted"]
    runs = [store.Run.open(p.parent) for p in sorted(run_dir.glob("*/*/config.json"))]
    page = report.write_comparison(run_dir / "compare", {r.id: store.load(r) for r in runs},
                                   configs={r.id: r.config for r in runs}, labs={r.id: r.lab for r in runs})
    assert "random-features · " in page.read_text() and "sparse-mlp · " in page.read_text()
    check = check_page(page, run_dir / "compare" / "comparison.png", exe=exe)
    assert check.problems == [], check.problems
    assert (run_dir / "report.png").stat().st_size > 10_000


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


def test_lab_figures_fit_their_canvas(quick_demo):
    """The labs' own figures, in the project style: no text cut off, no overlapping tick labels."""
    from specscope import labs, store
    from specscope.labs.config import make_config
    from specscope.report.style import finish, layout_problems

    _, _, run_dir = quick_demo
    for config in sorted(run_dir.glob("*/*/config.json")):
        run = store.Run.open(config.parent)
        lab = labs.get(run.lab)
        figures = lab.figures(store.load(run), make_config(lab.Config, run.config, run.lab))
        assert figures, run.lab
        for name, fig in figures.items():
            assert layout_problems(finish(fig)) == [], (run.lab, name)


def test_report_rewrites_the_demo_page_from_its_runs(quick_demo):
    from typer.testing import CliRunner

    from specscope.cli import app

    *_, run_dir = quick_demo
    page = run_dir / "report.html"
    before = page.read_text()
    page.unlink()
    res = CliRunner().invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    after = page.read_text()
    for word in ("specscope demo", "RF-1", "MLP-1a"):
        assert word in after and word in before


def test_a_quick_demos_lab_run_keeps_undecidable_verdicts_through_report_and_is_found_by_lab_and_id(quick_demo, tmp_path):
    """`report sparse-mlp/<id>` (the README's lab/run_id form, for a run inside a demo) finds the lab run and
    rewrites its page and summary from its records; at quick size the verdicts stay UNDECIDABLE."""
    import json

    from typer.testing import CliRunner

    from specscope.cli import app

    *_, run_dir = quick_demo
    root = run_dir.parent.parent
    (inner,) = run_dir.glob("sparse-mlp/*/")
    summary = inner / "summary.json"
    summary.unlink()
    res = CliRunner().invoke(app, ["report", f"sparse-mlp/{inner.name}", "--root", str(root)])
    assert res.exit_code == 0, res.output
    claims = json.loads(summary.read_text())["claims"]
    assert claims and {c["verdict"] for c in claims} == {"UNDECIDABLE"}
    assert "(quick size)" in (inner / "report.html").read_text()
    out = tmp_path / "inner.csv"
    res = CliRunner().invoke(app, ["export", f"sparse-mlp/{inner.name}", "--root", str(root), "--out", str(out)])
    assert res.exit_code == 0 and out.stat().st_size > 0, res.output
    res = CliRunner().invoke(app, ["export", f"random-features/{inner.name}", "--root", str(root)])
    assert f"no run 'random-features/{inner.name}'" in str(res.exception)  # `specscope` exits 2 with it


def test_a_quick_demo_in_the_same_root_does_not_hide_a_decided_run_from_claims(quick_demo, tmp_path):
    """A lab run recorded PASS/FAIL, then a newer `demo --quick` written beside it: `claims` still shows the
    decided verdicts, and the quick run's UNDECIDABLE rows only under --all."""
    import json
    import shutil

    from typer.testing import CliRunner

    from specscope.cli import app
    from specscope.store.integrity import digest, write_json

    *_, run_dir = quick_demo
    root = tmp_path / "runs"
    shutil.copytree(run_dir, root / "demo" / run_dir.name)
    (quick,) = run_dir.glob("random-features/*/")
    ids = [c["id"] for c in json.loads((quick / "summary.json").read_text())["claims"]]
    decided = root / "random-features" / "20261101T000000Z-000000"
    decided.mkdir(parents=True)
    meta = json.loads((quick / "config.json").read_text())
    meta["config"] = {**meta["config"], "width": 4096}  # another setting: its own group
    meta["config_sha256"] = digest(meta["config"])
    meta.update(created="2026-11-01T00:00:00Z", run_id=decided.name)  # older than the demo
    meta.pop("progress")  # made by hand, without a database: not the lab runner's run, whose files claims checks
    meta.pop("fixed_sha256")  # (its creation keys are edited here: as a run made before they had a checksum)
    (decided / "config.json").write_text(json.dumps(meta))
    claims = [{"id": cid, "text": "t", "published": "p", "measured": "m", "verdict": v}
              for cid, v in zip(ids, ["PASS", "FAIL", "PASS", "FAIL"])]
    write_json(decided / "summary.json", {"lab": "random-features", "claims": claims}, checksum=True)
    res = CliRunner().invoke(app, ["claims", "--root", str(root), "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = {r["id"]: r for r in json.loads(res.output) if r["lab"] == "random-features"}
    assert {cid: rows[cid]["verdict"] for cid in ids} == {c["id"]: c["verdict"] for c in claims}
    assert {r["runs"][0] for r in rows.values()} == {decided.name}
    every = json.loads(CliRunner().invoke(app, ["claims", "--root", str(root), "--format", "json", "--all"]).output)
    assert sum(r["verdict"] == "UNDECIDABLE" and r["lab"] == "random-features" for r in every) == len(ids)


@pytest.mark.parametrize("seed", ["-1", str(2**63)])
def test_a_seed_out_of_range_is_one_line_before_any_run_directory(tmp_path, monkeypatch, capsys, seed):
    """A lab's config refused it only after the demo's run directory was made (left behind as a failed run), and
    named the lab's 'seed' key, not the --seed option."""
    from specscope.cli import main

    monkeypatch.setattr(sys, "argv", ["specscope", "demo", "--quick", "--seed", seed, "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == f"error: --seed {seed}: use an integer in [0, 2^63)"
    assert not any(tmp_path.iterdir())
