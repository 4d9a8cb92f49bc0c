"""The settings specscope reads from the environment: each one's values, what unset means, and its check.

Standard library only, so that the command line checks them all before a command imports torch (`specscope --help`
and a usage error then take a fraction of a second). The modules that act on a setting read it through `read`.
"""

from __future__ import annotations

import os

# name: (its values, the one unset or empty means, what that means in words)
SETTINGS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "SPECSCOPE_EIGH": (("auto", "torch", "openblas"), "auto", "auto"),  # linalg/lapack.py
    "SPECSCOPE_OPENMP_RELEASE": (("auto", "on", "off"), "auto", "auto: on for AMD CPUs, off elsewhere"),  # linalg/workers.py
    "SPECSCOPE_CUDA_GRAPHS": (("on", "off"), "off", "off"),  # linalg/graphs.py
    "SPECSCOPE_ITERATION_DTYPE": (("auto", "bfloat16", "float32"), "auto", "auto"),  # linalg/devices.py
}


def read(name: str) -> str:
    """The setting `name` from the environment, lower-cased, its default where unset or empty. Raises ValueError
    naming the setting, the value given and the values it takes."""
    values, default, unset = SETTINGS[name]
    value = os.environ.get(name, "").strip().lower() or default
    if value not in values:
        shown = " or ".join(values) if len(values) == 2 else "one of " + ", ".join(values)
        raise ValueError(f"{name}={os.environ[name]!r}: must be {shown} (unset means {unset})")
    return value


def check_all() -> None:
    """Every setting read once: the first one set to a value it does not take raises ValueError."""
    for name in SETTINGS:
        read(name)
