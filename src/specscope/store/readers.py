"""Reading runs: `load` (records -> DataFrame), `list_runs` (run directories -> DataFrame), `export`.

Readers never write: metrics.sqlite is opened read-only (immutable for a finished run, a private copy for a
crashed one), so they work while the run is being written (WAL), after a crash, and on a read-only run
directory, and they create nothing in it. A database that fails its integrity check is an error naming the
file unless `salvage=True`, which reads what is still readable and marks the DataFrame (`df.attrs["damage"]`).
"""

from __future__ import annotations

import fnmatch
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from specscope.errors import ConfigError, RunStoreError
from specscope.names import check_name
from specscope.store import sqlite
from specscope.store.deps import require
from specscope.store import integrity
from specscope.store.run import _NAME, CONFIG, METRICS, PROGRESS, SUMMARY, Run, effective_status, parts_left

if TYPE_CHECKING:
    import pandas as pd

LOAD_COLUMNS = ["run_id", *sqlite.COLUMNS]
LIST_COLUMNS = ["run_id", "lab", "status", "created", "steps", "records", "path", "problem"]


def run_dir(run: str | os.PathLike | Run) -> Path:
    """The directory of a Run, a run directory path, or the path of its metrics.sqlite / config.json."""
    if isinstance(run, Run):
        return run.path
    p = Path(run)
    return p.parent if p.name in (METRICS, CONFIG) and p.is_file() else p


def load(run: str | os.PathLike | Run, *, metric: str | Iterable[str] | None = None,
         layer: str | Iterable[str] | None = None, arm: str | Iterable[str] | None = None,
         salvage: bool = False) -> "pd.DataFrame":
    """All records of a run as a long DataFrame (run_id, step, layer, metric, value, arm, estimator, rows,
    shape, flag), in the order they were written, optionally only some metrics / layers / arms.

    A Run still open for writing in this process is flushed first. A database that fails its integrity
    check raises RunStoreError naming the file; with `salvage` every readable record is returned, with a
    RuntimeWarning and `df.attrs["damage"]` saying what was wrong. NaN values come back as NaN.
    """
    import pandas as pd

    run = run if isinstance(run, Run) else Run.open(run_dir(run))
    with warnings.catch_warnings(record=True) as said, run.reader(salvage=salvage) as (con, damage):
        warnings.simplefilter("always")
        rows, damage = sqlite.read_rows(con, run.metrics_path, {"metric": metric, "layer": layer, "arm": arm}, salvage, damage)
        df, failed = sqlite.verify(pd.DataFrame.from_records(rows, columns=[*sqlite.COLUMNS, *sqlite.READ_CHECKS]),
                                   run.metrics_path, salvage)
        damage, unchecked = "; ".join(filter(None, [damage, failed])), ""
        try:
            _check_counts(run, lambda name, upto: sqlite.count_rows(con, run.metrics_path, arm=name, upto=upto))
        except RunStoreError as e:
            if not salvage:
                raise
            lost = str(e).split(": the database lost records")[0].split(". The file is truncated")[0].split("; --salvage")[0]  # no fix: this is it
            if ": the database lost records" in str(e):  # the database's damage
                lost += " (records lost)"
                damage = "; ".join(filter(None, [damage, lost]))
            else:  # progress.json's: the database may be whole, its counts are what cannot be checked
                unchecked = lost = lost + f" ({COUNTS_UNCHECKED})"
            warnings.warn(f"{lost}; read the {len(df)} records still there", RuntimeWarning, stacklevel=2)
    if damage or unchecked:  # a damaged page can yield a record without a step: it cannot be placed, so it is not used
        df = df.dropna(subset=["step"]).fillna({"rows": 0})
    df = _numbers(df, run.metrics_path, salvage)
    df.insert(0, "run_id", run.id)
    if damage and df.empty and metric is None and layer is None and arm is None:
        # a report, a claims table or an export of nothing would stand in for the run (a report would replace
        # its recorded verdicts with INCONCLUSIVE ones); what was lost is all of it, so no warning says more
        raise RunStoreError(f"{run.metrics_path} is damaged and not one of its records could be read, even to salvage "
                            "them; restore it from a copy, or delete the run.")
    for w in said:  # what the salvage read and lost, once the result is sure to be returned
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if damage:
        df.attrs["damage"] = f"{run.metrics_path} is damaged ({damage}); only the {len(df)} readable records were used"
    if unchecked:  # the page says which file was damaged: the database, or only what checks its counts
        df.attrs["damage"] = "; ".join(filter(None, [df.attrs.get("damage"), f"{unchecked}: the {len(df)} records of "
                                                     f"{run.metrics_path} were read, their counts unchecked"]))
    return df


COUNTS_UNCHECKED = "record counts not checked"


def salvage_title(damage: str) -> str:
    """What a page or table made from salvaged records says first: a damaged database, or a whole one whose record
    counts could not be checked (progress.json damaged)."""
    return "SALVAGED: RECORD COUNTS NOT CHECKED" if COUNTS_UNCHECKED in damage and " is damaged (" not in damage \
        else "SALVAGED FROM A DAMAGED DATABASE"


def _numbers(df, path: Path, salvage: bool):
    """step, value and rows as int64, float64 (NULL, a stored NaN, as NaN) and int64. A record holding text there (in a
    database from before record checksums, which catch it) is a RunStoreError, or left out with `salvage`."""
    import pandas as pd

    try:
        return df.astype({"step": "int64", "value": "float64", "rows": "int64"})
    except (ValueError, TypeError, OverflowError) as e:
        numbers = {c: pd.to_numeric(df[c], errors="coerce") for c in ("step", "value", "rows")}
        bad = numbers["step"].isna() | numbers["rows"].isna() | (numbers["value"].isna() & df["value"].notna())
        if not salvage:
            raise RunStoreError(f"{path}: {int(bad.sum())} of its {len(df)} records hold a step, value or rows that is "
                                f"not a number ({e}); the file is corrupt; --salvage reads the others.") from None
        warnings.warn(f"{path}: {int(bad.sum())} records hold a step, value or rows that is not a number; read the "
                      f"{int((~bad).sum())} others.", RuntimeWarning, stacklevel=3)
        kept = df[~bad].assign(**{c: v[~bad] for c, v in numbers.items()})
        return kept.astype({"step": "int64", "value": "float64", "rows": "int64"}).reset_index(drop=True)


def _check_counts(run: Run, count) -> None:
    """A lab run's progress.json says how many records each finished arm wrote (a measurement's under the arm names
    "arms" lists) and each checkpoint covers; a
    database holding fewer lost them (a damaged or truncated -wal file reads as a valid, shorter database).
    A damaged progress.json, or another run's, is a RunStoreError naming it (the counts cannot be checked), and so
    is a missing one where config.json records that the run keeps one and the database holds records (a run not made
    by a lab has none: not checked)."""
    path = Path(run.path) / PROGRESS
    if not path.exists():
        if run.meta.get("progress") is True and count(None, None):
            raise RunStoreError(f"{path} is missing: config.json records that this run keeps one, and the database "
                                "holds records whose counts it would check (deleted?); restore it from a copy; "
                                "--salvage reads the records without checking their counts.")
        return
    progress = integrity.read_json(path, checksum=True, fix="--salvage reads the records without checking their counts")
    if progress.get("run_id", run.id) != run.id:
        raise RunStoreError(f"{path} is run {progress['run_id']!r}'s, not this run's ({run.id!r}): it was copied over "
                            "from another run; --salvage reads the records without checking their counts.")
    want = {name: (n, None, "when it finished") for name, n in (progress.get("records") or {}).items()
            if name in (progress.get("done") or [])}
    for name, ck in (progress.get("checkpoints") or {}).items():
        if isinstance(ck, dict) and name not in want:
            upto = ck.get("position") if isinstance(ck.get("position"), int) else None  # older runs: no position
            want[name] = (ck.get("records"), upto, f"up to its step-{ck.get('step')} checkpoint")
    arms = progress.get("arms") if isinstance(progress.get("arms"), dict) else {}  # a measurement's other arm names
    for name, (n, upto, when) in want.items():
        owned = arms.get(name)
        owned = owned if isinstance(owned, list) and all(isinstance(a, str) for a in owned) else [name]
        have = sum(count(a, upto) for a in owned)
        if isinstance(n, int) and have < n:
            raise RunStoreError(f"{run.metrics_path} holds {have} records of '{name}', but {path} says {n} were "
                                f"written {when}: the database lost records (a damaged or truncated "
                                f"{run.metrics_path.name}-wal?); --salvage reads what is left.")


# Where a run directory lies under a root, as `specscope` writes runs: root/<lab>/<run_id>; a demo's lab runs
# (root/demo/<id>/<lab>/<run_id>) and the runs of a sweep in root (root/<sweep>/runs/<lab>/<run_id>); a sweep's runs with
# the sweep itself as root; those of a sweep one folder down (`specscope sweep`'s default: runs/sweeps/<sweep>/...).
# `list_runs` lists, `find_run` finds by id, and `claims` names by id, the runs in these places, and only those.
LAYOUTS = ("{lab}/{run}", "*/*/{lab}/{run}", "runs/{lab}/{run}", "*/*/runs/{lab}/{run}")


def found_by_id(path: Path, root: Path) -> bool:
    """Whether the run directory `path` lies in one of the LAYOUTS under `root` (a run id finds it there)."""
    parts = path.relative_to(root).parts
    return any(len(parts) == len(want) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, want))
               for want in (Path(layout.format(lab="*", run="*")).parts for layout in LAYOUTS))


def list_runs(root: str | os.PathLike = "runs", lab: str | None = None) -> "pd.DataFrame":
    """Every run under `root/<lab>/<run_id>/` (and the lab runs inside a demo or a sweep: LAYOUTS), newest first: run_id,
    lab, status, created, steps (the last step recorded), records, path, problem. A "running" run whose process is
    gone is listed as "incomplete"; a directory with a damaged config.json as "unreadable". `problem` names a
    checksummed file (summary.json, progress.json) that is damaged or was edited, with its fix; "" when there is none."""
    import pandas as pd

    root = Path(root)
    if lab is not None:
        check_name("lab", lab)  # never a glob pattern or a path
    patterns = [f"{layout.format(lab=lab or '*', run='*')}/{name}" for layout in LAYOUTS for name in (CONFIG, METRICS)]
    # a run killed before its config.json was written still has its database: listed as unreadable, not hidden
    dirs = dict.fromkeys(p.parent for pattern in patterns for p in root.glob(pattern)
                         if not _hidden(p.parent, root)) if root.is_dir() else {}  # hidden: a run still being made
    rows = [_describe(d) for d in dirs]
    df = pd.DataFrame(rows, columns=LIST_COLUMNS)
    df["created"] = pd.to_datetime(df["created"], utc=True, errors="coerce", format="ISO8601")
    df["steps"] = df["steps"].astype("Int64")
    df["records"] = df["records"].astype("Int64")
    return df.sort_values(["created", "run_id"], ascending=False, na_position="last").reset_index(drop=True)


def _hidden(path: Path, root: Path) -> bool:
    """Whether a folder under `root` has a hidden name on the way (`Run.create` makes a run under one)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _describe(path: Path) -> dict:
    row = {"run_id": path.name, "lab": path.parent.name, "status": "unreadable", "created": None,
           "steps": None, "records": None, "path": str(path), "problem": ""}
    try:
        run = Run.open(path)
    except RunStoreError as e:
        row["problem"] = str(e)
        return row
    meta = run.meta
    # the folder's name: what `export ID`, `report ID` resolve (a copy of a run in another folder keeps the
    # original's id in its config.json, and was listed under it, which then named no run)
    row.update(lab=meta["lab"], created=meta.get("created"), status=effective_status(path, meta))
    try:
        with run.reader(check=False) as (con, _):
            progress = sqlite.read_progress(con, run.metrics_path)
        row.update(steps=progress.get("last_step"), records=progress.get("records", 0))
    except RunStoreError as e:  # an unreadable database (or another run's config.json) is damage too: said first
        salvageable = (run.metrics_path.is_file() and "--salvage" not in str(e)  # a missing file has nothing left to read
                       and "another run's" not in str(e))
        row["problem"] = f"{e} (`--salvage` reads what is left)" if salvageable else str(e)
    row["problem"] = row["problem"] or _damaged_json(path, run.meta, row["records"] or 0) or _edited_status(path, run.meta)
    return row


_FIXES = {SUMMARY: "`specscope report {path}` rewrites it from the recorded metrics",
          PROGRESS: "`specscope run --resume` cannot continue this run; start a new one"}


def _damaged_json(path: Path, meta: dict, records: int = 0) -> str:
    """The first checksummed JSON file of the run that fails its check or is another run's (its run_id or lab is not
    config.json's: copied over), or the summary.json a complete run recorded having and no longer has, as a
    RunStoreError's message; "" if none."""
    for name, fix in _FIXES.items():
        recorded = meta.get("summary") and meta.get("status") == "complete" if name == SUMMARY else meta.get("progress") is True
        if (path / name).exists() or (recorded and (name == SUMMARY or records)):
            try:
                data = integrity.read_json(path / name, checksum=True, fix=fix.format(path=path))
            except RunStoreError as e:
                return str(e)
            if problem := other_runs(path / name, data, meta, fix.format(path=path)):
                return problem
    return ""


def _edited_status(path: Path, meta: dict) -> str:
    """What is wrong with a "complete" status that progress.json contradicts (its parts were not all done), or ""."""
    if meta.get("status") != "complete" or not (left := parts_left(path, meta)):
        return ""
    return (f"{path / CONFIG} says complete, but {path / PROGRESS} (checksummed) has {', '.join(map(repr, left))} "
            "unfinished: the status was edited; `specscope run --resume` continues the run")


def other_runs(path: Path, data: dict, meta: dict, fix: str) -> str:
    """"" unless the JSON file `path` (read as `data`) names another run or lab than config.json's `meta`: then what
    it is and `fix`. (Files from before a field was recorded lack it: not checked.)"""
    if "run_id" in data and "run_id" in meta and data["run_id"] != meta["run_id"]:
        return f"{path} is run {data['run_id']!r}'s, not this run's ({meta['run_id']!r}): it was copied over from another run; {fix}"
    if "lab" in data and "lab" in meta and data["lab"] != meta["lab"]:  # config.json's lab is outside its checksum
        return (f"{path} is of lab {data['lab']!r}, but {CONFIG} names lab {meta['lab']!r}: {CONFIG}'s lab was edited "
                f"(restore it to {data['lab']!r}: metrics.sqlite says which), or {path.name} was copied over from "
                f"another run ({fix})")
    return ""


def find_run(run: str, root: str | os.PathLike = "runs") -> Path:
    """A run directory from a path, or from a run id (or `lab/run_id`) under `root` in one of the LAYOUTS: a demo's lab
    runs and a sweep's included (the ids `runs` and `claims` show)."""
    if not str(run).strip():  # Path("") is ".": the current folder would stand in for the run
        raise RunStoreError(f"a run named {str(run)!r} (empty): give a run directory or a run id; list runs with "
                            f"`specscope runs --root {root}`.")
    p, root = Path(run), Path(root)
    if p.is_dir():
        return p
    run = run.rstrip("/") or run  # "lab/ID/", as shell completion from inside the root writes it
    parts = run.split("/")
    plain = len(parts) <= 2 and all(_NAME.fullmatch(x) for x in parts)  # never glob a name with wildcards in it
    if len(parts) == 2 and plain and (root / run / CONFIG).is_file():  # "lab/run_id" (never "../x": outside root)
        return root / run
    lab, run_id = parts if len(parts) == 2 else ("*", run)
    patterns = [layout.format(lab=lab, run=run_id) for layout in LAYOUTS]  # a demo's lab runs and a sweep's runs too
    hits = sorted(h for pattern in patterns for h in root.glob(pattern)
                  if (h / CONFIG).is_file() and not _hidden(h, root)) if plain and root.is_dir() else []
    hits = [h for i, h in enumerate(hits) if h.resolve() not in {g.resolve() for g in hits[:i]}]  # one run, two links
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise RunStoreError(f"run id {run!r} exists in several labs under {root}: "
                            + ", ".join(str(h) for h in hits) + "; give the path instead.")
    if not plain:  # a path (or a hostile name), not an id: nothing under root was looked at
        raise RunStoreError(f"no run directory {run!r}; check the path, or list runs with "
                            f"`specscope runs --root {root}` and give a run id.")
    raise RunStoreError(f"no run {run!r}: not a directory, and no {root}/<lab>/{run}; "
                        f"list runs with `specscope runs --root {root}` or give the run directory's path.")


def run_holding(path: str | os.PathLike) -> Path | None:
    """The run (or sweep) directory `path` lies in — a folder holding config.json and metrics.sqlite, or a
    sweep's sweep.json —, or None."""
    here = Path(os.path.realpath(path))  # a link into a run counts as inside it
    for d in (here, *here.parents):
        if ((d / CONFIG).exists() and (d / METRICS).exists()) or (d / "sweep.json").is_file():
            return d
    return None


def _no_folder(out: Path) -> str:
    """Why no file can be made at `out`: it is a directory, a folder on its way is a file (or another non-folder), or
    its folder does not exist."""
    if out.is_dir():
        return "it is a directory"
    blocking = next((p for p in reversed(out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        return f"{blocking} is a file, not a directory" if blocking.is_file() else f"{blocking} is not a directory"
    return f"the directory {out.parent} does not exist"


def export(run: str | os.PathLike | Run, out: str | os.PathLike, fmt: str = "csv", *, salvage: bool = False,
           force: bool = False) -> Path:
    """Write `load(run)` to `out` as csv or parquet (parquet needs pyarrow), through a temporary file, so
    `out` is the whole export or untouched. With `salvage` and a damaged database the file name says so: `<out stem>.salvaged<suffix>`.
    An existing file at `out` is replaced only with `force=True` (it may be an earlier export, or anything else)."""
    if fmt not in ("csv", "parquet"):
        raise ConfigError(f"unknown export format {fmt!r}: use csv or parquet.")
    if fmt == "parquet":
        require("pyarrow", "parquet", "export to parquet")
    out = Path(out)
    if long := [part for part in out.parts if len(os.fsencode(part)) > 255]:  # NAME_MAX of Linux's file systems
        raise ConfigError(f"cannot write {out}: the name {long[0][:40]}… is {len(os.fsencode(long[0]))} bytes, longer "
                          "than a file name may be (255); pass a shorter --out FILE.")
    holder = run_holding(out)
    if holder is not None:  # an export never replaces what a run recorded (its database, config, checkpoints …)
        raise RunStoreError(f"cannot write {out}: it is inside the run directory {holder}, whose files an export "
                            "must not replace; pass --out FILE outside every run (and sweep) directory.")
    df = load(run, salvage=salvage)  # refuses a damaged database with not one readable record
    special = out.exists() and not out.is_file() and not out.is_dir()  # /dev/null, a fifo: write into, never replace
    if "damage" in df.attrs and not special:
        out = out.with_name(f"{out.stem}.salvaged{out.suffix}")
    if special:
        tmp = out
    elif out.is_dir() or not out.parent.is_dir():
        raise RunStoreError(f"cannot write {out}: {_no_folder(out)}; write to a file in an existing directory (--out FILE; "
                            "`out=` of store.export).")
    elif out.exists() and not force:
        raise RunStoreError(f"cannot write {out}: the file exists, and an export does not replace a file unasked; "
                            "pass another file (--out FILE; `out=` of store.export), or replace it with --force "
                            "(force=True).")
    else:
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if fmt == "csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False, engine="pyarrow")
        if tmp != out:
            os.replace(tmp, out)
    except OSError as e:
        if tmp != out:
            integrity.discard(tmp)
        raise RunStoreError(f"cannot write {out}: {e.strerror or e}; pass --out FILE somewhere writable.") from None
    return out
