"""Errors a user can cause. The CLI prints their message on one line and exits non-zero, no traceback."""


class SpecscopeError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(SpecscopeError, ValueError):
    """A config key that does not exist, an ill-typed value, an unknown lab or option."""


class NonFiniteError(SpecscopeError, ValueError):
    """A NaN or Inf in a gradient, activation or parameter; the message names where and when."""


class RunStoreError(SpecscopeError, OSError):
    """A missing, truncated or corrupt run directory, database or checkpoint; the message names the file."""
