"""Several runs on one page: loss curves overlaid, final st(A) / nr(G) per weight side by side,
the per-weight final values and the config keys that differ."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from specscope.report.figures import DPI, LINESTYLES, _arm_colour, _figure, _grid, _log_is_sensible, _metric_names
from specscope.report.html import (config_table, esc, figure_block, flatten, page, save_figures, table,
                                   value_text, write_text_atomic)
from specscope.report.tables import finite, ordered_unique, prepare, rank_pairs


def _label(run: str, arm: str) -> str:
    return f"{run} / {arm}" if arm else run


def combine(runs: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """All runs in one long frame with a `run` column holding the name the caller gave each run."""
    frames = [prepare(df).assign(run=str(name)) for name, df in runs.items()]
    return pd.concat(frames, ignore_index=True) if frames else prepare(None).assign(run="")


def compare_losses(runs: Mapping[str, pd.DataFrame], *, dpi: int = DPI) -> Figure | None:
    """One panel per loss-like metric; colour = run, line style = arm."""
    df = finite(combine(runs))
    metrics = _metric_names(df, "loss")
    if not metrics:
        return None
    names = list(runs)
    rows, cols = _grid(len(metrics))
    fig = _figure(4.4 * cols, 3.0 * rows, dpi)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        d = df[(df["metric"] == metric)]
        for (run, arm), g in d.groupby(["run", "arm"], sort=False):
            arms = ordered_unique(df[df["run"] == run]["arm"])
            g = g.groupby("step")["value"].mean()
            ax.plot(g.index, g.to_numpy(), color=_arm_colour(names.index(run)),
                    linestyle=LINESTYLES[arms.index(arm) % 4], lw=1.4, label=_label(run, arm))
        if _log_is_sensible(d["value"].to_numpy()):
            ax.set_yscale("log")
        ax.set(title=metric, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, framealpha=0.7)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle("Loss, all runs", fontsize=11)
    return fig


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


def compare_final_ranks(runs: Mapping[str, pd.DataFrame], *, dpi: int = DPI) -> Figure | None:
    """Final st(A) and nr(G) per weight, one horizontal bar per run/arm, the two quantities side by side."""
    final = final_ranks(runs)
    if final.empty:
        return None
    layers = ordered_unique(final["layer"])
    series = ordered_unique(zip(final["run"], final["arm"]))
    height = 0.8 / len(series)
    fig = _figure(11, float(np.clip(0.25 * len(layers) * max(len(series), 2) / 2 + 1.5, 2.8, 30)), dpi)
    axes = fig.subplots(1, 2, sharey=True)
    names = list(runs)
    for ax, (key, label) in zip(axes, [("st", "final st(A)"), ("nr", "final nr(G)")]):
        for k, (run, arm) in enumerate(series):
            d = final[(final["run"] == run) & (final["arm"] == arm)].set_index("layer").reindex(layers)
            arms = ordered_unique(final[final["run"] == run]["arm"])
            ax.barh(np.arange(len(layers)) + (k - (len(series) - 1) / 2) * height, d[key].to_numpy(),
                    height=height, color=_arm_colour(names.index(run)), label=_label(run, arm),
                    hatch=["", "//", "..", "xx"][arms.index(arm) % 4], edgecolor="white", linewidth=0.3)
        values = final[key].to_numpy(dtype=float)
        if _log_is_sensible(values):
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, axis="x")
    size = float(np.clip(240 / max(len(layers), 1), 5, 9))
    axes[0].set_yticks(range(len(layers)), [textwrap.shorten(l, 40, placeholder="…") for l in layers],
                       fontsize=size)
    axes[0].invert_yaxis()  # model order from the top
    axes[1].legend(fontsize=7, loc="best", framealpha=0.7)
    fig.suptitle("Final st(A) and nr(G) per weight", fontsize=11)
    return fig


def config_diff_html(configs: Mapping[str, Mapping]) -> str:
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
    return ("<p>Highlighted rows differ between runs.</p>"
            + table(rows, ["key", *flat], row_classes=row_classes))


def final_table_html(runs: Mapping[str, pd.DataFrame]) -> str:
    final = final_ranks(runs)
    if final.empty:
        return "<p>No per-weight st(A) / nr(G) were recorded.</p>"
    final = final.assign(favoured=np.where(final["ratio"] > 1, "spectral",
                                           np.where(final["ratio"] <= 1, "euclidean", "")))
    rows = final.values.tolist()
    classes = [[""] * 6 + [r[-1]] for r in rows]
    return table(rows, ["run", "arm", "layer", "st(A)", "nr(G)", "nr/st", "favoured"], classes=classes)


def write_comparison(out_dir: str | os.PathLike, runs: Mapping[str, pd.DataFrame], *,
                     configs: Mapping[str, Mapping] | None = None, title: str = "specscope comparison",
                     dpi: int = DPI) -> Path:
    """Write out_dir/comparison.html (self-contained) and its PNGs to out_dir/figures/.

    runs maps a display name (usually the run id) to that run's long-format metrics; configs maps the
    same names to their config dicts. Returns the path of comparison.html.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"compare_loss": compare_losses(runs, dpi=dpi), "compare_final_ranks": compare_final_ranks(runs, dpi=dpi)}
    pngs = save_figures({k: f for k, f in figures.items() if f is not None}, out, dpi=dpi)
    captions = {"compare_loss": "Loss-like metrics of every run; colour = run, line style = arm.",
                "compare_final_ranks": "st(A) and nr(G) of every weight at the last measured step, per run."}
    listing = table([[name, len(prepare(df)), ", ".join(a for a in ordered_unique(prepare(df)["arm"]) if a) or "—"]
                     for name, df in runs.items()], ["run", "records", "arms"])
    body = "\n".join([
        f"<h1>{esc(title)}</h1>",
        "<h2>Runs</h2>", listing,
        "<h2>Figures</h2>",
        "\n".join(figure_block(s, d, captions[s]) for s, d in pngs.items()) or "<p>No metrics to plot.</p>",
        "<h2>Final per-weight values</h2>", final_table_html(runs),
        "<h2>Configuration</h2>", config_diff_html(configs) if configs else config_table(None),
    ])
    path = out / "comparison.html"
    write_text_atomic(path, page(title, body))
    return path
