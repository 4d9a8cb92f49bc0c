"""SIGKILL at the checkpoint rename and at the database commit (the SPECSCOPE_FAULT test hook), then resume:
the result equals the uninterrupted run's, with one timing record. A killed sweep takes its workers along."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from conftest import QUICK, kill_at, metrics
from specscope import store
from specscope.labs.runner import run_lab
from specscope.store.lock import pid_alive as _pid_alive


def resume_equals_finished(run, finished):
    run_lab("", resume=run)
    assert store.Run.open(run).status == "complete"
    pd.testing.assert_frame_equal(metrics(run), metrics(finished))
    seconds = store.load(run, metric="lab_seconds")
    assert len(seconds) == 1 and seconds.value.iloc[0] > 0


def test_kill_at_checkpoint_rename_then_resume(killed, copy_of, finished):
    run = copy_of(killed)
    assert list((run / "checkpoints").glob(".*.tmp")), "the kill between fsync and rename left no temporary file"
    resume_equals_finished(run, finished)
    assert not list((run / "checkpoints").glob(".*.tmp")), "the resumed run kept the dead writer's temporary file"


def test_kill_at_database_commit_then_resume(tmp_path, finished):
    run = kill_at(tmp_path, "db_commit:7")  # the 7th commit: past the first checkpoints
    resume_equals_finished(run, finished)


def test_a_run_killed_just_before_its_stopping_evaluation_stops_there_on_resume(tmp_path):
    """The checkpoint of step 4 is written before step 4's evaluation, the one whose stop rule ends the arm;
    the resume repeated that evaluation but not the stop, and trained on to the next one."""
    stops = {**QUICK, "arms": ["l2"], "stop_after_grok": True, "grok_threshold": 0.0, "grok_window": 1}
    whole = run_lab("grokking", stops, out=tmp_path / "whole", run_id="whole")
    assert list(store.load(whole, metric="stopped_early").step) == [4]
    run = kill_at(tmp_path / "killed", "db_commit:2", stops)  # after the step-4 checkpoint, before that step's records
    assert (run / "checkpoints" / "l2.pt").is_file() and store.load(run, metric="stopped_early").empty
    resume_equals_finished(run, whole)


def test_resume_after_a_kill_while_the_report_was_written(finished, copy_of):
    """All parts done and timed; killed before `complete`: the resume keeps the one timing record."""
    run = copy_of(finished)
    meta = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**meta, "status": "running", "pid": 2**22 + 1}))
    before = store.load(run, metric="lab_seconds")
    run_lab("", resume=run)
    pd.testing.assert_frame_equal(store.load(run, metric="lab_seconds"), before)


SWEEP = textwrap.dedent("""
    import sys
    from specscope.sweep import run_sweep
    fixed = {"p": 5, "steps": 300, "eval_every": 100, "d_model": 8, "d_ff": 16, "n_heads": 2, "n_layers": 1,
             "grok_window": 2, "batch_size": 8, "arms": ["l2"], "device": "cpu", "checkpoint_every": 20}
    run_sweep("grokking", {"seed": [0, 1]}, fixed, out=sys.argv[1], workers=2)
""")


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:  # gone meanwhile
        return ""


def assert_killing_kills_all(parent: subprocess.Popen, workers: list[int]) -> None:
    """SIGKILL `parent`; every one of its `workers` is gone within 30 s."""
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(_pid_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_pid_alive(w) for w in workers)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_sweep_takes_its_workers_and_resumes(tmp_path):
    from specscope import sweep

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", SWEEP, str(tmp_path)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("*/runs/grokking/*/metrics.sqlite")) and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [c for c in children(parent.pid) if "spawn_main" in cmdline(c)]
        assert workers, "no worker process found"
        assert_killing_kills_all(parent, workers)
    finally:
        if parent.poll() is None:
            parent.kill()
    (sweep_dir,) = tmp_path.iterdir()
    sweep.run_sweep("grokking", {}, resume=sweep_dir, echo=lambda *a: None)
    assert sorted(sweep.summary(sweep_dir)["seed"]) == [0, 1]


SPAWNER = "from sleeper import sleep; from specscope.train.distributed import spawn; spawn(sleep, 2)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_spawn_takes_its_ranks_with_it(tmp_path):
    (tmp_path / "sleeper.py").write_text("import time\n\ndef sleep(rank, world):\n    time.sleep(600)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    parent = subprocess.Popen([sys.executable, "-c", SPAWNER], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        ranks = []
        while len(ranks) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            ranks = [c for c in children(parent.pid) if "spawn_main" in cmdline(c)]
        assert len(ranks) == 2, "the two ranks did not start"
        time.sleep(3)  # past their start-up: the death signal is armed
        assert_killing_kills_all(parent, ranks)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_ctrl_c_prints_the_resume_command(cli, tmp_path, monkeypatch, finished):
    from specscope.train import loop

    step = loop.Trainer._step

    def interrupted_at_5(self, arm, i):
        if i == 5 and arm.name == "lrd":
            os.kill(os.getpid(), signal.SIGINT)  # the loop's handler checkpoints and stops after this step
        return step(self, arm, i)

    monkeypatch.setattr(loop.Trainer, "_step", interrupted_at_5)
    sets = [a for k, v in QUICK.items() for a in ("--set", f"{k}={v}")]
    rc, _, err = cli("run", "grokking", *sets, "--out", tmp_path, "--quiet")
    (run,) = (tmp_path / "grokking").iterdir()
    assert rc == 130 and err.strip() == f"interrupted: run interrupted; resume with: specscope run --resume {run}"
    assert store.Run.open(run).status == "interrupted"
    monkeypatch.setattr(loop.Trainer, "_step", step)
    rc, _, err = cli("run", "--resume", run, "--quiet")
    assert rc == 0, err
    pd.testing.assert_frame_equal(metrics(run), metrics(finished))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups")
def test_ctrl_c_stops_a_sweep_without_starting_queued_points(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) used to let the pool run every queued point first and then
    print one point's `run --resume`; now nothing queued starts and the message names `sweep --resume`."""
    script = SWEEP.replace('{"seed": [0, 1]}', '{"seed": [0, 1, 2, 3, 4, 5]}').replace('"steps": 300', '"steps": 3000')
    wrapper = textwrap.dedent("""
        import sys
        from specscope.cli import interruptible
        body = compile(sys.argv[2], "sweep", "exec")
        interruptible(lambda: exec(body, {"__name__": "sweep"}))()
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", wrapper, str(tmp_path), script], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("*/runs/grokking/*/metrics.sqlite")) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (sweep_dir,) = tmp_path.iterdir()
    assert proc.returncode == 130, err
    assert f"specscope sweep --resume {sweep_dir}" in err and "run --resume" not in err
    assert len(list((sweep_dir / "runs" / "grokking").iterdir())) <= 2  # the two under way; none of the four queued


def test_a_run_killed_while_it_was_being_created_leaves_no_half_made_run(tmp_path):
    """Killed after making its folders, database and config.json, before they appear under the run's name: no run
    directory is left that `runs` would not list and `--resume` would refuse (a folder holding only checkpoints/ and
    figures/, or a 0-byte database and no config.json), only a hidden folder that the next run removes."""
    run = kill_at(tmp_path, "run_create")
    assert not run.exists()
    assert [p.name.endswith(".creating") for p in (tmp_path / "grokking").iterdir()] == [True]
    assert store.list_runs(tmp_path).empty
    again = run_lab("grokking", QUICK, out=tmp_path, run_id="victim")
    assert store.Run.open(again).status == "complete"
    assert [p.name for p in (tmp_path / "grokking").iterdir()] == ["victim"]  # the dead creator's folder is gone


def test_resume_by_run_id_under_runs(killed, copy_of, finished, cli, monkeypatch):
    """`specscope run --resume RUN_ID` finds the run under runs/ as `report` and `export` find it (it was "no run
    directory at RUN_ID"), and finishes it exactly."""
    run = copy_of(killed)  # tmp_path/runs/grokking/<id>
    monkeypatch.chdir(run.parents[2])
    rc, _, err = cli("run", "--resume", run.name, "--quiet")
    assert rc == 0, err
    assert store.Run.open(run).status == "complete"
    pd.testing.assert_frame_equal(metrics(run), metrics(finished))
