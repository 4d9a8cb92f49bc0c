"""The labs: one module per published experiment, discovered automatically.

A module in this package that defines `NAME` and `build` is a lab (see `specscope.labs.base`). Labs from
other packages register through the entry-point group `specscope.labs`. Adding a lab edits nothing else.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from functools import lru_cache
from importlib.metadata import entry_points
from types import ModuleType

from specscope.errors import ConfigError


_broken: dict[str, str] = {}


@lru_cache(maxsize=1)
def _registry() -> dict[str, str]:
    """Lab name -> module path, without importing every lab (cheap for `specscope list`)."""
    found: dict[str, str] = {}
    for m in pkgutil.iter_modules(__path__):
        if m.name.startswith("_") or m.name in {"base", "config", "runner"}:
            continue
        try:
            mod = importlib.import_module(f"{__name__}.{m.name}")
        except Exception as e:  # a broken lab must not take `specscope list` down with it
            _broken[m.name.replace("_", "-")] = f"{type(e).__name__}: {e}"
            continue
        if hasattr(mod, "NAME") and hasattr(mod, "build"):
            found[mod.NAME] = mod.__name__
    for ep in entry_points(group="specscope.labs"):
        if ep.name not in found:
            found[ep.name] = ep.value
    return found


def _entry_point_lab(name: str, value: str) -> ModuleType:
    """The module an entry point `name = value` names, checked: a module path (not module:attr) whose NAME is `name`
    (runs are recorded under NAME, and resumed, reported and swept by it); a ConfigError naming the fix."""
    fix = f"register it in its package as `{name} = <module>` under [project.entry-points.\"specscope.labs\"]"
    if ":" in value:
        raise ConfigError(f"lab '{name}': its entry point names '{value}'; a lab is a module (NAME, Config, build): "
                          f"give the module path, `{name} = {value.split(':')[0]}`")
    try:
        mod = importlib.import_module(value)
    except Exception as e:  # noqa: BLE001 — an outside lab that does not import is that lab's fault, said in one line
        raise ConfigError(f"lab '{name}' (module {value}, from an entry point) failed to import ({type(e).__name__}: {e}); "
                          "fix or reinstall the package that provides it") from None
    if getattr(mod, "NAME", None) != name or not hasattr(mod, "build"):
        what = (f"its NAME is {getattr(mod, 'NAME', None)!r}" if hasattr(mod, "build") else "it has no build()")
        raise ConfigError(f"lab '{name}': module {value} is registered under that name, but {what}; the entry point's "
                          f"name must be the module's NAME (its runs are recorded, resumed and swept under NAME): {fix}")
    return mod


def names() -> list[str]:
    return sorted(_registry())


def get(name: str) -> ModuleType:
    """The lab module called `name`; an unknown name suggests the closest one."""
    reg = _registry()
    if name in _broken and name not in reg:
        raise ConfigError(f"lab '{name}' failed to import ({_broken[name]}); reinstall specscope or fix the module")
    if name not in reg:
        close = difflib.get_close_matches(name, reg, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "."
        raise ConfigError(f"unknown lab '{name}'{hint} Labs: {', '.join(sorted(reg))} (see `specscope list`).")
    if not reg[name].startswith(f"{__name__}."):
        return _entry_point_lab(name, reg[name])
    return importlib.import_module(reg[name])


def summary(name: str) -> str:
    """The first line of the lab's docstring; for a lab that does not load, the one-line reason."""
    try:
        doc = (get(name).__doc__ or "").strip()
    except ConfigError as e:
        return f"(does not load: {e})"
    return doc.splitlines()[0] if doc else ""


def run_lab(name: str, overrides: dict | None = None, out: str = "runs", **kwargs):
    """Run a lab with config overrides; returns the run directory. See `specscope.labs.runner.run_lab`."""
    from specscope.labs.runner import run_lab as _run

    return _run(name, overrides, out=out, **kwargs)


__all__ = ["get", "names", "run_lab", "summary"]
