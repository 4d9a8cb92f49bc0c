"""Facts about the CPU that pick between measured routes (docs/linalg.md "Which LAPACK", "The caller's OpenMP team")."""
from __future__ import annotations

import functools
import glob


@functools.cache
def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("AuthenticAMD", "GenuineIntel", …), or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


CACHE_DIR = "/sys/devices/system/cpu/cpu0/cache"


@functools.cache
def last_level_cache(root: str = CACHE_DIR) -> int:
    """Bytes of the largest CPU cache cpu0 sees (`root`/index*/size, e.g. "32768K": the L3 of its core complex on
    an AMD EPYC, 32 MiB on the one measured), or 0 where none can be read (another OS, a container without sysfs)."""
    best = 0
    for d in glob.glob(f"{glob.escape(root)}/index*"):
        try:
            with open(f"{d}/size") as f:
                text = f.read().strip().upper()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, int(digits) * unit)
    return best
