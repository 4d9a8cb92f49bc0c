"""Is the process that wrote "running" into a run's config.json still alive?

The writer holds an exclusive `flock` on `<run>/run.lock` for as long as the run is open. The kernel drops
that lock when the process dies, however it dies (SIGKILL, OOM killer, segfault), so a reader that can take
a shared lock knows nobody is writing: a status of "running" on disk is stale and reads as "incomplete".
No heartbeat to tune and no pid reuse to fool it. Two fallbacks:
- flock is shared with children made by fork (e.g. DataLoader workers) and outlives the writer until they
  exit, so a held lock whose recorded pid is dead on this host also counts as stale;
- where flock is unavailable (no fcntl, some network file systems) the recorded pid is checked on the same
  host; a run written on another host then keeps the status it has on disk.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

from specscope.errors import RunStoreError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = "run.lock"


def acquire(run_dir: Path, wait_s: float = 0.5) -> tuple[int, ...]:
    """Take the writer lock; returns the fds to keep open. Raises if another writer holds it.

    Two locks: `run.lock`, which readers test, and the directory itself, which only writers take: a run.lock deleted
    under a live writer (its flock then held on a file no longer there) must not let a second writer in. Waits up to
    `wait_s` because a reader holds a shared lock on run.lock for a few microseconds while it checks.
    """
    path = run_dir / LOCK_NAME
    held: list[int] = []
    try:
        targets = [(run_dir, os.O_RDONLY)] if fcntl is not None else []  # a directory opens on POSIX only
        for target, flags in (*targets, (path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NONBLOCK", 0))):
            try:
                fd = os.open(target, flags, 0o644)
            except IsADirectoryError:
                raise RunStoreError(f"{path} is not a regular file (a FIFO, a device or a folder): restore it as an empty "
                                    "file, or delete it when no process writes the run") from None
            held.append(fd)
            if target == path and not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RunStoreError(f"{path} is not a regular file (a FIFO, a device or a folder): restore it as an "
                                    "empty file, or delete it when no process writes the run")
            _lock_exclusive(fd, run_dir, path, wait_s)
    except BaseException:
        release(tuple(held))
        raise
    return tuple(held)


def _lock_exclusive(fd: int, run_dir: Path, path: Path, wait_s: float) -> None:
    if fcntl is None:
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RunStoreError(
                    f"{run_dir} is being written by another live process (it holds {path}); "
                    "wait for it to finish, or stop it first.") from None
            time.sleep(0.01)
        except OSError:  # file system without flock: fall back to the pid check
            return


def release(fds: tuple[int, ...] | None) -> None:
    for fd in fds or ():
        os.close(fd)  # closing the last descriptor drops the flock


def writer_alive(run_dir: Path, pid: int | None, host: str | None, strict: bool = False) -> bool:
    """True when the run's writer is (as far as can be told) still running. When nothing is decisive (no
    flock, no pid to check) the answer is True, or False with `strict` (only a held lock counts)."""
    held = _lock_held(run_dir / LOCK_NAME)
    same_host = host == socket.gethostname()
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        pid = None  # a config.json edited by hand: no pid to check
    if held is False:
        return False
    if same_host and pid is not None and not pid_alive(pid):
        return False
    return held is True or not strict  # lock held by a live pid, or nothing decisive: trust the status on disk


def _lock_held(path: Path) -> bool | None:
    """True/False when flock can tell; None when it cannot (no lock file, no fcntl, no flock support)."""
    if fcntl is None or not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO put there must not block the reader
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RunStoreError(f"{path} is not a regular file (a FIFO, a device or a folder): restore it as an empty "
                                "file, or delete it when no process writes the run")
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    """A killed child that its parent has not reaped yet still answers kill(pid, 0); /proc says it is dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
