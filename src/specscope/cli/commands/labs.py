"""`specscope list | run | report | compare`: the labs from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from specscope.cli import app, interruptible
from specscope.errors import ConfigError, RunStoreError
from specscope.names import markup, visible

SALVAGE_HELP = "Read a damaged metrics database anyway: use the records still readable, and say so in every file written."

console = Console()


@app.command("list")
def list_labs(
    lab: Optional[str] = typer.Argument(None, help="Only this lab (implies --keys)."),
    keys: bool = typer.Option(False, "--keys", help="Also list each lab's config keys with types and defaults."),
) -> None:
    """List the labs, one line each; `specscope list LAB` shows one lab with its config keys."""
    from specscope import labs
    from specscope.labs.config import describe_fields

    if lab is not None:
        labs.get(lab)  # an unknown name: one line naming the labs
    table = Table(title="specscope labs")
    table.add_column("lab", style="bold")
    table.add_column("what it reproduces", overflow="fold")  # a long list of names breaks, never ends in "…"
    keys = keys or lab is not None
    for name in [lab] if lab is not None else labs.names():
        text = labs.summary(name)
        if text.startswith("(does not load"):  # an outside lab that fails: listed with its reason, its keys unknown
            table.add_row(name, markup(text))
            continue
        if keys:
            text += "\n[dim]" + describe_fields(labs.get(name).Config) + "[/dim]"
        table.add_row(name, text)
    console.print(table)


@app.command("run")
@interruptible
def run(
    lab: Optional[str] = typer.Argument(None, help="Lab name (see `specscope list`)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set key=value (repeatable)."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file of config keys, under a \\[config] table or at top level."),
    out: Optional[Path] = typer.Option(None, "--out", help="Root directory for run directories (default: runs)."),
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
    if resume is not None and out is not None:
        raise ConfigError("--resume continues a run in its own directory; drop --out")
    if resume is not None:  # a run directory, or a run id under runs/ as `report` and `export` take it
        from specscope.store import find_run

        resume = find_run(str(resume), Path("runs"))
    if resume is not None and lab is not None:
        from specscope import store

        recorded = store.Run.open(resume).lab
        if recorded != lab:
            raise ConfigError(f"{resume} is a run of lab '{recorded}', not '{lab}': drop the lab name, or resume a '{lab}' run")
    overrides = {}
    if lab is not None and resume is None:
        mod = labs.get(lab)
        if config is not None:
            overrides.update(load_toml(config))
        overrides.update(parse_overrides(mod.Config, set_, lab))
    run_dir = run_lab(lab or "", overrides, out=out or Path("runs"), resume=resume, progress=not quiet)
    show_run(run_dir)


def show_run(run_dir: Path) -> None:
    """Print a finished run's claims table and where its report is (summary.json's checksum verified)."""
    from specscope import store
    from specscope.records import Claim
    from specscope.report import claims_table

    run = store.Run.open(run_dir)
    summary = run.summary or {}
    claims = [Claim(**c) for c in summary.get("claims", [])]
    if claims:
        console.print(claims_table(claims))
    else:
        show_measured(run, salvage=bool(summary.get("salvaged")))
    if summary.get("salvaged"):
        console.print(f"[red]salvaged[/]: {markup(summary['salvaged'])}")
    console.print(f"run: {markup(visible(run_dir))}\nreport: {markup(visible(Path(run_dir) / 'report.html'))}", soft_wrap=True)  # paths whole


def show_measured(run, *, salvage: bool) -> None:
    """A lab that states no claims (shardwise: an open question) prints its summary rows instead."""
    from specscope import labs, store
    from specscope.labs.config import make_config
    from specscope.report.tables import fmt, ordered_unique

    if not _made_by_a_lab(run) or run.lab not in labs.names() or not hasattr(lab := labs.get(run.lab), "summarize"):
        return
    rows = lab.summarize(store.load(run, salvage=salvage), make_config(lab.Config, run.config, run.lab))
    if not rows:
        return
    table = Table(title=f"{run.lab}: measured")
    header = ordered_unique(k for r in rows for k in r)
    for name in header:
        table.add_column(name, overflow="fold")
    for r in rows:
        table.add_row(*(markup(fmt(r.get(k))) for k in header))
    console.print(table)


def _made_by_a_lab(run) -> bool:
    """Whether a lab recorded the run: config.json says it keeps a progress.json (lab runs from before that was
    recorded: the file itself). A run of a training loop of the user's own (run=, the Python API) keeps none, whatever
    lab name it was given, a built-in lab's included."""
    from specscope.store.run import PROGRESS

    return run.meta.get("progress") is True or (Path(run.path) / PROGRESS).exists()


@app.command("report")
def report_cmd(
    run_dir: str = typer.Argument(..., metavar="RUN", help="A run directory, or a run id (or lab/run_id) under --root."),
    salvage: bool = typer.Option(False, "--salvage", help=SALVAGE_HELP),
    root: Path = typer.Option(Path("runs"), "--root", help="Where run ids are looked up."),
) -> None:
    """Recompute a run's claims from its recorded metrics and rewrite its report.html."""
    from specscope import labs, store
    from specscope.labs.config import make_config
    from specscope.labs.runner import finish
    from specscope.report.html import check_writable
    from specscope.store.run import effective_status, read_config

    run_dir = store.find_run(run_dir, root)
    run = store.Run.open(run_dir)
    status = effective_status(Path(run_dir), read_config(run_dir))
    if status == "running":
        raise ConfigError(f"{run_dir} is being written by a live process; report it when it has finished "
                          "(it writes its own report then)")
    check_writable(run_dir)  # every refusal before the first write: a refused report changes no file
    if (Path(run_dir) / "summary.json").is_dir() and not (Path(run_dir) / "summary.json").is_symlink():
        raise RunStoreError(f"{Path(run_dir) / 'summary.json'} is a folder, not the summary the report rewrites: move it "
                            "away, then report again")
    own = run.lab not in ("demo", "diagnose") and not _made_by_a_lab(run)  # a loop of the user's own (run=, the API)
    if run.lab == "diagnose" or own:  # per-weight records: diagnose's page
        from specscope.cli.commands.diagnose import write_diagnose_report

        write_diagnose_report(run, store.load(run, salvage=salvage), partial=status if status != "complete" else "")
    elif run.lab == "demo":
        from specscope.cli.commands.demo import rewrite_demo_report

        rewrite_demo_report(run, salvage)
    else:
        lab = labs.get(run.lab)
        cfg = make_config(lab.Config, run.config, run.lab)
        if not salvage:
            run.check()  # before anything is rewritten
        finish(run, lab, cfg, salvage=salvage, partial=status if status != "complete" else "")  # a `demo --quick` lab run keeps its UNDECIDABLE verdicts
    if status != "complete":  # verdicts from the records so far: said here (stderr) and in the page's title
        again = ("a run recorded through the Python API is complete once its Run is closed (run.close())" if own
                 else f"`specscope run --resume {visible(run_dir)}` finishes it" if run.lab not in ("diagnose", "demo")
                 else f"a {run.lab} run does not resume: run `specscope {run.lab}` again for a complete one")
        typer.echo(f"warning: {visible(run_dir)} is {status}: the claims and the report cover only the steps recorded "
                   f"so far ({again})", err=True)
    show_run(run_dir)


def _distinct_names(runs: list, paths: list[Path]) -> list[str]:
    """Each run's name on the page: its id, `lab/run_id` where two runs share an id, its path where even that is
    shared (two roots holding the same lab and id). One run given twice is refused by `compare`."""
    ids = [r.id for r in runs]
    names = [f"{r.lab}/{r.id}" if ids.count(r.id) > 1 else r.id for r in runs]
    return [str(p) if names.count(n) > 1 else n for n, p in zip(names, paths)]


@app.command("compare")
def compare(
    run_dirs: list[str] = typer.Argument(..., help="Two or more run directories, or run ids (or lab/run_id) under --root."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the comparison (default <root>/compare/<time>)."),
    salvage: bool = typer.Option(False, "--salvage", help=SALVAGE_HELP),
    root: Path = typer.Option(Path("runs"), "--root", help="Where run ids are looked up."),
    force: bool = typer.Option(False, "--force", help="Replace the comparison.html already in --out (refused otherwise)."),
) -> None:
    """Overlay several runs in one HTML page (loss curves, st(A) and nr(G) per weight)."""
    import time

    from specscope import report, store

    if len(run_dirs) < 2:
        raise ConfigError("compare needs at least two run directories")
    paths = [store.find_run(p, root) for p in run_dirs]
    runs = [store.Run.open(p) for p in paths]
    holder = store.readers.run_holding(out) if out is not None else None
    if holder is not None:  # its figures/ would replace the run's own
        raise ConfigError(f"--out {out} is inside the run directory {holder}; give a folder outside every run directory")
    if out is not None and (out / "comparison.html").exists() and not force:  # as export refuses to replace a file
        raise ConfigError(f"--out {out} already holds a comparison.html; a comparison does not replace one unasked: "
                          "give another folder, or add --force to replace it")
    names = _distinct_names(runs, paths)
    frames = {n: store.load(r, salvage=salvage) for n, r in zip(names, runs)}  # all read (and checked) before writing
    seen: dict[Path, str] = {}
    for given, p in zip(run_dirs, paths):  # one run twice would be drawn twice, as if two runs agreed exactly (checked
        if (key := Path(p).resolve()) in seen:  # after the reads, so a damaged run given twice gets its own error)
            raise ConfigError(f"compare: {given!r} and {seen[key]!r} are the same run ({visible(p)}); give each run once")
        seen[key] = given
    damaged = [df.attrs["damage"] for df in frames.values() if "damage" in df.attrs]
    out = out or _fresh_folder(root / "compare" / time.strftime("%Y%m%d-%H%M%S"))  # beside the runs it compares
    configs, labs = dict(zip(names, (r.config for r in runs))), dict(zip(names, (r.lab for r in runs)))
    unfinished = {n: r.status for n, r in zip(names, runs) if r.status != "complete"}  # as `report` tells them
    for n, p in zip(names, paths):
        if n in unfinished:
            typer.echo(f"warning: {visible(p)} is {unfinished[n]}: the comparison shows only the steps it recorded "
                       "so far, not its final values", err=True)
    page = report.write_comparison(out, frames, configs=configs, labs=labs, unfinished=unfinished,
                                   salvaged="; ".join(damaged))
    console.print(f"comparison: {markup(page)}", soft_wrap=True)


def _fresh_folder(path: Path) -> Path:
    """`path`, made now, or `path_2`, `path_3`, … where it exists: two comparisons started in one second each get a
    folder of their own (mkdir is the test, so two processes cannot both take one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        candidate = path if k == 1 else path.with_name(f"{path.name}_{k}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise ConfigError(f"{path}: no free folder name beside it; pass --out")
