"""Run directories: create/append/flush/load, never overwrite, statuses, resume, NaN, injection-like names."""

import json
import math
import sqlite3
import subprocess
import sys

import pytest

from specscope.errors import ConfigError, RunStoreError
from specscope.records import Record
from specscope.store import STATUSES, Run, list_runs, load, new_run_id


def recs(step, n=3, arm=""):
    return [Record(step, f"blocks.{i}.mlp", "stable_rank", step + i / 10, arm=arm, estimator="gram", rows=64,
                   shape="64x32") for i in range(n)]


def test_layout_and_metadata(tmp_path):
    run = Run.create(tmp_path, "demo", {"seed": 7, "device": "cpu", "width": 8})
    assert run.path == tmp_path / "demo" / run.id and run.lab == "demo"
    for name in ("config.json", "metrics.sqlite", "checkpoints", "figures", "run.lock"):
        assert (run.path / name).exists(), name
    meta = json.loads((run.path / "config.json").read_text())
    assert meta["config"] == {"seed": 7, "device": "cpu", "width": 8} and meta["seed"] == 7
    assert meta["status"] == "running" and meta["versions"]["python"] and "git_commit" in meta
    run.close()
    assert Run.open(run.path).status == "complete" and Run.open(run.path).config["width"] == 8


def test_git_commit_absent_outside_a_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # tmp is not inside a git repository
    run = Run.create(tmp_path, "demo", {})
    assert run.meta["git_commit"] is None
    run.close()


def test_round_trip_with_buffering(tmp_path):
    run = Run.create(tmp_path, "demo", {}, flush_every=5, flush_seconds=1e9)
    run.append(recs(0))  # 3 records: buffered
    assert len(load(run.path)) == 0
    run.append(recs(1))  # 6 >= 5: one batch written
    assert len(load(run.path)) == 6
    run.log(2, {"loss": 1.25, "val_loss": 1.5}, arm="adamw")
    run.close()
    df = load(run)
    assert list(df.columns) == ["run_id", "step", "layer", "metric", "value", "arm", "estimator", "rows", "shape", "flag"]
    assert len(df) == 8 and (df.run_id == run.id).all()
    expected = [r.as_dict() for r in recs(0) + recs(1)] + [
        Record(2, "", "loss", 1.25, arm="adamw").as_dict(), Record(2, "", "val_loss", 1.5, arm="adamw").as_dict()]
    assert df.drop(columns="run_id").to_dict("records") == expected
    assert df.step.dtype == "int64" and df.value.dtype == "float64" and df.rows.dtype == "int64"
    assert load(run, metric="loss").value.tolist() == [1.25]
    assert len(load(run, layer=["blocks.0.mlp", "blocks.2.mlp"], arm="")) == 4


def test_time_based_flush(tmp_path):
    run = Run.create(tmp_path, "demo", {}, flush_every=10**9, flush_seconds=0.0)
    run.append(recs(0))
    assert len(load(run.path)) == 3  # written by append itself, not by close
    run.close()


def test_nan_and_inf_round_trip(tmp_path):
    with Run.create(tmp_path, "demo", {}) as run:
        run.append([Record(0, "a", "m", math.nan, flag="nonfinite"), Record(1, "a", "m", math.inf),
                    Record(2, "a", "m", -math.inf), Record(3, "a", "m", -0.0)])
    v = load(run).value.tolist()
    assert math.isnan(v[0]) and v[1:3] == [math.inf, -math.inf] and v[3] == 0.0
    assert load(run).flag.tolist()[0] == "nonfinite"


def test_numpy_scalars_are_stored(tmp_path):
    np = pytest.importorskip("numpy")
    with Run.create(tmp_path, "demo", {}) as run:
        run.append([Record(np.int64(3), "a", "m", np.float32(0.5), rows=np.int64(9))])
    assert load(run)[["step", "value", "rows"]].values.tolist() == [[3, 0.5, 9]]


def test_injection_like_names_are_data(tmp_path):
    evil = "x'); DROP TABLE metrics;--"
    with Run.create(tmp_path, "demo", {}) as run:
        run.append([Record(0, evil, evil, 1.0, arm=evil, estimator=evil, shape=evil, flag=evil), Record(0, "b", "m", 2.0)])
        run.delete_after(-1, arm=evil)  # deletes only the evil arm's rows
    df = load(run)
    assert df.layer.tolist() == ["b"]
    with Run.create(tmp_path, "demo", {}) as run2:
        run2.append([Record(0, evil, evil, 1.0, arm=evil)])
    assert load(run2, layer=evil, metric=evil, arm=evil).value.tolist() == [1.0]
    assert load(run2, layer="' OR '1'='1").empty


def test_never_overwrite(tmp_path):
    run = Run.create(tmp_path, "demo", {"a": 1}, run_id="fixed")
    run.close()
    with pytest.raises(RunStoreError, match="fixed"):
        Run.create(tmp_path, "demo", {"a": 2}, run_id="fixed")
    assert Run.open(run.path).config == {"a": 1}
    (tmp_path / "demo" / "bare").mkdir()  # a directory that exists, even empty, is taken
    with pytest.raises(RunStoreError, match="bare"):
        Run.create(tmp_path, "demo", {}, run_id="bare")


@pytest.mark.parametrize("bad", ["", "..", "a/b", ".hidden", "x y"])
def test_bad_names(tmp_path, bad):
    with pytest.raises(ConfigError):
        Run.create(tmp_path, "demo", {}, run_id=bad)


def test_run_ids_sort_by_time_and_differ():
    ids = [new_run_id() for _ in range(50)]
    assert len(set(ids)) == 50 and all(len(i) == len(ids[0]) for i in ids)
    assert sorted(ids, key=lambda i: i[:16]) == ids  # the time prefix never goes backwards


def test_statuses_and_context_manager(tmp_path):
    with pytest.raises(RuntimeError):
        with Run.create(tmp_path, "demo", {}) as failed:
            failed.append(recs(0))
            raise RuntimeError("boom")
    assert Run.open(failed.path).status == "failed" and len(load(failed.path)) == 3  # buffered records kept
    with pytest.raises(KeyboardInterrupt):
        with Run.create(tmp_path, "demo", {}) as interrupted:
            raise KeyboardInterrupt
    assert Run.open(interrupted.path).status == "interrupted"
    run = Run.create(tmp_path, "demo", {})
    for s in STATUSES:
        run.set_status(s)
        assert json.loads((run.path / "config.json").read_text())["status"] == s
    run.set_status("interrupted")
    run.close()  # an explicit status survives close
    assert Run.open(run.path).status == "interrupted"
    with pytest.raises(ConfigError, match="complete"):
        run.set_status("done")


def test_status_running_while_open_then_incomplete_when_abandoned(tmp_path):
    run = Run.create(tmp_path, "demo", {})
    assert Run.open(run.path).status == "running"  # lock held by this process
    assert list_runs(tmp_path).status.tolist() == ["running"]
    run._release()  # as if the process died: lock gone, config.json still says running
    assert json.loads((run.path / "config.json").read_text())["status"] == "running"
    assert Run.open(run.path).status == "incomplete"
    assert list_runs(tmp_path).status.tolist() == ["incomplete"]


@pytest.mark.parametrize("pid", ["abc", None, -3, True])
def test_a_run_without_its_lock_file_and_a_pid_edited_by_hand_reads_without_a_traceback(tmp_path, pid):
    """No run.lock and a config.json `pid` of "abc": runs, export and report ended in os.kill's TypeError."""
    run = Run.create(tmp_path, "demo", {})
    run.append(recs(0))
    run.flush()
    run._release()
    (run.path / "run.lock").unlink()
    meta = json.loads((run.path / "config.json").read_text())
    (run.path / "config.json").write_text(json.dumps({**meta, "pid": pid}))
    assert Run.open(run.path).status == "running"  # nothing decisive: the status on disk
    assert list_runs(tmp_path).status.tolist() == ["running"]
    assert len(load(run.path)) == 3


def test_second_writer_is_refused(tmp_path):
    run = Run.create(tmp_path, "demo", {})
    other = Run.open(run.path)
    with pytest.raises(RunStoreError, match="another live process"):
        other.append(recs(0))
    run.close()


def test_resume_delete_after(tmp_path):
    run = Run.create(tmp_path, "demo", {})
    for step in range(10):
        run.append(recs(step, n=1, arm="a") + recs(step, n=1, arm="b"))
    run.flush()
    run.append(recs(10, n=1, arm="a"))  # buffered when the process "dies": lost
    run._release()  # crash: lock gone, status on disk still "running"
    resumed = Run.open(run.path)
    assert resumed.status == "incomplete"
    assert resumed.delete_after(5, "a") == 4  # steps 6..9 of arm a
    assert resumed.status == "running"
    resumed.append(recs(6, n=1, arm="a"))
    resumed.close()
    df = load(run.path)
    assert sorted(df[df.arm == "a"].step) == [0, 1, 2, 3, 4, 5, 6] and len(df[df.arm == "b"]) == 10
    assert list_runs(tmp_path).steps.tolist() == [9] and Run.open(run.path).status == "complete"


def test_steps_are_listed_after_a_delete_on_an_empty_run(tmp_path):
    """A new arm clears its stale records first (delete_after on an empty table): the progress counter
    must still follow the records appended afterwards."""
    run = Run.create(tmp_path, "demo", {})
    assert run.delete_after(-1, "a") == 0
    run.append(recs(3, n=1, arm="a") + recs(7, n=1, arm="a"))
    run.close()
    assert list_runs(tmp_path).steps.tolist() == [7]


def test_summary_does_not_touch_status(tmp_path):
    with Run.create(tmp_path, "demo", {}) as run:
        pass
    reader = Run.open(run.path)
    reader.write_summary({"claims": [{"id": "RF-1", "verdict": "PASS"}], "loss": math.nan})
    assert Run.open(run.path).summary["claims"][0]["verdict"] == "PASS"
    assert Run.open(run.path).status == "complete"


def test_list_runs_newest_first_and_lab_filter(tmp_path):
    ids = []
    for lab in ("a", "b", "a"):
        with Run.create(tmp_path, lab, {}) as run:
            run.log(3, {"loss": 1.0})
        ids.append(run.id)
    df = list_runs(tmp_path)
    assert df.run_id.tolist() == ids[::-1]
    assert list(df.columns) == ["run_id", "lab", "status", "created", "steps", "records", "path", "problem"]
    assert list_runs(tmp_path, lab="a").run_id.tolist() == [ids[2], ids[0]]
    assert list_runs(tmp_path / "nothing").empty
    (tmp_path / "a" / "junk").mkdir()  # no config.json: not a run, not listed
    (tmp_path / "b" / "broken").mkdir()
    (tmp_path / "b" / "broken" / "config.json").write_text("{not json")
    df = list_runs(tmp_path)
    assert len(df) == 4 and df.set_index("run_id").loc["broken", "status"] == "unreadable"
    assert "config.json is unreadable" in df.set_index("run_id").loc["broken", "problem"]
    assert (df[df.run_id != "broken"].problem == "").all()


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(RunStoreError, match="no run directory at .*nope.*specscope runs"):
        Run.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunStoreError, match=r"empty is not a run directory .*runs/LAB/RUN_ID"):  # a wrong path, not a damaged run
        load(tmp_path / "empty")
    run = Run.create(tmp_path, "demo", {})
    run.close()
    (run.path / "config.json").rename(run.path / "config.json.bak")
    with pytest.raises(RunStoreError, match=r"config\.json is missing.*restore config\.json"):
        load(run.path)
    (run.path / "config.json.bak").rename(run.path / "config.json")
    (run.path / "metrics.sqlite").unlink()
    with pytest.raises(RunStoreError, match=r"metrics\.sqlite does not exist"):
        load(run.path)
    (problem,) = list_runs(tmp_path).problem
    assert "metrics.sqlite does not exist" in problem and "--salvage" not in problem  # nothing left for it to read


def test_newer_schema_is_refused(tmp_path):
    with Run.create(tmp_path, "demo", {}) as run:
        run.log(0, {"loss": 1.0})
    con = sqlite3.connect(run.path / "metrics.sqlite")
    con.execute("UPDATE schema_version SET version = 99")
    con.commit()
    con.close()
    with pytest.raises(RunStoreError, match="upgrade specscope"):
        load(run)


def test_a_database_from_before_checksums_loads_and_its_resume_checksums_new_records(tmp_path):
    """Schema 1 had no checksum column: such a run still loads; a writer adds the column (NULL in the old
    records, which stay unchecked) and every record it appends carries a checksum."""
    with Run.create(tmp_path, "demo", {}) as run:
        run.log(0, {"loss": 1.0, "acc": 0.5})
    db = run.path / "metrics.sqlite"
    con = sqlite3.connect(db)
    con.execute("ALTER TABLE metrics DROP COLUMN checksum")
    con.execute("UPDATE schema_version SET version = 1")
    con.commit()
    con.close()
    assert list(load(run.path).value) == [1.0, 0.5]
    with Run.open(run.path) as resumed:
        resumed.log(1, {"loss": 0.25})
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    assert con.execute("SELECT max(version) FROM schema_version").fetchone() == (2,)
    assert [c is None for (c,) in con.execute("SELECT checksum FROM metrics ORDER BY rowid")] == [True, True, False]
    con.close()
    assert list(load(run.path).value) == [1.0, 0.5, 0.25]
    con = sqlite3.connect(db)
    con.execute("UPDATE metrics SET value = 0.5 WHERE value = 0.25")  # a new record changed: caught
    con.commit()
    con.close()
    with pytest.raises(RunStoreError, match="1 of its 3 records fail their checksum"):
        load(run.path)


def test_concurrent_reader_in_another_process(tmp_path):
    """The writer stays open (lock held, records flushed + some buffered); a separate process reads."""
    run = Run.create(tmp_path, "demo", {}, flush_every=10**9, flush_seconds=1e9)
    run.append(recs(0) + recs(1))
    run.flush()
    run.append(recs(2))  # buffered: not visible to others yet
    code = ("import sys; from specscope.store import load, list_runs; "
            "print(len(load(sys.argv[1])), list_runs(sys.argv[2]).status[0])")
    out = subprocess.run([sys.executable, "-c", code, str(run.path), str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6", "running"]
    run.close()
    assert len(load(run.path)) == 9


def test_a_demos_lab_runs_are_listed_and_found_by_id(tmp_path):
    """`specscope demo` keeps its lab runs inside its own directory (runs/demo/<id>/<lab>/<run_id>): `runs`
    lists them and `report`, `export`, `compare` find them by id, like any run."""
    from specscope.store import find_run

    with Run.create(tmp_path, "demo", {}) as demo:
        with Run.create(demo.path, "random-features", {"dim": 8}) as inner:
            inner.log(0, {"loss": 1.0})
    with Run.create(tmp_path, "random-features", {"dim": 16}) as top:
        top.log(0, {"loss": 2.0})
    df = list_runs(tmp_path)
    assert set(df.run_id) == {demo.id, inner.id, top.id}
    assert set(list_runs(tmp_path, lab="random-features").run_id) == {inner.id, top.id}
    assert find_run(inner.id, tmp_path) == inner.path and find_run(top.id, tmp_path) == top.path
    assert load(find_run(inner.id, tmp_path)).value.tolist() == [1.0]


def test_a_sweeps_runs_are_found_by_the_id_claims_shows():
    """`claims` names a sweep's runs by id, and `export ID --root runs` said "no run" for each of them."""
    import tempfile
    from pathlib import Path

    from specscope.store import find_run

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with Run.create(root / "sweeps" / "grid1" / "runs", "grokking", {}) as point:
            point.log(0, {"loss": 1.0})
        assert find_run(point.id, root) == point.path
        assert find_run(f"grokking/{point.id}", root) == point.path


def test_a_forked_child_neither_writes_the_parents_buffer_again_nor_through_its_connection(tmp_path):
    """A child made by os.fork that exited normally flushed the parent's buffered records at its exit (atexit):
    every one of them was in the run twice."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import os, sys
        from specscope.store import Run
        from specscope.errors import RunStoreError
        run = Run.create(sys.argv[1], "demo", {}, run_id="r", flush_every=10**6, flush_seconds=1e9)
        for step in range(5):
            run.log(step, {"x": float(step)})
        run.flush()
        run.log(5, {"x": 5.0})  # buffered when the child is made
        pid = os.fork()
        if pid == 0:  # the child: a write is refused, and its normal exit (atexit hooks) writes nothing
            try:
                run.log(6, {"x": 6.0})
                run.flush()
            except RunStoreError as e:
                sys.exit(0 if "child forked from it" in str(e) else 4)
            sys.exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        run.close()
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert load(tmp_path / "demo" / "r").step.tolist() == list(range(6))


def test_a_deleted_run_lock_lets_no_second_writer_into_a_live_run(tmp_path):
    """The writer's flock was on run.lock alone: deleted under a live writer, a second process made a new one, took it
    and wrote step 0 a second time. The writer also locks the run's directory, which readers never take."""
    a = Run.create(tmp_path, "api", {"seed": 0})
    a.log(0, {"loss": 1.0})
    a.flush()
    (a.path / "run.lock").unlink()
    code = "import sys; from specscope.store import Run; b = Run.open(sys.argv[1]); b.log(0, {'loss': 9.0}); b.close()"
    out = subprocess.run([sys.executable, "-c", code, str(a.path)], capture_output=True, text=True)
    assert out.returncode != 0 and "is being written by another live process" in out.stderr
    a.log(1, {"loss": 0.5})
    a.close()
    assert load(a.path)[["step", "value"]].values.tolist() == [[0, 1.0], [1, 0.5]]
    assert list_runs(tmp_path).status.tolist() == ["complete"]  # readers: not blocked by the directory's lock


@pytest.mark.parametrize("content", [b"", "foreign"])
def test_an_emptied_or_foreign_metrics_database_is_refused_not_recreated(tmp_path, content):
    """A writer opening a run whose metrics.sqlite was emptied (or replaced by another program's database) created the
    tables anew: the 100 records were gone and the run read as sound."""
    with Run.create(tmp_path, "api", {"seed": 0}, run_id="r") as run:
        for s in range(100):
            run.log(s, {"loss": 1 / (s + 1)})
    if content == "foreign":
        run.metrics_path.unlink()
        con = sqlite3.connect(run.metrics_path)
        con.execute("CREATE TABLE notes (text TEXT)")
        con.close()
    else:
        run.metrics_path.write_bytes(content)
    before = run.metrics_path.read_bytes()
    again = Run.open(run.path)
    with pytest.raises(RunStoreError, match=r"holds no specscope records .*emptied or replaced.*Restore the file"):
        again.log(100, {"loss": 0.0})
    assert run.metrics_path.read_bytes() == before


def test_position_is_a_query_that_leaves_the_status_as_it_is(tmp_path):
    """position() took the writer lock and marked the run "running" (then "complete" at close): a finished run read as
    incomplete meanwhile, a killed one became complete and could no longer be resumed."""
    with Run.create(tmp_path, "api", {"seed": 0}, run_id="r") as run:
        run.log(0, {"loss": 1.0})
        run.log(1, {"loss": 0.5})
    status = list_runs(tmp_path).status.tolist()
    config = (run.path / "config.json").read_bytes()
    reader = Run.open(run.path)
    assert reader.position() == 2
    reader.close()
    assert list_runs(tmp_path).status.tolist() == status and (run.path / "config.json").read_bytes() == config


def test_a_write_the_file_system_refuses_is_named_as_such_not_as_corruption(tmp_path):
    """Under `ulimit -f` the append failed with SQLite's "disk I/O error", reported as a truncated or corrupt file with
    --salvage as the fix; creating a run named the hidden stage folder."""
    code = f"""
import resource, sys
from specscope.store import Run
resource.setrlimit(resource.RLIMIT_FSIZE, ({{0}}, {{0}}))
run = Run.create({str(tmp_path)!r}, "api", {{{{"seed": 0}}}}, run_id=sys.argv[1])
for s in range(2000):
    run.log(s, {{{{"loss": 1.0, "other": 2.0}}}})
run.close()
"""
    for limit, name in ((200_000, "big"), (4096, "small")):
        out = subprocess.run([sys.executable, "-c", code.format(limit), name], capture_output=True, text=True)
        assert "the file system refused the write" in out.stderr and "corrupt" not in out.stderr.splitlines()[-1]
        assert ".creating" not in out.stderr.splitlines()[-1]


@pytest.mark.parametrize("edit", [lambda m: m.pop("progress"), lambda m: m.update(created="2020-01-01T00:00:00Z"),
                                  lambda m: m.update(seed=7), lambda m: m.update(argv=["x"])])
def test_config_json_keys_set_at_creation_are_under_a_checksum(tmp_path, edit):
    """Outside config_sha256, `created`, `versions`, `argv`, `seed` and the `progress` flag could be changed unnoticed; a
    renamed `progress` turned off the check that progress.json is there."""
    run = Run.create(tmp_path, "api", {"seed": 0}, run_id="r", progress=True)
    run.log(0, {"loss": 1.0})
    run.close()
    meta = json.loads((run.path / "config.json").read_text())
    edit(meta)
    (run.path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(RunStoreError, match="fails its fixed_sha256 checksum"):
        load(run.path)


def test_a_run_id_with_a_trailing_slash_or_found_through_a_link_is_one_run(tmp_path, monkeypatch):
    """`lab/ID/` (shell completion from inside the root) was "no run directory"; a lab folder linked under another
    name made one run "exist in several labs"."""
    from specscope.store import find_run

    monkeypatch.chdir(tmp_path)  # the names are not paths from here
    root = tmp_path / "runs"
    with Run.create(root, "random-features", {"dim": 8}) as run:
        run.log(0, {"loss": 1.0})
    assert find_run(f"random-features/{run.id}/", root) == run.path
    assert find_run(f"{run.id}/", root) == run.path
    (root / "alias").symlink_to(root / "random-features")
    assert find_run(run.id, root).resolve() == run.path.resolve()
