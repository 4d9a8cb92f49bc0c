"""Reports from synthetic long-format metrics: files written, valid PNGs, self-contained and escaped HTML,
one verdict rule, unmeasured weights listed, figures that fit their canvas."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import matplotlib.text
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from rich.console import Console

from specscope.records import Claim
from specscope.report import (
    advantage_heatmap, claims_table, layer_summary, layer_table, loss_curves, rank_curves, rank_pairs,
    rank_scatter, run_figures, write_comparison, write_report,
)
from specscope.report.html import CSP, SCRIPT

from conftest import LAYERS, synthetic_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DPI = 30  # tiny images keep the folder fast


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 50 and height > 50, (path, width, height)


def assert_self_contained(text: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert not re.search(r"https?://", text)
    # the one script is the page's own, allowed by hash; nothing else may run or load
    assert text.lower().count("<script") == 1 and f"<script>{SCRIPT}</script>" in text
    assert f'http-equiv="Content-Security-Policy" content="{CSP}"' in text and "default-src 'none'" in CSP
    assert "@import" not in text and "url(" not in text


def render(table) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(table)
    return console.export_text()


def test_report_writes_html_and_valid_pngs(tmp_path, metrics, claims):
    path = write_report(tmp_path / "out", metrics, config={"lr": 0.1, "optim": {"name": "specgd"}},
                        claims=claims, title="Synthetic run", dpi=DPI)
    assert path == tmp_path / "out" / "report.html"
    text = path.read_text(encoding="utf-8")
    pngs = sorted((tmp_path / "out" / "figures").glob("*.png"))
    names = {p.stem for p in pngs}
    assert names == {"loss", "accuracy", "stable_rank", "nuclear_rank", "advantage_heatmap", "nr_vs_st", "claims"}
    for p in pngs:
        assert_png(p)
    # every figure except the claims image is embedded, as a data URI
    assert text.count('src="data:image/png;base64,') == len(pngs) - 1
    assert_self_contained(text)
    for c in claims:
        assert f'<td class="{c.verdict}">{c.verdict}</td>' in text
    assert '<div class="weights">' in text and "<button" in text  # searchable, sortable per-weight table
    assert "optim.name" in text and "specgd" in text
    for layer in LAYERS:
        assert layer in text


def test_report_escapes_every_foreign_string(tmp_path):
    evil = "<script>alert(1)</script>"
    math = r"a$\frac{$"  # not valid mathtext: drawn as typed, never parsed
    df = synthetic_metrics(layers=[evil, "ok.layer", math], arms=(f'arm"{evil}', f"{math}"), steps=range(3))
    claim = Claim(evil, f"text {evil}", "<img src=x onerror=alert(1)>", "a & b", "PASS")
    fig = Figure()
    fig.subplots().plot([0, 1])
    config = {evil: 'say "hi" & <b>bye</b>', "nested": {"k": f"'{evil}'"}, "path": "../../etc/passwd"}
    path = write_report(tmp_path, df, config=config, claims=[claim], title=f"Title {evil}",
                        summary={"note": evil}, extra_figures={f"../{evil}": fig}, dpi=DPI)
    text = path.read_text(encoding="utf-8")
    assert_self_contained(text)
    assert "<img src=x" not in text and "<b>bye" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "say &quot;hi&quot; &amp; &lt;b&gt;bye&lt;/b&gt;" in text
    # the lab figure's file name cannot leave figures/ or carry markup
    lab = [p for p in (tmp_path / "figures").iterdir() if p.name.startswith("lab_")]
    assert len(lab) == 1 and re.fullmatch(r"lab_[A-Za-z0-9_.-]+\.png", lab[0].name)
    assert_png(lab[0])


def test_missing_metrics_give_none_not_errors(tmp_path):
    only_loss = synthetic_metrics()
    only_loss = only_loss[only_loss["metric"].isin(["loss"])]
    assert loss_curves(only_loss) is not None
    for make in (advantage_heatmap, rank_scatter, lambda d: rank_curves(d, "stable_rank")):
        assert make(only_loss) is None
    assert run_figures(only_loss).keys() == {"loss"}
    empty = pd.DataFrame(columns=["run_id", "step", "layer", "metric", "value"])
    assert run_figures(empty) == {}
    path = write_report(tmp_path, empty, config=None, claims=[], title="empty", dpi=DPI)
    assert "No metrics to plot" in path.read_text() and list((tmp_path / "figures").iterdir()) == []


def test_frames_without_optional_columns_or_with_all_nan(tmp_path):
    df = synthetic_metrics(arms=("",))[["step", "layer", "metric", "value"]]  # no arm, run_id, ...
    assert set(run_figures(df, dpi=DPI)) >= {"loss", "stable_rank", "advantage_heatmap", "nr_vs_st"}
    nan = synthetic_metrics().assign(value=np.nan)
    assert run_figures(nan) == {}
    assert layer_summary(nan).empty
    write_report(tmp_path, nan, config={}, claims=[], title="all NaN", dpi=DPI)


def test_ratio_uses_recorded_advantage_else_nr_over_st():
    df = pd.DataFrame({"step": [0, 0, 1, 1, 1], "layer": ["w"] * 5, "arm": [""] * 5,
                       "metric": ["stable_rank", "nuclear_rank", "stable_rank", "nuclear_rank",
                                  "spectral_advantage"],
                       "value": [4.0, 2.0, 4.0, 2.0, 0.7]})
    pairs = rank_pairs(df)
    assert pairs["ratio"].tolist() == [0.5, 0.7]  # step 0 computed nr/st, step 1 the recorded value
    summary = layer_summary(df).iloc[0]
    assert summary["verdict"] == "euclidean" and summary["ratio_median"] == pytest.approx(0.6)


def test_layer_summary_values_and_nan_handling(metrics):
    summary = layer_summary(metrics)
    assert len(summary) == len(LAYERS) * 2
    head = summary[(summary["layer"] == "head") & (summary["arm"] == "gd")].iloc[0]
    rows = metrics[(metrics["layer"] == "head") & (metrics["arm"] == "gd") & (metrics["metric"] == "stable_rank")]
    finite = rows["value"][np.isfinite(rows["value"])]
    assert head["st_median"] == pytest.approx(finite.median())
    assert head["st_last"] == pytest.approx(rows[rows["step"] == rows["step"].max()]["value"].iloc[0])
    # the synthetic model makes early layers spectral (nr >> st) and the head Euclidean
    first = summary[summary["layer"] == LAYERS[0]]
    assert set(first["verdict"]) == {"spectral"} and head["verdict"] == "euclidean"


def test_many_layers_are_grouped_by_type():
    layers = [f"blocks.{i}.{n}" for i in range(6) for n in ("attn.q", "mlp.down")]
    fig = rank_curves(synthetic_metrics(layers=layers, steps=range(0, 10, 2)), "nuclear_rank", dpi=DPI)
    titles = {ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()}
    assert titles == {"blocks.*.attn.q (6 weights)", "blocks.*.mlp.down (6 weights)"}


def test_heatmap_is_centred_and_shows_unmeasured_cells(metrics):
    fig = advantage_heatmap(metrics, dpi=DPI)
    image = fig.axes[0].images[0]
    lo, hi = image.norm.vmin, image.norm.vmax
    assert lo == pytest.approx(-hi) and hi > 0
    grid = image.get_array()
    assert grid.shape == (len(LAYERS), metrics["step"].nunique())
    assert grid.mask[:, 2].all()  # step 10: st is NaN for every weight -> grey column, not dropped


def test_rich_tables(metrics, claims):
    text = render(claims_table(claims))
    for c in claims:
        assert c.id in text and c.verdict in text
    assert "<b>bold</b>" in text  # shown as written, never parsed as markup
    text = render(layer_table(metrics))
    assert "blocks.1.mlp.down" in text and "spectral" in text and "euclidean" in text
    assert "not decidable at quick size" in render(claims_table([Claim("X", "t", "p", "m", "UNDECIDABLE")]))
    as_dicts = [dataclasses.asdict(c) for c in claims]  # a run's summary.json holds them so; write_report takes both
    assert render(claims_table(as_dicts)) == render(claims_table(claims))
    advice = pd.DataFrame({"layer": ["[red]x[/red]", "y"], "spectral_advantage": [2.0, np.nan],
                           "geometry": ["spectral", "euclidean"]})
    text = render(layer_table(advice))
    assert "[red]x[/red]" in text and "—" in text


def test_a_per_weight_table_on_a_narrow_console_leaves_columns_out_and_keeps_every_verdict():
    """Monitor.advice()'s ten columns beside long layer names: at 80 columns kind, shape, verdict and estimator
    were squeezed to nothing (the verdict, the point of the table, unreadable)."""
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    advice = pd.DataFrame({"layer": names, "kind": "linear", "shape": "32x32", "rows": 64, "stable_rank": 8.5,
                           "nuclear_rank": [15.0, 9.0, 7.0], "spectral_advantage": [1.76, 1.06, 0.82],
                           "measurements": 3, "verdict": ["spectral", "undecided", "euclidean"], "estimator": "gram"})
    for width in (80, 50):  # at 50 even the name and nr/st alone do not fit: names fold over lines
        console = Console(width=width, record=True, color_system=None, file=io.StringIO())
        console.print(layer_table(advice))
        text = console.export_text()
        rows = [line for line in text.splitlines() if line.startswith("│")]
        assert max(map(len, text.splitlines())) <= width
        for v, ratio in zip(advice["verdict"], ["1.76", "1.06", "0.82"]):
            assert any(f" {v} " in r and ratio in r for r in rows), (width, text)
        assert len(rows) == (3 if width == 80 else 6), text
        assert all(n in "".join(r.split("│")[1].strip() for r in rows) for n in names), text  # whole, if folded
        assert "not shown at this width:" in text and "estimator" in text.split("not shown")[1]
    text = render(layer_table(advice))  # wide enough: every column, no caption
    assert all(col in text for col in advice.columns) and "not shown" not in text


def test_a_claim_over_seeds_says_how_many_seeds_its_range_covers():
    """A seed the claim's rule does not apply to (no value) is left out of the mean and range, which say so: the
    range of one seed's value read as a spread over all of them."""
    from specscope.records import over_seeds

    claims = [Claim("C", "t", "p", "m", "PASS", value=0.282), Claim("C", "t", "p", "m", "FAIL", value=None),
              Claim("C", "t", "p", "m", "PASS", value=0.3)]
    assert over_seeds(claims[:2]).spread == "0.282 [0.282–0.282] over 1 of 2 seeds; verdicts PASS, FAIL"
    assert over_seeds([claims[0], claims[2]]).spread == "0.291 [0.282–0.3]; verdicts PASS, PASS"
    assert over_seeds([claims[1]] * 2).spread == "verdicts FAIL, FAIL"
    assert over_seeds(claims).value == 0.291 and over_seeds(claims).seeds == 3


def test_a_claim_over_seeds_names_the_seeds_in_its_setting():
    """sed's setting says "seeds a..b" (the seeds one run covers): two runs at seeds 0 and 1 read "seeds 0..0"."""
    from specscope.records import over_seeds

    def claim(setting):
        return Claim("SED-1", "t", "p", "m", "PASS", setting=setting, value=1.0)

    assert over_seeds([claim("add; seeds 0..0"), claim("add; seeds 1..1")], seeds=[0, 1]).setting == "add; seeds 0, 1"
    assert over_seeds([claim("add; seeds 0..2"), claim("add; seeds 3..5")], seeds=[0, 3]).setting == "add; seeds 0..2, 3..5"
    assert over_seeds([claim("gpt; seed 0"), claim("gpt; seed 3")], seeds=[0, 3]).setting == "gpt; seeds 0, 3"


def test_comparison(tmp_path):
    runs = {"run-a": synthetic_metrics(seed=1),
            'run-"b"<script>': synthetic_metrics(seed=2, arms=("adamw",), layers=LAYERS[:3])}
    configs = {"run-a": {"lr": 0.1, "width": 64}, 'run-"b"<script>': {"lr": 0.2, "width": 64}}
    path = write_comparison(tmp_path, runs, configs=configs, title="A vs B", dpi=DPI)
    text = path.read_text(encoding="utf-8")
    assert path.name == "comparison.html"
    assert_self_contained(text)
    pngs = sorted((tmp_path / "figures").glob("*.png"))
    assert {p.stem for p in pngs} == {"compare_loss", "compare_final_ranks"}
    for p in pngs:
        assert_png(p)
    assert text.count("data:image/png;base64,") == 2
    assert '<tr class="differs"><td>lr</td>' in text and "<tr><td>width</td>" in text
    # named by the setting that differs, the id appended where labels would collide
    assert "lr=0.1 · gd" in text and "lr=0.2 · adamw" in text
    # wide: one row per weight, four columns (st, nr, nr/st, verdict) per run/arm
    assert text.count("<td>blocks.0.attn.q</td>") == 1
    assert text.count('<th colspan="4">') == 3 and "<td>head</td>" in text


def test_sweep_records_stay_out_of_steps_weights_and_the_comparison(tmp_path):
    """A lab's sweep stores a width in `step` (flag "sweep"): it is no training step and its activation no weight."""
    train = synthetic_metrics(arms=("gd",), steps=range(0, 15, 5))
    sweep = pd.DataFrame([{"run_id": "run-1", "step": w, "layer": "relu", "metric": "stable_rank", "value": 3.1,
                           "arm": "", "shape": f"64x{w}", "flag": "sweep"} for w in (128, 512, 2048)])
    df = pd.concat([train, sweep], ignore_index=True)
    text = write_report(tmp_path / "r", df, claims=[], dpi=DPI).read_text()
    assert "<td>steps</td><td>0 – 10</td>" in text and "<td>sweep records</td><td>3 (" in text
    assert "<td>relu</td>" not in text
    text = write_comparison(tmp_path / "c", {"a": df, "b": train}, dpi=DPI).read_text()
    assert "(+3 sweep)" in text and "<td>relu</td>" not in text


def test_heatmap_of_many_arms_of_one_weight_is_one_panel():
    """Twelve random-features arms of one weight were twelve one-row panels side by side; now one panel with a
    row per arm. Two arms of many weights keep a panel each."""
    arms = tuple(f"{act}/{m}" for act in ("relu", "swiglu", "gelu", "tanh") for m in ("gd", "specgd", "auto"))
    fig = advantage_heatmap(synthetic_metrics(layers=("W",), arms=arms, steps=range(0, 30)), dpi=DPI)
    (panel,) = [ax for ax in fig.axes if ax.images]
    assert panel.images[0].get_array().shape == (12, 30)
    assert {t.get_text() for t in panel.get_yticklabels()} == {f"{a} · W" for a in arms}
    fig = advantage_heatmap(synthetic_metrics(arms=("gd", "specgd")), dpi=DPI)
    assert len([ax for ax in fig.axes if ax.images]) == 2


def unmeasured_records(layers=("blocks.0.attn.c_attn", "blocks.1.attn.c_attn")) -> pd.DataFrame:
    return pd.DataFrame([{"run_id": "run-1", "step": 0, "layer": name, "metric": "unmeasured", "value": 1.0,
                          "arm": "gd", "shape": "64x192", "flag": "no input seen <b>"} for name in layers])


def test_unmeasured_weights_are_listed_never_absent(tmp_path):
    metrics = synthetic_metrics(arms=("gd",), steps=range(0, 15, 5))
    df = pd.concat([metrics, unmeasured_records()], ignore_index=True)
    summary = layer_summary(df)
    rows = summary[summary["verdict"] == "unmeasured"]
    assert sorted(rows["layer"]) == ["blocks.0.attn.c_attn", "blocks.1.attn.c_attn"]
    assert (rows["shape"] == "64x192").all() and rows["st_median"].isna().all()
    text = write_report(tmp_path, df, claims=[], dpi=DPI).read_text()
    assert "Weights not measured (2)" in text and "no input seen &lt;b&gt;" in text
    assert text.count('<td class="unmeasured">unmeasured</td>') == 2
    grid = advantage_heatmap(df, dpi=DPI).axes[0].images[0].get_array()
    assert grid.shape[0] == len(LAYERS) + 2  # the unmeasured weights are rows of the heatmap too
    text = write_comparison(tmp_path / "c", {"a": df, "b": metrics}, dpi=DPI).read_text()
    assert text.count('<td class="unmeasured">unmeasured</td>') == 2  # in run a only


def test_one_verdict_rule_in_report_and_compare(tmp_path):
    """nr/st = 0.903 is inside the 0.25 margin: "undecided" everywhere, as in advice()."""
    from specscope.probe.advice import MARGIN, verdict

    df = pd.DataFrame({"step": [0, 0], "layer": ["w", "w"], "metric": ["stable_rank", "nuclear_rank"],
                       "value": [10.0, 9.03]})
    assert MARGIN == 0.25 and verdict(0.903) == "undecided"
    assert layer_summary(df)["verdict"].tolist() == ["undecided"]
    assert '<td class="undecided">undecided</td>' in write_report(tmp_path / "r", df, dpi=DPI).read_text()
    text = write_comparison(tmp_path / "c", {"a": df, "b": df}, dpi=DPI).read_text()
    assert text.count('<td class="undecided">undecided</td>') == 2


def test_run_labels_name_lab_and_differing_settings():
    from specscope.report.compare import run_labels

    configs = {"20261201-1": {"lr": 0.1, "width": 64, "seed": 0}, "20261201-2": {"lr": 0.2, "width": 64, "seed": 0}}
    assert run_labels(list(configs), configs, {"20261201-1": "gpt", "20261201-2": "gpt"}) == {
        "20261201-1": "lr=0.1", "20261201-2": "lr=0.2"}
    labs = {"20261201-1": "gpt", "20261201-2": "sed"}  # settings of different labs are not compared
    assert run_labels(list(configs), configs, labs) == {"20261201-1": "gpt", "20261201-2": "sed"}
    configs["20261201-3"], labs["20261201-3"] = {"lr": 0.1, "width": 128, "seed": 0}, "sed"
    assert run_labels(list(configs), configs, labs) == {"20261201-1": "gpt", "20261201-2": "sed · lr=0.2, width=64",
                                                        "20261201-3": "sed · lr=0.1, width=128"}
    same = {"a": {"lr": 1}, "b": {"lr": 1}}
    assert run_labels(["a", "b"], same, {"a": "gpt", "b": "gpt"}) == {"a": "gpt (a)", "b": "gpt (b)"}


def test_hundred_layer_model_stays_readable(tmp_path):
    layers = [f"model.layers.{i}.mlp.down_proj" for i in range(100)]
    df = synthetic_metrics(layers=layers, arms=("",), steps=range(0, 6, 2))
    text = write_report(tmp_path, df, dpi=DPI).read_text()
    for name in layers:  # every weight findable by name in the table, though the heatmap thins its labels
        assert f"<td>{name}</td>" in text
    assert "100 of 100 shown" in text
    ticks = advantage_heatmap(df, dpi=DPI).axes[0].get_yticklabels()
    assert 40 <= len(ticks) <= 80


def test_log_ticks_are_plain_numbers():
    from specscope.report.style import log_ticks, plain_number

    assert log_ticks(3, 8) == [3, 4, 5, 6, 7, 8]
    assert log_ticks(1.5, 40) == [2, 5, 10, 20]
    assert log_ticks(0.01, 1000) == [0.01, 0.1, 1, 10, 100, 1000]
    # 1-2-5 would be ten labels; thinned it read 1, 5, 20, 100, 500: steps that differ. 1-3 fits in eight.
    assert log_ticks(1, 1000) == [1, 3, 10, 30, 100, 300, 1000]
    assert log_ticks(0.02, 60) == [0.03, 0.1, 0.3, 1, 3, 10, 30]  # decades alone left three labels
    assert log_ticks(1e-12, 1) == [1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1]  # thinned decades: an even stride
    assert [plain_number(v) for v in (0.02, 5, 300, 2e6, 1e-5)] == ["0.02", "5", "300", "2e6", "1e-5"]
    ticks = log_ticks(1.4e6, 2.6e6)  # less than half a decade of large values: the labels were "2e6, 2e6, 3e6"
    assert len({plain_number(t) for t in ticks}) == len(ticks) >= 3
    fig = rank_scatter(synthetic_metrics(), dpi=DPI)
    fig.draw_without_rendering()
    labels = [t.get_text() for ax in fig.axes[:1] for t in ax.get_xticklabels() + ax.get_yticklabels()]
    assert labels and not any("×" in t or "^" in t or "$" in t for t in labels)


@pytest.mark.parametrize("layers", [LAYERS, [f"transformer.h.{i}.attn.c_attn" for i in range(30)]])
def test_no_figure_text_leaves_its_canvas(layers, claims):
    from specscope.report.compare import compare_final_ranks, compare_losses
    from specscope.report.style import finish, layout_problems

    df = synthetic_metrics(layers=layers, steps=range(0, 15, 5))
    figures = dict(run_figures(df, claims, dpi=DPI))
    runs = {"a": df, "b": synthetic_metrics(layers=layers, seed=3, arms=("adamw",), steps=range(0, 15, 5))}
    labels = {"a": "gpt · lr=0.001, width=128", "b": "gpt · lr=0.01, width=256"}
    figures["compare_loss"] = finish(compare_losses(runs, labels=labels, dpi=DPI))
    figures["compare_final_ranks"] = finish(compare_final_ranks(runs, labels=labels, dpi=DPI))
    for name, fig in figures.items():
        assert layout_problems(fig) == [], name


def test_compare_figures_stay_readable_with_many_arms_and_long_labels():
    """Two runs of twelve arms with labels longer than the canvas (a demo's lab run against a standalone
    one): the legend goes below the panels, names every run, shows each entry's arm, covers nothing."""
    import warnings

    from specscope.report.compare import compare_final_ranks, compare_losses, legend_names
    from specscope.report.style import layout_problems

    arms = tuple(f"{act}/{m}" for act in ("relu", "swiglu", "gelu", "silu") for m in ("gd", "specgd", "auto"))
    runs = {"20261203T071905Z-9a1153": synthetic_metrics(arms=arms, steps=range(0, 15, 5)),
            "20261203T071636Z-e0a72e": synthetic_metrics(arms=arms, seed=4, steps=range(0, 15, 5))}
    labels = legend_names({"20261203T071905Z-9a1153": 'activations=["relu", "swiglu", "gelu"], methods=["gd", "specgd", "auto"]',
                           "20261203T071636Z-e0a72e": 'activations=["relu", "swiglu"], methods=["gd", "specgd"]'})
    assert labels["20261203T071905Z-9a1153"].endswith("(9a1153)") and len(set(labels.values())) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "constrained_layout not applied because axes sizes collapsed"
        for fig in (compare_losses(runs, labels=labels, dpi=DPI), compare_final_ranks(runs, labels=labels, dpi=DPI)):
            assert layout_problems(fig) == []
            texts = [t.get_text() for t in fig.legends[0].get_texts() if not t.get_text().startswith("…")]
            assert {t.split(" · ")[0][-8:] for t in texts} == {"(9a1153)", "(e0a72e)"}  # both runs, however many arms
            assert all(t.split(" · ")[1] in arms for t in texts)  # every entry shows its arm
    # colour = run, line style = arm: with four styles, arms 1 and 5 were the same line; now every one of the
    # twelve arms of a run is drawn its own way
    ax = compare_losses(runs, labels=labels, dpi=DPI).axes[0]
    for colour in {tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color() for line in ax.lines}:
        looks = [(line.get_linestyle(), line.get_marker()) for line in ax.lines if line.get_color() == colour]
        assert len(looks) == len(arms) == len(set(looks)), looks


def test_layout_problems_finds_clipped_and_overlapping_text():
    from specscope.report.style import figure, layout_problems

    fig = figure(3, 2, dpi=DPI)
    ax = fig.subplots()
    ax.text(0.5, 1.4, "a label far above the axes", transform=ax.transAxes)
    ax.set_xticks([0, 0.01], ["a long tick label", "another long one"])
    problems = layout_problems(fig)
    assert any("leaves the canvas" in p for p in problems) and any("overlap" in p for p in problems)
    fig = figure(3, 2, dpi=DPI)
    ax = fig.subplots()
    line, = ax.plot([0, 1], [0, 1])
    fig.legend([line] * 8, [f"entry {i}" for i in range(8)], loc="center")  # on the panel
    assert any("covers Axes" in p for p in layout_problems(fig))


def test_cli_compare_names_runs_by_lab_and_settings(tmp_path, monkeypatch, capsys):
    """`specscope compare A B`: the page names the runs by the setting that differs, not by their ids."""
    import sys

    from specscope import store
    from specscope.cli import main
    from specscope.records import Record

    dirs = []
    for lr in (0.1, 0.2):
        with store.Run.create(tmp_path / "runs", "gpt", {"lr": lr, "width": 64}) as run:
            run.append([Record(s, "", "loss", 1 / (1 + lr * s)) for s in range(3)]
                       + [Record(s, "w", m, v) for s in range(3)
                          for m, v in (("stable_rank", 4.0), ("nuclear_rank", 6.0))])
            dirs.append(str(run.path))
    monkeypatch.setattr(sys, "argv", ["specscope", "compare", *dirs, "--out", str(tmp_path / "cmp")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None), capsys.readouterr()
    text = (tmp_path / "cmp" / "comparison.html").read_text()
    assert "<title>specscope comparison: lr=0.1 vs lr=0.2</title>" in text
    assert text.count('<td class="spectral">spectral</td>') == 2


def test_compare_shows_the_medians_and_verdict_of_each_runs_report(tmp_path):
    """Last step nr/st 1.67 (spectral on its own), median over the steps 1.0: compare says what the report says."""
    nr = [10.0, 10.0, 16.7]
    df = pd.DataFrame({"step": [0, 0, 1, 1, 2, 2], "layer": ["w"] * 6, "metric": ["stable_rank", "nuclear_rank"] * 3,
                       "value": [v for n in nr for v in (10.0, n)]})
    assert layer_summary(df)["verdict"].tolist() == ["undecided"]
    text = write_comparison(tmp_path, {"a": df, "b": df}, dpi=DPI).read_text()
    assert text.count('<td class="undecided">undecided</td>') == 2 and "spectral</td>" not in text


def test_the_run_table_says_which_estimator_gave_each_metric(metrics):
    from specscope.report.html import estimators_text

    ratio = metrics[metrics["metric"] == "stable_rank"].assign(metric="spectral_advantage", estimator="gram/power")
    text = estimators_text(pd.concat([metrics, ratio]))
    assert text == ("stable_rank: power; nuclear_rank: gram; spectral_advantage: gram/power (nr(G)'s / st(A)'s)")


def test_cli_compare_keeps_runs_that_share_an_id_and_refuses_a_run_given_twice(tmp_path, monkeypatch, capsys):
    """Two labs' runs with one id were merged into one (the second silently dropped the first); a run given twice
    was drawn twice, as if two runs agreed exactly, and is now refused."""
    import sys

    from specscope import store
    from specscope.cli import main
    from specscope.records import Record

    dirs = []
    for lab, loss in (("alpha", 1.0), ("beta", 2.0)):
        with store.Run.create(tmp_path / "runs", lab, {"lr": 0.1}, run_id="same-id") as run:
            run.append([Record(s, "", "loss", loss / (1 + s)) for s in range(3)])
            dirs.append(str(run.path))

    def compare(*args):
        monkeypatch.setattr(sys, "argv", ["specscope", "compare", *args, "--out", str(tmp_path / "cmp"), "--force"])
        with pytest.raises(SystemExit) as e:
            main()
        return e.value.code, capsys.readouterr()

    code, out = compare(*dirs)
    assert code in (0, None), out
    text = (tmp_path / "cmp" / "comparison.html").read_text()
    assert "alpha/same-id" in text and "beta/same-id" in text and "alpha vs beta" in text
    code, out = compare(dirs[0], dirs[0])
    assert code == 2 and "are the same run" in out.err and "give each run once" in out.err
    assert (tmp_path / "cmp" / "comparison.html").read_text() == text  # the earlier page stays


def test_a_rewritten_report_drops_the_figures_it_no_longer_draws(tmp_path, metrics):
    """`report --salvage` on a database with nothing left kept every PNG of the undamaged data beside a page
    that shows none; a file that is not one of the report's own figures stays."""
    write_report(tmp_path, metrics, dpi=DPI)
    (tmp_path / "figures" / "mine.png").write_bytes(b"a user's file")
    loss_only = metrics[metrics.metric == "loss"]
    write_report(tmp_path, loss_only, dpi=DPI)
    assert {p.stem for p in (tmp_path / "figures").glob("*.png")} == {"loss", "mine"}


def test_bidirectional_and_zero_width_characters_show_escaped_on_the_page(tmp_path):
    df = synthetic_metrics(layers=["ok.layer", "w\u202eevil\u200b"], steps=range(3))
    text = write_report(tmp_path, df, dpi=DPI).read_text(encoding="utf-8")
    assert "\u202e" not in text and "\u200b" not in text and "w\\u202eevil\\u200b" in text


def test_a_metric_recorded_at_one_step_is_drawn_as_a_point_on_whole_step_ticks():
    """The gpt lab's unigram_loss (step 0 only) drew an empty panel ticked −0.04…0.04."""
    from specscope.report.figures import loss_curves

    df = pd.DataFrame({"step": [0, 0, 5, 10], "layer": [""] * 4, "metric": ["unigram_loss", "loss", "loss", "loss"],
                       "value": [5.5, 5.0, 3.0, 2.0], "arm": ["", "adamw", "adamw", "adamw"]})
    fig = loss_curves(df, dpi=DPI)
    (ax,) = [a for a in fig.axes if a.get_title() == "unigram_loss"]
    (line,) = ax.lines
    assert line.get_marker() == "o"
    assert all(float(t).is_integer() for t in ax.get_xticks()) and ax.get_xlim() == (-1, 1)


def test_every_figure_of_a_salvaged_report_says_so(tmp_path, metrics, monkeypatch):
    """After `report --salvage` the page said SALVAGED, but loss.png on its own was titled just "Loss"."""
    from specscope.report import html

    titles = {}
    real = html.png_bytes

    def recording(fig, dpi=None):
        titles[id(fig)] = fig._suptitle.get_text() if fig._suptitle is not None else ""
        return real(fig, dpi)

    monkeypatch.setattr(html, "png_bytes", recording)
    lab_fig = Figure()
    lab_fig.subplots().plot([0, 1])
    text = write_report(tmp_path, metrics, extra_figures={"mine": lab_fig}, salvaged="metrics.sqlite is damaged (x)",
                        dpi=DPI).read_text()
    assert titles and all(t.startswith("SALVAGED FROM A DAMAGED DATABASE") for t in titles.values()), titles
    assert "<title>SALVAGED FROM A DAMAGED DATABASE — specscope report</title>" in text


def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `specscope args...`, in this process."""
    import sys

    from specscope.cli import main

    monkeypatch.setattr(sys, "argv", ["specscope", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_cli_compare_marks_a_run_that_did_not_finish(tmp_path, monkeypatch, capsys):
    """A killed run's numbers were shown as final, unmarked: now stderr, the title, its label and the final
    metrics (with the step each value is from) say it stopped."""
    from specscope import store
    from specscope.records import Record

    with store.Run.create(tmp_path / "runs", "gpt", {"steps": 20}, run_id="done") as run:
        run.append([Record(s, "", "loss", 1 / (1 + s)) for s in range(0, 21, 10)])
    killed = store.Run.create(tmp_path / "runs", "gpt", {"steps": 400}, run_id="killed")
    killed.append([Record(s, "", "loss", 2 / (1 + s)) for s in range(0, 140, 10)])
    killed.flush()
    killed._release()  # as after SIGKILL: status "running" on disk, no writer
    code, _, err = _cli(monkeypatch, capsys, "compare", killed.path, run.path, "--out", tmp_path / "cmp")
    assert code == 0, err
    assert f"warning: {killed.path} is incomplete" in err and "done is" not in err
    text = (tmp_path / "cmp" / "comparison.html").read_text()
    assert "<title>INCOMPLETE RUN, RECORDS SO FAR — specscope comparison: [incomplete] steps=400 vs steps=20</title>" in text
    assert "<td>0.01527 (step 130)</td>" in text  # the killed run's last loss, and its step
    assert '<td class="num">0.04762</td>' in text  # the complete run's final loss, plain
    assert "<td>incomplete</td>" in text and "<td>complete</td>" in text


def test_a_refused_report_changes_no_file(tmp_path, monkeypatch, capsys):
    """figures/ a link out of the run: `report` refused only after rewriting summary.json."""
    import hashlib
    import os

    from specscope.labs.runner import run_lab

    quick = {"p": 5, "steps": 4, "eval_every": 2, "d_model": 16, "d_ff": 32, "n_heads": 2, "grok_window": 2,
             "batch_size": 8, "device": "cpu"}
    run = Path(run_lab("grokking", quick, out=tmp_path / "runs", run_id="r"))
    outside = tmp_path / "outside"
    (run / "figures").rename(outside)
    (run / "figures").symlink_to(outside, target_is_directory=True)
    os.utime(run / "summary.json", ns=(1, 1))

    def fingerprint() -> dict:
        return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                for p in sorted([*run.rglob("*"), *outside.rglob("*")]) if p.is_file() and not p.is_symlink()}

    before = fingerprint()
    code, _, err = _cli(monkeypatch, capsys, "report", run)
    assert code == 2 and "is a link to" in err and "remove the link" in err
    assert fingerprint() == before


def test_control_and_bidi_characters_in_names_are_drawn_escaped():
    """A layer named with U+202E, ESC or BEL reached matplotlib's text raw (only `$` was escaped)."""
    from specscope.report.compare import compare_final_ranks, compare_losses
    from specscope.report.style import finish

    evil, arm = "<svg onload=alert(3)>\u202e<evil\x1b[31m", "adam\x07w"
    df = synthetic_metrics(layers=["ok", evil], arms=(arm, "gd"), steps=range(0, 10, 5))
    figures = [*run_figures(df, [], dpi=DPI).values(), compare_losses({"a\u202eb": df}, dpi=DPI),
               compare_final_ranks({"a\u202eb": df}, dpi=DPI)]
    drawn = []
    for fig in figures:
        finish(fig)
        fig.canvas.draw()  # tick labels are made by their formatter at drawing time
        drawn += [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
    assert not any(ch in t for t in drawn for ch in "\u202e\x1b\x07")
    assert any("\\u202e<evil\\x1b[31m" in t for t in drawn) and any("adam\\x07w" in t for t in drawn)


def test_a_legend_names_every_line_of_a_per_parameter_figure():
    """The GPT lab's nr(G) by parameter draws 8 weights: all 8 are named (mlp.down, the one GPT-2b is about,
    used to be hidden in "+2 more"); past 12 the rest are counted."""
    from specscope.report import style

    def legend_texts(n: int) -> list[str]:
        fig = Figure(figsize=style.PANEL)
        ax = fig.add_subplot()
        for i in range(n):
            ax.plot([1, 2], [i, i + 1], label=f"blocks.0.w{i}")
        return [t.get_text() for t in style.legend(ax).get_texts()]

    assert legend_texts(8) == [f"blocks.0.w{i}" for i in range(8)]
    assert legend_texts(14)[-1] == "… +2 more" and len(legend_texts(14)) == 13


def test_a_comparison_of_no_runs_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="write_comparison got no runs"):  # it was pandas' "No objects to concatenate"
        write_comparison(tmp_path / "cmp", {}, dpi=DPI)
    assert not (tmp_path / "cmp").exists()


def test_claims_are_claims_or_dicts_alike_and_an_unknown_verdict_is_refused(tmp_path, metrics, claims):
    from specscope.report import claims_figure

    as_dicts = [c.as_dict() for c in claims]
    assert isinstance(claims_figure(as_dicts, dpi=DPI), Figure)  # it raised 'dict' object has no attribute 'id'
    assert set(run_figures(metrics, as_dicts, dpi=DPI)) == set(run_figures(metrics, claims, dpi=DPI))
    maybe = dict(as_dicts[0], verdict="MAYBE")
    for call in (lambda: claims_figure([maybe], dpi=DPI), lambda: claims_figure([Claim(**maybe)], dpi=DPI),
                 lambda: write_report(tmp_path / "rep", metrics, claims=[maybe], dpi=DPI)):
        with pytest.raises(ValueError, match="unknown verdict 'MAYBE'; use one of PASS, FAIL, INCONCLUSIVE"):
            call()
    assert not (tmp_path / "rep").exists()
    with pytest.raises(ValueError, match="missing field.*verdict"):
        claims_figure([{"id": "X-1", "text": "t", "published": "p", "measured": "m"}], dpi=DPI)
    with pytest.raises(ValueError, match="a claim must be a specscope.records.Claim or a dict"):
        claims_figure(["X-1 PASS"], dpi=DPI)


def test_nans_recorded_for_undefined_quantities_are_not_counted_as_non_finite_values():
    """An expert no token reached has a zero gradient, whose nr(G) is recorded NaN with flag zero_gradient: the report's
    summary counted it among "non-finite values", which reads as divergence."""
    from specscope.report.html import metadata_html

    rows = [dict(run_id="r", arm="", step=0, layer="e[3]", metric="nuclear_rank", value=float("nan"), flag="zero_gradient"),
            dict(run_id="r", arm="", step=0, layer="e[2]", metric="nuclear_rank", value=float("nan"), flag="nonfinite"),
            dict(run_id="r", arm="", step=0, layer="e[1]", metric="nuclear_rank", value=2.0, flag="")]
    df = pd.DataFrame([{**r, "estimator": "gram", "rows": 4, "shape": "4x4"} for r in rows])
    html = metadata_html(df)
    assert re.search(r"non-finite values</t[dh]><t[dh][^>]*>1<", html), html


def test_names_without_spaces_keep_both_ends_when_shortened():
    """textwrap.shorten cut at spaces and left a bare "…" of BERT's 41–45-character weight names: six rows of the
    heatmap read "…" and could not be told apart."""
    from specscope.report.style import shorten

    names = [f"bert.encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "value")]
    short = [shorten(n, 40) for n in names]
    assert len(set(short)) == 4 and all(len(s) <= 40 and "…" in s for s in short)
    assert short[0] == "bert.….layer.0.attention.self.query"  # the first part and the last ones, the index kept
    assert shorten("x" * 50, 40) == "x" * 19 + "…" + "x" * 20
    assert shorten("lm_head", 40) == "lm_head" and shorten("a\tb", 40) == "a b"


def test_the_eleventh_arm_or_run_has_its_own_colour():
    """tab10 alone: the 11th arm drew exactly as the first (random-features' 12 arms: relu/gd and tanh/specgd)."""
    from specscope.report.figures import _arm_colour

    assert len({tuple(_arm_colour(i)) for i in range(50)}) == 50


def test_two_lab_figures_saved_under_one_file_name_are_refused(tmp_path):
    """"a<b" and "a>b" both became lab_a_b.png: one figure was dropped without a word."""
    from specscope.errors import ConfigError

    figs = {name: Figure() for name in ("a<b", "a>b")}
    with pytest.raises(ConfigError, match=r"'a<b' and 'a>b' are both saved as lab_a_b.png"):
        write_report(tmp_path, synthetic_metrics(), extra_figures=figs, dpi=DPI)
    assert not (tmp_path / "report.html").exists()


def test_a_run_that_ended_on_nan_shows_it_in_the_final_metrics_not_its_last_finite_value():
    """The comparison's final metrics took the last finite value: a run whose loss went 1, inf, 0.5, nan read 0.5, with
    no step and no note, and could look like the best of a sweep."""
    from specscope.report.compare import final_metrics_html

    def run(values):
        return pd.DataFrame({"step": range(len(values)), "layer": "", "metric": "loss", "value": values, "arm": "main"})

    html = final_metrics_html({"a": run([1.0, float("inf"), 0.5, float("nan")]), "b": run([5.0, 2.0, 1.0, 0.8])}, {})
    assert "nan (step 3; last finite 0.5 at step 2)" in html and "diverged" in html and "0.8" in html
    assert "diverged" not in final_metrics_html({"b": run([5.0, 2.0, 1.0, 0.8])}, {})
    html = final_metrics_html({"a": run([3.0, 2.0, float("nan")]), "b": run([float("nan")] * 3)}, {})
    assert "nan (step 2; no finite value)" in html and "nan (step 2; last finite 2 at step 1)" in html  # b not left out


@pytest.mark.parametrize("kwargs, message", [(dict(extra_figures={"x": 3}), r"extra_figures\['x'\] is a int, not a matplotlib Figure"),
                                             (dict(extra_figures=[1]), "extra_figures is a list"),
                                             (dict(df=[1, 2, 3]), "pass the run's records as a DataFrame")])
def test_write_report_refuses_bad_input_before_writing_anything(tmp_path, kwargs, message):
    """An int among extra_figures raised AttributeError after figures/*.png were written; a list as df left an empty
    directory behind an AttributeError."""
    from specscope.errors import ConfigError
    from specscope.report import write_report

    out = tmp_path / "r"
    with pytest.raises(ConfigError, match=message):
        write_report(out, **{"df": synthetic_metrics(), **kwargs})
    assert not out.exists()


@pytest.mark.parametrize("width", [24, 30, 34, 36, 38])
def test_the_verdict_is_whole_at_any_width(width):
    """Below about 40 columns the weight, nr/st and the verdict did not fit folded, and the verdict was cut
    ("undeci…", "spectr"): nr/st is left out before the verdict is cut."""
    df = pd.DataFrame({"layer": ["transformer.h.0.mlp.c_fc", "transformer.h.0.attn.c_attn"], "kind": ["linear", "linear"],
                       "stable_rank": [3.2, 40.1], "nuclear_rank": [10.0, 12.0], "spectral_advantage": [3.1, 0.3],
                       "verdict": ["undecided", "euclidean"]})
    console = Console(width=width, record=True)
    console.print(layer_table(df))
    text = console.export_text()
    assert "undecided" in text and "euclidean" in text


def test_a_legend_label_with_a_control_character_is_measured_and_drawn_as_its_escape(recwarn):
    """The legend's widest entry was measured before its ESC was escaped: matplotlib warned "Glyph 27 (\\x1b) missing"
    on stderr and the columns were fitted to the wrong widths (U+202E drawn as 6 characters, measured as 1)."""
    from matplotlib.figure import Figure as Fig

    from specscope.report.style import figure_legend, finish

    fig = Fig()
    ax = fig.add_subplot()
    lines = [ax.plot([0, 1], [0, i])[0] for i in range(2)]
    legend = figure_legend(fig, lines, ["run\x1b[2J", "other\u202e"])
    finish(fig)
    fig.canvas.draw()
    assert [t.get_text() for t in legend.get_texts()] == ["run\\x1b[2J", "other\\u202e"]
    assert not [w for w in recwarn if "missing from font" in str(w.message)]


def test_write_comparison_refuses_settings_of_a_run_it_was_not_given(tmp_path):
    """configs={"zzz": {}} (a name that is no run's) was accepted and ignored: the labels came from nothing."""
    from specscope.report import write_comparison

    with pytest.raises(ValueError, match=r"configs names \['zzz'\], which are not among the runs \['a'\]"):
        write_comparison(tmp_path / "c", {"a": synthetic_metrics()}, configs={"zzz": {}})
    assert not (tmp_path / "c").exists()


def test_a_verdict_column_of_several_words_keeps_every_column_where_they_fit():
    """An `advice` column of "spectral (Muon)" read as never whole (its cell is two words), and every other column was
    left out at any width."""
    df = pd.DataFrame({"layer": ["blocks.0.mlp.fc", "blocks.0.attn"], "nr/st": [2.0, 0.5], "stable_rank": [3.1, 4.2],
                       "advice": ["spectral (Muon)", "euclidean (AdamW)"]})
    console = Console(width=120, record=True, file=io.StringIO(), color_system=None)
    console.print(layer_table(df))
    text = console.export_text()
    assert "stable_rank" in text and "nr/st" in text and "not shown" not in text and "euclidean (AdamW)" in text


def test_infinite_values_read_inf_not_the_no_value_dash():
    """±Inf (a diverged loss) is a value: tables print "inf" / "-inf"; only NaN (no value) prints "—"."""
    from specscope.report.tables import fmt

    assert [fmt(float("inf")), fmt(float("-inf")), fmt(float("nan")), fmt(np.float32("inf")), fmt(1.23456)] == \
        ["inf", "-inf", "—", "inf", "1.235"]
