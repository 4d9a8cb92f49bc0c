"""Reports in a real browser (headless Chromium): every image decodes, nothing is requested beyond the
page and its data: images, no console error, no horizontal overflow, the per-weight table searches and
sorts. A screenshot of each page is written beside it."""

from __future__ import annotations

import pandas as pd

from specscope.report import write_comparison, write_report
from specscope.report.browser import check_page

from conftest import CLAIMS, synthetic_metrics

DPI = 40


def deep_model_metrics() -> pd.DataFrame:
    """A 100-weight model with two weights the probe could not pair and hostile names."""
    layers = [f"model.layers.{i}.{n}" for i in range(24) for n in ("q_proj", "k_proj", "v_proj", "down_proj")]
    layers += ["<script>alert(1)</script>", "lm_head", "embed_tokens", "norm.weight"]
    df = synthetic_metrics(layers=layers, arms=("",), steps=range(0, 6, 2))
    missing = pd.DataFrame([{"run_id": "run-1", "step": 0, "layer": f"model.layers.{i}.attn.c_attn",
                             "metric": "unmeasured", "value": 1.0, "shape": "64x192",
                             "flag": "Conv1D: input not seen"} for i in range(2)])
    return pd.concat([df, missing], ignore_index=True)


def test_report_of_a_deep_model_in_a_browser(tmp_path, chromium):
    page = write_report(tmp_path, deep_model_metrics(), claims=CLAIMS, config={"lr": 0.1}, title="deep", dpi=DPI)
    check = check_page(page, tmp_path / "report.png", exe=chromium)
    assert check.problems == [], check.problems
    assert len(check.images) >= 5 and all(i["width"] > 0 for i in check.images)
    (weights,) = check.tables
    assert weights["rows"] == 102 and weights["sorted"] and 1 <= weights["hits"] < 102
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparison_in_a_browser(tmp_path, chromium):
    layers = [f"transformer.h.{i}.attn.c_proj" for i in range(12)]
    runs = {"20261201T000000Z-aaaaaa": synthetic_metrics(layers=layers, seed=1, arms=("adamw", "muon")),
            "20261201T000100Z-bbbbbb": synthetic_metrics(layers=layers, seed=2, arms=("adamw", "muon"))}
    configs = {k: {"lr": lr, "width": 64} for k, lr in zip(runs, (0.001, 0.01))}
    page = write_comparison(tmp_path, runs, configs=configs, labs=dict.fromkeys(runs, "gpt"), dpi=DPI)
    check = check_page(page, tmp_path / "comparison.png", exe=chromium)
    assert check.problems == [], check.problems
    assert "lr=0.001 · muon" in page.read_text()
    assert check.tables and check.tables[0]["rows"] == 12 and check.tables[0]["sorted"]


def test_a_verdict_is_never_broken_inside_the_word_on_a_narrow_screen(tmp_path, chromium):
    """At a phone's width the claims table's cells wrap (`overflow-wrap: anywhere`, for long layer names), and
    INCONCLUSIVE was set as INCONCL / USIVE."""
    page = write_report(tmp_path, synthetic_metrics(), claims=CLAIMS, config={"lr": 0.1}, title="narrow", dpi=DPI)
    assert "INCONCLUSIVE" in {c.verdict for c in CLAIMS}
    check = check_page(page, exe=chromium, width=360)
    assert not check.split_verdicts, check.split_verdicts
    assert not [p for p in check.problems if "verdict" in p]


def test_a_labs_measured_table_sorts_and_a_phone_scrolls_its_claims(tmp_path, chromium):
    """The Measured table said "Click a column to sort." and did not (the page's script sorted .weights tables only);
    at 390 px the claims table pushed a lab report 60 px past the window."""
    measured = [{"arm": a, "final_test_acc": v} for a, v in (("l2", 0.4918), ("lrd", 0.09836), ("lrd_prox", 0.1475))]
    page = write_report(tmp_path, synthetic_metrics(), claims=CLAIMS, measured=measured, title="lab", dpi=DPI)
    for width in (1280, 390):
        check = check_page(page, exe=chromium, width=width)
        assert check.problems == [], (width, check.problems)
        sortable = [t for t in check.tables if t.get("column")]
        assert sortable and all(t["sorted"] for t in sortable), check.tables


def test_the_check_sees_what_a_reader_would(tmp_path, chromium):
    """A broken image, a script error and a request leaving the page are each reported."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><img alt="broken" src="data:image/png;base64,AAAA">'
                    '<img alt="remote" src="http://127.0.0.1:9/x.png"><div style="width:5000px">wide</div>'
                    "<script>undefinedFunction()</script></body></html>")
    problems = " | ".join(check_page(page, exe=chromium).problems)
    assert "image 'broken' does not decode" in problems
    assert "request to http://127.0.0.1:9/x.png" in problems
    assert "undefinedFunction" in problems and "wider than the window" in problems


def test_parallel_installs_of_chromium_take_turns(tmp_path, monkeypatch):
    """Two test workers finding no browser at once (CI as root on a fresh machine) ran apt-get side by side: the
    second failed on dpkg's lock and its tests skipped. The installs now take turns, and the second finds the first's."""
    import os
    import subprocess
    import tempfile
    import threading
    import time

    from specscope.report import browser

    installed, running, most, runs = [], [0], [0], []
    lock = threading.Lock()

    def fake_run(cmd, **kw):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            runs.append(cmd[1])
        time.sleep(0.2)  # an apt-get's time: long enough for the other thread to come in
        with lock:
            running[0] -= 1
            if cmd[1] == "install":
                installed.append(True)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(browser.shutil, "which", lambda name: "/usr/bin/apt-get" if name == "apt-get"
                        else "/usr/bin/chromium" if installed and name == "chromium" else None)
    monkeypatch.setattr(browser.subprocess, "run", fake_run)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    found = []
    threads = [threading.Thread(target=lambda: found.append(browser.chromium(install=True))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found == ["/usr/bin/chromium"] * 2 and most[0] == 1 and runs == ["install"]


def test_a_comparison_of_copies_of_one_run_in_other_folders_fits_the_window(tmp_path, chromium):
    """Runs named by their paths (copies of one run in three folders): the configuration table squeezed its key column
    into fragments and pushed the last run's column 1027 px past the window; the figures' legends gave the three runs
    one label."""
    from specscope.report.compare import legend_names, run_labels

    names = [f"backup_copy_number_{i}/gpt/20261201T000000Z-aaaaaa" for i in (2, 3, 4)]
    runs = {n: synthetic_metrics(seed=i, arms=("",)) for i, n in enumerate(names)}
    configs = {n: {"d_model": 32, "corpus": "stdlib", "device": "cpu", "lr": 0.001} for n in names}
    page = write_comparison(tmp_path, runs, configs=configs, labs=dict.fromkeys(runs, "gpt"), dpi=DPI)
    check = check_page(page, exe=chromium)
    assert check.problems == [], check.problems
    legends = legend_names(run_labels(names, configs, dict.fromkeys(names, "gpt")))
    assert len(set(legends.values())) == 3 and all(len(v) <= 44 for v in legends.values())


def test_a_measured_column_with_infinities_sorts_them_as_the_largest_and_smallest(tmp_path, chromium):
    """A diverged arm's loss prints "inf": the page's sort read it as text, after every number in both directions."""
    measured = [{"arm": a, "final_loss": v} for a, v in (("a", 0.5), ("b", float("inf")), ("c", 2.0), ("d", float("-inf")))]
    page = write_report(tmp_path, synthetic_metrics(), measured=measured, title="diverged", dpi=DPI)
    check = check_page(page, exe=chromium)
    sortable = [t for t in check.tables if t.get("column") == "final_loss"]
    assert sortable and sortable[0]["sorted"], check.tables
