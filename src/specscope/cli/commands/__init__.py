"""Command modules. Each imports `specscope.cli.app` and registers its commands with `@app.command()`."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
