"""One figure style for every specscope figure: sizes, fonts, layout, log ticks, verdict colours.

Every figure of a report, of the compare page and of the labs is made with `figure`/`subplots` (a plain
`Figure`, constrained layout, no pyplot registry) and passes through `finish` before it is saved, which
applies the rest: plain-number log ticks (1, 2, 5, 10 or 1, 3, 10 — never "6 × 10⁰"), no tick or legend text
below `MIN_FONT`, and titles and labels wrapped until they fit the canvas. `layout_problems` says what
would still be cut off or overlap; the tests call it on every figure.
"""

from __future__ import annotations

import math
import textwrap

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.ticker import (AutoLocator, FixedFormatter, FixedLocator, FuncFormatter, MaxNLocator, NullFormatter,
                               NullLocator)

from specscope.names import visible

DPI = 100
PANEL = (4.2, 3.0)  # inches of one panel of a grid
FONT = {"title": 10, "suptitle": 11, "label": 9, "tick": 8, "legend": 8}
MIN_FONT = 7  # no text smaller than this (points) after `finish`
LEGEND_CAP = 12  # entries named in one legend (beside the axes from five on); the rest are counted
# one colour per verdict, the same in figures, HTML tables and the terminal
VERDICT_COLOURS = {"spectral": "#b2182b", "euclidean": "#2166ac", "undecided": "#8a6d00", "unmeasured": "#6a3d9a"}
CLAIM_COLOURS = {"PASS": "#b7e4c7", "FAIL": "#f4b6b6", "INCONCLUSIVE": "#fde8a6", "UNDECIDABLE": "#e4e4e4"}
NOT_MEASURED = "#dddddd"  # a heatmap cell with no value


def figure(width: float, height: float, dpi: int = DPI) -> Figure:
    """A figure with constrained layout and no pyplot state."""
    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def subplots(rows: int = 1, cols: int = 1, *, figsize: tuple[float, float] | None = None,
             panel: tuple[float, float] = PANEL, dpi: int = DPI, **kw):
    """(figure, axes) like `plt.subplots` (figsize, or `panel`-sized panels), in the project style and
    without pyplot's global figure registry."""
    width, height = figsize or (panel[0] * cols, panel[1] * rows)
    fig = figure(width, height, dpi)
    return fig, fig.subplots(rows, cols, **kw)


def plain_number(value: float, _pos=None) -> str:
    """A tick value as a reader writes it: 0.02, 5, 300, 2e6 or 1.5e6 for the very large or small (three significant
    digits, so neighbouring ticks never read the same)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:g}"
    return f"{value:.3g}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")


MAX_LOG_TICKS = 8


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick positions for a log axis over [lo, hi], all plain numbers: round linear steps over less than
    half a decade (8, 10, 12, 14, 16); beyond, the densest of 1-2-5, 1-3 and decades per decade that gives
    at most MAX_LOG_TICKS labels (1..9 where 1-2-5 gives fewer than three), decades thinned by an even stride
    past that (1e-12, 1e-10, …) — never a thinned 1-2-5 series (1, 5, 20, 100, 500), whose steps differ."""
    if not (lo > 0 and hi > lo):
        return []
    inside = lambda ticks: [float(f"{t:.12g}") for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
    if math.log10(hi / lo) < 0.5:
        ticks = inside(MaxNLocator(5, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi))
        return ticks if len(ticks) >= 3 else inside(MaxNLocator(9, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi))
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))

    def per_decade(subs) -> list[float]:
        return inside(m * 10.0**e for e in range(first, last + 1) for m in subs)

    options = [per_decade(subs) for subs in ((1, 2, 5), (1, 3), (1,))]
    ticks = next((t for t in options if len(t) <= MAX_LOG_TICKS), options[-1])
    if len(ticks) < 3:
        ticks = per_decade(range(1, 10))
    return ticks[:: max(1, math.ceil(len(ticks) / MAX_LOG_TICKS))]


def log_axis(axis, lo: float, hi: float) -> None:
    """Plain-number major ticks (see `log_ticks`), unlabelled minor ticks."""
    ticks = log_ticks(lo, hi)
    if len(ticks) < 2:  # less than a factor 2 of range: label the two ends
        ticks = [lo, hi]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: plain_number(float(f"{v:.3g}"))))
    axis.set_minor_formatter(NullFormatter())
    if len(ticks) > 4:
        axis.set_minor_locator(NullLocator())


def _capped(handles: list, labels: list, cap: int) -> tuple[list, list]:
    """The first `cap` entries and one that counts the rest."""
    if len(handles) <= cap:
        return list(handles), list(labels)
    return (list(handles[:cap]) + [Line2D([], [], linestyle="none")],
            list(labels[:cap]) + [f"… +{len(handles) - cap} more"])


def shorten(text: str, width: int) -> str:
    """`text` in at most `width` characters, whitespace runs as one space, a cut made in the middle ("…") so that both
    ends stay (of a dotted name, whole parts: the first and the last ones that fit): textwrap.shorten cuts at spaces and left "…" alone of a name without any (BERT's 45-character
    `bert.encoder.layer.0.attention.self.query.weight`), so rows of a figure could not be told apart."""
    text = " ".join(str(text).split())
    if len(text) <= width:
        return text
    parts = text.split(".")  # a dotted name: its first part and as many of its last as fit (the layer index stays)
    for k in range(len(parts) - 2, 0, -1):
        kept = f"{parts[0]}.….{'.'.join(parts[-k:])}"
        if len(kept) <= width:
            return kept
    head = max((width - 1) // 2, 1)
    return text[:head] + "…" + text[len(text) - max(width - 1 - head, 1):]


def legend(ax, handles: list | None = None, labels: list[str] | None = None, *, cap: int = LEGEND_CAP,
           where: str | None = None, title: str | None = None):
    """A legend of at most `cap` named entries (the rest counted), placed `where`: "best" (inside),
    "right" (outside, beside the axes) or "top" (outside, one row above). Default: inside for up to 4
    entries, else right, so a long legend never covers the data."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    handles, labels = _capped(handles, labels, cap)
    labels = [shorten(label, 40) for label in labels]
    where = where or ("best" if len(handles) <= 4 else "right")
    common = dict(fontsize=FONT["legend"], title=title, title_fontsize=FONT["legend"])
    if where == "right":
        return ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0,
                         frameon=False, **common)
    if where == "top":
        return ax.legend(handles, labels, loc="lower left", bbox_to_anchor=(0, 1.01), borderaxespad=0,
                         ncols=min(len(handles), 4), frameon=False, **common)
    return ax.legend(handles, labels, framealpha=0.85, loc="best", **common)


def _texts(fig: Figure) -> list:
    """Every text that is drawn: suptitle, figure texts and legends, and per axes its titles, axis
    labels, the tick labels inside the view, its texts and its legend."""
    texts = [t for t in (fig._suptitle, fig._supxlabel, fig._supylabel) if t is not None]
    texts += list(fig.texts) + [t for leg in fig.legends for t in (*leg.get_texts(), leg.get_title())]
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis) if ax.axison else ():
            texts += [t for tick in axis._update_ticks() for t in (tick.label1, tick.label2) if t.get_visible()]
        if ax.get_legend() is not None:
            texts += [*ax.get_legend().get_texts(), ax.get_legend().get_title()]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _wrap(text, width_px: float, renderer) -> bool:
    """Wrap a text to `width_px`; True when it changed."""
    extent = text.get_window_extent(renderer)
    if extent.width <= width_px or "\n" in text.get_text() and extent.width <= width_px * 1.05:
        return False
    words = text.get_text().replace("\n", " ")
    chars = max(12, int(len(words) * width_px / extent.width * 0.95))
    wrapped = textwrap.fill(words, chars)
    if wrapped == text.get_text():
        return False
    text.set_text(wrapped)
    return True


def _axis_titles(fig: Figure):
    for ax in fig.axes:
        if ax.get_visible():
            yield ax, [ax.title, ax._left_title, ax._right_title, ax.xaxis.label]


def _fit_text(fig: Figure) -> None:
    """Wrap the suptitle to the canvas and each axes title / x label to its axes. A text's width needs no
    layout pass, so this draws nothing."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    canvas = fig.bbox.width * 0.96
    texts = [(fig._suptitle, canvas)] if fig._suptitle is not None else []
    for ax, titles in _axis_titles(fig):
        room = min(max(ax.get_position().width * fig.bbox.width, fig.bbox.width / len(fig.axes)) * 1.1, canvas)
        texts += [(t, room) for t in titles if t.get_text()]
    for text, room in texts:
        for _ in range(3):  # each pass re-measures the wrapped text
            if not _wrap(text, room, renderer):
                break


def figure_legend(fig: Figure, handles: list, labels: list[str], *, cap: int = 2 * LEGEND_CAP,
                  title: str | None = None):
    """One legend for the whole figure, below the panels: at most `cap` named entries (the rest counted),
    as many columns as the widest label allows, and the figure made taller by its rows, so the panels
    keep their size however many runs or arms there are."""
    if not handles:
        return None
    handles, labels = _capped(handles, labels, cap)
    labels = [shorten(shown(label), 70) for label in labels]  # measured as drawn: a control character as its escape
    renderer = FigureCanvasAgg(fig).get_renderer()
    probe = Text(0, 0, max(labels, key=len), fontsize=FONT["legend"], figure=fig)
    entry_px = probe.get_window_extent(renderer).width + 3.2 * FONT["legend"] * fig.dpi / 72  # + handle and gaps
    ncols = int(max(1, min(len(labels), (fig.bbox.width * 0.95) // entry_px)))
    rows = math.ceil(len(labels) / ncols) + (1 if title else 0)
    w, h = fig.get_size_inches()
    fig.set_size_inches(w, h + rows * 1.45 * FONT["legend"] / 72 + 0.15)
    return fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=FONT["legend"],
                      title=title, title_fontsize=FONT["legend"], frameon=False)


def shown(text: object) -> str:
    """`text` as a figure draws it: every control or bidirectional character (U+202E, ESC, BEL) as a visible
    escape (`names.visible`), line breaks kept (titles and table cells are wrapped on purpose)."""
    return "\n".join(visible(line) for line in str(text).split("\n"))


def _escape_controls(fig: Figure) -> None:
    """Every text of the figure (titles, labels, legend entries, fixed tick labels such as layer names) through
    `shown`, so a recorded name can neither reorder nor hide what is drawn."""
    for text in fig.findobj(Text):
        if text.get_text() != shown(text.get_text()):
            text.set_text(shown(text.get_text()))
    for axis in (axis for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)):
        for formatter in (axis.get_major_formatter(), axis.get_minor_formatter()):
            if isinstance(formatter, FixedFormatter):  # labels given as text: set_ticklabels, set_yticks(.., names)
                formatter.seq = [shown(s) for s in formatter.seq]
            elif isinstance(formatter, FuncFormatter):
                formatter.func = _shown_by(formatter.func)


def _shown_by(func):
    return lambda x, pos=None: shown(func(x, pos))


def finish(fig: Figure) -> Figure:
    """Apply the style to a figure made anywhere (report, compare, a lab) and return it.

    Constrained layout (unless the figure has one already), plain-number log ticks, tick and legend
    fonts no smaller than MIN_FONT, and titles wrapped to fit the canvas.
    """
    if getattr(fig, "_specscope_finished", False):
        return fig
    fig._specscope_finished = True
    for text in fig.findobj(Text):  # names are data: "a$b$" draws as typed, never as mathtext
        text.set_parse_math(False)
    _escape_controls(fig)
    if fig.get_layout_engine() is None or type(fig.get_layout_engine()).__name__ != "ConstrainedLayoutEngine":
        try:
            fig.set_layout_engine("constrained")
        except RuntimeError:  # colorbars made for another engine: keep it
            pass
    for ax in fig.axes:
        for name in ("x", "y"):
            axis = getattr(ax, f"{name}axis")
            if axis.get_scale() == "log":
                lo, hi = sorted(getattr(ax, f"get_{name}lim")())
                log_axis(axis, lo, hi)
            elif axis.get_label_text() == "step" and isinstance(axis.get_major_locator(), AutoLocator):
                axis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
                lo, hi = getattr(ax, f"get_{name}lim")()
                if abs(hi - lo) < 1:  # one step only: a step either side, not ticks at ±0.04
                    mid = round((lo + hi) / 2)
                    getattr(ax, f"set_{name}lim")(mid - 1, mid + 1)
        ax.tick_params(labelsize=max(MIN_FONT, min(_tick_size(ax), FONT["tick"])))
        leg = ax.get_legend()
        if leg is not None and leg._bbox_to_anchor is None and len(leg.get_texts()) > 4:
            handles, labels = ax.get_legend_handles_labels()  # a long legend inside the axes covers data
            if len(handles) == len(leg.get_texts()):
                leg = legend(ax, handles, labels, where="right")
        if leg is not None:
            for t in leg.get_texts():
                t.set_fontsize(max(MIN_FONT, t.get_fontsize()))
    for leg in fig.legends:
        for t in leg.get_texts():
            t.set_fontsize(max(MIN_FONT, t.get_fontsize()))
    _fit_text(fig)
    return fig


def _tick_size(ax) -> float:
    labels = ax.get_xticklabels() + ax.get_yticklabels()
    return max((t.get_fontsize() for t in labels), default=FONT["tick"])


PLAIN_TEXT = {"text.parse_math": False}  # rc for drawing: tick labels made while drawing are plain text too


def layout_problems(fig: Figure, tolerance: float = 1.0) -> list[str]:
    """What a reader would find broken once the figure is drawn: text leaving the canvas, a figure legend
    on the panels or the title, tick labels of one axis that overlap. Empty when the figure is clean."""
    with rc_context(PLAIN_TEXT):
        fig.draw_without_rendering()
    renderer = FigureCanvasAgg(fig).get_renderer()
    canvas = fig.bbox
    problems = []
    for text in _texts(fig):
        box = text.get_window_extent(renderer)
        if box.width == 0:
            continue
        if (box.x0 < canvas.x0 - tolerance or box.y0 < canvas.y0 - tolerance
                or box.x1 > canvas.x1 + tolerance or box.y1 > canvas.y1 + tolerance):
            problems.append(f"text {text.get_text()!r} leaves the canvas ({_box(box)} vs {_box(canvas)})")
    titles = [t for t in (fig._suptitle,) if t is not None and t.get_text()]
    for leg in fig.legends:  # a figure legend beside the panels, never on them or on the title
        box = leg.get_window_extent(renderer)
        for other in [ax for ax in fig.axes if ax.get_visible()] + titles:
            b = other.get_window_extent(renderer)
            if _overlap_area(box, b) > 0.05 * min(box.width * box.height, b.width * b.height):
                problems.append(f"the figure legend ({_box(box)}) covers {type(other).__name__} "
                                f"{_box(other.get_window_extent(renderer))}")
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)) if ax.axison else ():
            labels = [(t.get_window_extent(renderer), t.get_text()) for tick in axis._update_ticks()
                      for t in (tick.label1, tick.label2) if t.get_visible() and t.get_text()]
            labels.sort(key=lambda bt: bt[0].x0 if name == "x" else bt[0].y0)
            for (a, ta), (b, tb) in zip(labels, labels[1:]):
                if _overlap_area(a, b) > 0.1 * min(a.width * a.height, b.width * b.height):
                    problems.append(f"{name} tick labels {ta!r} and {tb!r} overlap")
    return problems


def _overlap_area(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0) * max(h, 0)


def _box(b) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in np.round([b.x0, b.y0, b.x1, b.y1])) + "]"
