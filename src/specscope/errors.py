"""Errors a user can cause. The CLI prints their message on one line and exits non-zero, no traceback."""


class SpecscopeError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(SpecscopeError, ValueError):
    """A config key that does not exist, an ill-typed value, an unknown lab or option."""


class NonFiniteError(SpecscopeError, ValueError):
    """A NaN or Inf in a gradient, activation or parameter; the message names where and when."""


class RunStoreError(SpecscopeError, OSError):
    """A missing, truncated or corrupt run directory, database or checkpoint; the message names the file."""


class OutOfMemoryError(SpecscopeError, MemoryError):
    """An allocation the sizes asked for failed; the message names the sizes to lower."""


def allocation_failure(e: BaseException) -> str | None:
    """What failed, when `e` is an allocation failure (Python's MemoryError, torch's CPU allocator or CUDA
    out of memory): "80.0 GB on cpu"; None for any other error."""
    import re

    text = str(e)
    if not isinstance(e, MemoryError) and not (isinstance(e, RuntimeError) and (
            "can't allocate memory" in text or "out of memory" in text.lower())):
        return None
    size = re.search(r"allocate (\d+) bytes", text) or re.search(r"allocate ([\d.]+ [KMGT]iB)", text)
    where = "cuda" if "CUDA" in text else "cpu"
    if size is None:
        return f"memory on {where}"
    amount = size.group(1)
    if not amount.isdigit():
        return f"{amount} on {where}"
    n, unit = float(amount), "bytes"
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            break
        n /= 1000
    return f"{n:.1f} {unit} on {where}"


def checked_keywords(init):
    """A constructor whose misspelt keyword (`Muon(params, lrr=0.1)`) is a ConfigError naming the closest option
    and every option, as a misspelt param-group key is, instead of Python's bare TypeError."""
    import difflib
    import functools
    import inspect

    params = inspect.signature(init).parameters
    known = [k for k, p in params.items() if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    @functools.wraps(init)
    def init_checked(self, *args, **kwargs):
        for key in kwargs:
            if key not in params:
                close = difflib.get_close_matches(key, known, n=1)
                raise ConfigError(f"{key!r} is not an option of {type(self).__name__}; "
                                  + (f"did you mean {close[0]!r}? " if close else "") + f"its options are {known}")
        return init(self, *args, **kwargs)

    return init_checked
