"""Facts about the CPU that pick between measured routes (docs/linalg.md "Which LAPACK", "The caller's OpenMP team",
"Iteration dtype")."""
from __future__ import annotations

import functools
import glob

import torch


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


BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 (/proc/cpuinfo "flags")
ARM_BF16_FEATURE = "bf16"  # aarch64 (/proc/cpuinfo "Features")


@functools.cache
def bfloat16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 in hardware: AVX512_BF16 or AMX on x86 (as torch reads them), the BF16
    extension on Arm (/proc/cpuinfo). Without them a bfloat16 product goes through float32 and costs more than a
    float32 one: 3.2× for the polar iterations of one GPT block on an Intel Xeon (Ice Lake), docs/linalg.md
    "Iteration dtype"."""
    x86 = [getattr(torch.cpu, f"_is_{name}_supported", None) for name in ("avx512_bf16", "amx_tile")]
    if any(f is not None and f() for f in x86):
        return True
    return bool(_cpuinfo_words(cpuinfo) & {*BF16_FLAGS, ARM_BF16_FEATURE})


def _cpuinfo_words(path: str = "/proc/cpuinfo") -> set[str]:
    """The words of cpu0's "flags" (x86) or "Features" (aarch64) line, or none where `path` cannot be read."""
    try:
        with open(path) as f:
            line = next((line for line in f if line.split(":", 1)[0].strip() in ("flags", "Features")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[1].split()) if ":" in line else set()
