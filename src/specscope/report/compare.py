"""Several runs on one page: loss curves overlaid, final st(A) / nr(G) per weight side by side, wide
tables (rows = metrics or weights, columns = runs) and the config keys that differ.

Runs are named by what tells them apart: lab, the settings that differ between them, and arm."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from specscope.records import SWEEP
from specscope.report import style
from specscope.report.figures import DPI, LINESTYLES, MARKERS, _arm_colour, _grid, _log_is_sensible, _metric_names
from specscope.report.html import (config_table, esc, figure_block, flatten, page, save_figures, searchable,
                                   table, value_text, write_text_atomic)
from specscope.report.tables import finite, fmt, layer_summary, ordered_unique, prepare, rank_pairs, training

MAX_KEYS = 3  # differing settings named in a run's label
BOOKKEEPING = {"checkpoint_every", "device"}  # settings that do not change what a run measures
MAX_SERIES = 8  # run/arm pairs drawn in the final-ranks figure
HATCHES = ["", "//", "..", "xx", "\\\\", "++", "oo", "--"]


def differing_keys(configs: Mapping[str, Mapping]) -> list[str]:
    """Flattened config keys whose value is not the same in every run (missing counts as a value); the
    settings that do not change a run's results (BOOKKEEPING) last."""
    flat = [flatten(cfg or {}) for cfg in configs.values()]
    keys = ordered_unique(k for cfg in flat for k in cfg)
    keys = [k for k in keys if len({value_text(cfg[k]) if k in cfg else "—" for cfg in flat}) > 1]
    return sorted(keys, key=lambda k: k.split(".")[-1] in BOOKKEEPING)


def run_labels(names: Sequence[str], configs: Mapping[str, Mapping] | None = None,
               labs: Mapping[str, str] | None = None) -> dict[str, str]:
    """Run name -> "lab · key=value, ..." with the settings that differ between the runs of the same lab
    (at most MAX_KEYS, "+N" for the rest). Labs are named only when they differ or when nothing else
    does; the run's own name is appended wherever two labels would otherwise be the same."""
    configs, labs = configs or {}, labs or {}
    several_labs = len({labs.get(n, "") for n in names}) > 1
    labels = {}
    for n in names:
        # settings are compared between runs of the same lab; different labs have different settings
        same_lab = [m for m in names if labs.get(m, "") == labs.get(n, "")]
        keys = differing_keys({m: configs.get(m, {}) for m in same_lab}) if len(same_lab) > 1 else []
        flat = flatten(configs.get(n) or {})
        parts = [f"{k.split('.')[-1]}={style.shorten(value_text(flat[k]), 24)}"
                 for k in keys[:MAX_KEYS] if k in flat]
        settings = ", ".join(parts) + (f" +{len(keys) - MAX_KEYS}" if len(keys) > MAX_KEYS else "")
        lab = labs.get(n, "")
        head = lab if lab and (several_labs or not settings) else ""
        labels[n] = " · ".join(x for x in (head, settings) if x) or str(n)
    counts = {v: list(labels.values()).count(v) for v in labels.values()}
    return {n: (f"{v} ({n})" if counts[v] > 1 and v != str(n) else v) for n, v in labels.items()}


def legend_names(labels: Mapping[str, str], width: int = 44) -> dict[str, str]:
    """Run name -> its label, shortened for a legend; a label that had to be cut ends with the end of the
    run's id (what tells cut labels apart; the page's run table has both in full). Runs whose cut labels and id
    ends are the same (copies of one run in other folders) end with the part of their names that differs."""
    def cut(v: str, tail: str) -> str:
        return v if len(v) <= width else f"{style.shorten(v, max(width - 3 - len(tail), 12))} ({tail})"
    out = {n: cut(v, str(n)[-6:]) for n, v in labels.items()}
    for same in [[n for n in out if out[n] == v] for v in set(out.values())]:
        if len(same) > 1:
            for n, middle in zip(same, _differing_parts([str(n) for n in same])):
                out[n] = cut(labels[n], style.shorten(middle, 16) if len(middle) > 16 else middle)
    return out


def _differing_parts(names: Sequence[str]) -> list[str]:
    """Each name without the beginning and the end all of them share (at least one character of each is kept)."""
    head = len(os.path.commonprefix(list(names)))
    tail = len(os.path.commonprefix([n[::-1] for n in names]))
    return [n[min(head, len(n) - 1): max(len(n) - tail, min(head, len(n) - 1) + 1)] for n in names]


def _label(run: str, arm: str, labels: Mapping[str, str] | None = None) -> str:
    name = (labels or {}).get(run, run)
    return f"{name} · {arm}" if arm else name


def round_robin(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(run, arm) pairs taking one arm of each run in turn, so a capped legend or figure shows every run."""
    by_run: dict[str, list] = {}
    for pair in pairs:
        by_run.setdefault(pair[0], []).append(pair)
    columns = list(by_run.values())
    return [c[i] for i in range(max(map(len, columns), default=0)) for c in columns if i < len(c)]


def combine(runs: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """All runs in one long frame with a `run` column holding the name the caller gave each run."""
    frames = [prepare(df).assign(run=str(name)) for name, df in runs.items()]
    return pd.concat(frames, ignore_index=True) if frames else prepare(None).assign(run="")


def compare_losses(runs: Mapping[str, pd.DataFrame], *, labels: Mapping[str, str] | None = None,
                   dpi: int = DPI) -> Figure | None:
    """One panel per loss-like metric; colour = run, line style = arm; one legend below the panels."""
    df = finite(combine(runs))
    metrics = _metric_names(df, "loss")
    if not metrics:
        return None
    names = list(runs)
    rows, cols = _grid(len(metrics))
    fig = style.figure(max(style.PANEL[0] * cols, 6.6), style.PANEL[1] * rows, dpi)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    lines = {}  # (run, arm) -> its first line, for the legend
    for ax, metric in zip(axes, metrics):
        d = df[(df["metric"] == metric)]
        for (run, arm), g in d.groupby(["run", "arm"], sort=False):
            arms = ordered_unique(df[df["run"] == run]["arm"])
            g = g.groupby("step")["value"].mean()
            k = arms.index(arm)  # arms 0-3: four line styles; from the fifth on, the same with markers of a kind per four
            marker = "o" if len(g) == 1 else (MARKERS[(k // 4 - 1) % len(MARKERS)] if k >= 4 else None)
            line, = ax.plot(g.index, g.to_numpy(), color=_arm_colour(names.index(run)), linestyle=LINESTYLES[k % 4],
                            lw=1.4, marker=marker, ms=4, markevery=max(1, len(g) // 8))
            lines.setdefault((run, arm), line)
        if _log_is_sensible(d["value"].to_numpy()):
            ax.set_yscale("log")
        ax.set_title(metric, fontsize=style.FONT["title"])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    pairs = round_robin(list(lines))
    style.figure_legend(fig, [lines[p] for p in pairs], [_label(*p, labels) for p in pairs])
    fig.suptitle("Loss, all runs", fontsize=style.FONT["suptitle"])
    return style.finish(fig)


def final_ranks(runs: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per (run, arm, layer): st, nr and nr/st at the last step where each was finite."""
    rows = []
    for name, df in runs.items():
        pairs = rank_pairs(df)
        for (arm, layer), g in pairs.groupby(["arm", "layer"], sort=False):
            last = {k: g[k].dropna() for k in ("st", "nr", "ratio")}
            rows.append({"run": str(name), "arm": arm, "layer": layer,
                         **{k: float(v.iloc[-1]) if len(v) else np.nan for k, v in last.items()}})
    return pd.DataFrame(rows, columns=["run", "arm", "layer", "st", "nr", "ratio"])


def compare_final_ranks(runs: Mapping[str, pd.DataFrame], *, labels: Mapping[str, str] | None = None,
                        dpi: int = DPI) -> Figure | None:
    """Final st(A) and nr(G) per weight, one horizontal bar per run/arm that measured it (colour = run,
    hatch = arm), the two quantities side by side. At most MAX_SERIES run/arm pairs are drawn; the
    table on the page has all of them."""
    final = final_ranks(runs)
    if final.empty:
        return None
    layers = ordered_unique(final["layer"])
    series = round_robin(ordered_unique(zip(final["run"], final["arm"])))
    dropped, series = len(series[MAX_SERIES:]), series[:MAX_SERIES]
    final = final[[s in set(series) for s in zip(final["run"], final["arm"])]]
    present = {layer: [s for s in series if ((final["run"] == s[0]) & (final["arm"] == s[1])
                                              & (final["layer"] == layer)).any()] for layer in layers}
    layers = [layer for layer in layers if present[layer]]
    height = 0.8 / max(max(len(p) for p in present.values()), 1)
    fig = style.figure(11, float(np.clip(0.8 * len(layers) * height * max(map(len, present.values()))
                                         * 0.35 + 0.3 * len(layers) + 2.2, 3.2, 30)), dpi)
    axes = fig.subplots(1, 2, sharey=True)
    names = list(runs)
    by = final.set_index(["run", "arm", "layer"])
    for ax, (key, label) in zip(axes, [("st", "final st(A)"), ("nr", "final nr(G)")]):
        for run, arm in series:
            rows = [(i, by.loc[(run, arm, layer), key], present[layer].index((run, arm)), len(present[layer]))
                    for i, layer in enumerate(layers) if (run, arm) in present[layer]]
            arms = ordered_unique(final[final["run"] == run]["arm"])
            ax.barh([i + (k - (n - 1) / 2) * height for i, _, k, n in rows], [v for _, v, _, _ in rows],
                    height=height, color=_arm_colour(names.index(run)), label=_label(run, arm, labels),
                    hatch=HATCHES[arms.index(arm) % len(HATCHES)], edgecolor="white", linewidth=0.3)
        values = final[key].to_numpy(dtype=float)
        if _log_is_sensible(values):
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, axis="x")
    size = float(np.clip(240 / max(len(layers), 1), style.MIN_FONT, 9))
    axes[0].set_yticks(range(len(layers)), [style.shorten(l, 40) for l in layers],
                       fontsize=size)
    axes[0].invert_yaxis()  # model order from the top
    style.figure_legend(fig, *axes[0].get_legend_handles_labels())
    more = f" (first {MAX_SERIES} run/arm pairs; {dropped} more in the table)" if dropped else ""
    fig.suptitle("Final st(A) and nr(G) per weight" + more, fontsize=style.FONT["suptitle"])
    return style.finish(fig)


def config_diff_html(configs: Mapping[str, Mapping], labels: Mapping[str, str] | None = None) -> str:
    """Every config key with its value in each run; rows where the runs differ are highlighted."""
    flat = {str(name): flatten(cfg or {}) for name, cfg in configs.items()}
    keys = ordered_unique(k for cfg in flat.values() for k in cfg)
    if not keys:
        return "<p>No configurations given.</p>"
    missing = object()
    rows, row_classes = [], []
    for key in keys:
        values = [cfg.get(key, missing) for cfg in flat.values()]
        texts = ["—" if v is missing else value_text(v) for v in values]
        rows.append([key, *texts])
        row_classes.append("differs" if len(set(texts)) > 1 else "")
    header = ["key", *[(labels or {}).get(n, n) for n in flat]]
    return "<p>Highlighted rows differ between runs.</p>" + table(rows, header, row_classes=row_classes, table_class="wide")


def _series(runs: Mapping[str, pd.DataFrame]) -> list[tuple[str, str]]:
    """(run, arm) in the order given, arms in order of appearance."""
    return [(str(name), arm) for name, df in runs.items() for arm in ordered_unique(prepare(df)["arm"])]


def final_metrics_html(runs: Mapping[str, pd.DataFrame], labels: Mapping[str, str],
                       unfinished: Mapping[str, str] | None = None) -> str:
    """Wide: one row per whole-model metric (loss, accuracy, ...), one column per run/arm, the last
    finite value; in the column of a run that did not finish (`unfinished`: name -> status) with the step
    it was recorded at, as it is not final."""
    every = combine(runs)
    every = every[every["layer"] == ""].sort_values("step", kind="stable")
    if every.empty:
        return "<p>No whole-model metrics were recorded.</p>"
    last = finite(every).groupby(["metric", "run", "arm"])[["step", "value"]].last()
    latest = every.groupby(["metric", "run", "arm"]).tail(1).set_index(["metric", "run", "arm"])[["step", "value"]]
    series = [s for s in _series(runs) if any((s[0], s[1]) == (r, a) for _, r, a in latest.index)]
    diverged = False

    def cell(m: str, r: str, a: str) -> object:
        nonlocal diverged
        if (m, r, a) not in latest.index:
            return np.nan
        end_step, end = latest.loc[(m, r, a)]
        if not np.isfinite(float(end)):  # the run ended on NaN/inf: that is its final value, not the last finite one
            diverged = True
            if (m, r, a) not in last.index:
                return f"{float(end)} (step {int(end_step)}; no finite value)"
            step, value = last.loc[(m, r, a)]
            return f"{float(end)} (step {int(end_step)}; last finite {fmt(float(value))} at step {int(step)})"
        return f"{fmt(float(end))} (step {int(end_step)})" if r in (unfinished or {}) else float(end)

    rows = [[m, *[cell(m, r, a) for r, a in series]] for m in ordered_unique(every["metric"])]
    note = ("<p>A run that did not finish shows its last value so far and the step it was recorded at.</p>"
            if unfinished else "")
    if diverged:
        note += ("<p>A run whose last value of a metric is not finite (it diverged) shows that value, with its last "
                 "finite one beside it.</p>")
    return note + table(rows, ["metric", *[_label(r, a, labels) for r, a in series]], table_class="wide")


def final_table_html(runs: Mapping[str, pd.DataFrame], labels: Mapping[str, str]) -> str:
    """Wide: one row per weight; per run/arm its median st(A), nr(G) and nr/st over the measured steps and
    the verdict of that median — `report.tables.layer_summary`, the numbers and rule of each run's own report
    and of advice(). "unmeasured" where the probe could not pair the weight in a run; "—" where a run has
    no such weight."""
    summary = pd.concat([layer_summary(df).assign(run=str(name)) for name, df in runs.items()], ignore_index=True)
    if summary.empty:
        return "<p>No per-weight st(A) / nr(G) were recorded.</p>"
    series = ordered_unique(zip(summary["run"], summary["arm"]))
    by = summary.set_index(["run", "arm", "layer"])
    rows, classes = [], []
    for layer in ordered_unique(summary["layer"]):
        row, cls = [layer], [""]
        for run, arm in series:
            key = (run, arm, layer)
            if key in by.index:
                r = by.loc[key]
                row += [r["st_median"], r["nr_median"], r["ratio_median"], r["verdict"]]
                cls += ["", "", r["verdict"], r["verdict"]]
            else:
                row += [np.nan, np.nan, np.nan, "—"]
                cls += ["", "", "—", "—"]
        rows.append(row)
        classes.append(cls)
    header = ["weight"] + ["st(A)", "nr(G)", "nr/st", "verdict"] * len(series)  # medians: as in each run's report
    groups = [("", 1)] + [(_label(r, a, labels), 4) for r, a in series]
    return searchable(table(rows, header, classes=classes, sortable=True, groups=groups, table_class="wide"),
                      "a weight", len(rows))


def unfinished_title(unfinished: Mapping[str, str]) -> str:
    """"INCOMPLETE RUN, RECORDS SO FAR — " (as `specscope report` titles such a run's page) for the runs that did
    not finish (name -> status); "" when every run finished."""
    if not unfinished:
        return ""
    statuses = " / ".join(s.upper() for s in ordered_unique(unfinished.values()))
    return f"{statuses} RUN{'S' if len(unfinished) > 1 else ''}, RECORDS SO FAR — "


def mark_unfinished(labels: Mapping[str, str], unfinished: Mapping[str, str]) -> dict[str, str]:
    """Each label of a run that did not finish starting with its status ("[incomplete] lr=0.1"): kept when a
    legend shortens the label."""
    return {n: f"[{unfinished[n]}] {v}" if n in unfinished else v for n, v in labels.items()}


def write_comparison(out_dir: str | os.PathLike, runs: Mapping[str, pd.DataFrame], *,
                     configs: Mapping[str, Mapping] | None = None, labs: Mapping[str, str] | None = None,
                     title: str | None = None, unfinished: Mapping[str, str] | None = None,
                     salvaged: str = "", dpi: int = DPI) -> Path:
    """Write out_dir/comparison.html (self-contained) and its PNGs to out_dir/figures/.

    runs maps a run's name (usually its id) to its long-format metrics; configs and labs map the same
    names to their config dicts and lab names, from which each run gets a readable label (`run_labels`).
    unfinished maps the name of a run that did not finish to its status (incomplete, running, ...): its label,
    the title and the final metrics say its values are the records so far. salvaged: what was wrong with the
    damaged databases read, put first in the title. Returns the path of comparison.html.
    """
    if not runs:
        raise ValueError("write_comparison got no runs; pass at least one {name: metrics DataFrame} "
                         "(specscope compare RUN RUN ...)")
    names = {str(n) for n in runs}
    for what, given in (("configs", configs), ("labs", labs), ("unfinished", unfinished)):
        if stray := sorted(str(k) for k in (given or {}) if str(k) not in names):
            raise ValueError(f"write_comparison: {what} names {stray[:4]}, which are not among the runs "
                             f"{sorted(names)[:6]}; key {what} by the runs' names")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unfinished = {str(k): v for k, v in (unfinished or {}).items() if v != "complete"}
    labels = run_labels([str(n) for n in runs], {str(k): v for k, v in (configs or {}).items()},
                        {str(k): v for k, v in (labs or {}).items()})
    labels = mark_unfinished(labels, unfinished)
    swept = {str(k): int((prepare(v)["flag"] == SWEEP).sum()) for k, v in runs.items()}
    runs = {str(k): training(prepare(v)) for k, v in runs.items()}  # sweep records hold no training step
    title = title or "specscope comparison: " + " vs ".join(labels.values())
    title = (f"SALVAGED FROM DAMAGED DATABASES ({salvaged}) — " if salvaged else "") + unfinished_title(unfinished) + title
    short = legend_names(labels)
    figures = {"compare_loss": compare_losses(runs, labels=short, dpi=dpi),
               "compare_final_ranks": compare_final_ranks(runs, labels=short, dpi=dpi)}
    pngs = save_figures({k: f for k, f in figures.items() if f is not None}, out, dpi=dpi, owned=lambda stem: stem in figures,
                        page_name="comparison.html")
    captions = {"compare_loss": "Loss-like metrics of every run; colour = run, line style = arm.",
                "compare_final_ranks": "st(A) and nr(G) of every weight at the last measured step, per run."}
    listing = table([[labels[name], (labs or {}).get(name, ""), name, unfinished.get(name, "complete"),
                      f"{len(df)} (+{swept[name]} sweep)" if swept[name] else len(df),
                      ", ".join(a for a in ordered_unique(df["arm"]) if a) or "—"]
                     for name, df in runs.items()], ["run", "lab", "id", "status", "records", "arms"])
    keys = differing_keys(configs) if configs and len(set((labs or {}).values())) <= 1 else []
    body = "\n".join([
        f"<h1>{esc(title)}</h1>",
        "".join(f'<p class="warning">{esc(n)} is {esc(st)}: its values are the records so far, not final.</p>'
                for n, st in unfinished.items()),
        "<h2>Runs</h2>",
        f"<p>Settings that differ: {esc(', '.join(keys))}.</p>" if keys else "", listing,
        "<h2>Figures</h2>",
        "\n".join(figure_block(s, d, captions[s]) for s, d in pngs.items()) or "<p>No metrics to plot.</p>",
        "<h2>Final metrics</h2>", final_metrics_html(runs, labels, unfinished),
        "<h2>Per-weight values</h2>",
        "<p>Medians over each run's measured steps, and the verdict of the median nr/st — the numbers of each "
        "run's own report.</p>", final_table_html(runs, labels),
        "<h2>Configuration</h2>", config_diff_html(configs, labels) if configs else config_table(None),
    ])
    path = out / "comparison.html"
    write_text_atomic(path, page(title, body))
    return path
