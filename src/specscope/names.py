"""Names read from files (run ids, labs, arms, layers) are data: checked before they become paths, escaped
before they are printed with rich or drawn by matplotlib.

    check_name("run_id", meta["run_id"], source=path / "config.json")   # ConfigError unless a plain name
    console.print(f"run {markup(run_id)}")                             # "[/nope]" prints as typed
    ax.set_title(mathtext(layer))                                      # "a$\\x{$" draws as typed

Layer names (the probe's, the optimizers', the records'): a parameter's name without the segments wrappers
insert (torch.compile's `_orig_mod`, activation checkpointing's `_checkpoint_wrapped_module`, FSDP1's
`_fsdp_wrapped_module`), so a model names its weights alike wrapped or not, at the top or inside:

    layer_name("model._orig_mod.blocks.0.mlp.down.weight")  ->  "model.blocks.0.mlp.down"
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from specscope.errors import ConfigError

PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # no separators, no "..", no leading dot, never absolute
MAX_LEN = 200


def is_plain(name: object) -> bool:
    """A name that is safe as one path component on every platform: letters, digits, '.', '_', '-', not '..'-led."""
    return isinstance(name, str) and len(name) <= MAX_LEN and PLAIN.fullmatch(name) is not None


def check_name(what: str, name: object, source: str | Path | None = None, error: type[Exception] = ConfigError) -> str:
    """`name` if it is plain, else `error` naming the value, where it came from and what is allowed."""
    if is_plain(name):
        return name  # type: ignore[return-value]
    where = f" in {source}" if source is not None else ""
    raise error(f"{what} {name!r}{where} is not a plain name: use letters, digits, '.', '_', '-' "
                      f"(no path separators, no leading '.', at most {MAX_LEN} characters).")


def markup(text: object) -> str:
    """`text` for rich's console markup: square brackets print as themselves instead of styling."""
    from rich.markup import escape

    return escape(str(text))


def visible(text: object) -> str:
    """`text` with every control or format character shown as an escape (\\x1b, \\u200b): text read from a file
    (a claim, a name) can never move the cursor, retitle the terminal or hide part of itself when printed."""
    return "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode() for ch in str(text))


def mathtext(text: object) -> str:
    """`text` for a matplotlib label: every `$` escaped, so no mathtext is parsed."""
    return str(text).replace("$", r"\$")


WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def parameter_name(name: str) -> str:
    """`name` (from `named_parameters()`) without the segments of torch.compile / checkpoint / FSDP1 wrappers."""
    if "_" not in name:
        return name
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def layer_name(name: str) -> str:
    """`blocks.0.mlp.down.weight` -> `blocks.0.mlp.down` (the module that owns the weight), wrapper segments
    dropped; other names stay, a root-level `weight` too (the layer "" holds the whole model's records: loss, lr)."""
    name = parameter_name(name)
    return name[: -len(".weight")] if name.endswith(".weight") else name


def name_matches(name: str, pattern: str) -> bool:
    """Whether a layer or parameter name matches an include/exclude/split pattern: fnmatch's, or the name itself
    (fnmatch reads the "[0]" of a ModuleDict key "a[0]" as a character class, which the name does not match)."""
    return name == pattern or fnmatch.fnmatchcase(name, pattern)
