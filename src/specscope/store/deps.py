"""Optional packages (pyarrow for parquet, tensorboard for the TensorBoard sink), imported only when asked for."""

from __future__ import annotations

import importlib
import importlib.util

from specscope.errors import SpecscopeError


class MissingDependencyError(SpecscopeError, ImportError):
    """An optional package a requested feature needs is not installed; the message says what to install."""


def require(module: str, extra: str, feature: str):
    """Import `module` or raise MissingDependencyError naming the pip extra that provides it."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"{feature} needs the optional package `{module}`, which is not installed: "
            f"pip install 'specscope[{extra}]' (from a checkout: .venv/bin/pip install -e '.[{extra}]'; or pip install "
            f"{module}).")
    return importlib.import_module(module)
