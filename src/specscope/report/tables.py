"""Tables from the long-format metrics: the per-layer summary, and rich tables for the CLI.

The metrics DataFrame is the store's long format (`run_id, step, layer, metric, value, arm, estimator,
rows, shape, flag`). Every function here tolerates missing columns, missing metrics and NaN values:
a lab that records no st(A) simply gets an empty summary, never an exception.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import typing
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from rich.table import Table
from rich.text import Text

from specscope.names import visible
from specscope.probe.advice import MARGIN, verdict
from specscope.records import SWEEP, Claim, Verdict

COLUMNS = ("run_id", "step", "layer", "metric", "value", "arm", "estimator", "rows", "shape", "flag")
TEXT_COLUMNS = ("run_id", "layer", "metric", "arm", "estimator", "shape", "flag")

VERDICT_STYLE = {"PASS": "bold green", "FAIL": "bold red", "INCONCLUSIVE": "bold yellow", "UNDECIDABLE": "bold"}
# how a claim verdict reads on a page or a terminal, where it differs from its code
CLAIM_VERDICT_TEXT = {"UNDECIDABLE": "not decidable at quick size"}
# per-weight verdict -> terminal style (the same hues as style.VERDICT_COLOURS)
WEIGHT_STYLE = {"spectral": "red", "euclidean": "blue", "undecided": "yellow", "unmeasured": "magenta"}

SUMMARY_COLUMNS = [
    "arm", "layer", "shape", "steps", "last_step",
    "st_last", "st_median", "nr_last", "nr_median", "ratio_last", "ratio_median", "verdict",
]
UNMEASURED_COLUMNS = ["arm", "layer", "shape", "reason"]


# the CLI shows a compact view of layer_summary: summary column -> header
CLI_COLUMNS = {"arm": "arm", "layer": "weight", "last_step": "step", "st_last": "st(A)", "nr_last": "nr(G)",
               "ratio_last": "nr/st", "ratio_median": "median nr/st", "verdict": "verdict"}


VERDICTS = typing.get_args(Verdict)  # PASS, FAIL, INCONCLUSIVE, UNDECIDABLE
CLAIM_FIELDS = tuple(f.name for f in dataclasses.fields(Claim))


def as_claim(c: Claim | Mapping) -> Claim:
    """A claim given as a `Claim` or as a dict of its fields (`Claim.as_dict()`, a summary.json entry), checked:
    anything else, a missing or unknown field, or a verdict other than PASS/FAIL/INCONCLUSIVE/UNDECIDABLE is
    one ValueError naming it."""
    if isinstance(c, Mapping):
        fields = dict(c)
        missing = [k for k in ("id", "text", "published", "measured", "verdict") if k not in fields]
        unknown = [str(k) for k in fields if k not in CLAIM_FIELDS]
        if missing or unknown:
            raise ValueError(f"claim {fields.get('id', '?')!r}: " + "; ".join(
                ([f"missing field(s) {', '.join(missing)}"] if missing else [])
                + ([f"unknown field(s) {', '.join(unknown)}"] if unknown else []))
                + f"; a claim is a specscope.records.Claim or a dict of its fields ({', '.join(CLAIM_FIELDS)})")
        c = Claim(**fields)
    elif not isinstance(c, Claim):
        raise ValueError(f"a claim must be a specscope.records.Claim or a dict of its fields, got {type(c).__name__}")
    if c.verdict not in VERDICTS:
        raise ValueError(f"claim {c.id!r} has the unknown verdict {c.verdict!r}; use one of {', '.join(VERDICTS)}")
    return c


def claim_verdict_text(code: str) -> str:
    """A claim verdict as a reader sees it: "not decidable at quick size" for UNDECIDABLE, else the code."""
    return CLAIM_VERDICT_TEXT.get(code, code)


def prepare(df: pd.DataFrame | None) -> pd.DataFrame:
    """A clean copy of a metrics frame: all store columns present, text columns str, value float.

    Why: frames come from SQLite, from tests and from labs' own analysis; None/NaN arms and layers
    would otherwise split groups ("" vs None) and break sorting.
    """
    if df is None:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    out = df.copy()
    for c in COLUMNS:
        if c not in out.columns:
            out[c] = 0 if c in ("step", "rows") else ("" if c != "value" else np.nan)
    for c in TEXT_COLUMNS:
        out[c] = out[c].fillna("").astype(str)
    out["value"] = pd.to_numeric(out["value"], errors="coerce").astype(float)
    out["step"] = pd.to_numeric(out["step"], errors="coerce")
    out = out[out["step"].notna()]
    out["step"] = out["step"].astype(np.int64)
    return out.reset_index(drop=True)


def training(df: pd.DataFrame) -> pd.DataFrame:
    """The records of training steps: a prepared frame without the sweep records (flag `records.SWEEP`: their step
    column holds a width, a dimension, a size or an index)."""
    return df[df["flag"] != SWEEP]


def finite(df: pd.DataFrame) -> pd.DataFrame:
    """Rows whose value is a finite number (what can be plotted or summarized)."""
    return df[np.isfinite(df["value"].to_numpy(dtype=float))]


def ordered_unique(values: Iterable) -> list:
    """Unique values in order of first appearance (layers keep model order, not alphabetical)."""
    if isinstance(values, pd.Series):
        values = values.tolist()
    return list(dict.fromkeys(values))


def rank_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (arm, layer, step) with columns st, nr, ratio.

    ratio is the recorded `spectral_advantage` where present, else nr/st computed from the pair measured
    at the same step. Layers with neither metric are absent.
    """
    df = finite(prepare(df))
    df = df[df["metric"].isin(["stable_rank", "nuclear_rank", "spectral_advantage"]) & (df["layer"] != "")]
    cols = ["arm", "layer", "step", "st", "nr", "ratio"]
    if df.empty:
        return pd.DataFrame({"arm": pd.Series(dtype=str), "layer": pd.Series(dtype=str),
                             "step": pd.Series(dtype=np.int64),
                             **{c: pd.Series(dtype=float) for c in ("st", "nr", "ratio")}})
    wide = df.pivot_table(index=["arm", "layer", "step"], columns="metric", values="value", aggfunc="mean")
    wide = wide.reindex(columns=["stable_rank", "nuclear_rank", "spectral_advantage"])
    wide.columns = ["st", "nr", "recorded_ratio"]
    wide["ratio"] = wide["recorded_ratio"].fillna(wide["nr"] / wide["st"])
    wide = wide.drop(columns="recorded_ratio").reset_index()
    order = {name: i for i, name in enumerate(ordered_unique(df["layer"]))}
    wide["_order"] = wide["layer"].map(order)
    wide = wide.sort_values(["arm", "_order", "step"]).drop(columns="_order")
    return wide[cols].reset_index(drop=True)


def _last(s: pd.Series) -> float:
    s = s.dropna()
    return float(s.iloc[-1]) if len(s) else math.nan


def _median(s: pd.Series) -> float:
    s = s.dropna()
    return float(s.median()) if len(s) else math.nan


def unmeasured(df: pd.DataFrame) -> pd.DataFrame:
    """The weights the probe could not pair (records with metric "unmeasured"): arm, layer, shape, reason."""
    df = prepare(df)
    d = df[(df["metric"] == "unmeasured") & (df["layer"] != "")]
    d = d.drop_duplicates(["arm", "layer"], keep="last").rename(columns={"flag": "reason"})
    return d[UNMEASURED_COLUMNS].reset_index(drop=True)


def layer_summary(df: pd.DataFrame, margin: float = MARGIN) -> pd.DataFrame:
    """Per (arm, layer): last and median st(A), nr(G) and nr/st over the recorded steps, and the verdict.

    `verdict` is `specscope.probe.advice.verdict` of the median nr/st (the one rule used everywhere):
    "spectral" above 1 + margin (the spectral step has the larger guaranteed decrease, REFERENCE §3),
    "euclidean" below 1/(1 + margin), else "undecided". The median, not the last value, decides because
    a single measured step is noisy. Weights the probe could not pair are rows with verdict "unmeasured".
    """
    pairs = rank_pairs(df)
    shapes = _shapes(df)
    rows = []
    for (arm, layer), g in pairs.groupby(["arm", "layer"], sort=False):
        ratio_median = _median(g["ratio"])
        rows.append({
            "arm": arm, "layer": layer, "shape": shapes.get((arm, layer), ""), "steps": int(len(g)),
            "last_step": int(g["step"].max()), "st_last": _last(g["st"]), "st_median": _median(g["st"]),
            "nr_last": _last(g["nr"]), "nr_median": _median(g["nr"]),
            "ratio_last": _last(g["ratio"]), "ratio_median": ratio_median, "verdict": verdict(ratio_median, margin),
        })
    seen = {(r["arm"], r["layer"]) for r in rows}
    for u in unmeasured(df).itertuples():
        if (u.arm, u.layer) not in seen:
            rows.append({"arm": u.arm, "layer": u.layer, "shape": u.shape, "steps": 0, "last_step": -1,
                         **{c: math.nan for c in SUMMARY_COLUMNS[5:-1]}, "verdict": "unmeasured"})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _shapes(df: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(arm, layer) -> the weight's shape: from its gradient records (nr(G) is measured on the weight's
    own matrix), else "" (st(A) records carry the input's shape, not the weight's)."""
    df = prepare(df)
    d = df[(df["metric"] == "nuclear_rank") & (df["shape"] != "")]
    return dict(zip(zip(d["arm"], d["layer"]), d["shape"]))


def fmt(x: object) -> str:
    """Numbers to 4 significant digits, NaN (no value) to an em dash, ±Inf (a value that overflowed: a diverged loss)
    to "inf" / "-inf", anything else to str."""
    if isinstance(x, (bool, np.bool_)):
        return str(x)
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return "—" if math.isnan(x) else ("inf" if x > 0 else "-inf") if math.isinf(x) else f"{x:.4g}"
    return "" if x is None else str(x)


def claims_table(claims: Sequence[Claim | Mapping], *, title: str = "Claims") -> Table:
    """A rich table of claims (each a Claim or a dict of its fields, as write_report takes them): id, claim,
    published, measured, coloured verdict."""
    table = Table(title=title, show_lines=False)
    for name in ("claim", "text", "published", "measured", "verdict"):
        table.add_column(name, overflow="fold", ratio=3 if name == "text" else None)
    for c in map(as_claim, claims):
        # Text(...) never parses rich markup, so a claim text like "[red]" prints as written
        table.add_row(*(Text(visible(x)) for x in (c.id, c.text, c.published, c.measured)),
                      Text(claim_verdict_text(c.verdict), style=VERDICT_STYLE.get(c.verdict, "")))
    return table


def _is_long_format(df: pd.DataFrame) -> bool:
    return {"metric", "value"}.issubset(df.columns)


VERDICT_COLUMNS = ("verdict", "geometry", "advice", "recommendation")  # coloured by verdict, never narrowed
KEPT_COLUMNS = (*VERDICT_COLUMNS, "spectral_advantage", "nr/st", "median nr/st")  # with the first: last to go


class FittedTable(Table):
    """A Table that leaves out columns, right to left, where the console is too narrow for all of them, rather
    than squeezing some to nothing: the first column (the weight), the verdict and nr/st go last. The caption
    names what was left out."""

    def __rich_console__(self, console, options):
        table = self
        droppable = [c for c in self.columns[1:] if str(c.header) not in KEPT_COLUMNS]
        left_out = []
        while droppable and table.__rich_measure__(console, options).minimum > options.max_width:
            left_out.insert(0, str(droppable.pop().header))
            table = copy.copy(self)
            table.columns = [c for c in self.columns if str(c.header) not in left_out]
            table.caption = f"not shown at this width: {', '.join(left_out)}"
        if table.__rich_measure__(console, options).minimum > options.max_width:  # names and numbers fold too
            table = copy.copy(table)
            table.columns = [copy.copy(c) for c in table.columns]
            for c in table.columns:
                c.no_wrap = False
        rest = [c for c in table.columns[1:] if str(c.header) not in VERDICT_COLUMNS]  # nr/st, then the verdict is whole
        while rest and not _verdicts_whole(table, options.max_width):
            left_out.insert(0, str(rest.pop().header))
            table = copy.copy(table)
            table.columns = [c for c in table.columns if str(c.header) not in left_out]
            table.caption = f"not shown at this width: {', '.join(left_out)}"
        yield from Table.__rich_console__(table, console, options)


def _verdicts_whole(table: Table, width: int) -> bool:
    """Whether every verdict cell of `table` comes out whole at `width` columns (rendered off screen: rich's measure
    takes a folding name for one word as wide as the whole name, so it cannot tell)."""
    from rich.console import Console

    plain = copy.copy(table)
    plain.__class__ = Table  # rendered as is, not fitted again
    plain.title = plain.caption = None  # a verdict's word there is no cell
    off = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    off.print(plain)
    words = set(off.export_text().split())
    return all(word in words for c in table.columns if str(c.header) in VERDICT_COLUMNS  # each word of a cell whole
               for cell in c._cells for word in str(getattr(cell, "plain", cell)).split())


def layer_table(df_or_advice: pd.DataFrame, *, title: str = "Per-weight geometry") -> Table:
    """A rich per-layer table for the CLI.

    Accepts either the long-format metrics (summarized with `layer_summary`) or an already wide table
    such as `Monitor.advice()` (one row per layer; shown column by column). A column named
    `verdict`, `geometry`, `advice` or `recommendation` is coloured by verdict (`WEIGHT_STYLE`).
    """
    if _is_long_format(df_or_advice):
        wide = layer_summary(df_or_advice)[list(CLI_COLUMNS)].rename(columns=CLI_COLUMNS)
    else:
        wide = df_or_advice
    if "arm" in wide.columns and (wide["arm"].astype(str) == "").all():
        wide = wide.drop(columns="arm")
    table = FittedTable(title=title)  # on a narrow console, fewer columns: kind, shape, verdict and estimator of
    for col in wide.columns:           # Monitor.advice() were squeezed to nothing at 80 beside long layer names
        numeric = pd.api.types.is_numeric_dtype(wide[col])
        table.add_column(str(col), justify="right" if numeric else "left", overflow="fold",
                         no_wrap=numeric or col in ("arm", "weight", "layer"),
                         min_width=max((len(fmt(v)) for v in wide[col]), default=None) if str(col) in VERDICT_COLUMNS else None)
    for _, row in wide.iterrows():
        cells = []
        for col in wide.columns:
            text = fmt(row[col])
            style = WEIGHT_STYLE.get(text.lower(), "") if str(col) in VERDICT_COLUMNS else ""
            cells.append(Text(text, style=style))
        table.add_row(*cells)
    return table
