"""`specscope list | run | report | compare`: the labs from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from specscope.cli import app
from specscope.errors import ConfigError

console = Console()


@app.command("list")
def list_labs(keys: bool = typer.Option(False, "--keys", help="Also list each lab's config keys with types and defaults.")) -> None:
    """List the labs, one line each."""
    from specscope import labs
    from specscope.labs.config import describe_fields

    table = Table(title="specscope labs")
    table.add_column("lab", style="bold")
    table.add_column("what it reproduces")
    for name in labs.names():
        text = labs.summary(name)
        if keys:
            text += "\n[dim]" + describe_fields(labs.get(name).Config) + "[/dim]"
        table.add_row(name, text)
    console.print(table)


@app.command("run")
def run(
    lab: Optional[str] = typer.Argument(None, help="Lab name (see `specscope list`)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set key=value (repeatable)."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file of config keys ([config] table or top level)."),
    out: Path = typer.Option(Path("runs"), "--out", help="Root directory for run directories."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted or killed run directory."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Run a lab; writes runs/<lab>/<run_id>/ with metrics, figures, report.html and the claims."""
    from specscope import labs
    from specscope.labs.config import load_toml, parse_overrides
    from specscope.labs.runner import run_lab

    if resume is None and lab is None:
        raise ConfigError("name a lab (see `specscope list`) or pass --resume RUN_DIR")
    if resume is not None and (set_ or config):
        raise ConfigError("--resume continues a run with its recorded config; --set/--config cannot change it")
    overrides = {}
    if lab is not None and resume is None:
        mod = labs.get(lab)
        if config is not None:
            overrides.update(load_toml(config))
        overrides.update(parse_overrides(mod.Config, set_, lab))
    run_dir = run_lab(lab or "", overrides, out=out, resume=resume, progress=not quiet)
    show_run(run_dir)


def show_run(run_dir: Path) -> None:
    """Print a finished run's claims table and where its report is."""
    import json

    from specscope.records import Claim
    from specscope.report import claims_table

    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    claims = [Claim(**c) for c in summary.get("claims", [])]
    if claims:
        console.print(claims_table(claims))
    console.print(f"run: {run_dir}\nreport: {Path(run_dir) / 'report.html'}")


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="A run directory.")) -> None:
    """Recompute a run's claims from its recorded metrics and rewrite its report.html."""
    from specscope import labs, store
    from specscope.labs.config import make_config
    from specscope.labs.runner import finish

    run = store.Run.open(run_dir)
    lab = labs.get(run.lab)
    finish(run, lab, make_config(lab.Config, run.config, run.lab))
    show_run(run_dir)


@app.command("compare")
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="Two or more run directories."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the comparison (default runs/compare/<time>)."),
) -> None:
    """Overlay several runs in one HTML page (loss curves, st(A) and nr(G) per weight)."""
    import time

    from specscope import report, store

    if len(run_dirs) < 2:
        raise ConfigError("compare needs at least two run directories")
    runs = [store.Run.open(p) for p in run_dirs]
    out = out or Path("runs") / "compare" / time.strftime("%Y%m%d-%H%M%S")
    page = report.write_comparison(
        out,
        {r.id: store.load(r) for r in runs},
        configs={r.id: r.config for r in runs},
        labs={r.id: r.lab for r in runs},
    )
    console.print(f"comparison: {page}")
