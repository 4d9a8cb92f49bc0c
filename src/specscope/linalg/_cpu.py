"""Facts about the CPU that pick between measured routes (docs/linalg.md "Which LAPACK", "The caller's OpenMP team")."""
from __future__ import annotations

import functools


@functools.cache
def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("AuthenticAMD", "GenuineIntel", …), or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""
