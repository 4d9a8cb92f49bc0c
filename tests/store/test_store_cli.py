"""`specscope runs` and `specscope export`, in-process (CliRunner) and as a real console script."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import specscope.cli
from specscope.cli import app
from specscope.errors import RunStoreError
from specscope.records import Record
from specscope.store import Run, integrity, load

specscope.cli._register()
runner = CliRunner()
SCRIPT = Path(sys.executable).parent / "specscope"  # the console script of the environment running the tests


@pytest.fixture
def root(tmp_path):
    with Run.create(tmp_path, "demo", {"seed": 1}, run_id="r1") as run:
        run.append([Record(s, "blocks.0.mlp", "stable_rank", s / 7, estimator="gram", rows=32, shape="32x16")
                    for s in range(5)] + [Record(5, "a,b \"quoted\"", "loss", math.nan, arm="adamw")])
    killed = Run.create(tmp_path, "other", {}, run_id="r2")
    killed.log(9, {"loss": 0.5})
    killed.flush()
    killed._release()  # as after SIGKILL
    return tmp_path


def test_runs_lists_status(root):
    res = runner.invoke(app, ["runs", "--root", str(root)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    r1 = next(line for line in lines if "r1" in line)
    r2 = next(line for line in lines if "r2" in line)
    assert "complete" in r1 and "demo" in r1 and r1.split()[-1] == "5"
    assert "incomplete" in r2 and r2.split()[-1] == "9"
    assert lines.index(r2) < lines.index(r1)  # newest first
    res = runner.invoke(app, ["runs", "--root", str(root), "--lab", "demo"])
    assert "r1" in res.output and "r2" not in res.output
    assert "last step" in res.output  # the column is the last recorded step, not a count
    res = runner.invoke(app, ["runs", "--root", str(root), "--lab", "dem"])  # a misspelt lab is an error
    assert "--lab 'dem' is not a lab; did you mean 'demo'?" in str(res.exception)
    res = runner.invoke(app, ["runs", "--root", str(root), "--lab", "random-features"])  # a lab with no runs is not
    assert res.exit_code == 0 and "for lab 'random-features'" in res.output and "Labs with runs there: demo" in res.output


def test_a_sweep_does_not_move_the_last_step(tmp_path):
    """A lab's sweep records hold a width or a batch size in `step` (flag "sweep"): `runs` shows the last training
    step, not the largest width, also after records are deleted (a resume rolls back to a checkpoint)."""
    from specscope.records import SWEEP

    with Run.create(tmp_path, "random-features", {}, run_id="rf") as run:
        run.append([Record(s, "W", "nuclear_rank", 1.0, arm="gd") for s in range(31)])
        run.append([Record(w, "relu", "stable_rank", 2.0, flag=SWEEP) for w in (512, 2048)])
        run.delete_after(20, "gd")
    line = next(line for line in runner.invoke(app, ["runs", "--root", str(tmp_path)]).output.splitlines() if "rf" in line)
    assert line.split()[-1] == "20"


def test_runs_empty_root(tmp_path):
    res = runner.invoke(app, ["runs", "--root", str(tmp_path)])
    assert res.exit_code == 0 and "no runs under" in res.output
    res = runner.invoke(app, ["runs", "--root", str(tmp_path / "none")])  # a mistyped root is not "no runs"
    assert "is not a directory" in str(res.exception) and "(default: runs)" in str(res.exception)


@pytest.mark.parametrize("how", ["path", "id", "lab/id"])
def test_export_csv_equals_load(root, tmp_path, how):
    arg = {"path": str(root / "demo" / "r1"), "id": "r1", "lab/id": "demo/r1"}[how]
    out = tmp_path / "out.csv"
    res = runner.invoke(app, ["export", arg, "--format", "csv", "--out", str(out), "--root", str(root)])
    assert res.exit_code == 0, res.output
    got = pd.read_csv(out, keep_default_na=False, na_values={"value": ["NaN", ""]})
    pd.testing.assert_frame_equal(got, load(root / "demo" / "r1"), check_dtype=False)


def test_export_parquet_equals_load(root, tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "out.parquet"
    res = runner.invoke(app, ["export", "r1", "-f", "parquet", "-o", str(out), "--root", str(root)])
    assert res.exit_code == 0, res.output
    pd.testing.assert_frame_equal(pd.read_parquet(out), load(root / "demo" / "r1"))


def test_export_default_output_name(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["export", str(root / "other" / "r2")])
    assert res.exit_code == 0 and (tmp_path / "r2.csv").is_file()


def test_export_of_an_unfinished_run_says_its_file_is_not_the_final_record(root, tmp_path):
    """As compare and report tell it: a killed run's or a live run's export holds only the steps so far."""
    res = runner.invoke(app, ["export", "r2", "-o", str(tmp_path / "r2.csv"), "--root", str(root)])
    assert res.exit_code == 0 and res.stderr.startswith(f"warning: {root / 'other' / 'r2'} is incomplete: ")
    assert "holds only the steps it recorded so far" in res.stderr and (tmp_path / "r2.csv").is_file()
    with Run.create(root, "other", {}, run_id="live") as live:  # held open: a live writer
        live.log(3, {"loss": 0.25})
        live.flush()
        res = runner.invoke(app, ["export", "live", "-o", str(tmp_path / "live.csv"), "--root", str(root)])
        assert res.exit_code == 0 and " is running: " in res.stderr, res.stderr
        assert pd.read_csv(tmp_path / "live.csv")["step"].tolist() == [3]
    res = runner.invoke(app, ["export", "r1", "-o", str(tmp_path / "r1.csv"), "--root", str(root)])
    assert res.exit_code == 0 and res.stderr == ""


def test_export_replaces_an_existing_file_only_with_force(root, tmp_path):
    out = tmp_path / "notes.csv"
    out.write_text("the user's own notes\n")
    argv = ["export", "r1", "--out", str(out), "--root", str(root)]
    res = runner.invoke(app, argv)
    assert res.exit_code != 0 and "the file exists" in str(res.exception) and "--force" in str(res.exception)
    assert out.read_text() == "the user's own notes\n" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    res = runner.invoke(app, argv + ["--force"])
    assert res.exit_code == 0, res.output
    pd.testing.assert_frame_equal(pd.read_csv(out, keep_default_na=False, na_values={"value": ["NaN", ""]}),
                                  load(root / "demo" / "r1"), check_dtype=False)


def test_real_console_script(root):
    out = subprocess.run([str(SCRIPT), "runs", "--root", str(root)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "r1" in out.stdout and "complete" in out.stdout and "incomplete" in out.stdout


def test_export_unknown_run_is_a_store_error(root):
    res = runner.invoke(app, ["export", "nope", "--root", str(root)])
    assert isinstance(res.exception, RunStoreError)  # main() prints it on one line, exit status 2
    assert "no run 'nope'" in str(res.exception) and "specscope runs" in str(res.exception)


@pytest.mark.parametrize("argv", [["run", "sed", "--no-such-option"], ["no-such-command"], ["runs", "--root"]])
def test_usage_errors_exit_2_without_a_traceback(argv):
    out = subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1
    assert out.stderr.rstrip().endswith("--help`")  # where the valid options and commands are listed


def test_a_missing_path_is_named_as_a_path_not_as_a_run_id_under_root(tmp_path):
    missing = tmp_path / "nowhere"
    res = runner.invoke(app, ["report", str(missing), "--root", str(tmp_path)])
    assert f"no run directory '{missing}'" in str(res.exception) and "<lab>" not in str(res.exception)


@pytest.mark.parametrize("name, value, message", [
    ("SPECSCOPE_EIGH", "mkl", "error: SPECSCOPE_EIGH='mkl': must be one of auto, torch, openblas"),
    ("SPECSCOPE_OPENMP_RELEASE", "yes", "error: SPECSCOPE_OPENMP_RELEASE='yes': must be one of auto, on, off"),
    ("SPECSCOPE_CUDA_GRAPHS", "1", "error: SPECSCOPE_CUDA_GRAPHS='1': must be on or off"),
    ("SPECSCOPE_ITERATION_DTYPE", "fp16", "error: SPECSCOPE_ITERATION_DTYPE='fp16': must be one of auto, bfloat16, float32")])
def test_a_misspelt_environment_setting_stops_the_cli_before_any_work(tmp_path, name, value, message):
    env = {**os.environ, name: value}
    out = subprocess.run([str(SCRIPT), "run", "sed", "--root", str(tmp_path)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(message)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["run", "--help"], ["runs", "--no-such-option"]])
def test_help_version_and_usage_errors_check_the_environment_without_importing_torch(argv):
    """Help, the version and a usage error are instant: the environment's settings are checked as strings
    (specscope.settings), and no command module imports torch at registration."""
    code = ("import sys; from specscope.cli import main; sys.argv = ['specscope', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print('rc', e.code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SPECSCOPE_EIGH": "TORCH"})  # a valid setting in another case
    rc = 2 if argv[-1] == "--no-such-option" else 0
    assert out.stdout.splitlines()[-1] == f"rc {rc} False", (out.stdout, out.stderr)
    bad = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SPECSCOPE_CUDA_GRAPHS": "yes"})
    assert bad.stdout.splitlines()[-1] == f"rc {rc} False"
    if rc == 0:  # help and the version do no work: a misspelt setting does not hide them
        assert bad.stdout == out.stdout and bad.stderr == ""
    else:
        assert bad.stderr == "error: SPECSCOPE_CUDA_GRAPHS='yes': must be on or off (unset means off)\n"


def test_each_setting_reads_its_default_unset_or_empty_and_any_case(monkeypatch):
    from specscope import settings

    for name, (values, default, _) in settings.SETTINGS.items():
        monkeypatch.delenv(name, raising=False)
        assert settings.read(name) == default
        monkeypatch.setenv(name, "  ")
        assert settings.read(name) == default
        for value in values:
            monkeypatch.setenv(name, f" {value.upper()} ")
            assert settings.read(name) == value
        monkeypatch.setenv(name, "nonsense")
        with pytest.raises(ValueError, match=f"{name}='nonsense': must be .*{values[-1]} \\(unset means {default}"):
            settings.check_all()
        monkeypatch.delenv(name)
    settings.check_all()


def _passed_lab_run(tmp_path, records: list) -> Run:
    """A finished lab run "hurt" with `records`, its progress.json and one PASS claim, listed by `claims` unmarked."""
    with Run.create(tmp_path, "grokking", {"seed": 0}, run_id="hurt", progress=True) as run:
        run.append(records)
        integrity.write_json(run.path / "progress.json", {"arms": {"a": len(records)}, "run_id": run.id}, checksum=True)
        run.write_summary({"claims": [{"id": "GR-1", "text": "t", "published": "p", "measured": "m",
                                       "verdict": "PASS"}]})
    res = runner.invoke(app, ["claims", "--root", str(tmp_path), "--format", "json"])
    assert res.exit_code == 0 and '"hurt"' in res.stdout and "warning" not in res.stderr
    return run


@pytest.mark.parametrize("damage", ["truncate", "random", "delete"])
def test_claims_mark_and_warn_about_a_run_whose_database_is_damaged(tmp_path, damage):
    """`runs` said "complete (damaged)" and export refused, while `claims` repeated the run's PASS unmarked; a lab
    run's deleted database was not even warned about."""
    run = _passed_lab_run(tmp_path, [Record(s, f"layer{i}", "stable_rank", s / 7) for s in range(400) for i in range(8)])
    db = run.path / "metrics.sqlite"
    if damage == "truncate":
        os.truncate(db, 20000)
    elif damage == "delete":
        db.unlink()
    else:
        db.write_bytes(db.read_bytes()[:4096] + os.urandom(db.stat().st_size - 4096))
    res = runner.invoke(app, ["claims", "--root", str(tmp_path), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert '"hurt (its metrics database is damaged)"' in res.stdout and '"PASS"' in res.stdout
    assert f"warning: {run.path}: its metrics database is damaged, so its claims may not match its records" in res.stderr


@pytest.mark.parametrize("damage", ["edit", "delete"])
def test_claims_mark_and_warn_about_a_run_whose_progress_file_is_damaged(tmp_path, damage):
    """`runs` said "complete (damaged)" of a run whose progress.json failed its checksum or was gone, and `claims`
    listed its claims unmarked, exit 0, no warning."""
    run = _passed_lab_run(tmp_path, [Record(s, "layer0", "stable_rank", s / 7) for s in range(50)])
    progress = run.path / "progress.json"
    if damage == "delete":
        progress.unlink()
    else:
        progress.write_text(progress.read_text().replace("50", "51", 1))
    before = {f.name: f.read_bytes() for f in run.path.iterdir() if f.is_file()}
    res = runner.invoke(app, ["claims", "--root", str(tmp_path), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert '"hurt (its progress.json is damaged)"' in res.stdout and '"PASS"' in res.stdout
    assert f"warning: {run.path}: its progress.json is damaged, so its claims may not match its records" in res.stderr
    assert "progress.json" in res.stderr.split("(", 1)[1]
    assert before == {f.name: f.read_bytes() for f in run.path.iterdir() if f.is_file()}  # a reader writes nothing


def test_claims_say_which_runs_they_leave_out_and_name_nested_runs_by_their_path(tmp_path):
    """A killed run whose report wrote its claims was left out in silence ("no recorded claims under …"); a run in a
    folder below another lab's (runs/bad/grokking/X) was listed as "X", which `report X --root runs` could not find."""
    killed = Run.create(tmp_path, "grokking", {"seed": 0}, run_id="killed")
    killed.write_summary({"claims": [{"id": "GR-1", "text": "t", "published": "p", "measured": "m", "verdict": "PASS"}]})
    killed.flush()
    killed._release()  # as after SIGKILL: status incomplete
    res = runner.invoke(app, ["claims", "--root", str(tmp_path)])
    assert res.exit_code == 0 and "no recorded claims" in res.output
    assert f"1 run(s) under {tmp_path} did not complete, and their claims are left out: {killed.path} (incomplete)" \
        in " ".join(res.stderr.split())
    with Run.create(tmp_path / "bad", "grokking", {"seed": 0}, run_id="nested") as run:
        run.write_summary({"claims": [{"id": "GR-1", "text": "t", "published": "p", "measured": "m", "verdict": "PASS"}]})
    res = runner.invoke(app, ["claims", "--root", str(tmp_path), "--format", "json"])
    assert f'"{tmp_path / "bad" / "grokking" / "nested"}"' in res.stdout


def test_a_folder_where_summary_json_goes_is_named_with_a_fix_that_works(tmp_path):
    """`runs` and `claims` said that `specscope report` rewrites it; report then failed on writing the file."""
    with Run.create(tmp_path, "diagnose", {"seed": 0}, run_id="r") as run:
        run.append([Record(0, "w", "stable_rank", 1.5)])
        run.write_summary({"claims": []})
    (run.path / "summary.json").unlink()
    (run.path / "summary.json").mkdir()
    res = runner.invoke(app, ["claims", "--root", str(tmp_path)])
    assert "is a folder (or another non-file), not a JSON file; move it away, then `specscope report" in str(res.exception)
    res = runner.invoke(app, ["report", str(run.path)])
    assert isinstance(res.exception, RunStoreError) and "is a folder, not the summary the report rewrites: move it away" \
        in str(res.exception)
    (run.path / "summary.json").rmdir()
    assert runner.invoke(app, ["report", str(run.path)]).exit_code == 0 and (run.path / "report.html").is_file()


def test_runs_lists_a_copied_run_under_its_folders_name_which_export_finds(tmp_path):
    """A copy of run r1 in folder r1-backup was listed as r1 (its config.json's id), twice; `export r1-backup` is what
    finds it."""
    import shutil

    with Run.create(tmp_path, "demo", {"seed": 1}, run_id="r1") as run:
        run.append([Record(0, "w", "stable_rank", 1.5)])
    shutil.copytree(run.path, run.path.parent / "r1-backup")
    res = runner.invoke(app, ["runs", "--root", str(tmp_path)])
    ids = [line.split()[0] for line in res.output.splitlines() if line.strip().startswith("r1")]
    assert sorted(ids) == ["r1", "r1-backup"]
    out = tmp_path / "backup.csv"
    assert runner.invoke(app, ["export", "r1-backup", "--root", str(tmp_path), "--out", str(out)]).exit_code == 0


def test_runs_shows_control_characters_of_names_from_disk_as_escapes(tmp_path):
    """`runs` printed a folder name's ESC sequences raw (retitling the terminal, clearing the screen) and a newline
    broke its table; claims, export and report escaped them already."""
    from specscope.store import Run

    with Run.create(tmp_path, "custom", {"a": 1}, run_id="plain") as run:
        run.log(0, {"loss": 1.0})
    run.path.rename(run.path.with_name("x\x1b]0;pwned\x07\x1b[2Jy\nz"))
    out = subprocess.run([sys.executable, "-m", "specscope", "runs", "--root", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0 and "\x1b" not in out.stdout and "\\x1b]0;pwned\\x07" in out.stdout.replace("\n", "")


def test_a_fifo_at_run_lock_is_an_error_not_a_reader_that_hangs(tmp_path):
    from specscope.errors import RunStoreError
    from specscope.store import Run, load

    with Run.create(tmp_path, "custom", {"a": 1}, run_id="r") as run:
        run.log(0, {"loss": 1.0})
    (run.path / "run.lock").unlink()
    os.mkfifo(run.path / "run.lock")
    code = f"from specscope.store import load, list_runs; print(len(load({str(run.path)!r})), list_runs({str(tmp_path)!r}).status.tolist())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["1", "['complete']"]
    with pytest.raises(RunStoreError, match=r"run.lock is not a regular file \(a FIFO"):
        Run.open(run.path).log(1, {"loss": 0.5})
    assert len(load(run.path)) == 1


def test_specscope_alone_prints_the_help_and_exits_0():
    """`specscope` with no arguments printed the help, then `error: ; see specscope --help` and exited 2."""
    out = subprocess.run([sys.executable, "-m", "specscope"], capture_output=True, text=True)
    assert out.returncode == 0 and "Usage" in out.stdout and out.stderr == ""


def test_a_folder_at_run_lock_is_one_store_error(tmp_path):
    from specscope.errors import RunStoreError
    from specscope.store import Run

    with Run.create(tmp_path, "custom", {"a": 1}, run_id="r") as run:
        run.log(0, {"loss": 1.0})
    (run.path / "run.lock").unlink()
    (run.path / "run.lock").mkdir()
    with pytest.raises(RunStoreError, match=r"run.lock is not a regular file"):
        Run.open(run.path).log(1, {"loss": 0.5})


RF = {"dim": 8, "width": 16, "samples": 16, "outputs": 4, "steps": 3, "sweep_widths": [8, 16], "sweep_samples": 16,
      "sweep_dims": [4, 8], "activations": ["relu"], "sweep_activations": ["relu"]}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """(root, sweep directory): a one-point random-features sweep under root/sweeps/, as `specscope sweep` writes it by
    default, with a run of it cut short ("cut", as after SIGKILL)."""
    from specscope import sweep

    root = tmp_path_factory.mktemp("swept")
    d = sweep.run_sweep("random-features", {"seed": [0]}, RF, out=root / "sweeps", echo=lambda *a, **k: None)
    cut = Run.create(d / "runs", "random-features", {"seed": 1}, run_id="cut")
    cut.log(2, {"loss": 0.5})
    cut.flush()
    cut._release()
    return root, d


@pytest.mark.parametrize("where", ["root", "sweeps folder", "sweep"])
def test_runs_lists_a_sweeps_runs_and_each_id_claims_shows_is_found(swept, tmp_path, where):
    """`runs` listed none of a sweep's runs, finished or cut short ("no runs under runs."), while `claims` showed their
    claims by an id that `report ID --root` could not find with the sweep directory as the root."""
    import json

    root, d = swept
    root = {"root": root, "sweeps folder": d.parent, "sweep": d}[where]
    (done,) = [p.name for p in (d / "runs" / "random-features").iterdir() if p.name != "cut"]
    res = runner.invoke(app, ["runs", "--root", str(root)], env={"COLUMNS": "200"})
    rows = {line.split()[0]: line for line in res.output.splitlines() if line.strip().startswith((done, "cut "))}
    assert " complete " in rows[done] and " incomplete " in rows["cut"], res.output
    assert all(f"random-features (in sweep {d.name})" in row for row in rows.values())
    res = runner.invoke(app, ["claims", "--root", str(root), "--format", "json"])
    assert {name for claim in json.loads(res.stdout) for name in claim["runs"]} == {done}
    out = tmp_path / "run.csv"
    res = runner.invoke(app, ["export", done, "--root", str(root), "--out", str(out)])
    assert res.exit_code == 0 and out.is_file(), res.output


def test_report_of_an_api_run_named_like_a_lab_is_the_per_weight_page(tmp_path):
    """A run the Python API recorded under a lab's name ("gpt") was reported as that lab's run: "unknown config key
    'lr' for lab 'gpt'". A lab run records in config.json that it keeps progress.json; this one does not."""
    with Run.create(tmp_path, "gpt", {"lr": 0.1}, run_id="o-gpt") as run:
        run.log(0, {"loss": 1.0})
        run.append([Record(s, "w", m, 1.5 + s) for s in range(3) for m in ("stable_rank", "nuclear_rank")])
    res = runner.invoke(app, ["report", "o-gpt", "--root", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "<title>gpt — o-gpt" in (run.path / "report.html").read_text()


def test_export_under_a_file_names_the_file_not_a_missing_directory(root, tmp_path):
    (tmp_path / "afile").write_text("x")
    res = runner.invoke(app, ["export", "r1", "--root", str(root), "--out", str(tmp_path / "afile" / "x.csv")])
    assert isinstance(res.exception, RunStoreError)
    assert f"{tmp_path / 'afile'} is a file, not a directory" in str(res.exception) and "does not exist" not in str(res.exception)


def test_claims_name_a_folder_in_place_of_the_database_as_runs_does(tmp_path):
    """`claims` warned that the database "is missing"; `runs` said, correctly, that it is a folder."""
    run = _passed_lab_run(tmp_path, [Record(s, "layer0", "stable_rank", s / 7) for s in range(5)])
    for name in ("metrics.sqlite", "metrics.sqlite-wal", "metrics.sqlite-shm"):
        (run.path / name).unlink(missing_ok=True)
    (run.path / "metrics.sqlite").mkdir()
    res = runner.invoke(app, ["claims", "--root", str(tmp_path), "--format", "json"])
    assert res.exit_code == 0 and '"hurt (its metrics database is damaged)"' in res.stdout, res.output
    assert "is a folder" in res.stderr and "is missing" not in res.stderr
