"""A writer killed with SIGKILL, torn WAL tails, corrupt and truncated databases."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from specscope.errors import RunStoreError
from specscope.records import Record
from specscope.store import Run, list_runs, load
from specscope.store import checksum
from specscope.store.sqlite import COLUMNS, READ_CHECKS

B = 200  # records per batch

WRITER = textwrap.dedent(f"""
    import sys
    from specscope.records import Record
    from specscope.store import Run
    run = Run.create(sys.argv[1], "crash", {{"seed": 0}}, run_id="victim", flush_every=10**9, flush_seconds=1e9)
    b = 0
    while True:  # batch b = {B} records at step b; flushed in one transaction, then reported
        run.append(Record(b, f"blocks.{{i}}.attn.q", "stable_rank", b + i / {B}, estimator="gram", rows=b)
                   for i in range({B}))
        run.flush()
        print(b, flush=True)
        b += 1
""")


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """Run a real writer process, read it from here while it runs, SIGKILL it mid-stream."""
    root = tmp_path_factory.mktemp("runs")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        reported = [int(proc.stdout.readline()) for _ in range(5)]
        live = {"status": list_runs(root).status.tolist(), "rows": len(load(root / "crash" / "victim"))}
        reported += [int(proc.stdout.readline()) for _ in range(3)]
        os.kill(proc.pid, signal.SIGKILL)  # most likely in the middle of writing batch reported[-1] + 1
        proc.wait(timeout=60)
        reported += [int(line) for line in proc.stdout.read().split()]  # printed before the kill, not yet read
    finally:
        if proc.poll() is None:
            proc.kill()
    return root / "crash" / "victim", reported, live, root


def test_reader_sees_flushed_batches_while_the_writer_runs(killed_run):
    _, _, live, _ = killed_run
    assert live["status"] == ["running"]
    assert live["rows"] >= 5 * B and live["rows"] % B == 0


def test_every_flushed_batch_survives_sigkill(killed_run):
    path, reported, _, _ = killed_run
    df = load(path)
    per_step = df.groupby("step").size()
    last = reported[-1]
    assert set(range(last + 1)) <= set(per_step.index)  # every batch flushed before the kill
    assert set(per_step.index) == set(range(per_step.index.max() + 1))  # nothing else
    assert per_step.index.max() <= last + 1  # at most the batch in flight, and then whole
    assert (per_step == B).all()  # no batch is half there
    first = df[df.step == 3].sort_values("layer").iloc[0]
    assert first.value == 3.0 and first.estimator == "gram" and first.rows == 3


def test_killed_run_reads_incomplete(killed_run):
    path, reported, _, root = killed_run
    assert json.loads((path / "config.json").read_text())["status"] == "running"  # what the process left
    assert Run.open(path).status == "incomplete"
    df = list_runs(root)
    assert df.status.tolist() == ["incomplete"] and df.steps[0] >= reported[-1]


def test_torn_wal_tail_keeps_committed_batches(killed_run, tmp_path):
    """A partly written frame at the end of the WAL (a write cut off by the kill) is ignored."""
    path, reported, _, _ = killed_run
    copy = tmp_path / "crash" / "victim"
    shutil.copytree(path, copy)
    wal = copy / "metrics.sqlite-wal"
    if not wal.exists() or wal.stat().st_size == 0:
        pytest.skip("the WAL was checkpointed away before the kill")
    with open(wal, "ab") as f:
        f.write(os.urandom(3000))
    before = load(path)
    assert load(copy).drop(columns="run_id").equals(before.drop(columns="run_id"))
    with open(wal, "r+b") as f:  # cut the WAL in the middle: a prefix of whole batches remains
        f.truncate(wal.stat().st_size // 2)
    per_step = load(copy).groupby("step").size()
    assert (per_step == B).all() and set(per_step.index) == set(range(len(per_step)))


def make_run(tmp_path, n=20000):
    with Run.create(tmp_path, "demo", {}) as run:
        run.append(Record(i, f"layer{i % 7}", "stable_rank", i / 3, shape="8x8") for i in range(n))
    assert not (run.path / "metrics.sqlite-wal").exists()  # checkpointed on close
    return run.path


@pytest.mark.parametrize("cut", [0.31, 0.47, 0.6])
def test_salvage_reads_every_record_a_seek_can_reach(tmp_path, cut):
    """A range query over the rowids at the cut also steps onto the lost page and fails; the records before the cut
    on the last intact page were skipped 16 rowids at a time (70 of 84 read in one case, rowids 71–84 each readable)."""
    path = make_run(tmp_path)
    db = path / "metrics.sqlite"
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size * int(cut * 100) // 100)
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro&immutable=1", uri=True)  # as the store reads it
    con.execute("PRAGMA writable_schema=ON")  # (the file's real size, not the page count its header promises)
    reachable = []
    for rowid in range(1, 20001):  # make_run's records
        try:
            reachable += con.execute(f"SELECT {', '.join(COLUMNS)}, checksum, 0 FROM metrics WHERE rowid = ?", (rowid,)).fetchall()
        except sqlite3.DatabaseError:
            pass
    con.close()
    cut_through = checksum.mismatched(pd.DataFrame(reachable, columns=[*COLUMNS, *READ_CHECKS]))  # a record the cut went through reads with zeros for its lost bytes
    assert len(cut_through) <= 1
    with pytest.warns(RuntimeWarning, match="rowids unreadable"):
        part = load(path, salvage=True)
    assert 0 < len(part) == len(reachable) - len(cut_through)


def test_not_a_database_names_the_file(tmp_path):
    path = make_run(tmp_path, n=10)
    (path / "metrics.sqlite").write_bytes(b"this is not sqlite " * 500)
    with pytest.raises(RunStoreError, match=str(path / "metrics.sqlite")):
        load(path)
    assert list_runs(tmp_path).status.tolist() == ["complete"]  # listing still works


def test_truncated_database(tmp_path):
    path = make_run(tmp_path)
    full = load(path)
    db = path / "metrics.sqlite"
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size * 6 // 10)
    with pytest.raises(RunStoreError, match=str(db)):
        load(path)
    with pytest.warns(RuntimeWarning, match="damaged database"):
        part = load(path, salvage=True)
    assert "damage" in part.attrs
    assert 0 < len(part) < len(full)
    merged = part.merge(full, how="left", indicator=True)
    assert (merged["_merge"] == "both").all()  # every salvaged row is a real row, unchanged
