"""Matplotlib figures of one run's long-format metrics.

Every function takes the metrics DataFrame and returns a `matplotlib.figure.Figure`, or None when the
metrics it draws are absent, so a lab that records no st(A) still gets its loss curves. Figures are
made and finished with `specscope.report.style` (sizes, fonts, log ticks, verdict colours).
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from specscope.probe.advice import MARGIN
from specscope.records import Claim
from specscope.report import style
from specscope.report.style import DPI
from specscope.report.tables import as_claim, claim_verdict_text, finite, ordered_unique, prepare, rank_pairs, unmeasured

LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
MAX_PANELS = 24
MAX_POINTS = 20_000  # scatter points drawn at most
RANK_LABELS = {
    "stable_rank": "st(A): stable rank of each weight's input",
    "nuclear_rank": "nr(G): nuclear rank of each weight's gradient",
}


_COLOURS = [*colormaps["tab10"].colors, *colormaps["tab20b"].colors, *colormaps["tab20c"].colors]  # 50 apart


def _arm_colour(i: int):
    """The i-th arm's or run's colour: tab10's ten, then tab20b's and tab20c's twenty each (with tab10 alone the
    11th arm drew as the first, line for line)."""
    return _COLOURS[i % len(_COLOURS)]


def _depth_colour(i: int, n: int):
    # viridis clipped before its pale yellow end, which is unreadable on white
    return colormaps["viridis"](0.85 * i / max(n - 1, 1))


def _log_is_sensible(values: np.ndarray) -> bool:
    """Log scale when every value is positive and they span more than a factor of 10."""
    v = values[np.isfinite(values)]
    return len(v) > 0 and bool((v > 0).all()) and v.max() / v.min() > 10


def layer_type(name: str) -> str:
    """The layer's name with its numeric path parts replaced by '*': "blocks.3.attn.q" -> "blocks.*.attn.q"."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def metric_curves(df: pd.DataFrame, metrics: Sequence[str], *, title: str, dpi: int = DPI) -> Figure | None:
    """One panel per metric over steps, one line per arm (and layer, if the metric has layers)."""
    df = finite(prepare(df))
    df = df[df["metric"].isin(list(metrics))]
    metrics = [m for m in metrics if m in set(df["metric"])]
    if not metrics:
        return None
    arms = ordered_unique(df["arm"])
    rows, cols = _grid(len(metrics))
    fig = style.figure(style.PANEL[0] * cols, style.PANEL[1] * rows, dpi)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        d = df[df["metric"] == metric]
        for (arm, layer), g in d.groupby(["arm", "layer"], sort=False):
            g = g.groupby("step")["value"].mean()
            label = " / ".join(x for x in (arm, layer) if x) or metric
            ax.plot(g.index, g.to_numpy(), color=_arm_colour(arms.index(arm)), lw=1.4, label=label,
                    marker="o" if len(g) == 1 else None, ms=4)  # a metric recorded once is a point, not nothing
        if _log_is_sensible(d["value"].to_numpy()):
            ax.set_yscale("log")
        ax.set_title(metric, fontsize=style.FONT["title"])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(ax.lines) > 1:
            style.legend(ax)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    if len(metrics) > 1:
        fig.suptitle(title, fontsize=style.FONT["suptitle"])
    return style.finish(fig)


def _metric_names(df: pd.DataFrame, pattern: str) -> list[str]:
    names = ordered_unique(prepare(df)["metric"])
    return [m for m in names if re.search(pattern, m)]


def loss_curves(df: pd.DataFrame, *, dpi: int = DPI) -> Figure | None:
    """Every loss-like metric (name containing "loss") over steps, one line per arm; log-y when positive
    and spanning more than a decade."""
    return metric_curves(df, _metric_names(df, "loss"), title="Loss", dpi=dpi)


def accuracy_curves(df: pd.DataFrame, *, dpi: int = DPI) -> Figure | None:
    """Every accuracy metric (name containing "acc") over steps, one line per arm."""
    return metric_curves(df, _metric_names(df, "acc"), title="Accuracy", dpi=dpi)


def _panels(layers: list[str], max_single: int = 9) -> dict[str, list[str]]:
    """Panel title -> layers drawn in it: one panel per weight when few, else one per layer type."""
    if len(layers) <= max_single:
        return {name: [name] for name in layers}
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(layer_type(name), []).append(name)
    return groups


def rank_curves(df: pd.DataFrame, metric: str = "stable_rank", *, dpi: int = DPI) -> Figure | None:
    """`metric` (stable_rank = st(A), nuclear_rank = nr(G), ...) over steps for every weight.

    Up to 9 weights get a panel each (colour = arm). More weights are grouped by layer type
    ("blocks.*.attn.q"), colour = depth within the group (dark = first), line style = arm, with one
    colour bar and one arm legend outside the panels, so a 48-layer model stays readable.
    """
    df = finite(prepare(df))
    df = df[(df["metric"] == metric) & (df["layer"] != "")]
    if df.empty:
        return None
    arms = ordered_unique(df["arm"])
    groups = _panels(ordered_unique(df["layer"]))
    grouped = any(len(layers) > 1 for layers in groups.values())
    panels = list(groups.items())
    dropped = max(len(panels) - MAX_PANELS, 0)
    panels = panels[:MAX_PANELS]
    rows, cols = _grid(len(panels))
    fig = style.figure(style.PANEL[0] * cols + (1.2 if grouped else 0), style.PANEL[1] * rows + 0.4, dpi)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    curves = {key: g.groupby("step")["value"].mean() for key, g in df.groupby(["layer", "arm"], sort=False)}
    for ax, (name, layers) in zip(axes, panels):
        for li, layer in enumerate(layers):
            for ai, arm in enumerate(arms):
                if (layer, arm) not in curves:
                    continue
                g = curves[(layer, arm)]
                if grouped:
                    look = dict(color=_depth_colour(li, len(layers)), linestyle=LINESTYLES[ai % 4])
                else:
                    look = dict(color=_arm_colour(ai), label=arm or None)
                ax.plot(g.index, g.to_numpy(), lw=1.3, marker="." if len(g) < 3 else None, **look)
        if _log_is_sensible(df[df["layer"].isin(layers)]["value"].to_numpy()):
            ax.set_yscale("log")
        title = name if len(layers) == 1 else f"{name}  ({len(layers)} weights)"
        ax.set_title(style.shorten(title, 48), fontsize=style.FONT["label"])
        ax.grid(alpha=0.3)
        ax.set_xlabel("step", fontsize=style.FONT["label"])
        if not grouped and len(arms) > 1:
            style.legend(ax)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if grouped:
        depth = ScalarMappable(Normalize(0, 1), ListedColormap([_depth_colour(i, 64) for i in range(64)]))
        bar = fig.colorbar(depth, ax=list(axes), shrink=0.5, aspect=25, location="right")
        bar.set_ticks([0, 1], labels=["first", "last"])
        bar.set_label("depth within group", fontsize=style.FONT["label"])
        if len(arms) > 1:
            handles = [Line2D([], [], color="k", linestyle=LINESTYLES[i % 4]) for i in range(len(arms))]
            fig.legend(handles, [a or "(run)" for a in arms], title="arm", loc="outside right upper",
                       fontsize=style.FONT["legend"])
    suffix = f"  (first {MAX_PANELS} panels; {dropped} more not shown)" if dropped else ""
    fig.suptitle(RANK_LABELS.get(metric, metric) + suffix, fontsize=style.FONT["suptitle"])
    return style.finish(fig)


def stable_rank_curves(df: pd.DataFrame, *, dpi: int = DPI) -> Figure | None:
    """st(A) of every weight's input over steps."""
    return rank_curves(df, "stable_rank", dpi=dpi)


def nuclear_rank_curves(df: pd.DataFrame, *, dpi: int = DPI) -> Figure | None:
    """nr(G) of every weight's gradient over steps."""
    return rank_curves(df, "nuclear_rank", dpi=dpi)


STACKED_ROWS = 48  # from 3 arms, as many (arm, weight) rows as this go in one heatmap panel


def advantage_heatmap(df: pd.DataFrame, *, dpi: int = DPI) -> Figure | None:
    """Weight × step heatmap of log10(nr(G)/st(A)), one panel per arm (from three arms with at most
    STACKED_ROWS (arm, weight) pairs in all, one panel with a row per arm and weight).

    Diverging colours centred at 0: red cells are where the spectral step has the larger guaranteed
    decrease (nr > st), blue where the Euclidean one does; grey cells were not measured. Weights the
    probe could not pair are rows in the `unmeasured` colour. The colour bar marks the undecided band
    (nr/st within a factor 1 + MARGIN of 1).
    """
    pairs = rank_pairs(df)
    ratio = pairs["ratio"].to_numpy(dtype=float)
    valid = np.isfinite(ratio) & (ratio > 0)
    if not valid.any():
        return None
    # steps and weights with an unusable ratio stay in the grid as grey cells, so gaps are visible
    pairs = pairs.assign(log_ratio=np.log10(np.where(valid, ratio, np.nan)))
    arms = ordered_unique(pairs["arm"])
    missing = unmeasured(df)
    unmeasured_names = set(missing["layer"])
    layers = ordered_unique(list(pairs["layer"]) + list(missing["layer"]))
    if len(arms) >= 3 and len(arms) * len(layers) <= STACKED_ROWS:  # many arms of few weights: one panel, a row
        # per arm and weight (twelve random-features arms of one weight made twelve one-row panels side by side)
        pairs = pairs.assign(layer=pairs["arm"] + " · " + pairs["layer"], arm="")
        unmeasured_names = {f"{a} · {name}" for a in arms for name in unmeasured_names}
        layers, arms = [f"{a} · {name}" for a in arms for name in layers], [""]
    steps = sorted(pairs["step"].unique())
    vmax = max(float(np.abs(pairs["log_ratio"]).max()), 0.1)
    cmap = colormaps["RdBu_r"].with_extremes(bad=style.NOT_MEASURED)
    label_size = float(np.clip(240 / max(len(layers), 1), style.MIN_FONT, 9))
    every = max(1, math.ceil(len(layers) / 80))  # thin the labels of very deep models; the table has them all
    names = [style.shorten(l, 40) for l in layers]
    panel_width = float(np.clip(2.5 + 0.08 * len(steps), 3.0, 7.0))
    width = min(0.075 * max(map(len, names)) * label_size / 7 + 2.0 + panel_width * len(arms), 18)
    fig = style.figure(width, float(np.clip(0.16 * len(layers) / every + 1.8, 3.0, 16)), dpi)
    axes = fig.subplots(1, len(arms), squeeze=False, sharey=True).ravel()
    for k, (ax, arm) in enumerate(zip(axes, arms)):
        grid = (pairs[pairs["arm"] == arm]
                .pivot_table(index="layer", columns="step", values="log_ratio", aggfunc="mean")
                .reindex(index=layers, columns=steps))
        image = ax.imshow(np.ma.masked_invalid(grid.to_numpy(dtype=float)), aspect="auto", cmap=cmap,
                          norm=Normalize(-vmax, vmax), interpolation="nearest")
        for i in [i for i, name in enumerate(layers) if name in unmeasured_names]:
            ax.axhspan(i - 0.5, i + 0.5, color=style.VERDICT_COLOURS["unmeasured"], alpha=0.55, lw=0)
        if k == 0:
            ax.set_yticks(range(0, len(layers), every), names[::every], fontsize=label_size)
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=style.FONT["tick"])
        ax.set_xlabel("step", fontsize=style.FONT["label"])
        if arm:
            ax.set_title(f"arm: {arm}", fontsize=style.FONT["label"])
    bar = fig.colorbar(image, ax=list(axes), shrink=0.9)
    band = math.log10(1 + MARGIN)
    bar.ax.axhspan(-band, band, color="white", alpha=0.6, lw=0)
    bar.ax.axhline(band, color="0.3", lw=0.6)
    bar.ax.axhline(-band, color="0.3", lw=0.6)
    bar.set_label("log10(nr/st): red spectral, blue Euclidean", fontsize=style.FONT["label"])
    extra = ", purple = unmeasured" if len(missing) else ""
    fig.suptitle(f"log10(nr(G)/st(A)) per weight and step (grey = no value{extra})", fontsize=style.FONT["title"])
    return style.finish(fig)


def rank_scatter(df: pd.DataFrame, *, dpi: int = DPI) -> Figure | None:
    """nr(G) against st(A) for every (weight, step) on log-log axes with the line nr = st.

    Points above the line are where a spectral step has the larger guaranteed one-step decrease.
    Colour = step, marker = arm.
    """
    pairs = rank_pairs(df)
    pairs = pairs[np.isfinite(pairs["st"]) & np.isfinite(pairs["nr"]) & (pairs["st"] > 0) & (pairs["nr"] > 0)]
    if pairs.empty:
        return None
    steps = np.sort(pairs["step"].unique())
    if len(pairs) > MAX_POINTS:  # keep evenly spaced steps, whole, so every weight stays in the picture
        keep = steps[np.linspace(0, len(steps) - 1, max(2, MAX_POINTS * len(steps) // len(pairs))).astype(int)]
        pairs = pairs[pairs["step"].isin(keep)]
    fig = style.figure(6.2, 4.6, dpi)
    ax = fig.subplots()
    norm = Normalize(float(pairs["step"].min()), float(max(pairs["step"].max(), pairs["step"].min() + 1)))
    arms = ordered_unique(pairs["arm"])
    points = None
    for i, arm in enumerate(arms):
        p = pairs[pairs["arm"] == arm]
        points = ax.scatter(p["st"], p["nr"], c=p["step"], cmap="viridis", norm=norm, s=16, alpha=0.8,
                            marker=MARKERS[i % len(MARKERS)], edgecolors="none")
    lo = 0.8 * min(pairs["st"].min(), pairs["nr"].min())
    hi = 1.25 * max(pairs["st"].max(), pairs["nr"].max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.fill_between([lo, hi], [lo, hi], [hi, hi], color=style.VERDICT_COLOURS["spectral"], alpha=0.06, lw=0)
    ax.text(0.04, 0.96, "spectral favoured", transform=ax.transAxes, va="top", fontsize=style.FONT["tick"],
            color=style.VERDICT_COLOURS["spectral"])
    ax.text(0.96, 0.04, "Euclidean favoured", transform=ax.transAxes, ha="right", fontsize=style.FONT["tick"],
            color=style.VERDICT_COLOURS["euclidean"])
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi),
           xlabel="st(A)  (stable rank of the input)", ylabel="nr(G)  (nuclear rank of the gradient)")
    ax.grid(alpha=0.3, which="major")
    # proxy handles: the arm's marker shape in grey (the real points are coloured by step)
    handles = [Line2D([], [], marker=MARKERS[i % len(MARKERS)], color="0.4", linestyle="none")
               for i in range(len(arms)) if len(arms) > 1] + [Line2D([], [], color="k", linestyle="--")]
    labels = [a or "(run)" for a in arms if len(arms) > 1] + ["nr = st"]
    style.legend(ax, handles, labels, where="top")
    fig.colorbar(points, ax=ax, label="step")
    fig.suptitle("nr(G) vs st(A) per weight and step", fontsize=style.FONT["title"])
    return style.finish(fig)


def claims_figure(claims: Sequence[Claim | Mapping], *, dpi: int = DPI) -> Figure | None:
    """The claims (`Claim`s or dicts of their fields) as a table image: claim, text, published, measured,
    verdict (coloured)."""
    claims = [as_claim(c) for c in claims]
    if not claims:
        return None
    widths = {"claim": 8, "text": 60, "published": 20, "measured": 20, "verdict": 13}  # wrap, in chars
    rows = [[textwrap.fill(str(v), widths[k]) for k, v in zip(widths, (c.id, c.text, c.published,
                                                                         c.measured, claim_verdict_text(c.verdict)))]
            for c in claims]
    lines = [max(cell.count("\n") + 1 for cell in row) for row in rows]
    fig = style.figure(11, 0.6 + 0.2 * (sum(lines) + len(rows) + 1), dpi)
    ax = fig.subplots()
    ax.axis("off")
    total = sum(widths.values())
    table = ax.table(cellText=rows, colLabels=list(widths), colWidths=[w / total for w in widths.values()],
                     cellLoc="left", loc="upper center", bbox=[0, 0, 1, 1])
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    height = 1 / (sum(lines) + len(rows) + 1 + 1)
    for (r, col), cell in table.get_celld().items():
        cell.set_height(height * (1.5 if r == 0 else lines[r - 1] + 1))
        cell.get_text().set_va("center")
        cell.PAD = 0.15 * min(widths.values()) / list(widths.values())[col]  # same inset in every column
        if r == 0:
            cell.set_facecolor("#e8e8e8")
            cell.get_text().set_weight("bold")
        elif col == len(widths) - 1:
            cell.set_facecolor(style.CLAIM_COLOURS.get(claims[r - 1].verdict, "white"))
    return style.finish(fig)


def run_figures(df: pd.DataFrame, claims: Sequence[Claim | Mapping] = (), *, dpi: int = DPI) -> dict[str, Figure]:
    """All standard figures of one run that have data, by file stem (order = order in the report)."""
    claims = [as_claim(c) for c in claims]  # a bad claim is refused before any figure is drawn
    makers = {
        "loss": lambda: loss_curves(df, dpi=dpi),
        "accuracy": lambda: accuracy_curves(df, dpi=dpi),
        "stable_rank": lambda: stable_rank_curves(df, dpi=dpi),
        "nuclear_rank": lambda: nuclear_rank_curves(df, dpi=dpi),
        "advantage_heatmap": lambda: advantage_heatmap(df, dpi=dpi),
        "nr_vs_st": lambda: rank_scatter(df, dpi=dpi),
        "claims": lambda: claims_figure(claims, dpi=dpi),
    }
    figures = {name: make() for name, make in makers.items()}
    return {name: fig for name, fig in figures.items() if fig is not None}
