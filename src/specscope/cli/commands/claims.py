"""`specscope claims`: one table of every claim of every lab, from the runs recorded under --root.

Nothing is re-run. Sources: each complete run's summary.json and each sweep's claims.json. Runs of one lab
whose configs differ only in `seed` are one group: their claims are combined over seeds (the verdict most
seeds reached, the mean [min–max] of the figure the rule tests, the per-seed verdicts). A sweep's own runs
are represented by its claims.json, not as groups of their own; a sweep without one (`--grid seed=0,1,2`
over a lab with no sweep rule) lets its runs be grouped like any others. For each claim the table shows one
group: a decisive verdict (PASS or FAIL) first, then INCONCLUSIVE, then UNDECIDABLE (a `demo --quick`
run's); among equals the most seeds, then runs of the lab before a sweep (the lab's setting before a grid
over it), then the newest.
`--all` lists every group. `--format markdown --into README.md` rewrites the part of a file between the
lines `<!-- claims:begin -->` and `<!-- claims:end -->`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from specscope.cli import app, stdout_console
from specscope.errors import ConfigError, RunStoreError
from specscope.names import visible
from specscope.store.integrity import discard, read_json
from specscope.store import readers
from specscope.store.run import effective_status, read_config
from specscope.records import Claim, over_seeds

BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"
IGNORED = {"seed", "device", "checkpoint_every"}  # configs equal apart from these are one group
COLUMNS = ("lab", "claim", "verdict", "seeds", "spread", "setting", "run")
RANK = {"PASS": 2, "FAIL": 2, "INCONCLUSIVE": 1, "UNDECIDABLE": 0}  # which group a claim's row shows, first


@dataclass
class Row:
    lab: str
    claim: Claim
    runs: list[str]  # run (or sweep) directory names, one per seed
    created: str  # newest creation time in the group (ISO text)


def _runs(root: Path) -> list[tuple[str, str, dict, str, list[Claim]]]:
    """(lab, run name, config, created, claims) of every complete run and every sweep under `root`."""
    from specscope.sweep import read_sweep_meta  # pandas: not on every CLI start

    out, unfinished = [], []
    # a sweep with claims of its own speaks for its runs; one without (a lab with no sweep rule, a grid over
    # seeds) lets its runs be grouped like any others
    sweeps = {f.parent for f in root.rglob("sweep.json") if (f.parent / "claims.json").is_file()}
    found = set(root.rglob("config.json")) | {f.parent / "config.json" for f in root.rglob("summary.json")
                                              if (f.parent / "metrics.sqlite").is_file()}  # a run that lost its config.json
    for meta_file in sorted(f for f in found if not any(p.startswith(".") for p in f.relative_to(root).parts[:-1])):
        summary = meta_file.parent / "summary.json"
        if sweeps & set(summary.parents):  # a sweep's run: its claims.json speaks for it
            continue
        if summary.exists():
            meta = read_config(summary.parent)
        else:  # lost, if the run recorded writing one; else no claims (a model's config.json, a run in progress)
            try:
                meta = read_config(summary.parent)
            except RunStoreError:
                continue
            if not meta.get("summary"):
                continue
        if meta["lab"] == "demo":  # a demo's lab runs, inside it, speak for it
            continue
        if (status := effective_status(summary.parent, meta)) != "complete":  # claims of the records so far: left out, said so
            if summary.is_file():
                unfinished.append(f"{summary.parent} ({status})")
            continue
        fix = f"`specscope report {summary.parent}` rewrites it from the recorded metrics"
        data = read_json(summary, checksum=True, fix=fix)  # a tampered verdict is never shown as a result
        if problem := readers.other_runs(summary, data, meta, fix):  # nor another run's, under this run's name
            raise RunStoreError(problem)
        damaged = data.get("salvaged") or _damage(summary.parent)
        name = _display_name(summary.parent, root) + (f" ({readers.salvage_title(str(data['salvaged'])).lower()})" if data.get("salvaged")
                                      else f" ({damaged.split(': ', 1)[0]})" if damaged else "")
        out.append((meta["lab"], name, meta.get("config", {}), _digits(meta.get("created", "")),
                    _summary_claims(summary, data)))
    if unfinished:
        typer.echo(f"warning: {len(unfinished)} run(s) under {visible(root)} did not complete, and their claims are "
                   f"left out: {visible(', '.join(unfinished[:4]))}{' …' if len(unfinished) > 4 else ''} "
                   "(`specscope run --resume RUN` completes one)", err=True)
    for claims_file in sorted(root.rglob("claims.json")):
        sweep = claims_file.parent / "sweep.json"
        if not sweep.is_file():
            continue
        meta = read_sweep_meta(sweep)
        created = _digits(claims_file.parent.name.removeprefix(f"{meta['lab']}-"))  # <lab>-<YYYYmmdd-HHMMSS>
        out.append((meta["lab"], f"sweep {claims_file.parent.name}", {"sweep": meta}, created,
                    read_sweep_claims(claims_file)))
    return out


def _display_name(run_dir: Path, root: Path) -> str:
    """The run's id where `report ID --root ROOT` finds it — ROOT/LAB/ID, a demo's lab runs, a sweep's runs
    (readers.LAYOUTS) —; elsewhere (`--out runs/bad`, a sweep deeper down) its path."""
    return run_dir.name if readers.found_by_id(run_dir, root) else str(run_dir)


def _damage(path: Path) -> str:
    """"" unless the run is damaged as `specscope runs` sees it, else "<what>: <why>" (said on stderr): its metrics
    database cannot be read (a truncated, emptied or overwritten file; the cheap check, not a full integrity scan) or,
    in a lab run (config.json's "progress"), is missing — the claims in its summary.json were computed from records
    that may no longer be there —, or its progress.json fails its checksum or is gone. (A database of another run
    is an error of `Run.open`.)"""
    from specscope.store import Run, sqlite

    run = Run.open(path)
    records, what = 0, "its metrics database is damaged"
    try:
        if not run.metrics_path.exists():  # a folder there is read, and named as one
            if run.meta.get("progress") is True:  # made by the lab runner, which always makes one
                raise RunStoreError(f"{run.metrics_path} is missing")
        else:
            with run.reader(check=False) as (con, _):
                records = sqlite.read_progress(con, run.metrics_path).get("records", 0)
        if problem := readers._damaged_json(path, run.meta, records):
            what = f"its {'summary.json' if problem.startswith(str(path / 'summary.json')) else 'progress.json'} is damaged"
            raise RunStoreError(problem)
    except RunStoreError as e:
        typer.echo(f"warning: {visible(path)}: {what}, so its claims may not match its records ({visible(e)})", err=True)
        return f"{what}: {e}"
    return ""


def _summary_claims(path: Path, data: dict) -> list[Claim]:
    """A run's summary.json claims, checked as a sweep's are (the checksum stops an edit, not a resealed one)."""
    try:
        claims = data.get("claims", [])
        if not isinstance(claims, list):
            raise ValueError(f"'claims' is a {type(claims).__name__}, not a list")
        return [_as_claim(c) for c in claims]
    except (ValueError, TypeError) as e:
        raise RunStoreError(f"{path} holds claims that are not claims ({str(e)[:120]}); `specscope report "
                            f"{path.parent}` rewrites it from the recorded metrics.") from None


def read_sweep_claims(path: Path) -> list[Claim]:
    """A sweep's claims.json, checked: a list of claims as `specscope sweep` writes them; else a RunStoreError naming
    the file and the fix."""
    fix = f"`specscope sweep --resume {path.parent}` rewrites it (or removes it, where the sweep states no claims)"
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, list):
            raise ValueError(f"a {type(data).__name__}, not a list")
        return [_as_claim(c) for c in data]
    except (OSError, ValueError, TypeError, RecursionError) as e:
        raise RunStoreError(f"{path} is unreadable or not a list of claims ({str(e)[:120]}); {fix}.") from None


def _as_claim(c) -> Claim:
    """A claim read from a file, checked: its fields, a known verdict (PASS, FAIL, ...) and a `value` that is a
    number or null (the seeds' values are averaged); anything else is a ValueError naming it."""
    from specscope.report.tables import as_claim

    claim = as_claim(c)
    if claim.value is not None and (isinstance(claim.value, bool) or not isinstance(claim.value, (int, float))):
        raise ValueError(f"claim {claim.id!r} has the value {claim.value!r}; a claim's value is a number or null")
    return claim


def _digits(when: object) -> str:
    """"2026-12-01T23:17:14Z" and "20261201-231714" both -> "20261201231714" (comparable as text)."""
    return "".join(ch for ch in str(when) if ch.isdigit())


def collect(root: Path, every: bool = False) -> list[Row]:
    """The table's rows: one per claim (every group of it with `every`), ordered by lab and claim id."""
    if not root.is_dir():
        raise ConfigError(f"--root {root} is not a directory; give the directory runs were written to (default: runs)")
    groups: dict[tuple[str, str], list] = {}
    for lab, name, config, created, claims in _runs(root):
        key = json.dumps({k: v for k, v in config.items() if k not in IGNORED}, sort_keys=True, default=str)
        groups.setdefault((lab, key), []).append((config.get("seed", 0), name, created, claims))
    candidates: dict[tuple[str, str], list[Row]] = {}
    for (lab, _), members in groups.items():
        members.sort(key=lambda m: (m[0], m[2]))
        by_seed = {m[0]: m for m in members}  # the newest run of each seed
        ids = dict.fromkeys(c.id for m in by_seed.values() for c in m[3])
        for cid in ids:
            hits = [(seed, m[1], next(c for c in m[3] if c.id == cid)) for seed, m in by_seed.items()
                    if any(c.id == cid for c in m[3])]
            claim = hits[0][2] if len(hits) == 1 else over_seeds([h[2] for h in hits], [h[0] for h in hits])
            created = max(by_seed[h[0]][2] for h in hits)
            candidates.setdefault((lab, cid), []).append(Row(lab, claim, [h[1] for h in hits], created))
    rows = []
    for key in sorted(candidates):
        ranked = sorted(candidates[key], key=lambda r: (RANK.get(r.claim.verdict, 0), r.claim.seeds,
                                                        not r.runs[0].startswith("sweep "), r.created), reverse=True)
        rows += ranked if every else ranked[:1]
    return rows


def _cells(r: Row) -> list[str]:
    """The row's fields as printable text (control characters read from summary.json escaped)."""
    run = r.runs[0] if len(r.runs) == 1 else f"{len(r.runs)} runs: " + ", ".join(r.runs)
    cells = [r.lab, r.claim.id, r.claim.verdict, str(r.claim.seeds), r.claim.spread or "—", r.claim.setting or "—", run]
    return [visible(c) for c in cells]


def markdown(rows: list[Row]) -> str:
    """The rows as a Markdown table. A `<` that could open an HTML tag (a corpus folder named `<img onerror=…>` in a
    setting) is written `&lt;`: Markdown passes inline HTML through; `< 1.5` stays as it is."""
    import re

    esc = lambda s: re.sub(r"<(?=[A-Za-z/!?])", "&lt;", s.replace("|", "\\|").replace("\n", " "))  # noqa: E731
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(esc(c) for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_into(path: Path, text: str) -> None:
    """Replace what lies between the BEGIN and END marker lines of `path` (whole lines, BEGIN first) with `text`;
    the file is replaced whole (temporary file and rename), never left half written."""
    if path.exists() and not path.is_file():  # /dev/zero would be read until memory ran out; a FIFO, forever
        raise ConfigError(f"--into {path} is not a regular file (a folder, a device or a pipe); give a markdown file "
                          f"with the '{BEGIN}' … '{END}' lines")
    try:
        lines = path.read_bytes().decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        raise ConfigError(f"--into {path} is not UTF-8 text; give a markdown file with the '{BEGIN}' … '{END}' lines") from None
    for marker in (BEGIN, END):
        if sum(line.strip() == marker for line in lines) > 1:  # which pair is meant? the other marker would be lost
            raise ConfigError(f"{path} has the '{marker}' line more than once; keep one '{BEGIN}' line and one '{END}' "
                              "line after it")
    begin = next((i for i, line in enumerate(lines) if line.strip() == BEGIN), None)
    end = next((i for i, line in enumerate(lines) if line.strip() == END and begin is not None and i > begin), None)
    if begin is None or end is None:
        raise ConfigError(f"{path} has no '{BEGIN}' line followed by an '{END}' line; add them, each on a line of its "
                          "own, where the table belongs")
    if lines[begin].endswith("\r\n"):  # a CRLF file keeps its line endings
        text = text.replace("\r\n", "\n").replace("\n", "\r\n")
    body = "".join(lines[: begin + 1]) + text + "".join(lines[end:])
    target = Path(os.path.realpath(path))  # through a link to the file it names; the link stays a link
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(body.encode("utf-8"))
        shutil.copymode(target, tmp)  # the file keeps its permissions
        os.replace(tmp, target)
    except OSError as e:
        discard(tmp)
        if e.filename == str(tmp):  # name the file being written, not its temporary
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


@app.command("claims")
def claims_cmd(
    root: Path = typer.Option(Path("runs"), "--root", help="Directory holding the recorded runs and sweeps."),
    format: str = typer.Option("table", "--format", "-f", help="table, markdown or json."),
    every: bool = typer.Option(False, "--all", help="Every group of runs, not only the chosen one per claim."),
    into: Optional[Path] = typer.Option(None, "--into", help="With --format markdown: rewrite this file between "
                                        f"the lines {BEGIN} and {END}."),
) -> None:
    """Every claim of every lab from recorded runs: verdict, seeds, spread, setting, the run it came from."""
    if format not in ("table", "markdown", "json"):
        raise ConfigError(f"--format {format!r} is unknown; use table, markdown or json")
    if into is not None and format != "markdown":
        raise ConfigError("--into writes a markdown table; add --format markdown")
    rows = collect(root, every)
    if not rows:
        none = f"no recorded claims under {root} (run a lab first: specscope run LAB --out {root})"
        if into is not None:  # asked to write: an unchanged file must not read as written
            raise ConfigError(f"{none}; nothing was written into {into}, whose table stays as it was")
        if format == "json":  # stdout stays JSON for a script that parses it
            typer.echo("[]")
        typer.echo(none, err=format != "table")  # markdown's stdout holds a table or nothing
        return
    if format == "json":
        typer.echo(json.dumps([{**r.claim.as_dict(), "value": _number(r.claim.value), "lab": r.lab, "runs": r.runs}
                               for r in rows], indent=1))
    elif format == "markdown":
        text = markdown(rows)
        if into is None:
            typer.echo(text, nl=False)
        else:
            write_into(into, text)
            typer.echo(f"wrote {len(rows)} claims into {into}")
    else:
        console = stdout_console()
        console.print(_table(rows, root) if _fits(rows, console.width) else _records(rows, root))


def _number(value: float | None) -> float | None:
    """A claim's figure for JSON: NaN or ±inf (in a summary.json written before they became null) as null,
    which strict JSON readers accept."""
    return value if value is None or math.isfinite(value) else None


def _fits(rows: list[Row], width: int) -> bool:
    """Whether the one-line-per-claim table fits: the columns kept whole at their widest, setting and
    spread at their least (24 and 6), 3 columns of padding each."""
    whole = [max(len(COLUMNS[i]), *(len(_cells(r)[i]) for r in rows)) for i in (0, 1, 2, 3, 6)]
    return sum(whole) + 24 + 6 + 3 * len(COLUMNS) <= width


def _verdict(r: Row):
    from rich.text import Text

    from specscope.report.tables import VERDICT_STYLE

    return Text(r.claim.verdict, style=VERDICT_STYLE.get(r.claim.verdict, ""))


def _table(rows: list[Row], root: Path):
    """A row per claim, where it fits: names, verdicts and ids whole; setting and spread wrap."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"claims recorded under {root}", box=box.SIMPLE_HEAD)
    for col in COLUMNS:
        table.add_column(col, overflow="fold", no_wrap=col in ("lab", "claim", "verdict", "seeds", "run"),
                         min_width={"setting": 24, "spread": 6}.get(col))
    for r in rows:
        cells: list = [Text(c) for c in _cells(r)]
        cells[2] = _verdict(r)
        table.add_row(*cells)
    return table


def _records(rows: list[Row], root: Path):
    """A block per claim, for a narrow console: "lab claim VERDICT seeds", then spread, setting and run
    on lines of their own, so no column is dropped or cut."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    blocks: list = [Text(f"claims recorded under {root}", style="italic")]
    for r in rows:
        lab, cid, _, seeds, spread, setting, run = _cells(r)
        head = Text.assemble("\n", (lab, "bold"), " ", (cid, "bold"), " ", _verdict(r),
                             f"  {seeds} seed" + ("s" if r.claim.seeds != 1 else ""))
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(overflow="fold")
        for key, value in (("spread", spread), ("setting", setting), ("run", run)):
            grid.add_row(f"  {key}", Text(value))
        blocks += [head, grid]
    return Group(*blocks)
