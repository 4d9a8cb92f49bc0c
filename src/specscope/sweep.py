"""Sweeps: a grid of config overrides, one run directory per point, a summary table, resumable.

    sweep_dir = run_sweep("grokking", {"train_fraction": [0.3, 0.4, 0.5], "weight_decay": [0.3, 1.0]},
                          fixed={"arms": ["l2", "lrd"]}, workers=2, out="runs/sweeps")
    table = summary(sweep_dir)          # one row per point (and per row the lab's `summarize` returns)

Layout: `<out>/<lab>-<time>/sweep.json` (lab, grid, fixed), `runs/<lab>/<run_id>/` (one run per point,
written by `specscope.labs.run_lab`), `summary.csv`, `claims.json` and `phase_diagram.png` when the lab
declares them. Resuming scans the run directories: a point whose overrides match a *complete* run is not
rerun; an interrupted or killed (incomplete) run of a point is resumed from its checkpoints; a failed
point is rerun as a new run.

Workers are separate processes (spawned, each with `threads_per_worker` torch threads, 1 by default), so runs never
share a file or a thread pool. A worker dies with the sweep's process (Linux: PR_SET_PDEATHSIG; elsewhere
a watchdog thread that sees the parent change), so killing a sweep never leaves runs going on unattended.
`backend="ray"` sends the points to a Ray cluster instead (optional dependency, imported only then).

Lab hooks used when present: `summarize(df, cfg) -> list[dict]` (rows per run; default: the last
whole-model value of each metric per arm), `sweep_claims(table) -> list[Claim]`, and `PHASE = {"x", "y",
"values", "panel"}` naming the columns of the phase-diagram figure.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from specscope.errors import ConfigError, RunStoreError
from specscope.names import mathtext
from specscope.store import lock
from specscope.store.integrity import read_json, write_atomic
from specscope.train.processes import die_with_parent

SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "summary.csv"
CLAIMS_FILE = "claims.json"


# ---------------------------------------------------------------- grid


def expand_grid(grid: dict[str, list[Any]], fixed: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Cartesian product of the grid values, each point merged over `fixed` (grid keys win)."""
    if not isinstance(grid, dict) or not all(isinstance(k, str) for k in grid):
        raise ConfigError(f"grid={grid!r}: give a dict of config key -> list of values, e.g. {{'train_fraction': [0.3, 0.5]}}")
    if fixed is not None and (not isinstance(fixed, dict) or not all(isinstance(k, str) for k in fixed)):
        raise ConfigError(f"fixed={fixed!r}: give a dict of config key -> value, e.g. {{'steps': 2000}}")
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"--grid {key} needs at least one value (key=v1,v2,...)")
    keys = list(grid)
    return [{**(fixed or {}), **dict(zip(keys, combo))} for combo in itertools.product(*(grid[k] for k in keys))]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def matches(overrides: dict[str, Any], config: dict[str, Any]) -> bool:
    """A run's recorded config realizes these overrides (after validation: 1 == 1.0, (a, b) == [a, b])."""
    return all(k in config and _same(v, config[k]) for k, v in overrides.items())


def _normalized(lab: str, overrides: dict[str, Any], check: bool = False) -> dict[str, Any]:
    """The overrides as the lab's validated config writes them (so matching is by value, not spelling); with
    `check`, a point whose settings fail only together (the lab's `check(cfg)`) is refused here too."""
    from specscope import labs
    from specscope.labs.config import make_config

    module = labs.get(lab)
    cfg = make_config(module.Config, overrides, lab)
    if check and hasattr(module, "check"):
        module.check(cfg)
    dumped = cfg.model_dump(mode="json")
    return {k: dumped[k] for k in overrides}


def _checked_point(lab: str, point: dict[str, Any], grid: dict[str, list]) -> dict[str, Any]:
    """`_normalized` with the lab's check; an error names the point by its grid values."""
    try:
        return _normalized(lab, point, check=True)
    except ConfigError as e:
        raise ConfigError(f"grid point {_label({k: point[k] for k in grid if k in point}) or '(no grid keys)'}: {e}") from None


MAX_COUNT = 4096  # workers or threads: a C int bounds both (multiprocessing, torch); far more than a machine has


def _count(value: Any) -> bool:
    """An int >= 1 (numpy's too), never a bool, a float or a string."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _refuse_repeats(given: list[dict[str, Any]], points: list[dict[str, Any]], grid: dict[str, list]) -> None:
    """A ConfigError when two grid points are one configuration (a value listed twice, or spelled twice: 0.5 and
    "0.5"): it would run twice, as two runs of the same point."""
    for j, p in enumerate(points):
        for i in range(j):
            if matches(p, points[i]) and matches(points[i], p):
                key = next((k for k in grid if given[i].get(k) != given[j].get(k)), None) or next(iter(grid), "")
                raise ConfigError(f"--grid {key} lists one value twice ({given[i].get(key)!r} and {given[j].get(key)!r} are "
                                  f"the same {key}): grid points {_label({k: given[i][k] for k in grid})} and "
                                  f"{_label({k: given[j][k] for k in grid})} would run the same config twice; give each "
                                  "value once")


def read_sweep_meta(path: Path) -> dict[str, Any]:
    """sweep.json: {"lab": str, "grid": {key: [values]}, "fixed": {key: value}}, or one ConfigError naming it."""
    meta = read_json(path, fix="pass the directory `specscope sweep` printed, or start a new sweep")
    if not (isinstance(meta.get("lab"), str) and isinstance(meta.get("grid"), dict) and isinstance(meta.get("fixed"), dict)):
        raise ConfigError(f"{path} is not a sweep description (lab, grid, fixed); start a new sweep")
    if bad := [k for k, v in meta["grid"].items() if not isinstance(v, list) or not v]:
        raise ConfigError(f"{path}: grid {bad[0]!r} is {meta['grid'][bad[0]]!r}, not a non-empty list of values (the file was "
                          "changed after the sweep wrote it); restore it, or start a new sweep")
    return meta


# ---------------------------------------------------------------- running


def _run_point(lab: str, overrides: dict[str, Any], out: str, threads: int,
               resume: str | None = None) -> tuple[str, str, float]:
    """Worker body: one run (or the resume of one). Returns (run directory or "", error message or "", seconds)."""
    import torch

    from specscope.labs import run_lab

    if _STOP is not None and _STOP.is_set():  # queued before a Ctrl-C reached the sweep: never started
        return "", "not started: the sweep was interrupted", 0.0
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        path = run_lab(lab, overrides, out=out, resume=resume)
        return str(path), "", time.perf_counter() - t0
    except Exception as e:  # a failed point is reported in the table; the sweep goes on
        return "", f"{type(e).__name__}: {e}", time.perf_counter() - t0
    except KeyboardInterrupt:
        if _STOP is None:  # in the sweep's own process: the sweep stops
            raise
        _STOP.set()  # a worker: its run checkpointed; the points the pool already handed it are not started
        return "", "interrupted", time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous)


_STOP = None  # in a worker process: the sweep's interrupt event


def _init_worker(threads: int, parent: int, stop=None) -> None:
    global _STOP
    _STOP = stop
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    die_with_parent(parent)


def completed_runs(sweep_dir: Path, lab: str, statuses: tuple[str, ...] = ("complete",)) -> list[tuple[Path, dict[str, Any]]]:
    """(run directory, config) of every run under the sweep whose status is one of `statuses`."""
    from specscope import store

    out = []
    root = Path(sweep_dir) / "runs" / lab
    for cfg_file in sorted(root.glob("*/config.json")):
        if cfg_file.parent.name.startswith("."):  # a run still being made (`store.Run.create`), or one killed then
            continue
        try:
            run = store.Run.open(cfg_file.parent)
        except Exception:  # a run directory cut short before its config was written
            continue
        if run.status in statuses:
            out.append((Path(run.path), dict(run.config)))
    return out


def run_sweep(
    lab: str,
    grid: dict[str, list[Any]],
    fixed: dict[str, Any] | None = None,
    *,
    out: str | Path = "runs/sweeps",
    workers: int = 1,
    resume: str | Path | None = None,
    threads_per_worker: int | None = None,
    backend: str = "process",
    echo: Any = print,
) -> Path:
    """Run every grid point of `lab` that has no complete run yet; return the sweep directory.

    `resume` continues an existing sweep directory with its recorded lab, grid and fixed overrides
    (`grid` may add values to a recorded key; `fixed` may only repeat the recorded settings: anything else would
    mix two configurations in one table). Each point's error, if any, goes to the table and errors.json.
    """
    from specscope import labs

    if not _count(workers) or workers > MAX_COUNT:
        raise ConfigError(f"--workers must be from 1 to {MAX_COUNT}, got {workers!r}")
    if threads_per_worker is not None and (not _count(threads_per_worker) or threads_per_worker > MAX_COUNT):
        raise ConfigError(f"--threads must be from 1 to {MAX_COUNT}, got {threads_per_worker!r}")
    workers = int(workers)
    threads_per_worker = None if threads_per_worker is None else int(threads_per_worker)
    if backend not in ("process", "ray"):
        raise ConfigError(f"sweep backend {backend!r} is unknown; use 'process' or 'ray'")
    if backend == "ray":
        _require_ray()  # before the sweep directory exists
    if resume is not None:
        sweep_dir = Path(resume)
        meta_file = sweep_dir / SWEEP_FILE
        if not meta_file.is_file():
            raise ConfigError(f"{sweep_dir} is not a sweep directory (no {SWEEP_FILE}); pass the directory `specscope sweep` printed")
        meta = read_sweep_meta(meta_file)
        lab = meta["lab"]
        norm = lambda key, v: _normalized(lab, {key: v})[key]  # noqa: E731 - compared by value, not spelling
        grid = extended_grid(meta["grid"], {k: [norm(k, v) for v in vs] for k, vs in grid.items()}, norm)
        fixed = resumed_fixed(meta["fixed"], {k: norm(k, v) for k, v in (fixed or {}).items()}, norm)
    labs.get(lab)  # unknown lab: error now, not in every worker
    given = expand_grid(grid, fixed)
    points = [_checked_point(lab, p, grid) for p in given]  # every point, before any starts
    _refuse_repeats(given, points, grid)
    if resume is None:
        sweep_dir = Path(out) / f"{lab}-{time.strftime('%Y%m%d-%H%M%S')}"
        while sweep_dir.exists():
            sweep_dir = sweep_dir.with_name(sweep_dir.name + "_")
        sweep_dir.mkdir(parents=True)
    held = lock.acquire(sweep_dir)  # one process per sweep: a second resume would run the same points again
    try:
        return _run_points(lab, grid, fixed, points, sweep_dir, workers, threads_per_worker, backend, echo)
    finally:
        lock.release(held)


def _run_points(lab: str, grid: dict, fixed: dict | None, points: list, sweep_dir: Path, workers: int,
                threads_per_worker: int | None, backend: str, echo: Any) -> Path:
    """The part of `run_sweep` done under the sweep's lock: record the sweep, run its points without a complete
    run, write its summary."""
    write_atomic(sweep_dir / SWEEP_FILE, json.dumps({"lab": lab, "grid": grid, "fixed": fixed or {}}, indent=1).encode())
    done = completed_runs(sweep_dir, lab)
    todo = [p for p in points if not any(matches(p, cfg) for _, cfg in done)]
    cut_short = completed_runs(sweep_dir, lab, ("incomplete", "interrupted"))
    resumes = [next((str(path) for path, cfg in cut_short if matches(p, cfg)), None) for p in todo]
    echo(f"sweep {sweep_dir}: {len(points)} points, {len(points) - len(todo)} already complete, "
         f"{len(todo)} to run ({sum(r is not None for r in resumes)} resumed) on {workers} worker(s)")
    threads = threads_per_worker or 1  # small models: one thread each; more threads oversubscribe the cores
    t0 = time.perf_counter()
    try:
        errors = _execute(lab, todo, resumes, str(sweep_dir / "runs"), workers, threads, backend, echo)
    except KeyboardInterrupt:  # the points under way were checkpointed by their runs; none queued was started
        raise KeyboardInterrupt(f"sweep interrupted; resume with: specscope sweep --resume {sweep_dir}") from None
    wall = time.perf_counter() - t0
    write_atomic(sweep_dir / "errors.json", json.dumps(errors, indent=1).encode())
    _add_timing(sweep_dir / "timing.json", {"points_run": len(todo), "workers": workers, "threads_per_worker": threads,
                                             "wall_seconds": wall})
    finish(sweep_dir)
    return sweep_dir


def _add_timing(path: Path, session: dict) -> None:
    """timing.json: one entry per session that ran (a resume adds one, never replaces the earlier ones),
    with the totals of points run and wall seconds. An unreadable file starts the list anew."""
    sessions: list[dict] = []
    try:
        old = json.loads(path.read_text())
        sessions = old["sessions"] if isinstance(old, dict) and isinstance(old.get("sessions"), list) else [old]
    except (OSError, ValueError, RecursionError):
        pass
    sessions = [t for t in sessions if isinstance(t, dict)] + [session]
    total = {"points_run": sum(int(t.get("points_run", 0)) for t in sessions),
             "wall_seconds": sum(float(t.get("wall_seconds", 0.0)) for t in sessions)}
    write_atomic(path, json.dumps({**total, "sessions": sessions}, indent=1).encode())


def _execute(lab: str, todo: list[dict], resumes: list[str | None], runs_root: str, workers: int, threads: int,
             backend: str, echo) -> list[dict]:
    """Run the points (resuming the run directory given for a point, if any); returns [{overrides, error}]
    for the failed ones."""
    errors = []

    def report(p, result):
        path, err, secs = result
        echo(f"  {'FAILED' if err else 'done'} {_label(p)} ({secs:.1f} s){': ' + err if err else ''}")
        if err:
            errors.append({"overrides": p, "error": err})

    if backend == "ray":
        for p, result in zip(todo, _ray_map(lab, todo, resumes, runs_root, threads)):
            report(p, result)
    elif workers == 1:
        for p, r in zip(todo, resumes):
            report(p, _run_point(lab, p, runs_root, threads, r))
    else:
        ctx = get_context("spawn")  # a fresh interpreter per worker: no inherited torch thread pools or locks
        stop = ctx.Event()
        init = (threads, os.getpid(), stop)
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init)
        try:
            futures = {pool.submit(_run_point, lab, p, runs_root, threads, r): i
                       for i, (p, r) in enumerate(zip(todo, resumes))}
            for f in as_completed(futures):
                report(todo[futures[f]], f.result())
        except KeyboardInterrupt:  # Ctrl-C: start no queued point (the pool's exit would run them all first)
            stop.set()  # the points the pool has already handed to a worker return at once
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
    return errors


def extended_grid(recorded: dict[str, list], given: dict[str, list], norm=lambda key, v: v) -> dict[str, list]:
    """The grid of a resumed sweep: the recorded one, each key's values extended by those given. A key the sweep
    does not have would change every recorded point, and dropping values would hide them: both are errors."""
    new = sorted(set(given) - set(recorded))
    if new:
        raise ConfigError(f"--grid {', '.join(new)}: the sweep being resumed has no such grid key (its keys: "
                          f"{sorted(recorded)}); start a new sweep to vary it")
    out = {}
    for key, values in recorded.items():
        seen = [norm(key, v) for v in values]
        out[key] = list(values) + [v for v in given.get(key, []) if v not in seen]
    return out


def resumed_fixed(recorded: dict[str, Any], given: dict[str, Any], norm=lambda key, v: v) -> dict[str, Any]:
    """A resumed sweep keeps its fixed overrides: --set may only repeat them (a change would mix two configs)."""
    changed = {k: v for k, v in given.items() if k not in recorded or norm(k, recorded[k]) != v}
    if changed:
        raise ConfigError(f"--resume continues a sweep with its recorded settings ({recorded}); --set "
                          f"{', '.join(f'{k}={v!r}' for k, v in changed.items())} would change them: start a new sweep")
    return dict(recorded)


def _require_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("backend=ray needs Ray: pip install 'specscope[ray]' (or run without --ray)") from None
    return ray


def _ray_map(lab: str, todo: list[dict], resumes: list[str | None], runs_root: str,
             threads: int) -> list[tuple[str, str, float]]:
    ray = _require_ray()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    remote = ray.remote(num_cpus=threads)(_run_point)
    return ray.get([remote.remote(lab, p, runs_root, threads, r) for p, r in zip(todo, resumes)])


def _label(p: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in p.items())


# ---------------------------------------------------------------- summary, claims, figure


def _default_rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Per arm, the last value of each whole-model metric; a sweep record's step is a width or a batch size, not a
    step, so it has no last value and is left out (as are arms that recorded nothing else), and so is the run's own
    timing record (`lab_seconds`, still in each run's metrics; the sweep's timing.json keeps the wall time), which
    alone made a row with no arm."""
    from specscope.records import SWEEP

    whole = df[(df["layer"] == "") & (df["flag"] != SWEEP) & (df["metric"] != "lab_seconds")].sort_values("step")
    rows = []
    for arm, g in whole.groupby("arm"):
        rows.append({"arm": arm, **{f"final_{m}": float(s["value"].iloc[-1]) for m, s in g.groupby("metric")}})
    return rows


def summary(sweep_dir: str | Path, warn: bool = True) -> pd.DataFrame:
    """One row per (complete run, row of the lab's `summarize`): the grid keys, then the lab's columns; rows sorted
    by the grid keys' values (runs finish, and are named, in whatever order the workers took them). `warn`: of the
    complete runs of no point of the sweep, which are left out (a caller that has warned already passes False)."""
    from specscope import labs, store
    from specscope.labs.config import make_config

    sweep_dir = Path(sweep_dir)
    meta = read_sweep_meta(sweep_dir / SWEEP_FILE)
    lab = labs.get(meta["lab"])
    keys = list(meta["grid"])  # the fixed overrides are in sweep.json, the same for every row
    points = [_normalized(meta["lab"], p) for p in expand_grid(meta["grid"], meta["fixed"])]
    rows, strays = [], []
    for path, config in completed_runs(sweep_dir, meta["lab"]):
        if not any(matches(p, config) for p in points):  # a run of no point of this sweep (its sweep.json was changed)
            strays.append(path.name)
            continue
        try:
            df = store.load(path)
        except RunStoreError as e:  # one damaged run: its own message's --salvage is no option of `sweep`
            why = str(e).split("; --salvage")[0].split(" --salvage")[0].rstrip(" ;.")
            raise RunStoreError(f"{why}. That run is a point of the sweep {sweep_dir}: move its directory ({path}) out of "
                                f"the sweep and `specscope sweep --resume {sweep_dir}` runs the point again; `specscope export "
                                f"{path} --salvage` writes what is still readable of it") from None
        cfg = make_config(lab.Config, config, meta["lab"])
        lab_rows = lab.summarize(df, cfg) if hasattr(lab, "summarize") else _default_rows(df)
        point = {k: (json.dumps(config[k]) if isinstance(config.get(k), (list, dict)) else config.get(k)) for k in keys}
        rows += [{**point, **r, "run": path.name} for r in lab_rows]
    if strays and warn:
        warnings.warn(f"{len(strays)} complete run(s) under {sweep_dir} realize none of the points its {SWEEP_FILE} lists "
                      f"({', '.join(strays[:3])}{', …' if len(strays) > 3 else ''}): left out of the summary; a sweep.json "
                      "edited after they ran describes another sweep", stacklevel=2)
    return pd.DataFrame(rows).sort_values(keys, kind="stable", ignore_index=True) if rows else pd.DataFrame(rows)


def finish(sweep_dir: str | Path) -> pd.DataFrame:
    """Write summary.csv, the lab's sweep claims (claims.json) and phase diagram; print the table.

    A sweep with no claims of its own (its lab has no sweep rule, or no run is complete) has no claims.json: one
    there (damaged, or left by an earlier sweep rule) is removed, as `specscope claims` would take it to speak for the
    sweep's runs."""
    from specscope import labs

    sweep_dir = Path(sweep_dir)
    meta = read_sweep_meta(sweep_dir / SWEEP_FILE)
    lab = labs.get(meta["lab"])
    table = summary(sweep_dir)
    write_atomic(sweep_dir / SUMMARY_FILE, table.to_csv(index=False).encode())
    if not table.empty and hasattr(lab, "sweep_claims"):
        claims = lab.sweep_claims(table)
        write_atomic(sweep_dir / CLAIMS_FILE, json.dumps([c.as_dict() for c in claims], indent=1).encode())
    else:
        (sweep_dir / CLAIMS_FILE).unlink(missing_ok=True)
    phase = getattr(lab, "PHASE", None)
    if phase and not table.empty and {phase["x"], phase["y"]} <= set(table.columns):
        fig = phase_diagram(table, **phase)
        fig.savefig(sweep_dir / "phase_diagram.png", dpi=110)
    return table


def phase_diagram(table: pd.DataFrame, x: str, y: str, values: Iterable[str], panel: str | None = None):
    """A grid of heatmaps: one row per value column, one column per `panel` value (e.g. arm); cells are the
    mean over seeds at (x, y); blank, labelled "none", where nothing grokked (NaN). Returns a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = list(values)
    panels = list(pd.unique(table[panel])) if panel else [None]
    fig, axes = plt.subplots(len(values), len(panels), figsize=(4.2 * len(panels), 3.4 * len(values)), squeeze=False)
    for i, value in enumerate(values):
        finite = table[value].to_numpy(float)[np.isfinite(table[value].to_numpy(float))]
        vmin, vmax = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        for j, pv in enumerate(panels):
            sub = table if pv is None else table[table[panel] == pv]
            grid = sub.pivot_table(index=y, columns=x, values=value, aggfunc="mean", dropna=False)
            ax = axes[i][j]
            im = ax.imshow(grid.to_numpy(float), origin="lower", aspect="auto", vmin=vmin, vmax=vmax, cmap="viridis")
            ax.set_xticks(range(grid.shape[1]), [f"{c:g}" for c in grid.columns])
            ax.set_yticks(range(grid.shape[0]), [f"{r:g}" for r in grid.index])
            for (r, c), v in np.ndenumerate(grid.to_numpy(float)):
                ax.text(c, r, "none" if np.isnan(v) else f"{v:.3g}", ha="center", va="center", fontsize=7,
                        color="0.35" if np.isnan(v) else "w")  # a blank (NaN) cell is white: its label must not be
            title = f"{value}" + (f" — {panel}={pv}" if pv is not None else "")
            ax.set(xlabel=mathtext(x), ylabel=mathtext(y), title=mathtext(title))  # names from disk: drawn as typed
            fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def print_table(table: pd.DataFrame, echo: Any = print) -> None:
    """The summary as aligned text (numbers to 4 significant digits)."""
    if table.empty:
        echo("(no complete runs)")
        return
    echo(table.drop(columns=["run"], errors="ignore").to_string(index=False, float_format=lambda v: f"{v:.4g}"))
