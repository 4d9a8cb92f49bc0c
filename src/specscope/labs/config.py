"""Lab configs from defaults, a TOML file and `--set key=value` overrides, validated by the lab's pydantic Config."""

from __future__ import annotations

import json
import math
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from specscope.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def describe_fields(config_cls: type[BaseModel]) -> str:
    """`name (type) = default` for every key, for error messages and `specscope list --keys`; `seed` is left out
    where the lab draws its seeds from a `seeds` list (it refuses any other seed: `base.check_seed_list`)."""
    parts = []
    for name, f in config_cls.model_fields.items():
        if name == "seed" and isinstance(getattr(config_cls.model_fields.get("seeds"), "default", None), list):
            continue
        names = (f.json_schema_extra or {}).get("choices") if isinstance(f.json_schema_extra, dict) else None
        kind = f"list of one of {'|'.join(names)}" if names else type_name(f.annotation)
        if any((getattr(m, "min_length", None) or 0) >= 1 for m in f.metadata):
            kind = "non-empty " + kind
        parts.append(f"{name} ({kind}{_range(f.metadata)}) = {f.default!r}")
    return ", ".join(parts)


def names_from(default: list[str], choices: Sequence[str], *, may_be_empty: bool = False) -> Any:
    """A list-of-names field whose allowed names `list --keys` and key errors show (the lab checks them when it
    builds, where the names come from the module that defines them); non-empty unless `may_be_empty` (a sweep
    that [] skips)."""
    return Field(default=list(default), min_length=0 if may_be_empty else 1, json_schema_extra={"choices": list(choices)})


def type_name(annotation: Any) -> str:
    """A field's type as a user writes values for it: `one of relu2|swiglu`, `list of int`, `float or None`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin in (list, tuple, set) and args:
        return f"list of {type_name(args[0])}"
    if origin is typing.Annotated:
        meta = [m for a in args[1:] for m in (getattr(a, "metadata", None) or [a])]  # Field(gt=0) holds Gt(0)
        return type_name(args[0]) + _range(meta)
    if origin in (typing.Union, types.UnionType) and args:
        return " or ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is dict:
        return "table"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _range(metadata: list) -> str:
    """" >= 1" / " > 0, finite" from a field's annotated constraints ("" when it has none)."""
    bits = [f"{op} {getattr(m, k):g}" if isinstance(getattr(m, k), float) else f"{op} {getattr(m, k)}"
            for m in metadata for k, op in _BOUNDS.items() if getattr(m, k, None) is not None]
    bits += ["finite" for m in metadata if getattr(m, "allow_inf_nan", None) is False]
    return (" " + ", ".join(bits)) if bits else ""


def _is_list_field(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set):
        return True
    return any(_is_list_field(a) for a in typing.get_args(annotation)) if origin is typing.Union else False


def _parse_value(raw: str, annotation: Any, key: str = "") -> Any:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    except RecursionError:
        raise ConfigError(f"{key}={raw[:20]}…: nested too deeply to be a config value; give a value or a list of "
                          "values") from None
    if isinstance(value, float) and value in (0.0, math.inf, -math.inf) and any(c in "123456789" for c in raw.split("e")[0].split("E")[0]):
        raise ConfigError(f"{key}={raw}: beyond a float64's range (it reads as {value}); give a number between "
                          "2.2e-308 and 1.8e308 in size")
    if isinstance(value, str) and value.lower() in ("true", "false") and annotation is not None and _takes_bool(annotation):
        value = value.lower() == "true"  # Python's spelling, True/False, too; 1, yes and on stay refused
    if _is_list_field(annotation) and not isinstance(value, list):
        inner = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw  # [a,b] without JSON quotes
        if isinstance(value, str):
            items = [v.strip() for v in inner.split(",")] if inner.strip() else []  # "[]": the empty list
            if "" in items:
                raise ConfigError(f"{key}={raw}: an empty item (a comma at the start or end, or two in a row); "
                                  f"write {key}=a,b (a list key that may be empty also takes {key}=[])")
            value = [_parse_value(v, None) for v in items]
        else:
            value = [value]
    if annotation is str and not isinstance(value, str):
        value = raw  # "--set name=123" for a string field stays the string "123"
    return value


def parse_overrides(config_cls: type[BaseModel], pairs: list[str], lab: str = "") -> dict[str, Any]:
    """["width=512", "acts=relu,swiglu"] -> {"width": 512, "acts": ["relu", "swiglu"]}; an unknown key, or a key
    given twice, is an error."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip()
        field = config_cls.model_fields.get(key)
        if field is None:
            raise ConfigError(f"unknown config key {key!r}{_for(lab)}; valid keys: {describe_fields(config_cls)}")
        value = _parse_value(raw.strip(), field.annotation, key)
        if key in out:  # a --grid key given twice is refused too: neither is silently dropped
            raise ConfigError(f"--set {key} is given twice ({out[key]!r} and {value!r}){_for(lab)}; give each key once")
        out[key] = value
    return out


def _message(err: dict) -> str:
    """pydantic's message, its bound as a float is written (3.40282e+38, not 340282346638528860000000000000000000000)."""
    bounds = [v for k, v in (err.get("ctx") or {}).items() if k in _BOUNDS and isinstance(v, float)]
    return f"{err['msg'].rsplit(' ', 1)[0]} {bounds[0]:g}" if len(bounds) == 1 else err["msg"]  # the bound ends it


def _for(lab: str) -> str:
    return f" for lab '{lab}'" if lab else ""


def load_toml(path: str | Path) -> dict[str, Any]:
    """The `[config]` table of a TOML file (or its top level); every way it can be wrong is one ConfigError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give the path of the TOML file in it")
    if path.exists() and not path.is_file():
        raise ConfigError(f"config file {path} is not a regular file (a device or a pipe); give a TOML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the path")
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests arrays or tables thousands deep; a config holds values and "
                          "lists of values") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    other = [k for k, v in data.items() if isinstance(v, dict) and k != "config"]
    if other and "config" not in data:  # e.g. [gpt]: only [config] (or top-level keys) is read
        raise ConfigError(f"config file {path}: table [{other[0]}] is not read; put the keys under [config] "
                          f"or at the top level")
    outside = [k for k in data if k != "config"] if "config" in data else []
    if outside:  # beside [config] they would be dropped without a word
        key = outside[0]
        what = (f"table [{key}] is outside [config] and is not read; put its keys under [config]"
                if isinstance(data[key], dict) else f"key {key} is outside [config] and is not read; put it under [config]")
        raise ConfigError(f"config file {path}: {what} (or drop the [config] line and keep every key at the top level)")
    data = data.get("config", data)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: 'config' must be a table ([config] with key = value lines), "
                          f"not a {type(data).__name__}")
    return data


def _takes_bool(annotation: Any) -> bool:
    """Whether a field's type admits true/false (pydantic would otherwise read true as the number 1)."""
    return annotation is bool or any(_takes_bool(a) for a in typing.get_args(annotation) if not isinstance(a, str))


def make_config(config_cls: type[BaseModel], values: dict[str, Any] | None = None, lab: str = "") -> BaseModel:
    """Validate; every problem is reported as one ConfigError naming the key, what was given and what is expected."""
    values = dict(values or {})
    unknown = [k for k in values if k not in config_cls.model_fields]
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}{_for(lab)}; valid keys: {describe_fields(config_cls)}")
    for key, value in values.items():
        f = config_cls.model_fields[key]
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, bool) for v in items) and not _takes_bool(f.annotation):
            raise ConfigError(f"invalid config{_for(lab)}: '{key}' = {value!r}: true/false is not a value of "
                              f"this key (expected {type_name(f.annotation)}{_range(f.metadata)})")
        if _only_bool(f.annotation) and not isinstance(value, bool) and not (value is None and _takes_none(f.annotation)):
            raise ConfigError(f"invalid config{_for(lab)}: '{key}' = {value!r}: give true or false "
                              f"(--set {key}=true, or {key} = true in a TOML file)")
        length = _tuple_length(f.annotation)
        if length is not None and not (isinstance(value, (list, tuple)) and len(value) == length):
            example = "[" + ",".join(str(v) for v in f.default) + "]" if isinstance(f.default, (list, tuple)) else ""
            got = f"{len(value)} value(s)" if isinstance(value, (list, tuple)) else "one value"
            raise ConfigError(f"invalid config{_for(lab)}: '{key}' = {value!r}: {key} takes {length} values, each "
                              f"{type_name(typing.get_args(f.annotation)[0])}, got {got}"
                              + (f"; e.g. --set {key}={example}" if example else ""))
    try:
        cfg = config_cls(**values)
    except ValidationError as e:
        errs = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"])
            f = config_cls.model_fields.get(str(err["loc"][0])) if err["loc"] else None
            expected = type_name(f.annotation) + _range(f.metadata) if f else "?"
            where = f"expected {expected}" if len(err["loc"]) < 2 else f"an entry of '{err['loc'][0]}', a {expected}"
            errs.append(f"'{key}' = {err.get('input')!r}: {_message(err)} ({where})")
        raise ConfigError(f"invalid config{_for(lab)}: " + "; ".join(errs)) from None
    for key in values:
        value = getattr(cfg, key)
        big = _too_large(value)
        if big is not None:
            raise ConfigError(f"invalid config{_for(lab)}: '{key}' = {big}: too large; integer values must be "
                              f"below 2**63 = {2**63} (what the run store and torch hold)")
        if typing.get_origin(config_cls.model_fields[key].annotation) is list:
            seen = [json.dumps(v, sort_keys=True, default=str) for v in value]
            twice = next((v for i, v in enumerate(value) if seen[i] in seen[:i]), None)
            if len(set(seen)) < len(seen):
                once = ",".join(dict.fromkeys(str(v) for v in value))
                raise ConfigError(f"invalid config{_for(lab)}: '{key}' = {value!r} repeats {twice!r}; an entry counts "
                                  f"once, so give each once: --set {key}={once}")
    return cfg


def _only_bool(annotation: Any) -> bool:
    """bool or bool | None: a field whose only values are true/false (pydantic would read 1, "yes", "on" as true)."""
    return annotation is bool or (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                                  and {a for a in typing.get_args(annotation)} == {bool, type(None)})


def _takes_none(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _tuple_length(annotation: Any) -> int | None:
    """The number of items of a fixed-length tuple field (betas: 2), else None."""
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        return None if not args or Ellipsis in args else len(args)
    return None


def _too_large(value: Any) -> int | None:
    """The first int in a value (or in its lists / tables) outside the signed 64-bit range, else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if not -(2**63) <= value < 2**63 else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((v for v in map(_too_large, items) if v is not None), None)
