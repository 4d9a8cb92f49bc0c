"""One self-contained HTML page per run: figures as base64 PNG data URIs, inline CSS, one inline script.

The page loads nothing from the network and escapes every string it did not write itself (config keys
and values, layer and arm names, figure names, claim texts). Its only script is `SCRIPT` below (sorting
and searching the per-weight table), and a Content-Security-Policy allows that script by its hash and
nothing else: no other script, no request beyond the page's own data: images.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd
from matplotlib import rc_context
from matplotlib.figure import Figure

import specscope
from specscope.errors import ConfigError, RunStoreError
from specscope.probe.advice import MARGIN
from specscope.records import SWEEP, Claim
from specscope.report import style
from specscope.report.figures import DPI, run_figures
from specscope.report.tables import as_claim, claim_verdict_text, fmt, layer_summary, ordered_unique, prepare, training, unmeasured
from specscope.store.integrity import write_atomic
from specscope.store.readers import salvage_title

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
p.warning { color: #b00020; font-weight: 600; overflow-wrap: anywhere; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; overflow-wrap: anywhere; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd;
       padding-bottom: 0.2em; margin-top: 1.8em; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td { overflow-wrap: anywhere; } .wide td { white-space: nowrap; } .wide th { min-width: 4em; }
.scroll { max-width: 100%; overflow-x: auto; }
""" + "".join(f"td.{k} {{ background: {v}; font-weight: bold; overflow-wrap: normal; }}\n"  # never INCONCL-USIVE
          for k, v in style.CLAIM_COLOURS.items()) + \
    "".join(f"td.{k} {{ color: {v}; font-weight: 600; }}\n" for k, v in style.VERDICT_COLOURS.items()) + """
td.unmeasured { font-style: italic; } td.UNDECIDABLE { min-width: 9em; } tr.differs td { background: #fff6d6; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } .meta { color: #555; font-size: 0.9em; }
code { background: #f5f5f5; padding: 0 3px; }
.side { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.side > figure { flex: 1 1 480px; margin: 0; min-width: 0; }
.weights { flex: 0 1 auto; min-width: 0; max-height: 90vh; overflow: auto; }
.weights td, .weights th { white-space: nowrap; } td.num { white-space: nowrap; }
.weights thead th { position: sticky; top: 0; }
.weights input { font: inherit; padding: 2px 6px; width: 20em; max-width: 100%; }
th button { all: unset; cursor: pointer; } th button:focus-visible { outline: 2px solid #2166ac; }
th[aria-sort=ascending] button::after { content: " ▲"; } th[aria-sort=descending] button::after { content: " ▼"; }
"""

# Sorts every table whose header cells hold buttons by the clicked column (numbers as numbers, "inf" / "-inf" as ±∞,
# "—" last), and
# filters a .weights table's rows by its search box. Reads only the table it acts on; writes nothing but row
# order, row.hidden and a count.
SCRIPT = """
const key = (row, i) => {
  const t = row.cells[i].textContent.trim(), v = t === "inf" ? Infinity : t === "-inf" ? -Infinity : Number(t);
  return t === "" || t === "\u2014" ? null : Number.isNaN(v) ? t.toLowerCase() : v;
};
for (const table of document.querySelectorAll("table")) {
  if (!table.tHead || !table.tBodies.length) continue;
  const cells = [...table.tHead.rows[table.tHead.rows.length - 1].cells], body = table.tBodies[0];
  const rows = [...body.rows];
  for (const [i, th] of cells.entries()) {
    const button = th.querySelector("button");
    if (!button) continue;
    button.addEventListener("click", () => {
      const up = th.getAttribute("aria-sort") !== "ascending";
      for (const h of table.tHead.querySelectorAll("th")) h.removeAttribute("aria-sort");
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      rows.sort((a, b) => {
        const x = key(a, i), y = key(b, i);
        if (x === null || y === null) return (x === null) - (y === null);
        if (typeof x !== typeof y) return typeof x === "number" ? -1 : 1;
        return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
      });
      body.append(...rows);
    });
  }
}
for (const box of document.querySelectorAll(".weights")) {
  const rows = [...box.querySelector("table").tBodies[0].rows];
  const search = box.querySelector("input"), count = box.querySelector("output");
  search.addEventListener("input", () => {
    const q = search.value.trim().toLowerCase();
    let n = 0;
    for (const row of rows) { row.hidden = !row.textContent.toLowerCase().includes(q); n += !row.hidden; }
    count.textContent = n + " of " + rows.length + " shown";
  });
}
"""
SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode("utf-8")).digest()).decode("ascii")
CSP = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{SCRIPT_HASH}'; "
       "base-uri 'none'; form-action 'none'")

MEASURED = ("stable_rank", "nuclear_rank", "spectral_advantage")  # a weight with one of these was measured

CAPTIONS = {
    "loss": "Loss-like metrics over steps, one line per arm.",
    "accuracy": "Accuracy metrics over steps, one line per arm.",
    "stable_rank": "st(A) = ‖A‖_F²/‖A‖_2² of each weight's input over steps. Low st(A) favours a spectral step.",
    "nuclear_rank": "nr(G) = ‖G‖_*²/‖G‖_F² of each weight's gradient over steps. High nr(G) favours a spectral step.",
    "advantage_heatmap": "log10(nr(G)/st(A)) per weight and step. Red (> 0): the spectral step has the larger "
                         "guaranteed one-step decrease; blue: the Euclidean step does; the lines on the colour "
                         "bar bound the undecided band; grey: no value at that step; purple rows: weights the "
                         "probe could not pair (unmeasured). The table beside it has every weight.",
    "nr_vs_st": "nr(G) against st(A) for every weight and step; points above nr = st favour a spectral step.",
    "claims": "The claims table as an image (for slides).",
}


# characters that would hide or reorder text on the page (controls, zero-width and bidirectional marks): shown escaped
# (every control but tab and line feed, which HTML shows as a space; every format character: soft hyphen, Arabic letter
# mark, Mongolian vowel separator, zero-width and bidi marks, line and paragraph separators, interlinear annotation,
# tag characters)
_HIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f"
                     "\ufeff\ufff9-\ufffb\U000e0000-\U000e007f]")


def esc(x: object) -> str:
    """Text for HTML: escaped, quotes included; a control, zero-width or bidi character shown as `\u202e`."""
    return html.escape(_HIDDEN.sub(lambda m: m.group().encode("unicode_escape").decode(), fmt(x)), quote=True)


def png_bytes(fig: Figure, dpi: int | None = None) -> bytes:
    """The figure as PNG bytes (the same bytes go to disk and into the page)."""
    buffer = io.BytesIO()
    with rc_context(style.PLAIN_TEXT):
        fig.savefig(buffer, format="png", dpi=dpi or fig.dpi, facecolor="white")
    return buffer.getvalue()


def safe_name(name: str) -> str:
    """A file stem that cannot leave figures/ or confuse a shell: [A-Za-z0-9_.-] only, no leading dot."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "figure"
    return stem[:80]


def check_writable(out_dir: str | os.PathLike, page_name: str = "report.html") -> Path:
    """out_dir/figures, or RunStoreError when a page written to out_dir would be refused (figures/ a link out
    of the directory, or not a folder; the page `page_name` a folder): called before anything is written, so a
    refused report changes nothing."""
    folder = Path(out_dir) / "figures"
    if folder.is_symlink():
        raise RunStoreError(f"{folder} is a link to {os.path.realpath(folder)}; a report writes only inside its own "
                            "directory: remove the link")
    if folder.exists() and not folder.is_dir():
        raise RunStoreError(f"{folder} is a file, not the folder of the report's figures: move it away")
    page = Path(out_dir) / page_name  # replaced whole (a link there too), but a folder cannot be
    if page.is_dir() and not page.is_symlink():
        raise RunStoreError(f"{page} is a folder, not the report page the report replaces: move it away")
    return folder


def save_figures(figures: Mapping[str, Figure], out_dir: Path, *, dpi: int | None = None,
                 owned: Callable[[str], bool] = lambda stem: False, page_name: str = "report.html") -> dict[str, bytes]:
    """Finish each figure with the project style and write it to out_dir/figures/<stem>.png; returns
    stem -> PNG bytes. A PNG already there whose stem is `owned` (a figure this page could draw) but was not
    drawn this time is removed, so figures/ never keeps one from data the page no longer shows."""
    folder = check_writable(out_dir, page_name)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for stem, fig in figures.items():
        data = png_bytes(style.finish(fig), dpi)
        write_atomic(folder / f"{stem}.png", data)  # replaces a link there itself: never writes through it
        written[stem] = data
    for stale in folder.glob("*.png"):
        if stale.stem not in written and owned(stale.stem):
            stale.unlink()  # unlinks a link itself, never its target
    return written


def img(data: bytes, alt: str) -> str:
    """An <img> whose source is the PNG itself (a data URI), so the page needs no other file."""
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{esc(alt)}">'


def figure_block(stem: str, data: bytes, caption: str) -> str:
    return (f'<figure id="fig-{esc(stem)}">{img(data, stem)}<figcaption><code>figures/{esc(stem)}.png'
            f"</code> — {esc(caption)}</figcaption></figure>")


def table(rows: Sequence[Sequence[object]], header: Sequence[str], *, classes: Sequence[Sequence[str]] = (),
          row_classes: Sequence[str] = (), sortable: bool = False,
          groups: Sequence[tuple[str, int]] = (), table_class: str = "") -> str:
    """An HTML table; every cell escaped. Numbers are right-aligned; `classes[i][j]` styles a cell.

    sortable: header cells are buttons the page's script sorts by. groups: a header row above the
    column names, (text, number of columns spanned) each.
    """
    button = '<button type="button">{}</button>' if sortable else "{}"
    head = "<tr>" + "".join(f"<th>{button.format(esc(h))}</th>" for h in header) + "</tr>" if any(header) else ""
    if groups:
        head = "<tr>" + "".join(f'<th colspan="{int(n)}">{esc(g)}</th>' for g, n in groups) + "</tr>" + head
    head = f"<thead>{head}</thead>" if head else ""
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, value in enumerate(row):
            cls = ["num"] if isinstance(value, (int, float)) and not isinstance(value, bool) else []
            if i < len(classes) and j < len(classes[i]) and classes[i][j]:
                cls.append(re.sub(r"[^A-Za-z0-9_-]", "", classes[i][j]))
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{esc(value)}</td>")
        rc = f' class="{re.sub(r"[^A-Za-z0-9_-]", "", row_classes[i])}"' if i < len(row_classes) and row_classes[i] else ""
        body.append(f"<tr{rc}>{''.join(cells)}</tr>")
    cls = f' class="{re.sub(r"[^A-Za-z0-9_ -]", "", table_class)}"' if table_class else ""
    html_table = f"<table{cls}>{head}<tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{html_table}</div>' if "wide" in table_class.split() else html_table


def flatten(config: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested config dicts to dotted keys ({"optim": {"lr": 1}} -> {"optim.lr": 1})."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def value_text(value: object) -> str:
    """A config value as text: strings as written, everything else as JSON (lists, None, bools)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def config_table(config: Mapping | None) -> str:
    flat = flatten(config or {})
    if not flat:
        return "<p>No configuration recorded.</p>"
    return table([[k, value_text(v)] for k, v in flat.items()], ["key", "value"])


def claims_html(claims: Sequence[Claim]) -> str:
    if not claims:
        return "<p>This run states no claims.</p>"
    rows = [[c.id, c.text, c.published, c.measured, claim_verdict_text(c.verdict)] for c in claims]
    classes = [["", "", "", "", c.verdict] for c in claims]
    counts = {v: sum(c.verdict == v for c in claims) for v in ordered_unique(c.verdict for c in claims)}
    tally = ", ".join(f"{n} {claim_verdict_text(v)}" for v, n in counts.items())
    claims_table = table(rows, ["claim", "text", "published", "measured", "verdict"], classes=classes)
    return f'<p>{esc(tally)}</p><div class="scroll">{claims_table}</div>'  # a phone's width scrolls it, not the page


def searchable(table_html: str, what: str, n: int) -> str:
    """A table with a search box and sortable columns (the page's `SCRIPT`)."""
    return (f'<div class="weights"><label>Find {esc(what)}: <input type="search" placeholder="name or verdict">'
            f"</label> <output>{n} of {n} shown</output>{table_html}</div>")


def weights_table(summary: pd.DataFrame) -> str:
    """Every weight: shape, measured steps, median st(A), nr(G), nr/st (median and last), verdict."""
    cols = {"arm": "arm", "layer": "weight", "shape": "shape", "steps": "steps", "st_median": "st(A)",
            "nr_median": "nr(G)", "ratio_median": "nr/st", "ratio_last": "nr/st last", "verdict": "verdict"}
    if (summary["arm"] == "").all():
        cols.pop("arm")
    rows = summary[list(cols)].values.tolist()
    classes = [[""] * (len(cols) - 1) + [str(r[-1])] for r in rows]
    return searchable(table(rows, list(cols.values()), classes=classes, sortable=True), "a weight", len(rows))


def unmeasured_html(df: pd.DataFrame) -> str:
    """The weights the probe could not pair, with their shape and the reason."""
    missing = unmeasured(df)
    if missing.empty:
        return ""
    cols = [c for c in missing.columns if c != "arm" or (missing["arm"] != "").any()]
    return (f"<h3>Weights not measured ({len(missing)})</h3><p>The probe could not pair these weights with the "
            "input they multiply; their verdict is <em>unmeasured</em>, not a guess.</p>"
            + table(missing[cols].values.tolist(), ["weight" if c == "layer" else c for c in cols]))


def weights_html(df: pd.DataFrame, heatmap: str) -> str:
    """The per-weight section: the heatmap with the searchable, sortable table beside it, then the
    weights that were not measured."""
    summary = layer_summary(df)
    if summary.empty:
        return "<p>No per-weight st(A) / nr(G) were recorded.</p>"
    return (f'<div class="side">{heatmap}{weights_table(summary)}</div>' + unmeasured_html(df))


def metadata_html(df: pd.DataFrame, sweeps: int = 0) -> str:
    """What the data covers: run ids, arms, number of weights, step range, records, estimators; `sweeps`: how many
    sweep records the lab's own figures show beside these."""
    df = prepare(df)
    items = [
        ("run", ", ".join(x for x in ordered_unique(df["run_id"]) if x) or "—"),
        ("arms", ", ".join(x for x in ordered_unique(df["arm"]) if x) or "—"),
        ("weights measured", len(ordered_unique(df[df["metric"].isin(MEASURED)]["layer"]))),
        ("weights not measured", len(unmeasured(df))),
        ("steps", f"{df['step'].min()} – {df['step'].max()}" if len(df) else "—"),
        ("records", len(df)),
        *([("sweep records", f"{sweeps} (a swept width, dimension, size or index in their step column: in the "
                             "lab's figures, not in the step range, tables and step-axis figures here)")] if sweeps else []),
        ("non-finite values", nonfinite_count(df)),
        ("metrics", ", ".join(ordered_unique(df["metric"])) or "—"),
        ("estimators", estimators_text(df)),
        ("specscope", specscope.__version__),
    ]
    return table([[k, v if isinstance(v, int) else str(v)] for k, v in items], ["", ""])


def nonfinite_count(df) -> int:
    """Non-finite values, less the NaNs recorded for a quantity a step leaves undefined (nr(G) of a zero gradient — an
    expert no token reached —, st(A) of a zero input): those carry their flag and are no divergence."""
    undefined = df["flag"].isin(["zero_gradient", "zero_input"]) if "flag" in df else False
    return int((~df["value"].apply(lambda v: math.isfinite(v)) & ~undefined).sum())


def estimators_text(df: pd.DataFrame) -> str:
    """Which estimator gave each metric, e.g. "stable_rank: gram; spectral_advantage: gram/gram (nr(G)'s /
    st(A)'s); grad_fro_norm: exact"."""
    parts = []
    for metric in ordered_unique(df["metric"]):
        used = [x for x in ordered_unique(df.loc[df["metric"] == metric, "estimator"]) if x]
        if used:
            parts.append(f"{metric}: {', '.join(used)}" + (" (nr(G)'s / st(A)'s)" if any("/" in u for u in used) else ""))
    return "; ".join(parts) or "—"


def summary_html(summary: str | Mapping | None) -> str:
    if summary is None:
        return ""
    if isinstance(summary, Mapping):
        body = table([[k, value_text(v)] for k, v in flatten(summary).items()], ["key", "value"])
    else:
        body = "".join(f"<p>{esc(p)}</p>" for p in str(summary).split("\n\n") if p.strip())
    return f"<h2>Summary</h2>{body}"


def measured_html(rows: Sequence[Mapping]) -> str:
    """The lab's own summary rows (its `summarize`: one per arm, or per rank count and weight type …) as a table."""
    if not rows:
        return ""
    header = ordered_unique(k for r in rows for k in r)
    body = table([[fmt(r.get(k)) for k in header] for r in rows], header, sortable=True, table_class="wide")
    return f"<h2>Measured</h2><p>The lab's summary of its records (what a sweep's summary.csv holds per run). Click a column to sort.</p>{body}"


def page(title: str, body: str) -> str:
    """The whole document: inline CSS, the one inline `SCRIPT`, a CSP that allows nothing else."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            f"<script>{SCRIPT}</script>\n</body></html>\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a page."""
    write_atomic(path, text.encode("utf-8"))


def _mark_salvaged(fig: Figure, label: str) -> None:
    """Prefix the figure's overall title (or give it one) so a PNG on its own still says where it came from."""
    old = fig._suptitle.get_text() if fig._suptitle is not None else ""
    fig.suptitle(f"{label}" + (f" — {old}" if old else ""), color="#b00020")


def _check_figure_names(extra_figures: Mapping) -> None:
    """Two lab figures whose names clean to one file name ("a<b", "a>b": lab_a_b.png) kept one of them: refused; so is
    a value that is no matplotlib Figure (None: the lab made none), before anything is written."""
    if not isinstance(extra_figures, Mapping):
        raise ConfigError(f"extra_figures is a {type(extra_figures).__name__}; pass a dict {{name: matplotlib Figure}}")
    if bad := [name for name, fig in extra_figures.items() if fig is not None and not isinstance(fig, Figure)]:
        raise ConfigError(f"extra_figures[{bad[0]!r}] is a {type(extra_figures[bad[0]]).__name__}, not a matplotlib Figure; "
                          "pass the Figure (or None for none)")
    seen: dict[str, object] = {}
    for name in extra_figures:
        other = seen.setdefault(safe_name(name), name)
        if other != name:
            raise ConfigError(f"extra_figures {other!r} and {name!r} are both saved as lab_{safe_name(name)}.png (file names "
                              "keep letters, digits, '.', '-' and '_'); give them names that differ there")


def write_report(out_dir: str | os.PathLike, df: pd.DataFrame, *, config: Mapping | None = None,
                 claims: Sequence[Claim | Mapping] = (), extra_figures: Mapping[str, Figure] | None = None,
                 title: str = "specscope report", summary: str | Mapping | None = None,
                 measured: Sequence[Mapping] = (), salvaged: str = "", dpi: int = DPI) -> Path:
    """Write out_dir/report.html (self-contained) and every figure to out_dir/figures/*.png.

    df is the store's long-format metrics, claims the lab's verdicts, extra_figures the lab's own
    figures by name (saved as lab_<name>.png), measured the lab's summary rows. `salvaged`: what was wrong with
    the database the records were salvaged from; the title, the page and every figure then say so.
    Returns the path of report.html.
    """
    claims = [as_claim(c) for c in claims]  # a bad claim is refused before anything is written
    _check_figure_names(extra_figures or {})
    if df is not None and not isinstance(df, pd.DataFrame):
        raise ConfigError(f"write_report(df={type(df).__name__}): pass the run's records as a DataFrame (store.load(run))")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    swept = prepare(df)
    df, swept = training(swept), swept[swept["flag"] == SWEEP]  # a sweep's `step` is no training step
    figures = run_figures(df, claims, dpi=dpi)
    extra = {f"lab_{safe_name(name)}": fig for name, fig in (extra_figures or {}).items() if fig is not None}
    names = {f"lab_{safe_name(name)}": name for name in (extra_figures or {})}
    if salvaged:
        title = f"{salvage_title(salvaged)} — {title}"
        for fig in [*figures.values(), *extra.values()]:
            _mark_salvaged(fig, salvage_title(salvaged))
    pngs = save_figures({**figures, **extra}, out, dpi=dpi, owned=lambda stem: stem in CAPTIONS or stem.startswith("lab_"))
    blocks = {stem: figure_block(stem, data, CAPTIONS.get(stem) or f"Lab figure: {names.get(stem, stem)}")
              for stem, data in pngs.items() if stem != "claims"}
    heatmap = blocks.pop("advantage_heatmap", "")
    body = "\n".join([
        f"<h1>{esc(title)}</h1>",
        f'<p class="warning">{esc(salvaged)}</p>' if salvaged else "",
        '<p class="meta">Self-contained specscope report: every figure is embedded; '
        "the PNG files beside this page hold the same images.</p>",
        "<h2>Run</h2>", metadata_html(df, sweeps=len(swept)),
        "<h2>Configuration</h2>", config_table(config),
        summary_html(summary),
        "<h2>Claims</h2>", claims_html(claims),
        measured_html(measured),
        "<h2>Per-weight verdicts</h2>",
        "<p>st(A): stable rank of the weight's input; nr(G): nuclear rank of its gradient; medians over the "
        f"measured steps. nr/st &gt; {1 + MARGIN:g}: a spectral step has the larger guaranteed one-step "
        f"decrease (REFERENCE §3), verdict <em>spectral</em>; nr/st &lt; 1/{1 + MARGIN:g}: <em>euclidean</em>; "
        "between: <em>undecided</em>. Click a column to sort.</p>",
        weights_html(df, heatmap),
        "<h2>Figures</h2>", "\n".join(blocks.values()) or "<p>No metrics to plot.</p>",
    ])
    path = out / "report.html"
    write_text_atomic(path, page(title, body))
    return path
