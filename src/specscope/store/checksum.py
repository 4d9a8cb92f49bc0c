"""One checksum per record, stored beside it in metrics.sqlite.

SQLite's integrity_check finds a damaged page and an index entry that no longer matches its row, but a flipped
bit inside a stored number, or in a column no index holds, reads back as another valid value. The checksum
covers all nine fields of a record, one 64-bit word each, folded in by a bijection:

    h = mix(step);  h = mix(h ^ crc32(layer));  … crc32(metric), bits(value), crc32(arm), crc32(estimator), rows,
        crc32(shape), crc32(flag);  checksum = h >> 11

`mix` is splitmix64's finaliser (a bijection of 64-bit words), `bits(value)` the float64's bit pattern (-0.0 as
0.0, and NaN as one pattern: SQLite stores NaN as NULL). Since every fold is a bijection, a change to one field
changes h for certain: a number changes its own word, and CRC-32 detects every error of up to 32 consecutive
bits in a name. The stored checksum keeps h's top 53 bits, so that it reads back exactly even as a float64 (a
changed record then passes with odds 2⁻⁵³). Computed over whole columns (numpy, and pandas' factorize for the names: each distinct name is
hashed once), it costs a few percent of `load(run)` (benchmarks/store_read.py).
"""

from __future__ import annotations

import zlib
from typing import Mapping, Sequence

import numpy as np

# The fields in the order they are folded in: part of the checksum's definition (store.sqlite.COLUMNS is the same)
FIELDS = ("step", "layer", "metric", "value", "arm", "estimator", "rows", "shape", "flag")
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_NAN = np.uint64(0x7FF8000000000000)  # SQLite stores NaN as NULL: every NaN (and NULL) hashes as this one
_KIND = {"step": "int", "value": "float", "rows": "int"}  # the rest are names


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def _crc(name) -> int:
    """CRC-32 of a name; -1 for a value that is not text (a damaged row read by salvage)."""
    if not isinstance(name, str):
        return -1
    return zlib.crc32(name.encode("utf-8", "surrogatepass"))


def _name_words(column) -> tuple[np.ndarray, np.ndarray]:
    """CRC-32 of each name, hashing each distinct name once; and where the entry is not text. A list (a batch
    being written) goes through a dict, a pandas column (a run being read) through pandas' factorize."""
    if isinstance(column, list):
        crcs: dict = {}
        words = np.array([crcs[v] if v in crcs else crcs.setdefault(v, _crc(v)) for v in column], dtype=np.int64)
    else:
        import pandas as pd

        codes, uniques = pd.factorize(column)
        words = np.array([_crc(u) for u in uniques] + [-1], dtype=np.int64)[codes]  # code -1 (None/NaN): the last
    return words.view(np.uint64), words < 0


def _number_words(column, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A column of numbers as 64-bit words, and where the entry is not of the column's type. A column pandas made
    float64 (an int column with a NULL in a damaged row) or object (a damaged row's text) is read entry by entry."""
    values = np.asarray(column)
    wrong = np.zeros(len(values), bool)
    if values.dtype.kind in "OUSb":
        values, wrong = _typed(values, kind)
    if kind == "float":
        values = values.astype(np.float64) + 0.0  # -0.0 -> 0.0
        words = values.view(np.uint64)
        words[np.isnan(values)] = _NAN
        return words, wrong
    if values.dtype.kind == "f":
        whole = np.isfinite(values) & (values == np.round(values)) & (np.abs(values) < 2.0**63)
        values, wrong = np.where(whole, values, 0), wrong | ~whole
    return values.astype(np.int64).view(np.uint64), wrong


def _typed(values: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """An object column's entries as int64 (kind "int") or float64 (None as NaN), and where one is not."""
    def fits(v) -> bool:
        if kind == "float":
            return v is None or (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool))
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and -(2**63) <= v < 2**63

    ok = np.array([fits(v) for v in values], bool)
    out = np.zeros(len(values), np.float64 if kind == "float" else np.int64)
    out[ok] = [np.nan if v is None else v for v in values[ok]]
    return out, ~ok


def _hashes(columns: Mapping[str, Sequence]) -> tuple[np.ndarray, np.ndarray]:
    """The checksums of the records given as columns (FIELDS), as int64, and where a record has a field not of
    its column's type (it has no checksum)."""
    h, bad = None, None
    for name in FIELDS:
        kind = _KIND.get(name)
        words, wrong = _number_words(columns[name], kind) if kind else _name_words(columns[name])
        h = _mix(words if h is None else h ^ words)
        bad = wrong if bad is None else bad | wrong
    return (h >> _S11).view(np.int64), bad  # 53 bits: exact in a float64 (pandas' column of ints with a NULL)


def checksums(rows: Sequence[tuple]) -> list[int]:
    """The checksum of each row: a tuple in FIELDS' order, of the types `store.sqlite.as_row` makes."""
    if not rows:
        return []
    h, bad = _hashes({name: [r[i] for r in rows] for i, name in enumerate(FIELDS)})
    if bad.any():
        raise TypeError(f"row {rows[int(np.flatnonzero(bad)[0])]!r} has a field not of its column's type")
    return h.tolist()


def mismatched(columns: Mapping[str, Sequence]) -> np.ndarray:
    """Positions of the records whose stored checksum is not their fields'. `columns`: FIELDS, "checksum" (0
    where none was stored) and "unchecked" (true for a record written before checksums were stored: not checked)
    — a DataFrame of them, as `store.load` reads them, or a mapping of sequences."""
    unchecked = np.asarray(columns["unchecked"], dtype=bool)
    if unchecked.all():
        return np.zeros(0, np.int64)
    stored, bad_stored = _number_words(columns["checksum"], "int")
    have, bad = _hashes(columns)
    return np.flatnonzero(~unchecked & (bad | bad_stored | (stored.view(np.int64) != have)))
