"""Truncated, bit-flipped, emptied, missing and malformed files: exit 2 naming the file, nothing recorded changes."""

from __future__ import annotations

import json
import shutil
import sqlite3
import warnings

import pandas as pd
import pytest

from conftest import fingerprint, metrics, one_line_error
from specscope import store
from specscope.errors import RunStoreError


def truncate(path, fraction=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * fraction))


def flip_bit(path, at=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("command", ["report", "export", "compare"])
def test_truncated_database_is_an_error_for_every_reader(finished, copy_of, cli, tmp_path, command):
    run = copy_of(finished)
    truncate(run / "metrics.sqlite")
    before = fingerprint(run)
    argv = {"report": ["report", run], "export": ["export", run, "--out", tmp_path / "x.csv"],
            "compare": ["compare", run, finished, "--out", tmp_path / "cmp"]}[command]
    rc, _, err = cli(*argv)
    one_line_error(rc, err, run / "metrics.sqlite", "--salvage")
    assert fingerprint(run) == before
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "cmp").exists()


def test_salvage_says_so_in_every_file_it_writes(finished, copy_of, cli, tmp_path):
    run = copy_of(finished)
    truncate(run / "metrics.sqlite")
    rc, out, _ = cli("report", run, "--salvage")
    assert rc == 0
    summary = store.Run.open(run).summary
    assert "metrics.sqlite is damaged" in summary["salvaged"]
    page = (run / "report.html").read_text()
    assert "<title>SALVAGED FROM A DAMAGED DATABASE — grokking" in page  # short: the damage is said once, below
    assert page.count("metrics.sqlite is damaged") == 1 and '<p class="warning">' in page
    rc, out, err = cli("export", run, "--out", tmp_path / "x.csv", "--salvage")
    assert rc == 0 and (tmp_path / "x.salvaged.csv").is_file() and not (tmp_path / "x.csv").exists()
    assert "--salvage" not in err  # what it says under --salvage is what was lost, not advice to use it


def test_salvage_that_leaves_a_lab_too_few_records_is_one_line(finished, copy_of, cli, monkeypatch):
    """A lab's claims read a series the salvage lost (the gpt lab's `time`: an IndexError traceback, exit 1)."""
    from specscope.labs import grokking

    def claims_of_a_lost_series(df, cfg):
        return [df[df.metric == "gone"].value.iloc[-1]]

    run = copy_of(finished)
    truncate(run / "metrics.sqlite")
    monkeypatch.setattr(grokking, "claims", claims_of_a_lost_series)
    before = fingerprint(run)
    rc, _, err = cli("report", run, "--salvage")
    errors = [line for line in err.splitlines() if not line.startswith("warning: ")]  # what the salvage read and lost
    assert rc == 2 and "Traceback" not in err
    one_line_error(rc, "\n".join(errors), run / "metrics.sqlite", "too few to compute its claims", "IndexError", "restore")
    assert fingerprint(run) == before


def test_salvage_that_reads_no_record_exports_and_reports_nothing(finished, copy_of, cli, tmp_path):
    """A database cut to its first pages opens, but not one record is readable: a header-only file and exit 0 read
    as the export of an empty run, and `report --salvage` rewrote summary.json with INCONCLUSIVE verdicts."""
    run = copy_of(finished)
    with open(run / "metrics.sqlite", "r+b") as f:
        f.truncate(8192)
    before = fingerprint(run)
    rc, _, err = cli("export", run, "--out", tmp_path / "x.csv", "--salvage")
    # one line: the salvage's warnings (0 records read, counts not checked) would only repeat it
    one_line_error(rc, err, run / "metrics.sqlite", "not one of its records could be read", "restore it from a copy")
    assert list(tmp_path.glob("x*")) == [] and fingerprint(run) == before
    # a report would have replaced the run's recorded verdicts with INCONCLUSIVE ones built from no record
    rc, _, err = cli("report", run, "--salvage")
    one_line_error(rc, err, run / "metrics.sqlite", "not one of its records could be read")
    assert fingerprint(run) == before


def test_salvage_of_an_unreadable_file_does_not_suggest_salvage(finished, copy_of, cli):
    run = copy_of(finished)
    (run / "metrics.sqlite").write_bytes(b"not a database " * 4096)
    rc, _, err = cli("report", run, "--salvage")
    one_line_error(rc, err, run / "metrics.sqlite", "even to salvage it", "restore it from a copy")
    assert "--salvage" not in err


def test_overwritten_page_fails_the_integrity_check(finished, copy_of, cli):
    run = copy_of(finished)
    db = run / "metrics.sqlite"
    data = bytearray(db.read_bytes())
    page = 4096 * (len(data) // 4096 // 2)  # a b-tree page in the middle
    data[page:page + 64] = b"\xff" * 64
    db.write_bytes(bytes(data))
    before = fingerprint(run)
    rc, _, err = cli("report", run)
    one_line_error(rc, err, db)
    assert fingerprint(run) == before


def test_bit_flip_in_a_checkpoint_stops_the_resume(killed, copy_of, cli):
    run = copy_of(killed)
    ckpt = run / "checkpoints" / "lrd.pt"
    flip_bit(ckpt)
    before = fingerprint(run)
    rc, _, err = cli("run", "--resume", run)
    one_line_error(rc, err, ckpt, "checksum")
    assert fingerprint(run) == before


@pytest.mark.parametrize("how", ["removed", "emptied"])
def test_resume_refuses_a_lost_database(killed, copy_of, cli, how):
    run = copy_of(killed)
    for p in run.glob("metrics.sqlite*"):
        p.unlink()
    if how == "emptied":
        (run / "metrics.sqlite").write_bytes(b"")
    before = fingerprint(run)
    rc, _, err = cli("run", "--resume", run)
    one_line_error(rc, err, run / "metrics.sqlite")
    assert fingerprint(run) == before


@pytest.mark.parametrize("arm,named", [("l2", "progress.json"), ("lrd", "lrd.pt")])
def test_resume_refuses_a_database_missing_records(killed, copy_of, cli, arm, named):
    """l2 finished (progress.json holds its count), lrd has a checkpoint (which holds its count)."""
    run = copy_of(killed)
    with sqlite3.connect(run / "metrics.sqlite") as con:
        con.execute("DELETE FROM metrics WHERE arm = ? AND rowid % 5 = 0", (arm,))
    con.close()
    before = fingerprint(run)
    rc, _, err = cli("run", "--resume", run)
    one_line_error(rc, err, run / "metrics.sqlite", named, f"'{arm}'")
    assert fingerprint(run) == before


@pytest.mark.parametrize("name", ["progress.json", "checkpoints/lrd.pt"])
def test_truncated_progress_or_checkpoint(killed, copy_of, cli, name):
    run = copy_of(killed)
    truncate(run / name)
    before = fingerprint(run)
    rc, _, err = cli("run", "--resume", run)
    one_line_error(rc, err, run / name)
    assert fingerprint(run) == before


def test_a_checkpoint_deleted_as_its_damage_error_advises_restarts_its_arm(killed, copy_of, cli, finished):
    """A damaged checkpoint's error says "delete it to restart that arm from scratch"; with it deleted the resume
    refused (progress.json named it), so the run could not be resumed at all. Now the arm starts again, said once."""
    run = copy_of(killed)
    (run / "checkpoints" / "lrd.pt").unlink()
    rc, _, err = cli("run", "--resume", run)
    assert rc == 0, err
    assert "arm 'lrd' starts again from step 0" in err and "step 4" in err, err
    pd.testing.assert_frame_equal(metrics(run), metrics(finished))


def test_a_flipped_bit_in_a_records_name_fails_the_integrity_check(finished, copy_of, cli, tmp_path):
    """quick_check passed a database whose arm name had one flipped bit: `export` wrote the record under an arm the
    run never had. The full integrity check sees the index disagree with the row."""
    run = copy_of(finished)
    db = run / "metrics.sqlite"
    data = bytearray(db.read_bytes())
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as con:
        leaves = [n for (n,) in con.execute("SELECT pageno FROM dbstat WHERE name = 'metrics' AND pagetype = 'leaf'")]
    con.close()
    page = next(n for n in leaves if b"lrd" in data[(n - 1) * 4096 : n * 4096])
    at = (page - 1) * 4096 + data[(page - 1) * 4096 : page * 4096].index(b"lrd")
    data[at + 1] ^= 0x01  # 'lrd' -> 'lsd'
    db.write_bytes(bytes(data))
    before = fingerprint(run)
    rc, _, err = cli("export", run, "--out", tmp_path / "x.csv")
    one_line_error(rc, err, db, "integrity check")
    assert fingerprint(run) == before and not (tmp_path / "x.csv").exists()


def _leaf_offset(db, needle: bytes) -> int:
    """Where `needle` first occurs in a leaf page of the metrics table (not in an index)."""
    data = db.read_bytes()
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as con:
        leaves = [n for (n,) in con.execute("SELECT pageno FROM dbstat WHERE name = 'metrics' AND pagetype = 'leaf'")]
    con.close()
    page = next(n for n in leaves if needle in data[(n - 1) * 4096 : n * 4096])
    return (page - 1) * 4096 + data[(page - 1) * 4096 : page * 4096].index(needle)


@pytest.mark.parametrize("field", ["value", "shape"])
def test_a_flipped_bit_in_a_stored_number_or_unindexed_name_fails_its_checksum(finished, copy_of, cli, tmp_path, field):
    """A flipped bit in a stored number's last place, or in a column no index holds, passed SQLite's integrity
    check and was read as another valid value. Each record's checksum catches it: every reader exits 2 naming the
    database, and --salvage reads every other record."""
    import struct

    run = copy_of(finished)
    db = run / "metrics.sqlite"
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as con:
        value, shape = con.execute("SELECT value, shape FROM metrics WHERE value != CAST(value AS INTEGER) "
                                   "AND shape != '' LIMIT 1").fetchone()
    con.close()
    needle = struct.pack(">d", value) if field == "value" else shape.encode()
    at = _leaf_offset(db, needle) + len(needle) - 1
    data = bytearray(db.read_bytes())
    data[at] ^= 0x01  # the value's last bit of mantissa; the shape's last digit ("…x64" -> "…x65")
    db.write_bytes(bytes(data))
    assert sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    before = fingerprint(run)
    rc, _, err = cli("export", run, "--out", tmp_path / "x.csv")
    one_line_error(rc, err, db, "1 of its", "fail their checksum", "--salvage")
    rc, _, err = cli("report", run)
    one_line_error(rc, err, db, "fail their checksum")
    assert fingerprint(run) == before and not (tmp_path / "x.csv").exists()
    with pytest.warns(RuntimeWarning, match="fail their checksum"):
        part = store.load(run, salvage=True)
    whole = store.load(finished)
    assert len(part) == len(whole) - 1 and part.attrs["damage"]


def _set_schema_version(db, version, *, alter_a_value=False):
    """The schema_version row set to `version` (what one flipped bit there does: 2 -> 0 or 3), and, if asked, one
    stored value doubled with its checksum left as it was (a flipped exponent bit)."""
    con = sqlite3.connect(db)
    with con:
        con.execute("UPDATE schema_version SET version = ?", (version,))
        if alter_a_value:
            con.execute("UPDATE metrics SET value = value * 2 WHERE rowid = (SELECT min(rowid) FROM metrics "
                        "WHERE metric = 'loss' AND value != 0)")
    con.close()


def test_a_damaged_schema_version_neither_turns_the_checksums_off_nor_asks_for_an_upgrade(finished, copy_of, cli, tmp_path):
    """2 -> 0 made the readers take the run for one from before checksums: an altered value was read back as
    recorded. 2 -> 3 said "upgrade specscope" only, and --salvage failed the same way."""
    run = copy_of(finished)
    db = run / "metrics.sqlite"
    _set_schema_version(db, 0, alter_a_value=True)
    before = fingerprint(run)
    rc, _, err = cli("export", run, "--out", tmp_path / "x.csv")
    one_line_error(rc, err, db, "says schema version 0, and its tables are those of version 2", "--salvage")
    assert fingerprint(run) == before and not (tmp_path / "x.csv").exists()
    _set_schema_version(db, 3)
    rc, _, err = cli("report", run)
    one_line_error(rc, err, db, "has schema version 3, and its tables are this specscope's", "upgrade specscope",
                   "or the version number is damaged")
    for version in (0, 3):
        _set_schema_version(db, version)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            part = store.load(run, salvage=True)  # read by its tables: the checksums still apply
        assert any("1 of its" in str(w.message) and "fail their checksum" in str(w.message) for w in caught)
        assert len(part) == len(store.load(finished)) - 1 and f"schema version {version}" in part.attrs["damage"]


def test_a_resume_refuses_a_damaged_schema_version_and_leaves_the_run_as_it_was(killed, copy_of, cli):
    """It migrated 0 -> 1 over the existing tables ("table metrics already exists"), left the writer's connection
    open, and then reported "database is locked" from the status write that followed."""
    run = copy_of(killed)
    db = run / "metrics.sqlite"
    _set_schema_version(db, 0)
    before = fingerprint(run)
    rc, _, err = cli("run", "--resume", run)
    one_line_error(rc, err, db, "says schema version 0", "restore the file from a copy")
    assert "locked" not in err and fingerprint(run) == before and store.Run.open(run).status == "incomplete"


def test_claims_names_a_run_that_lost_its_config(finished, copy_of, cli, tmp_path):
    """A run with its summary.json and database but no config.json was left out of `claims` without a word."""
    run = copy_of(finished)
    (run / "config.json").unlink()
    rc, _, err = cli("claims", "--root", tmp_path / "runs")
    one_line_error(rc, err, run / "config.json")


def test_edited_summary_fails_its_checksum(finished, copy_of, cli):
    """A verdict edited by hand is never shown as a result: `claims` refuses it, `runs` flags the run, and
    `report` (the fix both name) rewrites the file from the records."""
    run = copy_of(finished)
    summary = json.loads((run / "summary.json").read_text())
    true_verdict = summary["claims"][0]["verdict"]
    summary["claims"][0]["verdict"] = "PASS" if true_verdict != "PASS" else "FAIL"
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(RunStoreError, match="summary.json fails its checksum"):
        store.Run.open(run).summary
    root = run.parent.parent
    before = fingerprint(run)
    rc, _, err = cli("claims", "--root", root)
    one_line_error(rc, err, run / "summary.json", "fails its checksum", "specscope report")
    rc, out, _ = cli("runs", "--root", root)
    assert rc in (0, None) and "(damaged)" in out and "summary.json fails its checksum" in out.replace("\n", "")
    assert store.list_runs(root).problem.str.contains("specscope report").all()
    assert fingerprint(run) == before  # the readers wrote nothing
    rc, _, err = cli("report", run)
    assert rc in (0, None), err
    assert store.Run.open(run).summary["claims"][0]["verdict"] == true_verdict
    rc, out, _ = cli("claims", "--root", root, "--format", "json")
    assert rc in (0, None) and json.loads(out)[0]["verdict"] == true_verdict
    assert (store.list_runs(root).problem == "").all()


def test_a_lost_summary_is_damage_not_a_run_without_claims(finished, copy_of, cli):
    """A complete run records that it wrote summary.json: with the file gone, `claims` does not quietly count
    one seed fewer, `runs` flags the run with the fix for that run, and `report` rewrites it."""
    run = copy_of(finished)
    (run / "summary.json").unlink()
    root = run.parent.parent
    rc, _, err = cli("claims", "--root", root)
    one_line_error(rc, err, run / "summary.json", "is missing", f"specscope report {run}")
    rc, out, _ = cli("runs", "--root", root)
    assert rc in (0, None) and "complete (damaged)" in out
    assert f"specscope report {run}" in store.list_runs(root).problem[0]
    rc, _, err = cli("report", run)
    assert rc in (0, None), err
    rc, out, _ = cli("claims", "--root", root, "--format", "json")
    assert rc in (0, None) and json.loads(out) and (store.list_runs(root).problem == "").all()


@pytest.mark.parametrize("damage", ["flipped", "deleted"])
def test_a_damaged_progress_file_is_flagged_by_runs(killed, copy_of, cli, damage):
    run = copy_of(killed)
    flip_bit(run / "progress.json") if damage == "flipped" else (run / "progress.json").unlink()
    rc, out, _ = cli("runs", "--root", run.parent.parent)
    assert rc in (0, None) and "incomplete (damaged)" in out and "progress.json" in out
    assert "cannot continue" in store.list_runs(run.parent.parent).problem[0]


DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON nested past Python's recursion limit: a RecursionError traceback


@pytest.mark.parametrize("content", ["5", "[{}]", '{"run_id": "x"', "\xff\xfe not utf-8", DEEP])
@pytest.mark.parametrize("command", ["report", "export", "resume"])
def test_malformed_config_json(finished, copy_of, cli, tmp_path, content, command):
    run = copy_of(finished)
    (run / "config.json").write_bytes(content.encode("latin-1"))
    before = fingerprint(run)
    argv = {"report": ["report", run], "export": ["export", run, "--out", tmp_path / "x.csv"],
            "resume": ["run", "--resume", run]}[command]
    rc, _, err = cli(*argv)
    one_line_error(rc, err, run / "config.json")
    assert fingerprint(run) == before


def test_a_config_nested_thousands_deep_is_one_problem_among_good_runs(finished, copy_of, cli, tmp_path):
    """`runs` and `claims` ended in a RecursionError traceback, hiding every good run beside the damaged one."""
    run = copy_of(finished)
    shutil.copytree(run, run.parent / "good")
    (run / "config.json").write_text(DEEP)
    rc, out, _ = cli("runs", "--root", tmp_path / "runs")
    assert rc in (0, None) and "complete" in out and "unreadable" in out and "config.json" in out
    rc, _, err = cli("claims", "--root", tmp_path / "runs")
    one_line_error(rc, err, run / "config.json")


@pytest.mark.parametrize("command", ["export", "report", "compare"])
@pytest.mark.parametrize("arm", ["l2", "lrd"])
def test_readers_refuse_a_database_that_lost_records_progress_counts(killed, copy_of, cli, tmp_path, command, arm):
    """A killed run's -wal file flipped or truncated reads as a valid, shorter database: `export` wrote a CSV of
    0 of 364 rows with exit 0. progress.json's counts (finished arm l2, lrd's checkpoint) now catch it, as
    `--resume` did."""
    run = copy_of(killed)
    with sqlite3.connect(run / "metrics.sqlite") as con:
        con.execute("DELETE FROM metrics WHERE arm = ? AND rowid % 5 = 0", (arm,))
    con.close()
    before = fingerprint(run)
    args = {"export": ("export", run, "--out", tmp_path / "x.csv"), "report": ("report", run),
            "compare": ("compare", run, run, "--out", tmp_path / "cmp")}[command]
    rc, _, err = cli(*args)
    one_line_error(rc, err, "lost records", f"'{arm}'", "--salvage")
    assert fingerprint(run) == before and not (tmp_path / "x.csv").exists()


def test_salvage_past_a_damaged_progress_json_blames_it_not_the_database(finished, copy_of, cli, tmp_path):
    """The page read "SALVAGED FROM A DAMAGED DATABASE" and summary.json "metrics.sqlite is damaged (...progress.json
    fails its checksum...)" over a whole database."""
    run = copy_of(finished)
    truncate(run / "progress.json")
    rc, out, err = cli("report", run, "--salvage")
    assert rc in (0, None), err
    page = (run / "report.html").read_text()
    assert "<title>SALVAGED: RECORD COUNTS NOT CHECKED — grokking" in page and "DAMAGED DATABASE" not in page
    salvaged = json.loads((run / "summary.json").read_text())["salvaged"]
    assert "progress.json" in salvaged and "their counts unchecked" in salvaged and " is damaged (" not in salvaged
    rc, out, err = cli("claims", "--root", tmp_path / "runs")
    assert "(salvaged: record counts not checked)" in " ".join(out.split())


def test_a_damaged_last_step_or_record_count_is_named_by_runs(finished, copy_of, cli, tmp_path):
    """run_info's counters carried no check: a flipped bit in last_step listed a 2000-step run at step 6096."""
    run = copy_of(finished)
    con = sqlite3.connect(run / "metrics.sqlite")
    with con:
        con.execute("UPDATE run_info SET value = value + 4096 WHERE key = 'last_step'")
    con.close()
    before = fingerprint(run)
    rc, out, err = cli("runs", "--root", tmp_path / "runs")
    said = " ".join(out.split())
    assert rc in (0, None) and "run_info counters" in said and "fail their check" in said, out
    assert fingerprint(run) == before


def test_runs_names_a_database_it_cannot_read(finished, copy_of, cli, tmp_path):
    """A complete run whose database is unreadable was listed `complete` with a blank last step and nothing else."""
    run = copy_of(finished)
    (run / "metrics.sqlite").write_bytes(b"not a database" * 100)
    before = fingerprint(run)
    rc, out, err = cli("runs", "--root", tmp_path / "runs")
    assert rc == 0, err
    assert "(damaged)" in out and "metrics.sqlite" in out and "--salvage" in out
    assert fingerprint(run) == before


def test_runs_lists_a_run_killed_before_its_config_was_written(finished, copy_of, cli, tmp_path):
    run = copy_of(finished)
    (run / "config.json").unlink()
    rc, out, err = cli("runs", "--root", tmp_path / "runs")
    assert rc == 0 and "no runs under" not in out, out
    assert "unreadable" in out and "config.json" in out


def test_salvage_after_lost_records_says_so_in_what_it_writes(killed, copy_of, cli, tmp_path):
    """The count check says `--salvage reads what is left`; what --salvage then wrote was not marked."""
    run = copy_of(killed)
    with sqlite3.connect(run / "metrics.sqlite") as con:
        con.execute("DELETE FROM metrics WHERE arm = 'l2' AND rowid % 5 = 0")
    con.close()
    rc, out, err = cli("export", run, "--out", tmp_path / "x.csv", "--salvage")
    assert rc == 0, err
    assert (tmp_path / "x.salvaged.csv").is_file() and not (tmp_path / "x.csv").exists()
    rc, _, err = cli("report", run, "--salvage")
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert "records lost" in summary["salvaged"] and "SALVAGED" in (run / "report.html").read_text()


@pytest.mark.parametrize("command", ["export", "report", "compare", "resume", "runs"])
def test_another_runs_config_json_is_refused(finished, killed, copy_of, cli, tmp_path, command):
    """config.json copied over from another run was taken as the run's own: every reader used the other run's id
    and settings, and --resume trained the run's unfinished arms on under the other run's config, then marked the
    mixture complete. The database records which run it was created for."""
    run = copy_of(killed)
    shutil.copy(finished / "config.json", run / "config.json")
    before = fingerprint(run)
    argv = {"export": ["export", run, "--out", tmp_path / "x.csv"], "report": ["report", run],
            "compare": ["compare", run, finished, "--out", tmp_path / "cmp"], "resume": ["run", "--resume", run],
            "runs": ["runs", "--root", tmp_path / "runs"]}[command]
    rc, out, err = cli(*argv)
    if command == "runs":  # listed, with the problem named
        assert rc in (0, None) and "replaced by another run's" in " ".join(out.split())
    else:
        one_line_error(rc, err, run / "config.json", "replaced by another run's")
    assert fingerprint(run) == before


@pytest.mark.parametrize("damage", ["truncated", "another run's", "deleted"])
@pytest.mark.parametrize("command", ["export", "report", "compare"])
def test_a_damaged_or_foreign_progress_json_is_an_error_for_every_reader(killed, copy_of, cli, tmp_path, command, damage):
    """A damaged or deleted progress.json turned the readers' record-count check off without a word (exit 0): a
    database that had lost records then exported as complete. Another run's progress.json is named as such."""
    run = copy_of(killed)
    if damage == "deleted":  # config.json records that the run keeps one
        (run / "progress.json").unlink()
    elif damage == "truncated":
        truncate(run / "progress.json")
    else:
        progress = json.loads((run / "progress.json").read_text())
        progress["run_id"] = "someone-else"
        from specscope.store import integrity
        (run / "progress.json").unlink()
        integrity.write_json(run / "progress.json", {k: v for k, v in progress.items() if k != "sha256"}, checksum=True)
    before = fingerprint(run)
    argv = {"export": ["export", run, "--out", tmp_path / "x.csv"], "report": ["report", run],
            "compare": ["compare", run, run, "--out", tmp_path / "cmp"]}[command]
    rc, _, err = cli(*argv)
    said = {"truncated": [], "another run's": ["'someone-else'"], "deleted": ["is missing"]}[damage]
    one_line_error(rc, err, run / "progress.json", "--salvage", *said)
    assert fingerprint(run) == before
    with pytest.warns(RuntimeWarning, match="record counts not checked"):
        assert len(store.load(run, salvage=True))


def test_claims_names_a_run_whose_database_is_another_runs(finished, killed, copy_of, cli, tmp_path):
    """`claims` listed the verdicts of a run whose metrics.sqlite was replaced by another run's as sound (exit 0,
    no word). The run's files disagree on which run it is: as for a missing config.json, one error."""
    run = copy_of(finished)
    shutil.copy(killed / "metrics.sqlite", run / "metrics.sqlite")
    rc, out, err = cli("claims", "--root", tmp_path / "runs")
    # config.json, progress.json and summary.json agree: the database is the file to restore (it blamed config.json)
    one_line_error(rc, err, run / "metrics.sqlite", "the database was copied over from another run",
                   "restore this run's metrics.sqlite")


@pytest.mark.parametrize("name", ["summary.json", "progress.json"])
def test_another_runs_summary_or_progress_json_is_named_by_runs_and_claims(finished, copy_of, cli, tmp_path, name):
    """Another run's summary.json (checksum intact) was listed by `claims` as this run's claims, and neither file
    was flagged by `runs`."""
    import copy as _copy

    from specscope.store import integrity

    run = copy_of(finished)
    data = json.loads((run / name).read_text())
    other = {k: v for k, v in _copy.deepcopy(data).items() if k != "sha256"} | {"run_id": "someone-else"}
    (run / name).unlink()
    integrity.write_json(run / name, other, checksum=True)
    rc, out, _ = cli("runs", "--root", tmp_path / "runs")
    assert rc in (0, None) and "is run 'someone-else''s, not this run's" in " ".join(out.split())
    rc, _, err = cli("claims", "--root", tmp_path / "runs")
    if name == "summary.json":
        one_line_error(rc, err, run / name, "copied over from another run")
    else:  # the claims are this run's; they are shown with the damage named
        assert rc in (0, None) and "its progress.json is damaged" in err and "someone-else" in err


@pytest.mark.parametrize("checksums", [True, False])
def test_text_stored_where_a_number_belongs_is_one_error(finished, copy_of, cli, tmp_path, checksums):
    """`value = 'abc'` in a record (SQLite's integrity check passes it) was a pandas ValueError traceback from
    export, report and compare, --salvage too. Record checksums catch it; a database from before them is checked
    for numbers."""
    run = copy_of(finished)
    with sqlite3.connect(run / "metrics.sqlite") as con:
        con.execute("UPDATE metrics SET value = 'abc' WHERE rowid = 3")
        if not checksums:  # as a database migrated from before checksums: every record older than them
            con.execute("UPDATE metrics SET checksum = NULL")
            con.execute("UPDATE run_info SET value = (SELECT max(rowid) + 1 FROM metrics) WHERE key = 'checksums_from'")
    con.close()
    rc, _, err = cli("export", run, "--out", tmp_path / "x.csv")
    one_line_error(rc, err, run / "metrics.sqlite", "fail their checksum" if checksums else "not a number", "--salvage")
    with pytest.warns(RuntimeWarning):
        assert len(store.load(run, salvage=True)) == len(store.load(finished)) - 1


def test_a_config_json_whose_lab_changed_is_named(finished, copy_of, cli, tmp_path):
    """The lab name is outside config_sha256: a flipped 'grokking' -> 'sed' gave "unknown config key ... for lab
    'sed'" from report and --resume without naming config.json, and export, runs and claims took it as a sed run."""
    run = copy_of(finished)
    meta = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**meta, "lab": "sed"}))
    for argv in (["report", run], ["export", run, "--out", tmp_path / "x.csv"], ["run", "--resume", run]):
        rc, _, err = cli(*argv)
        one_line_error(rc, err, run / "config.json", "lab 'grokking'")


def test_a_folder_in_place_of_a_checkpoint_is_named_with_the_fix(killed, copy_of, cli):
    """It said "does not exist; start a new run", though the path exists and deleting it restarts the arm."""
    run = copy_of(killed)
    (checkpoint,) = (run / "checkpoints").glob("*.pt")
    checkpoint.unlink()
    checkpoint.mkdir()
    rc, _, err = cli("run", "--resume", run)
    one_line_error(rc, err, checkpoint, "is a folder", "delete it")


def test_another_runs_checkpoint_is_named_as_such(killed, copy_of, cli):
    """A checkpoint copied over from another run was reported as the database having lost records."""
    from specscope.train import load_checkpoint, save_checkpoint

    run = copy_of(killed)
    (checkpoint,) = (run / "checkpoints").glob("*.pt")
    payload = load_checkpoint(checkpoint)
    payload.pop("format")
    save_checkpoint(checkpoint, {**payload, "run_id": "someone-else"})
    rc, _, err = cli("run", "--resume", run)
    one_line_error(rc, err, checkpoint, "'someone-else'", "copied over from another run", "delete it")


def test_a_byte_of_the_schema_text_that_is_no_utf8_is_a_damaged_file_for_every_reader(finished, copy_of, cli, tmp_path):
    """SQLite quotes a damaged schema's bytes in its message, which Python's sqlite3 then fails to decode: `runs`
    and `claims` stopped at a UnicodeDecodeError naming no file (every other run unlisted), and `export --salvage`
    printed a traceback from the table's column list. Byte 0xF2 (no valid UTF-8 after it) over the schema text."""
    run = copy_of(finished)
    db = run / "metrics.sqlite"
    clean = db.read_bytes()
    start = clean.index(b"CREATE TABLE metrics")
    hits = 0
    for at in range(start, start + 600, 7):
        damaged = bytearray(clean)
        damaged[at] = 0xF2
        db.write_bytes(bytes(damaged))
        rc, out, err = cli("runs", "--root", tmp_path / "runs")
        assert rc == 0 and "Traceback" not in err, (at, err)
        if "metrics.sqlite" in out:  # named as the damaged file
            hits += 1
        for salvage in ((), ("--salvage",)):
            rc, out, err = cli("export", run, "--out", tmp_path / f"x{at}{len(salvage)}.csv", *salvage)
            assert rc in (0, 2) and "Traceback" not in err, (at, salvage, err)
            if rc == 2:
                one_line_error(rc, err, db)
    assert hits > 40  # most of these bytes are read when the schema is parsed


def test_export_takes_its_format_from_the_outs_suffix_and_refuses_a_mismatch(finished, copy_of, cli, tmp_path):
    """`export RUN --out y.parquet` wrote CSV text into y.parquet and said "wrote y.parquet"."""
    import pandas as pd

    run = copy_of(finished)
    rc, out, err = cli("export", run, "--out", tmp_path / "y.parquet")
    assert rc in (0, None), err
    assert len(pd.read_parquet(tmp_path / "y.parquet")) == len(store.load(run))
    rc, out, err = cli("export", run, "--format", "csv", "--out", tmp_path / "z.parquet")
    one_line_error(rc, err, "ends in .parquet but --format is 'csv'")
    assert not (tmp_path / "z.parquet").exists()


@pytest.mark.parametrize("keep", [0.5, 0.75, 0.9])
def test_a_salvages_warnings_count_the_records_it_exports(finished, copy_of, cli, tmp_path, keep):
    """A damaged page can give records without a step (all NULL), which cannot be placed: they were counted by the
    warnings ("read the 176 others") and dropped after (151 rows written)."""
    import re

    run = copy_of(finished)
    truncate(run / "metrics.sqlite", keep)
    rc, _, err = cli("export", run, "--out", tmp_path / "x.csv", "--salvage")
    rows = len(pd.read_csv(tmp_path / "x.salvaged.csv"))
    counts = [int(n) for n in re.findall(r"read (?:the )?(\d+) (?:records|others)", err)]
    assert rc == 0 and counts and counts[-1] == rows


def test_a_status_edited_to_complete_is_not_believed(killed, copy_of, cli, finished, tmp_path):
    """config.json's status is outside its checksums (it changes as the run goes); a killed run edited to say
    "complete" was listed, reported and counted by `claims` as finished. progress.json (checksummed) names the
    lab's parts and which are done: the run reads as incomplete, `runs` says why, and the resume finishes it."""
    run = copy_of(killed)
    assert cli("report", run)[0] in (0, None)  # a summary.json of the records so far, as `claims` reads
    meta = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(meta | {"status": "complete"}))
    assert store.Run.open(run).status == "incomplete"
    listed = store.list_runs(run.parent.parent)
    assert listed.status[0] == "incomplete" and "status was edited" in listed.problem[0] and "'lrd'" in listed.problem[0]
    rc, out, err = cli("claims", "--root", run.parent.parent)
    assert "no recorded claims" in out and f"{run} (incomplete)" in err, (out, err)
    rc, _, err = cli("run", "--resume", run)
    assert rc == 0, err
    assert store.Run.open(run).status == "complete" and store.list_runs(run.parent.parent).problem[0] == ""
    pd.testing.assert_frame_equal(metrics(run), metrics(finished))
