"""`specscope runs` (list run directories with their status) and `specscope export` (records to csv/parquet)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Optional

import typer

from specscope import labs
from specscope.cli import app, stdout_console
from specscope.errors import ConfigError
from specscope.names import markup, visible

_STYLE = {"running": "cyan", "complete": "green", "incomplete": "yellow", "interrupted": "yellow",
          "failed": "red", "unreadable": "red"}


@app.command()
def runs(
    root: Path = typer.Option(Path("runs"), "--root", help="Directory holding <lab>/<run_id>/ run directories."),
    lab: Optional[str] = typer.Option(None, "--lab", help="Only the runs of this lab."),
) -> None:
    """List runs, newest first, with their status (a run whose process died reads "incomplete")."""
    from rich import box
    from rich.table import Table

    from specscope.store import list_runs

    if not root.is_dir():
        raise ConfigError(f"--root {root} is not a directory; give the directory runs were written to (default: runs)")
    df = list_runs(root, lab=lab)
    if df.empty:
        present = sorted(set(list_runs(root).lab)) if lab else []
        known = present + labs.names() + ["demo"]  # a demo's runs sit under <root>/demo
        close = difflib.get_close_matches(lab, known, n=1) if lab else []
        if lab and lab not in known:
            raise ConfigError(f"--lab {lab!r} is not a lab" + (f"; did you mean {close[0]!r}?" if close else ".")
                              + f" Labs: {', '.join(labs.names())} (and demo).")
        typer.echo(f"no runs under {root}" + (f" for lab {lab!r}" if lab else "") + "."
                   + (f" Did you mean {close[0]!r}?" if close and close[0] != lab else "")
                   + (f" Labs with runs there: {', '.join(present)}." if present else ""))
        return
    table = Table(title=f"runs in {markup(root)}/<lab>/<run_id>", box=box.SIMPLE_HEAD)
    for col in ("run_id", "lab", "status", "created", "last step"):  # path = root/lab/run_id
        whole = col in ("run_id", "last step")  # kept on one line; the others wrap in a narrow terminal, none is cut
        table.add_column(col, no_wrap=whole, overflow="fold", min_width=22 if col == "run_id" else 9 if whole else None,
                         justify="right" if col == "last step" else "left")
    for r in df.itertuples():
        created = "" if r.created is None or str(r.created) == "NaT" else r.created.strftime("%Y-%m-%d %H:%M")
        status = f"[{_STYLE.get(r.status, 'white')}]{r.status}[/]" + (" [red](damaged)[/]" if r.problem and r.status != "unreadable" else "")
        steps = "" if str(r.steps) == "<NA>" else str(r.steps)
        lab_text = r.lab + _holder(Path(r.path), root)
        table.add_row(markup(visible(r.run_id)), markup(visible(lab_text)), status, created, steps)  # names from disk are data
    stdout_console().print(table)
    for r in df[df.problem != ""].itertuples():  # what is wrong with each damaged run, and the fix
        typer.echo(f"{visible(r.run_id)}: {visible(r.problem)}")


def _holder(path: Path, root: Path) -> str:
    """What a run lies in, said after its lab: " (in sweep NAME)" for a sweep's run (NAME/runs/<lab>/<run_id>),
    " (in demo)" for a lab run a demo made, "" for a run of root/<lab>/<run_id>."""
    sweep = path.parent.parent.parent
    if path.parent.parent.name == "runs" and (sweep / "sweep.json").is_file():
        return f" (in sweep {sweep.name})"
    return f" (in {path.parents[2].name})" if len(path.relative_to(root).parts) == 4 else ""


@app.command()
def export(
    run: str = typer.Argument(..., metavar="RUN", help="Run directory, or a run id (or lab/run_id) under --root."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="csv or parquet (parquet needs pyarrow); default: "
                                         "--out's suffix (.csv, .parquet), else csv."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: <run_id>.<format> here)."),
    root: Path = typer.Option(Path("runs"), "--root", help="Where run ids are looked up."),
    salvage: bool = typer.Option(False, "--salvage", help="Export what is still readable of a damaged database "
                                 "(the file is named <name>.salvaged.<format>)."),
    force: bool = typer.Option(False, "--force", help="Replace the output file if it exists (refused otherwise)."),
) -> None:
    """Write every record of a run (run_id, step, layer, metric, value, arm, ...) to one csv or parquet file."""
    from specscope.names import visible
    from specscope.store import Run, find_run
    from specscope.store import export as export_run
    from specscope.store.run import read_config

    if out is not None and str(out) == "-":  # read as a file named "-" in the current folder
        raise ConfigError("--out -: export writes a file (csv or parquet), not standard output; give the file's path, "
                          "e.g. --out run.csv")
    suffix = out.suffix.lower().lstrip(".") if out is not None else ""
    if format is None:
        format = suffix if suffix in ("csv", "parquet") else "csv"
    elif suffix in ("csv", "parquet") and suffix != format:  # y.parquet holding CSV text, said "wrote y.parquet"
        raise ConfigError(f"--out {visible(out)} ends in .{suffix} but --format is {format!r}; give one of them only "
                          f"(the format follows --out's suffix), or make them agree")
    path = find_run(run, root)
    out = out or Path(f"{read_config(path)['run_id']}.{format}")  # a plain name (checked): here, never elsewhere
    status = Run.open(path).status  # read before the records: a run finishing meanwhile is exported whole
    written = export_run(path, out, format, salvage=salvage, force=force)
    typer.echo(f"wrote {written}")
    if status != "complete":  # as compare says it: a live or stopped run's file is not its final record
        typer.echo(f"warning: {visible(path)} is {status}: {visible(written)} holds only the steps it recorded so far, "
                   "not its final values", err=True)
