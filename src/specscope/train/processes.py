"""Child processes that never outlive the process that started them."""

from __future__ import annotations

import os
import signal
import time


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when `parent` dies (a killed sweep or spawn takes its workers with it)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        armed = False
    if os.getppid() != parent:  # died before the signal was armed
        os._exit(1)
    if not armed:
        import threading

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="specscope-parent-watchdog").start()


def exit_reason(exitcode: int | None) -> str:
    """How a child ended, in words: 'killed by SIGKILL', 'exit code 3'."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
