"""`specscope sweep LAB --grid key=v1,v2 ... --set key=value --workers N --out DIR [--resume SWEEPDIR]`."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Optional

import typer

from specscope.cli import app, interruptible
from specscope.errors import ConfigError


def _split_top(raw: str, keep_empty: bool = False) -> list[str]:
    """Split on commas outside brackets: "0.3,[l2,lrd],1" -> ["0.3", "[l2,lrd]", "1"] (empty parts dropped
    unless `keep_empty`)."""
    parts, depth, cur = [], 0, ""
    for ch in raw:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in parts + [cur] if keep_empty or p.strip()]


def parse_grid(config_cls, pairs: list[str], lab: str) -> dict[str, list]:
    """["train_fraction=0.3,0.5", "arms=[l2],[l2,lrd]"] -> {"train_fraction": [0.3, 0.5], "arms": [["l2"], ["l2", "lrd"]]}.

    Each value is parsed like `--set key=value` (a bracketed list for a list-valued key)."""
    from specscope.labs.config import parse_overrides

    grid: dict[str, list] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--grid expects key=v1,v2,..., got '{pair}'")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; give all its values in one: --grid {key}=v1,v2,...")
        parts = _split_top(raw, keep_empty=True)
        if raw.strip() and "" in parts:
            raise ConfigError(f"--grid {key}={raw.strip()} has an empty value (a comma at the start or end, or two in "
                              f"a row); write --grid {key}=v1,v2")
        field = config_cls.model_fields.get(key)
        if "[]" in parts and field is not None and typing.get_origin(field.annotation) is not list:
            raise ConfigError(f"--grid {key}={raw.strip()}: [] is an empty list, and {key} takes one value per point; "
                              f"write --grid {key}=v1,v2")
        values = [v[1:-1] if v.startswith("[") and v.endswith("]") else v for v in parts if v]
        grid[key] = [parse_overrides(config_cls, [f"{key}={v}"], lab)[key] for v in values]
        if not grid[key]:
            raise ConfigError(f"--grid {key} has no values; write --grid {key}=v1,v2")
        seen = [json.dumps(v, sort_keys=True) for v in grid[key]]
        if len(set(seen)) < len(seen):
            twice = next(v for v in seen if seen.count(v) > 1)
            raise ConfigError(f"--grid {key} lists the value {twice} twice; each point runs once")
    return grid


@app.command("sweep")
@interruptible
def sweep(
    lab: Optional[str] = typer.Argument(None, help="Lab name (see `specscope list`); omit with --resume."),
    grid: list[str] = typer.Option([], "--grid", help="key=v1,v2,... (repeatable; the product of all is run)."),
    set_: list[str] = typer.Option([], "--set", help="A fixed override for every point: key=value (repeatable)."),
    workers: int = typer.Option(1, "--workers", help="Parallel worker processes (one torch thread each unless --threads)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where the sweep directory is created (default runs/sweeps)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a sweep directory: complete points are not rerun."),
    threads: int = typer.Option(1, "--threads", help="torch threads per worker."),
    ray: bool = typer.Option(False, "--ray", help="Run the points on a Ray cluster (RAY_ADDRESS) instead of local processes."),
) -> None:
    """Run a lab over a grid of config values: one run per point and summary.csv.

    For a lab with a sweep rule (grokking: train fraction × strength), also claims.json and phase_diagram.png.
    """
    import json

    from specscope import labs, sweep as sw
    from specscope.labs.config import parse_overrides

    if resume is not None and out is not None:
        raise ConfigError("--resume continues a sweep in its own directory; drop --out")
    if resume is not None:
        meta_file = resume / sw.SWEEP_FILE
        if not meta_file.is_file():
            raise ConfigError(f"{resume} is not a sweep directory (no {sw.SWEEP_FILE})")
        recorded = sw.read_sweep_meta(meta_file)["lab"]
        if lab is not None and lab != recorded:
            raise ConfigError(f"--resume {resume} is a sweep of lab '{recorded}', not '{lab}'")
        lab = recorded
    if lab is None:
        raise ConfigError("name a lab (see `specscope list`) or pass --resume SWEEP_DIR")
    if resume is None and not grid:
        raise ConfigError("give at least one --grid key=v1,v2 (or use `specscope run` for a single point)")
    mod = labs.get(lab)
    grid_values, fixed = parse_grid(mod.Config, grid, lab), parse_overrides(mod.Config, set_, lab)
    both = sorted(set(grid_values) & set(fixed))
    if both:  # the grid's values would silently win over the --set one
        raise ConfigError(f"{both[0]!r} is given both as --set {both[0]}=… and in --grid; give it in one of them")
    sweep_dir = sw.run_sweep(
        lab, grid_values, fixed,
        out=out or Path("runs/sweeps"), workers=workers, resume=resume, threads_per_worker=threads, backend="ray" if ray else "process", echo=typer.echo,
    )
    sw.print_table(sw.summary(sweep_dir, warn=False), echo=typer.echo)  # run_sweep's summary warned of strays
    claims_file = sweep_dir / sw.CLAIMS_FILE
    if claims_file.is_file():
        from rich.console import Console

        from specscope.cli.commands.claims import read_sweep_claims
        from specscope.report import claims_table

        Console().print(claims_table(read_sweep_claims(claims_file), title="Sweep claims"))
    typer.echo(f"sweep: {sweep_dir}")
    failed = json.loads((sweep_dir / "errors.json").read_text()) if (sweep_dir / "errors.json").is_file() else []
    if failed:  # the table above has the points that ran; the exit status says not all did
        raise ConfigError(f"{len(failed)} point(s) of the sweep failed, e.g. {failed[0]['overrides']}: {failed[0]['error']}; "
                          f"errors in {sweep_dir / 'errors.json'}; a point interrupted or out of memory finishes with "
                          f"specscope sweep --resume {sweep_dir}, one whose settings fail fails again: start a new sweep "
                          "whose grid leaves that value out")
