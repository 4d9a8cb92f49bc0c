"""One run directory `root/<lab>/<run_id>/`: config and metadata, buffered metric records, status.

    with Run.create("runs", "random-features", cfg) as run:
        for step in range(T):
            ...
            run.log(step, {"loss": loss})            # buffered
            run.append(monitor.pop_records())         # buffered; a batch is written every N records or T seconds
    # clean exit: status "complete"; exception: "failed"; Ctrl-C: "interrupted"; SIGKILL: reads as "incomplete"
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import numbers
import os
import platform
import secrets
import socket
import subprocess
import sys
import time
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from specscope.errors import ConfigError, RunStoreError
from specscope.names import PLAIN, check_name
from specscope.records import Record
from specscope.store import integrity, lock, sqlite

STATUSES = ("running", "complete", "incomplete", "interrupted", "failed")
CONFIG, METRICS, SUMMARY = "config.json", "metrics.sqlite", "summary.json"
PROGRESS = "progress.json"  # a lab run's finished parts and checkpoints (labs.runner), for --resume
_NAME = PLAIN


STAGE_SUFFIX = ".creating"  # a run being made: `.<run_id>.<pid>.creating` beside where it will appear


class NotThisRun(RunStoreError):
    """config.json and metrics.sqlite of a run directory were made for different runs (or labs)."""


def _staged(path: Path, meta: dict) -> Path:
    """A new run's directory made complete — checkpoints/, figures/, an empty metrics.sqlite, config.json — under a
    hidden name beside `path`, for `Run.create` to rename into place: a process killed while making it leaves no
    half-made run under its name (only this hidden folder, which the next run created beside it removes)."""
    for old in path.parent.glob(f".*.*{STAGE_SUFFIX}"):  # left by a process killed while creating a run
        pid = old.name.removesuffix(STAGE_SUFFIX).rsplit(".", 1)[-1]
        if pid.isdigit() and not lock.pid_alive(int(pid)):
            _remove_tree(old)
    stage = path.parent / f".{path.name}.{os.getpid()}{STAGE_SUFFIX}"
    try:
        stage.mkdir()
        (stage / "checkpoints").mkdir()
        (stage / "figures").mkdir()
        con = sqlite.connect_writer(stage / METRICS, create=True)
        sqlite.set_owner(con, meta["run_id"], meta["lab"])
        con.close()
        integrity.write_json(stage / CONFIG, meta)
        integrity.fault_point("run_create")  # tests: killed with the run made but not yet in place
    except BaseException as e:
        _remove_tree(stage)
        if isinstance(e, OSError) and e.errno is not None and str(stage) in str(e.filename or ""):
            # named by the run it was making (a read-only disk: the folder the run goes into), not the hidden stage
            raise type(e)(e.errno, e.strerror, str(e.filename).replace(str(stage), str(path))) from None
        if isinstance(e, RunStoreError) and str(stage) in str(e):  # the database's refusal, named by the run's path too
            raise RunStoreError(str(e).replace(str(stage), str(path))) from None
        raise
    return stage


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def new_run_id() -> str:
    """UTC time to the second plus a random suffix: sorts by creation time, unique without coordination."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


class Run:
    """A run directory. Use `Run.create` for a new run and `Run.open` for an existing one.

    A Run from `open` is a reader until its first write of records (append, log, flush, delete_after): it
    then takes the writer lock (failing if another live process writes the run) and marks the run
    "running" again, which is how a resumed run continues. `set_status` takes the lock without that mark;
    `write_summary` needs no lock. After `close()` the object writes no records and no status (write_summary
    still rewrites summary.json): `Run.open(path)` resumes.
    """

    def __init__(self, path: Path, meta: dict, *, flush_every: int = 1000, flush_seconds: float = 5.0):
        self.path = path
        self._meta = meta
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self._buffer: list[tuple] = []
        self._sinks: list[Callable[[list[Record]], Any]] = []
        self._con = None
        self._lock_fd: tuple[int, ...] | None = None
        self._last_flush = time.monotonic()
        self._closed = False

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | os.PathLike, lab: str, config: Mapping[str, Any], *, run_id: str | None = None,
               flush_every: int = 1000, flush_seconds: float = 5.0, progress: bool = False) -> "Run":
        """Make `root/<lab>/<run_id>/` (never reusing a directory that exists) and open it for writing.

        progress=True records in config.json that the run keeps a progress.json from before its first record (a lab
        run: labs.runner): readers then take a missing one, beside recorded records, for a deleted file."""
        run_id = new_run_id() if run_id is None else run_id
        for what, name in (("lab", lab), ("run_id", run_id)):
            check_name(what, name)
        _check_flush(flush_every, flush_seconds)
        config = _plain_config(config)
        path = Path(root) / lab / run_id
        _make_folder(path.parent, root)
        taken = RunStoreError(f"run directory {path} already exists (run id {run_id!r} is taken); "
                              "runs are never overwritten: pick another run_id or leave it to the default.")
        if path.exists():
            raise taken
        meta = _metadata(run_id, lab, config) | ({"progress": True} if progress else {})
        meta[FIXED_SHA] = integrity.digest(_fixed(meta))
        stage = _staged(path, meta)
        try:
            os.rename(stage, path)  # atomic: the run appears whole or not at all; a directory holding files is never replaced
        except OSError:
            _remove_tree(stage)
            if path.exists():  # of two processes creating the same id, one fails here
                raise taken from None
            raise
        run = cls(path, meta, flush_every=flush_every, flush_seconds=flush_seconds)
        run._become_writer()
        return run

    @classmethod
    def open(cls, path: str | os.PathLike, *, flush_every: int = 1000, flush_seconds: float = 5.0) -> "Run":
        """An existing run directory (for reading; writing later resumes it)."""
        _check_flush(flush_every, flush_seconds)
        path = Path(path)
        run = cls(path, read_config(path), flush_every=flush_every, flush_seconds=flush_seconds)
        if run.live:  # reading it would touch the writer's -shm file; its readers check it (`reader`)
            return run
        try:  # config.json and the database of one run, before anything acts on the config (its lab included)
            with run.reader(check=False):
                pass
        except NotThisRun:
            raise
        except RunStoreError:  # a damaged database: the readers name it
            pass
        return run

    # ---- what a run is --------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._meta["run_id"]

    @property
    def lab(self) -> str:
        return self._meta["lab"]

    @property
    def config(self) -> dict:
        return self._meta["config"]

    @property
    def meta(self) -> dict:
        """Everything in config.json: config, versions, git commit, seed, device, created, status, pid, host."""
        return self._meta

    @property
    def status(self) -> str:
        """The status on disk, except that "running" without a live writer reads as "incomplete"."""
        if self._con is not None:
            return self._meta["status"]
        self._meta = read_config(self.path)
        return effective_status(self.path, self._meta)

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def figures_dir(self) -> Path:
        return self.path / "figures"

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def summary(self) -> dict | None:
        p = self.path / SUMMARY
        return integrity.read_json(p, checksum=True, fix=_REWRITE) if p.exists() else None

    @property
    def closed(self) -> bool:
        """Whether this Run object was closed (its `with` block ended, or `close()`): it writes nothing more."""
        return self._closed

    @property
    def live(self) -> bool:
        """Whether a process (this one or another) holds the writer lock of this run right now."""
        return self._con is not None or lock.writer_alive(self.path, self._meta.get("pid"), self._meta.get("host"),
                                                           strict=True)

    @contextlib.contextmanager
    def reader(self, *, salvage: bool = False, check: bool = True):
        """`with run.reader() as (con, damage):` a read-only connection that writes nothing in the run
        directory (see `sqlite.open_reader`); a damaged database raises unless `salvage`, and so does a database
        of another run than config.json's."""
        if self._con is not None:
            self.flush()
        with sqlite.open_reader(self.metrics_path, live=self.live, salvage=salvage, check=check) as (con, damage):
            self._check_owner(con)
            yield con, damage

    def _check_owner(self, con) -> None:
        """config.json and metrics.sqlite of one run: a config.json copied over from another run would give this
        run's records that run's settings (and a resume would train on under them)."""
        owner = sqlite.owner(con)
        if owner.get("run_id", self.id) != self.id:
            named = {name: _peek_run_id(self.path / name) for name in (PROGRESS, SUMMARY)}
            agree = [name for name, rid in named.items() if rid == self.id]
            if agree:  # the other files side with config.json: the database is the one copied over
                raise NotThisRun(f"{self.metrics_path} was created for run {owner['run_id']!r}, and {CONFIG} and "
                                 f"{' and '.join(agree)} are run {self.id!r}'s: the database was copied over from "
                                 "another run; restore this run's metrics.sqlite from a copy, or delete the run.")
            if owner["run_id"] in named.values():  # they side with the database: config.json is the one copied over
                raise NotThisRun(f"{self.path / CONFIG} is run {self.id!r}'s, but {self.metrics_path} was created for run "
                                 f"{owner['run_id']!r}: config.json was replaced by another run's; restore this run's "
                                 f"config.json (run_id {owner['run_id']!r}), or delete the run.")
            raise NotThisRun(f"{self.path / CONFIG} is run {self.id!r}'s, but {self.metrics_path} was created for run "
                             f"{owner['run_id']!r}: one of them was copied over from another run; restore this run's "
                             f"config.json (if the records are run {owner['run_id']!r}'s) or its metrics.sqlite, or "
                             "delete the run.")
        if owner.get("lab", self.lab) != self.lab:  # the lab is outside the config's checksum
            raise NotThisRun(f"{self.path / CONFIG} names lab {self.lab!r}, but {self.metrics_path} was created for "
                                f"a run of lab {owner['lab']!r}: config.json is damaged or edited; restore it, or "
                                "delete the run.")

    def record_count(self, arm: str | None = None, *, metric: str | None = None, upto: int | None = None) -> int:
        """Records in the database (of `arm`, of `metric`, written up to `position()` `upto`), buffered ones
        flushed first."""
        if self._con is not None:
            self.flush()
            return sqlite.count_rows(self._con, self.metrics_path, arm=arm, metric=metric, upto=upto)
        with self.reader(check=False) as (con, _):
            return sqlite.count_rows(con, self.metrics_path, arm=arm, metric=metric, upto=upto)

    def position(self) -> int:
        """The position (rowid) of the last record written, 0 when none: a checkpoint stores it, `rewind` returns to it.
        A query: a reader stays a reader (the run's status is left as it is)."""
        if self._con is not None:
            self.flush()
            return sqlite.position(self._con)
        with self.reader(check=False) as (con, _):
            return sqlite.position(con)

    def check(self) -> None:
        """RunStoreError naming the file unless metrics.sqlite exists and passes SQLite's integrity check."""
        with self.reader():
            pass

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # ---- writing --------------------------------------------------------------------------------

    def append(self, records: Iterable[Record] | Record) -> None:
        """Buffer records (a list of them, or one); a batch is written when `flush_every` records or
        `flush_seconds` have accumulated. A bad record is one ConfigError, and none of this call's records is
        buffered."""
        self._become_writer()
        records = _records(records)
        self._buffer += [sqlite.as_row(r) for r in records]
        for sink in self._sinks:
            sink(records)
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def log(self, step: int, values: Mapping[str, float], *, layer: str = "", arm: str = "") -> None:
        """Convenience: `run.log(step, {"loss": 1.2, "val_loss": 1.4})`."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"log: the values {sqlite.show(values)} are not a dict; give metric names and numbers, "
                              'e.g. run.log(step, {"loss": 0.5}).')
        self.append([Record(step, layer, metric, v, arm=arm) for metric, v in values.items()])

    def flush(self) -> None:
        """Write the buffered records as one transaction; once this returns they survive a crash. When the
        write fails the records stay buffered (none is written): the next flush or close writes them."""
        if self._con is None and not self._buffer:
            return  # a run opened for reading stays a reader (and keeps its status)
        self._become_writer()
        sqlite.insert_batch(self._con, self.metrics_path, self._buffer)
        self._buffer = []
        self._last_flush = time.monotonic()

    def delete_after(self, step: int, arm: str = "") -> int:
        """Drop the records of `arm` with step > `step` (resume from a checkpoint taken at `step`; -1 drops
        them all)."""
        if sqlite.as_int(step, low=-1) is None:
            raise ConfigError(f"delete_after: step {sqlite.show(step)} is not an int from -1 to 2**63 - 1; give the "
                              "last step to keep (-1 drops all of the arm's records).")
        self._become_writer()
        self.flush()
        return sqlite.delete_after(self._con, self.metrics_path, step, arm)

    def rewind(self, arm: str, position: int) -> int:
        """Drop the records of `arm` written after `position` (from `position()`): resume from a checkpoint
        taken there, whatever steps those records carry."""
        if sqlite.as_int(position) is None:
            raise ConfigError(f"rewind: position {sqlite.show(position)} is not an int >= 0; give what run.position() "
                              "returned when the checkpoint was taken.")
        self._become_writer()
        self.flush()
        return sqlite.rewind(self._con, self.metrics_path, arm, position)

    def add_sink(self, sink: Callable[[list[Record]], Any]) -> None:
        """Also hand every appended batch of records to `sink` (e.g. `TensorBoardSink`)."""
        self._sinks.append(sink)

    def set_status(self, status: str) -> None:
        """running / complete / incomplete / interrupted / failed; takes the writer lock if not yet held."""
        if status not in STATUSES:
            raise ConfigError(f"unknown run status {status!r}: use one of {', '.join(STATUSES)}.")
        self._become_writer(resume=False)
        # a complete run records whether it has a summary.json, so that losing the file reads as damage
        self._write_meta(status=status, **({"summary": (self.path / SUMMARY).is_file()} if status == "complete" else {}))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """summary.json (claims, headline numbers) with its checksum and the run's id and lab (a summary.json copied
        over from another run is named so: `readers`), written atomically; keeps the status."""
        integrity.write_json(self.path / SUMMARY, {**dict(summary), "run_id": self.id, "lab": self.lab}, checksum=True)

    def close(self) -> None:
        """Flush, mark "complete" if still "running" (a status set explicitly is kept), release the lock. The
        Run then writes nothing more (Run.open(path) resumes the run); when the flush fails, the records stay
        buffered and the run stays open to another close()."""
        if self._con is None and not self._buffer:
            self._closed = True
            return
        try:
            self.flush()
            if self._meta["status"] == "running":
                self._write_meta(status="complete")
            self._closed = True
        finally:
            self._release()
            for sink in self._sinks:
                getattr(sink, "close", lambda: None)()

    def __del__(self) -> None:  # an unclosed, collected run: keep its records, leave the status alone
        try:
            if self._con is not None and not self._forked():
                self.flush()
                self._release()
        except Exception:
            pass

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._con is not None:
            try:
                self.flush()
            finally:
                self._write_meta(status="interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed")
        self.close()

    # ---- internals ------------------------------------------------------------------------------

    def _become_writer(self, resume: bool = True) -> None:
        """Take the writer lock and open the database; `resume` marks the run "running" (records are coming)."""
        if self._con is not None:
            if self._forked():
                raise RunStoreError(f"run {self.path} is open for writing in process {self._writer_pid}, and this is a "
                                    f"child forked from it (pid {os.getpid()}), which cannot write through the parent's "
                                    "database connection: send the records back to the parent to write, or have the "
                                    "child create a run of its own")
            return
        if self._closed:
            raise RunStoreError(f"run {self.path} was closed: a closed Run writes nothing more; to add to the run, "
                                "resume it with Run.open(path), or start a new run with Run.create.")
        if not self.path.is_dir():
            raise RunStoreError(f"run directory {self.path} does not exist.")
        if not self.metrics_path.is_file():  # never re-create a database that went missing
            raise RunStoreError(f"{self.metrics_path} is missing: the records of this run are gone; "
                                "restore the file, or start a new run.")
        self._lock_fd = lock.acquire(self.path)
        try:
            for folder in (self.path, self.checkpoints_dir):  # a write cut off by a kill before its rename
                integrity.remove_stale_temps(folder, lock.pid_alive)
            self._con = sqlite.connect_writer(self.metrics_path)
            self._meta = read_config(self.path) if (self.path / CONFIG).exists() else self._meta
            self._check_owner(self._con)
            self._write_meta(pid=os.getpid(), host=socket.gethostname(),
                             **({"status": "running"} if resume else {}))
        except BaseException:
            self._release()
            raise
        self._writer_pid = os.getpid()
        _OPEN.add(self)

    def _forked(self) -> bool:
        """Open for writing by the process this one was forked from: its buffer and connection are the parent's
        (a child that flushed them at exit wrote the parent's records a second time)."""
        return self._con is not None and self._writer_pid != os.getpid()

    def _release(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        lock.release(self._lock_fd)
        self._lock_fd = None
        _OPEN.discard(self)

    def _write_meta(self, **changes) -> None:
        self._meta.update(changes, status_time=_now())
        integrity.write_json(self.path / CONFIG, self._meta)


# Runs open for writing: at interpreter exit their buffers are flushed (status stays as it is, so a script
# that forgot close() shows "incomplete" rather than claiming completion).
_OPEN: "weakref.WeakSet[Run]" = weakref.WeakSet()


@atexit.register
def _flush_open_runs() -> None:
    for run in list(_OPEN):
        if run._forked():  # the parent's run, whose records the parent writes
            continue
        try:
            run.flush()
            run._release()
        except Exception:
            pass


# ---- config.json ------------------------------------------------------------------------------------


def _peek_run_id(path: Path) -> str | None:
    """The run_id a run's JSON file names, read without its checksum (to tell which file was copied over), or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("run_id") if isinstance(data, dict) else None


def read_config(path: Path) -> dict:
    """config.json of a run directory, checked: its names are plain (they become paths), its config is a
    table and its status one of STATUSES; otherwise RunStoreError naming the file and the fix."""
    path = Path(path)
    if not path.is_dir():
        raise RunStoreError(f"no run directory at {path}: check the path, or list runs with `specscope runs --root DIR`.")
    p = path / CONFIG
    if not p.exists() and not (path / METRICS).exists():
        raise RunStoreError(f"{path} is not a run directory (no {CONFIG}, no {METRICS}): give runs/LAB/RUN_ID, "
                            "or list runs with `specscope runs --root DIR`.")
    meta = integrity.read_json(p, fix=f"{path} is not a complete run directory (restore config.json or delete the run)")
    missing = {"run_id", "lab", "config", "status"} - set(meta)
    if missing:
        raise RunStoreError(f"{p} lacks {sorted(missing)}: not written by specscope.store.Run.create.")
    for what in ("run_id", "lab"):
        check_name(what, meta[what], source=p, error=RunStoreError)
    if not isinstance(meta["config"], dict) or meta["status"] not in STATUSES:
        raise RunStoreError(f"{p}: 'config' must be an object and 'status' one of {', '.join(STATUSES)}; "
                            "the file was not written by specscope.store.Run.")
    if meta.get("config_sha256") != integrity.digest(meta["config"]):
        if "config_sha256" not in meta:
            raise RunStoreError(f"{p} has no config_sha256 (written by a specscope older than config checksums, or "
                                "edited): its config cannot be trusted; rerun the lab, or restore config.json from a backup.")
        raise RunStoreError(f"{p} fails its config_sha256 checksum: the run's config changed after it was created (or "
                            "the file is damaged); restore config.json from a backup, or delete the run.")
    if FIXED_SHA in meta and meta[FIXED_SHA] != integrity.digest(_fixed(meta)):  # (none in runs made before it was kept)
        raise RunStoreError(f"{p} fails its {FIXED_SHA} checksum: one of {list(FIXED)} changed after the run was "
                            "created (or the file is damaged); restore config.json from a backup, or delete the run.")
    return meta


FIXED = ("created", "seed", "device", "versions", "git_commit", "argv", "progress")  # set once (run_id, lab: checked apart)
FIXED_SHA = "fixed_sha256"


def _fixed(meta: dict) -> dict:
    """The keys of config.json that never change after the run is created (a renamed `progress` turned off the check
    that progress.json is there), as JSON reads them back."""
    return json.loads(json.dumps({k: meta.get(k) for k in FIXED}, default=str))


def effective_status(path: Path, meta: dict) -> str:
    """The status a reader should believe: "running" without a live writer reads as "incomplete", and so does a
    "complete" lab run whose progress.json (checksummed, unlike the status) has parts left (see `parts_left`)."""
    if meta["status"] == "running" and not lock.writer_alive(path, meta.get("pid"), meta.get("host")):
        return "incomplete"
    if meta["status"] == "complete" and parts_left(path, meta):
        return "incomplete"
    return meta["status"]


def parts_left(path: Path, meta: dict) -> list[str]:
    """The lab parts that progress.json names (its "parts", recorded when the run started) and does not list as
    done: none in a finished run, so a "complete" status with parts left was written by hand. [] where it cannot
    tell (no progress.json, one from before the parts were recorded, a damaged one: that is reported apart)."""
    p = Path(path) / PROGRESS
    if meta.get("progress") is not True or not p.is_file():
        return []
    try:
        progress = integrity.read_json(p, checksum=True)
    except RunStoreError:
        return []
    parts, done = progress.get("parts"), progress.get("done")
    if not (isinstance(parts, list) and isinstance(done, list)):
        return []
    return [str(name) for name in parts if name not in done]


_REWRITE = "`specscope report RUN` rewrites it from the recorded metrics"


def _plain_config(config: Any) -> dict:
    if hasattr(config, "model_dump"):  # a pydantic LabConfig
        config = config.model_dump(mode="json")
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a dict (or a pydantic model), not {type(config).__name__}.")
    plain = _json_value(config, "config")
    return json.loads(json.dumps(plain, allow_nan=False))  # what reads back from disk is what the run sees


def _json_value(value: Any, where: str) -> Any:
    """`value` as standard JSON data, or one ConfigError naming the key. A numpy scalar or one-element (0-d)
    tensor becomes its number, a path its text; NaN and Infinity are refused (standard JSON has neither)."""
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} = {value}: a run's config is standard JSON, which has no NaN or Infinity; "
                          "give a finite number, or None for 'not set'.")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"{where} has the key {sqlite.show(bad[0])}: config keys are strings; use str(key).")
        return {k: _json_value(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{where} = {sqlite.show(value)} is not JSON data: a run's config holds str, int, float, bool, "
                      "None, lists and dicts; convert the value (e.g. value.tolist(), str(value)) or leave it out.")


def _check_flush(flush_every: Any, flush_seconds: Any) -> None:
    """flush_every: records per batch, >= 1; flush_seconds: >= 0 (0: every append writes, inf: never by time)."""
    if sqlite.as_int(flush_every, low=1) is None:
        raise ConfigError(f"flush_every {sqlite.show(flush_every)} is not an int >= 1; give the number of records "
                          "per batch (default 1000; 1 writes on every append).")
    if isinstance(flush_seconds, bool) or not isinstance(flush_seconds, numbers.Real) or not flush_seconds >= 0:
        raise ConfigError(f"flush_seconds {sqlite.show(flush_seconds)} is not a number >= 0; give the seconds between "
                          "batches (default 5.0; 0 writes on every append, math.inf writes by count only).")


def _records(records: Any) -> list[Record]:
    """What `append` got, as a list: one Record, or an iterable of them (each checked by sqlite.as_row)."""
    if isinstance(records, Record):
        return [records]
    try:
        return list(records)
    except TypeError:
        raise ConfigError(f"append got {sqlite.show(records)}: pass a list of specscope.records.Record (or one "
                          "Record); for plain values use run.log(step, {name: value}).") from None


def _make_folder(folder: Path, root: Any) -> None:
    """`folder` and its parents, or one RunStoreError naming the part of the path that is a file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise RunStoreError(f"cannot make run directories under {root}: {blocker} is a file, not a folder; give a "
                            "root that is a folder, or a path that does not exist yet.") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _metadata(run_id: str, lab: str, config: dict) -> dict:
    return {
        "run_id": run_id, "lab": lab, "created": _now(), "status": "running",
        "config": config, "config_sha256": integrity.digest(config), "seed": config.get("seed"), "device": config.get("device") or _device(),
        "versions": _versions(), "git_commit": _git_commit(), "argv": sys.argv,
        "pid": os.getpid(), "host": socket.gethostname(),
    }


def _versions() -> dict:
    from importlib import metadata

    from specscope import __version__

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {"specscope": __version__, "torch": version("torch"), "numpy": version("numpy"),
            "python": platform.python_version(), "platform": platform.platform()}


def _device() -> str:
    torch = sys.modules.get("torch")  # only if the caller already imported it: the store does not need torch
    return "cuda" if torch is not None and torch.cuda.is_available() else "cpu"


def _git_commit() -> str | None:
    """HEAD of the git repository around the working directory, None when there is none (or no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None

