"""Record checksums: every record SQLite gives back matches its checksum, and a change to any one field does not."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specscope.records import Record
from specscope.store import Run, checksum, load
from specscope.store.checksum import FIELDS
from specscope.store.sqlite import COLUMNS, MAX_INT, as_row

names = st.text(max_size=12)  # any unicode, empty and NUL included
values = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**53), 2**53)
records = st.builds(Record, step=st.integers(0, MAX_INT), layer=names, metric=names, value=values, arm=names,
                    estimator=names, rows=st.integers(0, MAX_INT), shape=names, flag=names)


@settings(max_examples=30, deadline=None)
@given(st.lists(records, min_size=1, max_size=20))
def test_every_record_read_back_matches_its_checksum(tmp_path_factory, recs):
    """-0.0 (which SQLite may store as the integer 0), NaN (stored as NULL), ±inf, the largest steps, any names."""
    with Run.create(tmp_path_factory.mktemp("r"), "demo", {}) as run:
        run.append(recs)
    df = load(run.path)  # raises if any checksum failed
    assert len(df) == len(recs)
    assert all(math.isnan(a) if math.isnan(b) else a == b for a, b in zip(df.value, [float(r.value) for r in recs]))


def frame(rows: list[tuple]) -> pd.DataFrame:
    """Rows (FIELDS, then a stored checksum) as `store.load` reads them."""
    return pd.DataFrame.from_records([(*r, False) for r in rows], columns=[*FIELDS, "checksum", "unchecked"])


def test_the_checksum_folds_the_stored_columns():
    assert COLUMNS == FIELDS


def _changed(row: tuple, field: int, draw) -> tuple:
    old = row[field]
    if isinstance(old, str):
        new = draw(names.filter(lambda s: s != old))
    elif isinstance(old, float):
        new = draw(st.floats(allow_nan=True).filter(
            lambda v: not (v == old or (math.isnan(v) and math.isnan(old)))))
    else:
        new = draw(st.integers(0, MAX_INT).filter(lambda v: v != old))
    return (*row[:field], new, *row[field + 1:])


@settings(max_examples=200, deadline=None)
@given(records, st.integers(0, 8), st.data())
def test_a_change_to_any_one_field_changes_the_checksum(rec, field, data):
    row = as_row(rec)
    stored = checksum.checksums([row])[0]
    other = _changed(row, field, data.draw)
    if field == 3 and other[3] == 0.0 and row[3] == 0.0:  # -0.0 and 0.0 are one value to SQLite
        return
    assert len(checksum.mismatched(frame([(*other, stored)]))) == 1
    assert len(checksum.mismatched(frame([(*row, stored)]))) == 0


@given(records, st.integers(0, 63))
def test_a_flipped_bit_in_a_number_is_caught(rec, bit):
    row = as_row(rec)
    stored = checksum.checksums([row])[0]
    step = row[0] ^ (1 << bit) if bit < 63 else row[0]
    if step != row[0]:
        assert len(checksum.mismatched(frame([(step, *row[1:], stored)]))) == 1
    assert len(checksum.mismatched(frame([(*row, stored ^ (1 << bit))]))) == 1  # the stored checksum itself


def test_a_record_whose_checksum_was_set_to_null_after_checked_ones_is_damaged_not_unchecked(tmp_path):
    """NULL marked a record from before checksums, row by row: `UPDATE metrics SET value = 0.001, checksum = NULL`
    passed every reader. Only records before the first checksummed one are from before checksums."""
    import sqlite3

    from specscope.errors import RunStoreError
    from specscope.store import Run, load

    with Run.create(tmp_path, "api", {"seed": 0}, run_id="r") as run:
        for s in range(10):
            run.log(s, {"loss": 1.0 / (s + 1), "val_loss": 2.0})
    con = sqlite3.connect(run.metrics_path)
    con.execute("UPDATE metrics SET value = 0.001, checksum = NULL WHERE metric = 'val_loss'")
    con.commit()
    con.close()
    with pytest.raises(RunStoreError, match="checksum"):
        load(run.path)
    with pytest.warns(RuntimeWarning):
        df = load(run.path, salvage=True)
    assert set(df.metric) == {"loss"} and len(df) == 10  # the edited records are left out


def test_nulled_checksums_of_a_databases_first_records_are_damage_too(tmp_path):
    """Only records before the first checksummed one counted as "from before checksums": nulling the checksums of the
    leading records (or of all) made them unchecked. A database records where its checksums begin (`checksums_from`)."""
    from specscope.store import Run

    with Run.create(tmp_path, "api", {"seed": 0}, run_id="r") as run:
        for s in range(4):
            run.log(s, {"loss": 1.0 + s})
    _nulled_is_damage(run.path, checksums_from=1, where="")  # every record, the first ones included


def test_a_database_migrated_from_before_checksums_reads_its_old_records_unchecked(tmp_path):
    """Schema version 1 (no checksum column): its records stay readable, unchecked, and the ones appended after the
    migration are checked."""
    import sqlite3

    from specscope.store import Run, load, sqlite as S

    with Run.create(tmp_path, "api", {"seed": 0}, run_id="r") as run:
        run.log(0, {"loss": 1.0})
    db = run.metrics_path
    db.unlink()
    con = sqlite3.connect(db)
    for stmt in filter(str.strip, S.MIGRATIONS[0].split(";")):
        con.execute(stmt)
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    con.execute("INSERT INTO schema_version VALUES (1)")
    con.executemany("INSERT INTO metrics VALUES (?, '', 'loss', ?, '', '', 0, '', '')", [(0, 1.0), (1, 0.5)])
    con.commit()
    S.set_owner(con, "r", "api")
    con.close()
    again = Run.open(run.path)
    again.log(2, {"loss": 0.25})
    again.close()
    assert load(run.path).value.tolist() == [1.0, 0.5, 0.25]
    _nulled_is_damage(run.path, checksums_from=3, where=" WHERE rowid = 3")  # the one appended after the migration


def _nulled_is_damage(path, checksums_from: int, where: str) -> None:
    """The database records where its checksums begin; records of it edited with their checksum set to NULL (`where`:
    which) fail their check when read."""
    import sqlite3

    from specscope.errors import RunStoreError
    from specscope.store import load

    con = sqlite3.connect(path / "metrics.sqlite")
    assert con.execute("SELECT value FROM run_info WHERE key = 'checksums_from'").fetchone() == (checksums_from,)
    con.execute("UPDATE metrics SET value = value * 100, checksum = NULL" + where)
    con.commit()
    con.close()
    with pytest.raises(RunStoreError, match="fail their checksum"):
        load(path)
