"""One self-contained HTML page per run: figures as base64 PNG data URIs, inline CSS, no script.

The page loads nothing from the network and escapes every string it did not write itself (config keys
and values, layer and arm names, figure names, claim texts), so a shared report cannot carry script.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

import specscope
from specscope.records import Claim
from specscope.report.figures import DPI, run_figures
from specscope.report.tables import fmt, layer_summary, ordered_unique, prepare

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd;
       padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.PASS { background: #b7e4c7; font-weight: bold; } td.FAIL { background: #f4b6b6; font-weight: bold; }
td.INCONCLUSIVE { background: #fde8a6; font-weight: bold; }
td.spectral { color: #a11; } td.euclidean { color: #125; } tr.differs td { background: #fff6d6; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } .meta { color: #555; font-size: 0.9em; }
code { background: #f5f5f5; padding: 0 3px; }
"""

CAPTIONS = {
    "loss": "Loss-like metrics over steps, one line per arm.",
    "accuracy": "Accuracy metrics over steps, one line per arm.",
    "stable_rank": "st(A) = ‖A‖_F²/‖A‖_2² of each weight's input over steps. Low st(A) favours a spectral step.",
    "nuclear_rank": "nr(G) = ‖G‖_*²/‖G‖_F² of each weight's gradient over steps. High nr(G) favours a spectral step.",
    "advantage_heatmap": "log10(nr(G)/st(A)) per weight and step. Red (> 0): the spectral step has the larger "
                         "guaranteed one-step decrease; blue: the Euclidean step does; grey: not measured.",
    "nr_vs_st": "nr(G) against st(A) for every weight and step; points above nr = st favour a spectral step.",
    "claims": "The claims table as an image (for slides).",
}


def esc(x: object) -> str:
    """Text for HTML: escaped, quotes included."""
    return html.escape(fmt(x), quote=True)


def png_bytes(fig: Figure, dpi: int | None = None) -> bytes:
    """The figure as PNG bytes (the same bytes go to disk and into the page)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi or fig.dpi, facecolor="white")
    return buffer.getvalue()


def safe_name(name: str) -> str:
    """A file stem that cannot leave figures/ or confuse a shell: [A-Za-z0-9_.-] only, no leading dot."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "figure"
    return stem[:80]


def save_figures(figures: Mapping[str, Figure], out_dir: Path, *, dpi: int | None = None) -> dict[str, bytes]:
    """Write each figure to out_dir/figures/<stem>.png; returns stem -> PNG bytes."""
    folder = out_dir / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for stem, fig in figures.items():
        data = png_bytes(fig, dpi)
        (folder / f"{stem}.png").write_bytes(data)
        written[stem] = data
    return written


def img(data: bytes, alt: str) -> str:
    """An <img> whose source is the PNG itself (a data URI), so the page needs no other file."""
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{esc(alt)}">'


def figure_block(stem: str, data: bytes, caption: str) -> str:
    return (f'<figure id="fig-{esc(stem)}">{img(data, stem)}<figcaption><code>figures/{esc(stem)}.png'
            f"</code> — {esc(caption)}</figcaption></figure>")


def table(rows: Sequence[Sequence[object]], header: Sequence[str], *, classes: Sequence[Sequence[str]] = (),
          row_classes: Sequence[str] = ()) -> str:
    """An HTML table; every cell escaped. Numbers are right-aligned; `classes[i][j]` styles a cell."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    head = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
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
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


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


def as_claim(c: Claim | Mapping) -> Claim:
    return c if isinstance(c, Claim) else Claim(**dict(c))


def claims_html(claims: Sequence[Claim]) -> str:
    if not claims:
        return "<p>This run states no claims.</p>"
    rows = [[c.id, c.text, c.published, c.measured, c.verdict] for c in claims]
    classes = [["", "", "", "", c.verdict] for c in claims]
    counts = {v: sum(c.verdict == v for c in claims) for v in ("PASS", "FAIL", "INCONCLUSIVE")}
    tally = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    return f"<p>{esc(tally)}</p>" + table(rows, ["claim", "text", "published", "measured", "verdict"],
                                           classes=classes)


def layer_html(df: pd.DataFrame) -> str:
    summary = layer_summary(df)
    if summary.empty:
        return "<p>No per-weight st(A) / nr(G) were recorded.</p>"
    header = ["arm", "layer", "measured steps", "last step", "st(A) last", "st(A) median", "nr(G) last",
              "nr(G) median", "nr/st last", "nr/st median", "favoured (median nr/st)"]
    rows = summary.values.tolist()
    classes = [[""] * (len(header) - 1) + [str(r[-1])] for r in rows]
    if (summary["arm"] == "").all():
        header, rows, classes = header[1:], [r[1:] for r in rows], [c[1:] for c in classes]
    return table(rows, header, classes=classes)


def metadata_html(df: pd.DataFrame) -> str:
    """What the data covers: run ids, arms, number of weights, step range, records, estimators."""
    df = prepare(df)
    items = [
        ("run", ", ".join(x for x in ordered_unique(df["run_id"]) if x) or "—"),
        ("arms", ", ".join(x for x in ordered_unique(df["arm"]) if x) or "—"),
        ("weights measured", len([x for x in ordered_unique(df["layer"]) if x])),
        ("steps", f"{df['step'].min()} – {df['step'].max()}" if len(df) else "—"),
        ("records", len(df)),
        ("non-finite values", int((~df["value"].apply(lambda v: math.isfinite(v))).sum())),
        ("metrics", ", ".join(ordered_unique(df["metric"])) or "—"),
        ("estimators", ", ".join(x for x in ordered_unique(df["estimator"]) if x) or "—"),
        ("specscope", specscope.__version__),
    ]
    return table([[k, v if isinstance(v, int) else str(v)] for k, v in items], ["", ""])


def summary_html(summary: str | Mapping | None) -> str:
    if summary is None:
        return ""
    if isinstance(summary, Mapping):
        body = table([[k, value_text(v)] for k, v in flatten(summary).items()], ["key", "value"])
    else:
        body = "".join(f"<p>{esc(p)}</p>" for p in str(summary).split("\n\n") if p.strip())
    return f"<h2>Summary</h2>{body}"


def page(title: str, body: str) -> str:
    """The whole document: no <script>, no external stylesheet, no remote resource."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a page."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(out_dir: str | os.PathLike, df: pd.DataFrame, *, config: Mapping | None = None,
                 claims: Sequence[Claim] = (), extra_figures: Mapping[str, Figure] | None = None,
                 title: str = "specscope report", summary: str | Mapping | None = None,
                 dpi: int = DPI) -> Path:
    """Write out_dir/report.html (self-contained) and every figure to out_dir/figures/*.png.

    df is the store's long-format metrics, claims the lab's verdicts, extra_figures the lab's own
    figures by name (saved as lab_<name>.png). Returns the path of report.html.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    claims = [as_claim(c) for c in claims]
    figures = run_figures(df, claims, dpi=dpi)
    extra = {f"lab_{safe_name(name)}": fig for name, fig in (extra_figures or {}).items() if fig is not None}
    names = {f"lab_{safe_name(name)}": name for name in (extra_figures or {})}
    pngs = save_figures({**figures, **extra}, out, dpi=dpi)
    blocks = [figure_block(stem, data, CAPTIONS.get(stem) or f"Lab figure: {names.get(stem, stem)}")
              for stem, data in pngs.items() if stem != "claims"]
    body = "\n".join([
        f"<h1>{esc(title)}</h1>",
        '<p class="meta">Self-contained specscope report: every figure is embedded; '
        "the PNG files beside this page hold the same images.</p>",
        "<h2>Run</h2>", metadata_html(df),
        "<h2>Configuration</h2>", config_table(config),
        summary_html(summary),
        "<h2>Claims</h2>", claims_html(claims),
        "<h2>Figures</h2>", "\n".join(blocks) or "<p>No metrics to plot.</p>",
        "<h2>Per-weight summary</h2>",
        "<p>st(A): stable rank of the weight's input; nr(G): nuclear rank of its gradient. nr/st &gt; 1: "
        "a spectral step has the larger guaranteed one-step decrease (REFERENCE §3).</p>",
        layer_html(df),
    ])
    path = out / "report.html"
    write_text_atomic(path, page(title, body))
    return path
