"""Files a run relies on carry a content hash checked on every load, and are replaced atomically.

- JSON (summary.json, progress.json): a top-level `"sha256"` over the canonical JSON of everything else.
- Binary (checkpoints): `MAGIC`, the hex SHA-256 of the body, a newline, then the body.

A mismatch is a RunStoreError naming the file: a flipped bit is never loaded as data. `fault_point(name)` is
the test hook of tests/faults/: with `SPECSCOPE_FAULT=name` (or `name:N` for the N-th time it is reached)
the process SIGKILLs itself there, e.g. between a checkpoint's fsync and its rename, or before a commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any, Callable

from specscope.errors import RunStoreError

MAGIC = b"SPECSCOPE-SHA256 "
HASH_KEY = "sha256"
_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process here when SPECSCOPE_FAULT names this point (tests only; a no-op otherwise)."""
    want = os.environ.get("SPECSCOPE_FAULT")
    if not want:
        return
    point, _, nth = want.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(path: Path, data: bytes, fault: str | None = None) -> None:
    """Temporary file, fsync, rename: a reader or a crash sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if fault:
            fault_point(fault)
        os.replace(tmp, path)
    except BaseException as e:
        discard(tmp)
        if isinstance(e, OSError) and e.filename == str(tmp):  # name the file being written, not its temporary
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def discard(tmp: Path) -> None:
    """Remove a temporary file after a failed write, where that is possible: on a read-only file system the removal
    fails too (EROFS), and its error must not replace the write's."""
    try:
        Path(tmp).unlink(missing_ok=True)
    except OSError:
        pass


def remove_stale_temps(folder: Path, alive: Callable[[int], bool]) -> list[Path]:
    """Delete the temporary files `write_atomic` left in `folder` when its process was killed before the rename
    (`.NAME.PID.tmp` whose PID is not `alive`); returns what it deleted."""
    gone = []
    for tmp in Path(folder).glob(".*.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not alive(int(pid)) and tmp.is_file():
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


# ---- JSON ---------------------------------------------------------------------------------------------


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def digest(obj: Any) -> str:
    """SHA-256 of the canonical JSON of `obj` (sorted keys, no spaces)."""
    return hashlib.sha256(_canonical(obj)).hexdigest()


def write_json(path: Path, obj: dict, *, checksum: bool = False) -> None:
    """obj as indented JSON; with `checksum`, plus the hash of what will read back."""
    obj = json.loads(json.dumps(obj, default=str))  # hash what a reader will see, not what we hold
    obj.pop(HASH_KEY, None)
    if checksum:
        obj[HASH_KEY] = digest(obj)
    write_atomic(Path(path), json.dumps(obj, indent=2).encode())


def read_json(path: Path, *, checksum: bool = False, fix: str = "restore or delete that run directory") -> dict:
    """A JSON object from `path`; every way it can be wrong is one RunStoreError naming the file and `fix`."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise RunStoreError(f"{path} is a folder (or another non-file), not a JSON file; move it away, then {fix}.")
    if not path.is_file():
        raise RunStoreError(f"{path} is missing; {fix}.")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nested thousands deep
        raise RunStoreError(f"{path} is unreadable or not valid JSON ({_short(e)}); {fix}.") from None
    if not isinstance(obj, dict):
        raise RunStoreError(f"{path} holds a JSON {type(obj).__name__}, not an object; {fix}.")
    if checksum:
        recorded = obj.pop(HASH_KEY, None)
        if recorded is None:
            raise RunStoreError(f"{path} has no {HASH_KEY} (written by an older specscope, or edited); {fix}.")
        if digest(obj) != recorded:
            raise RunStoreError(f"{path} fails its checksum: it changed after it was written; {fix}.")
    return obj


# ---- binary -------------------------------------------------------------------------------------------


def seal(body: bytes) -> bytes:
    return MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def unseal(path: Path, blob: bytes, fix: str) -> bytes:
    """The body of a sealed file, or a RunStoreError naming `path` when the hash does not match."""
    head = len(MAGIC) + 64 + 1
    if not blob.startswith(MAGIC) or len(blob) < head or blob[head - 1:head] != b"\n":
        raise RunStoreError(f"{path} has no specscope checksum header (truncated, foreign or written by an "
                            f"older specscope); {fix}.")
    body = blob[head:]
    if hashlib.sha256(body).hexdigest().encode() != blob[len(MAGIC):head - 1]:
        raise RunStoreError(f"{path} fails its checksum (a flipped bit or a cut-off write); {fix}.")
    return body


def _short(e: BaseException) -> str:
    return str(e).replace("\n", " ")[:200]
