"""metrics.sqlite: the long-format record table of one run.

WAL journal, so one writer and any number of readers (other processes included) work at the same time,
and a transaction committed before a crash is in the WAL file and survives it. synchronous=NORMAL is
enough for that: WAL + NORMAL loses committed data only on power loss, never on a killed process.
Every statement is parameterized: layer, metric and arm names are data, never SQL.
"""

from __future__ import annotations

import contextlib
import operator
import shutil
import sqlite3
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Sequence

from specscope.errors import ConfigError, RunStoreError
from specscope.records import SWEEP, Record
from specscope.store import checksum
from specscope.store.integrity import fault_point

COLUMNS = ("step", "layer", "metric", "value", "arm", "estimator", "rows", "shape", "flag")

# MIGRATIONS[v] takes a database from schema version v to v + 1. Append, never edit.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE metrics (
        step INTEGER NOT NULL, layer TEXT NOT NULL, metric TEXT NOT NULL, value REAL,
        arm TEXT NOT NULL, estimator TEXT NOT NULL, rows INTEGER NOT NULL, shape TEXT NOT NULL,
        flag TEXT NOT NULL
    );
    CREATE INDEX metrics_arm_metric_layer_step ON metrics (arm, metric, layer, step);
    CREATE TABLE run_info (key TEXT PRIMARY KEY, value);
    """,
    # each record's checksum (store.checksum); NULL in the records written before it
    "ALTER TABLE metrics ADD COLUMN checksum INTEGER",
]
SCHEMA_VERSION = len(MIGRATIONS)

_FLAG = COLUMNS.index("flag")
MAX_INT = 2**63 - 1  # SQLite's INTEGER is a signed 64-bit number: a larger step or rows cannot be stored
_INSERT = f"INSERT INTO metrics ({', '.join(COLUMNS)}, checksum) VALUES ({', '.join('?' * (len(COLUMNS) + 1))})"
_CHECKSUMS = 2  # the schema version that added the checksum column


# What reading a damaged file raises: SQLite's errors, and UnicodeDecodeError where SQLite's own message quotes
# the damaged bytes of the schema (Python's sqlite3 then fails decoding the message, not the data).
DB_ERRORS = (sqlite3.DatabaseError, UnicodeDecodeError)


def _select(con: sqlite3.Connection, salvage: bool = False) -> str:
    """The SELECT of COLUMNS, the stored checksum (0 where none) and whether none was stored (`unchecked`: the
    records of a database from before checksums). Whether there are checksums is read off the table itself, never
    off the stored schema version: one flipped bit in that number would otherwise turn every check off."""
    try:
        version = tables_version(con)
    except DB_ERRORS:
        if not salvage:
            raise
        version = _CHECKSUMS  # the table's columns are unreadable: try the current ones
    # unchecked: records written before checksums were (a database migrated from version 1: `run_info`'s checksums_from,
    # else, in a database made before that was kept, those before its first checksummed record); a NULL after them is
    # a damaged or edited record (one bit turns an integer's type to NULL), checked and failed
    first = "(SELECT ifnull((SELECT rowid FROM metrics WHERE checksum IS NOT NULL ORDER BY rowid LIMIT 1), 9223372036854775807))"
    try:
        row = con.execute("SELECT value FROM run_info WHERE key = 'checksums_from'").fetchone()
    except DB_ERRORS:
        row = None
    if row is not None and isinstance(row[0], int):
        first = str(row[0])
    stored = ("0, 1" if version < _CHECKSUMS else "ifnull(checksum, 0), checksum IS NULL" if salvage
              else f"ifnull(checksum, 0), checksum IS NULL AND rowid < {first}")
    return f"SELECT {', '.join(COLUMNS)}, {stored} FROM metrics"


def tables_version(con: sqlite3.Connection) -> int:
    """The schema version the tables themselves have: 0 without a metrics table, 1 without the checksum column,
    _CHECKSUMS (= SCHEMA_VERSION) with it."""
    columns = {row[1] for row in con.execute("PRAGMA table_info(metrics)")}
    return 0 if not columns else _CHECKSUMS if "checksum" in columns else 1


_BY_TABLES = "--salvage (store.load(run, salvage=True)) reads it by its tables"


def version_problem(con: sqlite3.Connection, path: Path, fix: str = _BY_TABLES) -> str | None:
    """None when the stored schema version is one this specscope reads and matches the tables, else what is wrong
    and what to do: a version above SCHEMA_VERSION over tables of this one (a newer specscope's file, or a damaged
    number), or one that disagrees with the tables (damaged: a bit flip in it)."""
    version = con.execute("SELECT max(version) FROM schema_version").fetchone()[0]
    tables = tables_version(con)
    if version == tables and version is not None:
        return None
    if version is not None and version > SCHEMA_VERSION and tables == SCHEMA_VERSION:
        return (f"{path} has schema version {version}, and its tables are this specscope's (version {SCHEMA_VERSION}): a "
                f"newer specscope wrote it (upgrade specscope), or the version number is damaged ({fix})")
    said = "has no schema version" if version is None else f"says schema version {version}"
    return (f"{path} {said}, and its tables are those of version {tables}: the version number is damaged or was "
            f"altered; {fix}, or restore the file from a copy")


_SALVAGE = "--salvage (store.load(run, salvage=True)) reads what is still readable"


# SQLite's words for a write the file system refused (full disk, `ulimit -f`, a read-only file), not a damaged file
_WRITE_REFUSED = ("disk i/o error", "database or disk is full", "readonly database", "unable to open database file")


def _fail(path: Path, what: str, e: Exception, fix: str = _SALVAGE) -> RunStoreError:
    if any(words in str(e).lower() for words in _WRITE_REFUSED) and "integrity" not in what:
        return RunStoreError(f"{path}: {what} ({e}): the file system refused the write — a full disk, a file size limit "
                             "(ulimit -f) or a file or folder that is not writable. Free space or fix the permissions, "
                             "then resume the run; what was written before is kept.")
    return RunStoreError(f"{path}: {what} ({e}). The file is truncated, corrupt or not a specscope metrics database; {fix}.")


def connect_writer(path: Path, create: bool = False) -> sqlite3.Connection:
    """Open the database for appending, in WAL mode, migrated to SCHEMA_VERSION; `create`: a new, empty one (else a
    file without specscope's tables — emptied, or another program's — is refused, never re-created over the records)."""
    con = None
    try:
        con = sqlite3.connect(path, isolation_level=None, timeout=30.0)
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not create and "metrics" not in tables:
            raise RunStoreError(f"{path} holds no specscope records ({'an empty file' if not tables else 'tables ' + str(sorted(tables)[:4])}): "
                                "it was emptied or replaced, and a resume would start a new database over the run's "
                                "records. Restore the file from a copy of the run, or start a new run.")
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        _migrate(con, path)
    except BaseException as e:  # closed, so that no lock outlives the refusal (a later status write would wait on it)
        if con is not None:
            con.close()
        if isinstance(e, DB_ERRORS):
            raise _fail(path, "cannot open for writing", e) from e
        raise
    return con


def _migrate(con: sqlite3.Connection, path: Path) -> None:
    has_version = con.execute("SELECT count(*) FROM sqlite_master WHERE name = 'schema_version'").fetchone()[0]
    fix = f"{_BY_TABLES}; a resume does not write into it"
    if has_version and (problem := version_problem(con, path, fix)) is not None:  # before any write: a refusal changes nothing
        raise RunStoreError(problem)
    con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = con.execute("SELECT max(version) FROM schema_version").fetchone()
    version = row[0] or 0
    for v in range(version, SCHEMA_VERSION):
        con.execute("BEGIN IMMEDIATE")
        # executescript() would COMMIT on its own; run the statements one by one inside our transaction
        for stmt in filter(str.strip, MIGRATIONS[v].split(";")):
            con.execute(stmt)
        if v + 1 == _CHECKSUMS:  # every record from here on has a checksum: a NULL one after it is damage
            con.execute("INSERT OR REPLACE INTO run_info (key, value) VALUES ('checksums_from', "
                        "(SELECT ifnull(max(rowid), 0) + 1 FROM metrics))")
        con.execute("DELETE FROM schema_version")
        con.execute("INSERT INTO schema_version (version) VALUES (?)", (v + 1,))
        con.execute("COMMIT")


@contextlib.contextmanager
def open_reader(path: Path, *, live: bool, salvage: bool = False, check: bool = True):
    """A read-only connection and, when the file is damaged and `salvage`, the damage worked around (else None).

    Nothing in the run directory is written, not even the -wal/-shm files SQLite makes for WAL readers:
    - a run with a live writer is read with `mode=ro` (the writer's -wal/-shm are already there);
    - a finished run is read with `immutable=1` (no locks, no side files: works on a read-only directory);
    - a run that crashed (a -wal file left behind) is read from a private copy of the database and its WAL
      in a temporary directory, so the committed batches in the WAL are seen without touching the run.
    `check` runs SQLite's integrity_check first (quick_check misses a flipped bit in an indexed name: a record read
    under an arm, metric or layer it was never written with): a database that fails it raises RunStoreError naming the file
    unless `salvage`, which reads what is still readable (a truncated file is opened with writable_schema,
    which takes the file's real size instead of the page count its header promises).
    """
    if path.exists() and not path.is_file():
        raise RunStoreError(f"{path} is a folder (or another non-file), not the run's metrics database; restore the "
                            "database file from a copy of the run.")
    if not path.is_file():
        raise RunStoreError(f"{path} does not exist: the run directory has no metrics database (was it made by Run.create?).")
    with contextlib.ExitStack() as stack:
        wal = path.with_name(path.name + "-wal")
        if live:
            uri = f"{path.resolve().as_uri()}?mode=ro"
        elif wal.is_file() and wal.stat().st_size > 0:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="specscope-read-")))
            shutil.copyfile(path, tmp / path.name)
            shutil.copyfile(wal, tmp / wal.name)
            uri = f"{(tmp / path.name).as_uri()}?mode=ro"
        else:
            uri = f"{path.resolve().as_uri()}?mode=ro&immutable=1"
        con, damage = _open_checked(uri, path, salvage, check)
        stack.callback(con.close)
        yield con, damage


def _open_checked(uri: str, path: Path, salvage: bool, check: bool) -> tuple[sqlite3.Connection, str | None]:
    try:
        con = _open_ro(uri, path, writable_schema=False)
    except DB_ERRORS as e:
        if not salvage:
            raise _fail(path, "cannot read the database", e) from None
        try:
            return _open_ro(uri, path, writable_schema=True), str(e)
        except DB_ERRORS:
            raise _fail(path, "cannot read the database even to salvage it", e,
                        "nothing in it is readable: restore it from a copy, or delete the run") from None
    problem = _integrity_check(con) if check else None
    if problem and not salvage:
        con.close()
        raise _fail(path, "fails its integrity check", problem)
    try:
        version = version_problem(con, path)
        readable = tables_version(con) > 0
    except DB_ERRORS as e:  # no schema_version table, or a damaged schema
        version, readable = f"{path} has no readable schema version ({e})", True
    if version is not None and (not salvage or not readable):
        con.close()
        raise RunStoreError(version)
    return con, "; ".join(filter(None, (problem, version))) or None


def _integrity_check(con: sqlite3.Connection) -> str | None:
    """None when SQLite's integrity_check passes, else its first complaint. Unlike quick_check it also checks that
    every index entry matches its row, which catches a flipped bit in an indexed column (arm, metric, layer, step);
    0.35× the time of `load(run)` against quick_check's 0.07× (benchmarks/store_read.py)."""
    try:
        first = con.execute("PRAGMA integrity_check(1)").fetchone()[0]
    except DB_ERRORS as e:
        return str(e)
    return None if first == "ok" else str(first)


def _open_ro(uri: str, path: Path, writable_schema: bool) -> sqlite3.Connection:
    con = sqlite3.connect(uri, uri=True, timeout=30.0)
    try:
        if writable_schema:
            con.execute("PRAGMA writable_schema=ON")
        con.execute("SELECT max(version) FROM schema_version").fetchone()  # a file SQLite cannot read fails here
    except BaseException:
        con.close()
        raise
    return con


def count_rows(con: sqlite3.Connection, path: Path, *, arm: str | None = None, metric: str | None = None,
               upto: int | None = None) -> int:
    """How many records (of `arm`, of `metric`, written up to position `upto`) the database holds."""
    where, params = _where({"arm": arm, "metric": metric})
    if upto is not None:
        where += (" AND" if where else " WHERE") + " rowid <= ?"
        params.append(int(upto))
    try:
        return con.execute("SELECT count(*) FROM metrics" + where, params).fetchone()[0]
    except DB_ERRORS as e:
        raise _fail(path, "cannot count records", e) from None


def position(con: sqlite3.Connection) -> int:
    """The rowid of the last record written (0 when none): records are appended in rowid order."""
    return con.execute("SELECT coalesce(max(rowid), 0) FROM metrics").fetchone()[0]


def rewind(con: sqlite3.Connection, path: Path, arm: str, to: int) -> int:
    """Delete the records of `arm` written after position `to` (resume from a checkpoint taken there)."""
    return _delete(con, path, "DELETE FROM metrics WHERE arm = ? AND rowid > ?", (arm, int(to)))


def as_int(value, low: int = 0) -> int | None:
    """`value` as an int from `low` to MAX_INT, else None: ints, numpy integers and one-element torch integer
    tensors count; bools, floats and strings do not."""
    if isinstance(value, bool) or "bool" in str(getattr(value, "dtype", "")):
        return None
    try:
        n = operator.index(value)
    except TypeError:
        return None
    return n if low <= n <= MAX_INT else None


def show(value) -> str:
    """`value` for an error message: its repr, cut short, and its type."""
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def as_row(r: Record) -> tuple:
    """Record -> SQL parameters, or one ConfigError naming what is wrong with it (nothing is buffered then).
    NaN is stored as NULL by SQLite and read back as NaN (`value` is never NULL otherwise)."""
    if not isinstance(r, Record):
        raise ConfigError(f"append got {show(r)}, not a specscope.records.Record: pass a list of Records (or one "
                          "Record); for plain values use run.log(step, {name: value}).")
    step, rows = as_int(r.step), as_int(r.rows)
    if step is None:
        raise ConfigError(f"record {r.metric!r}: step {show(r.step)} is not an int from 0 to 2**63 - 1; pass the "
                          "step as a whole number >= 0 (numpy integers are fine).")
    if rows is None:
        raise ConfigError(f"record {r.metric!r} at step {step}: rows {show(r.rows)} is not an int from 0 to 2**63 - 1; "
                          "pass the number of rows measured as a whole number >= 0 (0 when it does not apply).")
    try:
        value = None if isinstance(r.value, (str, bytes)) else float(r.value)
    except (TypeError, ValueError, OverflowError):
        value = None
    if value is None:
        raise ConfigError(f"record {r.metric!r} at step {step}: value {show(r.value)} is not a number within float64's "
                          "range; pass a float (an int, a numpy number or a one-element tensor is fine).")
    texts = (str(r.layer), str(r.metric), str(r.arm), str(r.estimator), str(r.shape), str(r.flag))
    for field, text in zip(("layer", "metric", "arm", "estimator", "shape", "flag"), texts):
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"record {r.metric!r} at step {step}: its {field} {text!r} is no valid text (a lone "
                                  "surrogate, as os.fsdecode leaves for bytes that are not UTF-8); pass a name that "
                                  "encodes as UTF-8, e.g. name.encode('utf-8', 'replace').decode()") from None
    return (step, texts[0], texts[1], value, texts[2], texts[3], rows, texts[4], texts[5])


def insert_batch(con: sqlite3.Connection, path: Path, rows: Sequence[tuple]) -> None:
    """Append one batch in one transaction and bump the run's progress counters in the same transaction."""
    if not rows:
        return
    last = max((r[0] for r in rows if r[_FLAG] != SWEEP), default=None)  # a sweep record's step is a swept value
    stored = [(*r, c) for r, c in zip(rows, checksum.checksums(rows))]
    try:
        con.execute("BEGIN IMMEDIATE")
        con.executemany(_INSERT, stored)
        if last is not None:
            con.execute(
                "INSERT INTO run_info (key, value) VALUES ('last_step', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = max(coalesce(value, excluded.value), excluded.value)", (last,))
        con.execute(
            "INSERT INTO run_info (key, value) VALUES ('records', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value", (len(rows),))
        con.execute("INSERT OR REPLACE INTO run_info (key, value) VALUES ('updated', ?)", (time.time(),))
        _seal_progress(con)
        fault_point("db_commit")
        con.execute("COMMIT")
    except BaseException as e:  # no half batch left open, whatever failed: the caller keeps the rows to retry
        if con.in_transaction:
            con.execute("ROLLBACK")
        if isinstance(e, (sqlite3.Error, UnicodeDecodeError)):
            raise _fail(path, "cannot append records", e) from e
        raise


def delete_after(con: sqlite3.Connection, path: Path, step: int, arm: str) -> int:
    """Delete the records of `arm` with step > `step`; return how many."""
    return _delete(con, path, "DELETE FROM metrics WHERE arm = ? AND step > ?", (arm, int(step)))


def _delete(con: sqlite3.Connection, path: Path, sql: str, params: tuple) -> int:
    try:
        con.execute("BEGIN IMMEDIATE")
        n = con.execute(sql, params).rowcount
        con.execute("INSERT OR REPLACE INTO run_info (key, value) VALUES ('last_step', "
                    "(SELECT max(step) FROM metrics WHERE flag != ?))", (SWEEP,))
        con.execute("INSERT OR REPLACE INTO run_info (key, value) VALUES ('records', (SELECT count(*) FROM metrics))")
        _seal_progress(con)
        con.execute("COMMIT")
    except (sqlite3.Error, UnicodeDecodeError) as e:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise _fail(path, "cannot delete records", e) from e
    return n


def _where(filters: dict[str, Iterable[str] | None]) -> tuple[str, list]:
    clauses, params = [], []
    for col, values in filters.items():
        if values is None:
            continue
        values = [values] if isinstance(values, str) else _names(col, values)
        clauses.append(f"{col} IN ({', '.join('?' * len(values))})")  # col is ours, values are data
        params += values
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _names(col: str, values) -> list[str]:
    """A filter's list of names, or one ConfigError saying what a filter takes."""
    try:
        names = list(values)
    except TypeError:
        names = None
    if names is None or not all(isinstance(v, str) for v in names):
        raise ConfigError(f"{col}={show(values)}: a {col} filter is a name or a list of names (str), "
                          f'e.g. {col}="NAME" or {col}=["A", "B"].')
    return names


def read_rows(con: sqlite3.Connection, path: Path, filters: dict, salvage: bool,
              damage: str | None = None) -> tuple[list[tuple], str | None]:
    """All matching rows in insertion order (COLUMNS, then READ_CHECKS: see `verify`), and the damage met (None
    when none). On a damaged file: raise unless `salvage`, else read what is readable and warn."""
    where, params = _where(filters)
    select = _select(con, salvage=True)  # what a salvage reads with (the current columns where the table's are unreadable)
    try:
        rows = con.execute(_select(con) + where + " ORDER BY rowid", params).fetchall()
    except DB_ERRORS as e:
        if not salvage:
            raise _fail(path, "the metrics table is damaged", e) from e
        (rows, lost, guessed), damage = _salvage(con, select, where, params), damage or str(e)
        placed = [r for r in rows if r[0] is not None]  # a damaged page's record without a step cannot be placed
        rows, lost = placed, lost + len(rows) - len(placed)
        bound = " (the last rowid is unreadable too: counted up to a bound from the file size)" if guessed else ""
        warnings.warn(f"{path}: damaged database ({damage}); read {len(rows)} records, {lost} rowids unreadable{bound}.",
                      RuntimeWarning, stacklevel=3)
    else:
        if damage:
            warnings.warn(f"{path}: damaged database ({damage}); read {len(rows)} records.", RuntimeWarning, stacklevel=3)
    return rows, damage


READ_CHECKS = ("checksum", "unchecked")  # the two columns read_rows adds after COLUMNS


def verify(df, path: Path, salvage: bool):
    """`df` (read_rows' rows as a DataFrame) less the records whose checksum fails, without READ_CHECKS' columns,
    and what was left out ("" when nothing). Without `salvage` a failed checksum raises RunStoreError naming the
    first such record."""
    bad = checksum.mismatched(df)
    df = df.drop(columns=list(READ_CHECKS))
    if not len(bad):
        return df, ""
    first = df.iloc[int(bad[0])]
    what = f"{len(bad)} of its {len(df)} records fail their checksum"
    if not salvage:
        raise _fail(path, what, f"the first: step {first.step}, layer {first.layer!r}, metric {first.metric!r}, "
                                f"arm {first.arm!r}; a stored byte changed since it was written")
    warnings.warn(f"{path}: damaged database ({what}); read the {len(df) - len(bad)} others.", RuntimeWarning,
                  stacklevel=3)
    return df.drop(index=df.index[bad]).reset_index(drop=True), f"{what}, left out"


def _salvage(con: sqlite3.Connection, select: str, where: str, params: list,
             chunk: int = 4096) -> tuple[list[tuple], int, bool]:
    """Read rowid ranges one at a time, halving a range that fails; a range of <= 16 rowids that still fails is
    read rowid by rowid (a range query also steps onto the next, possibly lost, page; a seek to one rowid does
    not), unless both its ends fail, when it is counted lost whole. Returns (rows, rowids not read, whether the
    table's last rowid was unreadable and the search ran up to a bound from the file size instead)."""
    try:
        hi, guessed = con.execute("SELECT max(rowid) FROM metrics").fetchone()[0] or 0, False
    except DB_ERRORS:  # upper bound from the file size: a row takes at least ~16 bytes
        hi = con.execute("PRAGMA page_count").fetchone()[0] * con.execute("PRAGMA page_size").fetchone()[0] // 16
        guessed = True
    cond = (where + " AND" if where else " WHERE")
    sql, one = select + cond + " rowid BETWEEN ? AND ? ORDER BY rowid", select + cond + " rowid = ?"

    def read_one(rowid: int) -> list[tuple] | None:
        try:
            return con.execute(one, params + [rowid]).fetchall()
        except DB_ERRORS:
            return None

    rows, lost, todo = [], 0, [(lo, min(lo + chunk - 1, hi)) for lo in range(1, hi + 1, chunk)]
    while todo:
        lo, hi_ = todo.pop(0)
        try:
            rows += con.execute(sql, params + [lo, hi_]).fetchall()
        except DB_ERRORS:
            if hi_ - lo >= 16:
                mid = (lo + hi_) // 2
                todo[:0] = [(lo, mid), (mid + 1, hi_)]
                continue
            ends = [read_one(lo), read_one(hi_)] if hi_ > lo else [read_one(lo)]
            if all(e is None for e in ends):
                lost += hi_ - lo + 1
                continue
            for got in [ends[0], *map(read_one, range(lo + 1, hi_)), *ends[1:]]:
                if got is None:
                    lost += 1
                else:
                    rows += got
    return rows, lost, guessed


def set_owner(con: sqlite3.Connection, run_id: str, lab: str) -> None:
    """Record which run the database belongs to (run_info's run_id and lab), for `owner` to compare with config.json."""
    con.executemany("INSERT OR REPLACE INTO run_info (key, value) VALUES (?, ?)", [("run_id", run_id), ("lab", lab)])


def owner(con: sqlite3.Connection) -> dict[str, str]:
    """The run id and lab the database was created for ({} in a database from before they were recorded, or
    unreadable)."""
    try:
        rows = con.execute("SELECT key, value FROM run_info WHERE key IN ('run_id', 'lab')").fetchall()
    except DB_ERRORS:
        return {}
    return {k: v for k, v in rows if isinstance(v, str)}


_SEALED = ("last_step", "records")  # what `specscope runs` shows of a run without reading its records


def _progress_check(info: dict) -> int:
    """A CRC-32 of run_info's last step and record count (a flipped bit in either shows as a wrong listing)."""
    return zlib.crc32(repr(tuple(info.get(k) for k in _SEALED)).encode())


def _seal_progress(con: sqlite3.Connection) -> None:
    """Store `_progress_check` of the counters just updated, in the same transaction."""
    info = dict(con.execute(f"SELECT key, value FROM run_info WHERE key IN {_SEALED!r}").fetchall())
    con.execute("INSERT OR REPLACE INTO run_info (key, value) VALUES ('progress_check', ?)", (_progress_check(info),))


def read_progress(con: sqlite3.Connection, path: Path | None = None) -> dict:
    """run_info as a dict: last_step, records, updated (cheap: no scan of the metrics table). Counters that fail their
    check (`_seal_progress`; a database from before it has none: not checked) raise RunStoreError naming `path`."""
    try:
        info = dict(con.execute("SELECT key, value FROM run_info").fetchall())
    except DB_ERRORS:
        return {}
    if "progress_check" in info and info["progress_check"] != _progress_check(info):
        raise RunStoreError(f"{path or 'the metrics database'}: its run_info counters (last step {info.get('last_step')}, "
                            f"{info.get('records')} records) fail their check: the file is damaged; {_SALVAGE} (the "
                            "records themselves are checked one by one)")
    return info
