"""Sweep engine: grid expansion, matching runs to points, resume without rerunning, the CLI's grid parser."""

import json
import re

import pytest

from specscope import sweep
from specscope.errors import ConfigError

FAST = {"p": 5, "steps": 4, "eval_every": 2, "d_model": 8, "d_ff": 16, "n_heads": 2, "n_layers": 1,
        "grok_window": 2, "batch_size": 0, "arms": ["l2"], "device": "cpu"}


def test_expand_grid_is_the_product_over_fixed():
    points = sweep.expand_grid({"a": [1, 2], "b": ["x", "y", "z"]}, {"c": 0, "a": 9})
    assert len(points) == 6 and points[0] == {"c": 0, "a": 1, "b": "x"}
    with pytest.raises(ConfigError, match="at least one value"):
        sweep.expand_grid({"a": []})


def test_matches_compares_validated_values():
    cfg = {"train_fraction": 0.5, "arms": ["l2", "lrd"], "betas": [0.9, 0.98], "p": 97}
    assert sweep.matches({"train_fraction": 0.5, "arms": ["l2", "lrd"], "betas": (0.9, 0.98)}, cfg)
    assert not sweep.matches({"train_fraction": 0.4}, cfg)
    assert not sweep.matches({"arms": ["l2"]}, cfg)
    assert not sweep.matches({"missing": 1}, cfg)


def _run_dirs(sweep_dir):
    return sorted(p.name for p in (sweep_dir / "runs" / "grokking").iterdir())


def test_resume_runs_only_missing_points(tmp_path):
    quiet = lambda *a, **k: None  # noqa: E731
    d = sweep.run_sweep("grokking", {"train_fraction": [0.4, 0.6]}, FAST, out=tmp_path, echo=quiet)
    first = _run_dirs(d)
    assert len(first) == 2
    table = sweep.summary(d)
    assert sorted(table["train_fraction"]) == [0.4, 0.6] and set(table["arm"]) == {"l2"}
    assert (d / "summary.csv").is_file() and (d / "phase_diagram.png").is_file()

    sweep.run_sweep("grokking", {}, resume=d, echo=quiet)  # everything complete: nothing reruns
    assert _run_dirs(d) == first
    sweep.run_sweep("grokking", {"train_fraction": [0.4, 0.6, 0.8]}, resume=d, echo=quiet)  # one new point
    assert len(_run_dirs(d)) == 3 and set(first) <= set(_run_dirs(d))
    assert json.loads((d / "sweep.json").read_text())["grid"]["train_fraction"] == [0.4, 0.6, 0.8]
    timing = json.loads((d / "timing.json").read_text())  # each session kept: a resume never erases the first's
    assert [t["points_run"] for t in timing["sessions"]] == [2, 0, 1] and timing["points_run"] == 3
    assert timing["wall_seconds"] == pytest.approx(sum(t["wall_seconds"] for t in timing["sessions"]))


def test_failed_point_is_reported_and_rerun_on_resume(tmp_path, monkeypatch):
    from specscope.labs import grokking

    make_data = grokking.make_data

    def failing(cfg, device):  # a point that fails while it runs (its settings are valid)
        if cfg.train_fraction == 0.6:
            raise RuntimeError("disk full")
        return make_data(cfg, device)

    monkeypatch.setattr(grokking, "make_data", failing)
    quiet = lambda *a, **k: None  # noqa: E731
    d = sweep.run_sweep("grokking", {"train_fraction": [0.4, 0.6]}, FAST, out=tmp_path, echo=quiet)
    errors = json.loads((d / "errors.json").read_text())
    assert len(errors) == 1 and "disk full" in errors[0]["error"] and errors[0]["overrides"]["train_fraction"] == 0.6
    assert len(sweep.summary(d)) == 1
    monkeypatch.setattr(grokking, "make_data", make_data)
    sweep.run_sweep("grokking", {}, resume=d, echo=quiet)
    assert len(sweep.summary(d)) == 2 and len(_run_dirs(d)) == 2


@pytest.mark.parametrize("lab, grid, fixed, point, reason", [
    ("grokking", {"lrd_targets": [["q"], ["x"]]}, FAST, "lrd_targets=['x']", "lrd_targets ['x'] unknown"),
    ("grokking", {"d_model": [8, 9]}, FAST, "d_model=9", "d_model=9 is not divisible by n_heads=2"),
    ("grokking", {"arms": [["l2"], ["lrd"]]}, {**FAST, "strength_grid": {"l2": [0.1]}}, "arms=['lrd']",
     "strength_grid names ['l2'], which are not in arms ['lrd']"),
    ("gpt", {"d_model": [64, 66]}, {"n_head": 4}, "d_model=66", "d_model=66 is not divisible by n_head=4"),
    ("switching", {"setups": [["rf/relu"], ["rf/nope"]]}, {}, "setups=['rf/nope']", "unknown activation 'nope'"),
])
def test_settings_that_fail_together_are_refused_before_the_sweep_starts(tmp_path, lab, grid, fixed, point, reason):
    """Every point is checked (the lab's check(cfg)) before the sweep directory exists: a bad combination in the
    last point of a long sweep used to fail only when its turn came."""
    import re

    with pytest.raises(ConfigError, match=f"^grid point {re.escape(point)}: .*{re.escape(reason)}"):
        sweep.run_sweep(lab, grid, fixed, out=tmp_path / "sweeps", echo=lambda *a, **k: None)
    assert not (tmp_path / "sweeps").exists()


def test_cli_grid_parser_handles_lists_and_numbers():
    from specscope.cli.commands.sweep import parse_grid
    from specscope.labs.grokking import Config

    grid = parse_grid(Config, ["train_fraction=0.3,0.5", "arms=[l2,lrd],[l2]", "task=add,mul"], "grokking")
    assert grid == {"train_fraction": [0.3, 0.5], "arms": [["l2", "lrd"], ["l2"]], "task": [["add"], ["mul"]]}
    with pytest.raises(ConfigError, match="unknown config key"):
        parse_grid(Config, ["nope=1,2"], "grokking")
    with pytest.raises(ConfigError, match="--grid seed is given twice"):  # it dropped seed=0,1 and ran seed=2 alone
        parse_grid(Config, ["seed=0,1", "seed=2"], "grokking")
    with pytest.raises(ConfigError, match="lists the value 0 twice"):  # it ran the same point twice
        parse_grid(Config, ["seed=0,0"], "grokking")
    with pytest.raises(ConfigError, match=r"^--grid steps=\[\]: \[\] is an empty list, and steps takes one value"):
        parse_grid(Config, ["steps=[]"], "grokking")  # it said: 'steps' = '': Input should be a valid integer


@pytest.mark.parametrize("pair", ["steps=1,", "steps=,1", "steps=1,,2", "arms=[l2],,[lrd]"])
def test_an_empty_grid_value_is_refused_not_dropped(pair):
    from specscope.cli.commands.sweep import parse_grid
    from specscope.labs.grokking import Config

    key = pair.split("=")[0]
    with pytest.raises(ConfigError, match=f"^--grid {re.escape(pair)} has an empty value.*write --grid {key}=v1,v2"):
        parse_grid(Config, [pair], "grokking")  # `steps=1,` ran the one point steps=1


def test_a_grid_point_with_a_list_naming_an_entry_twice_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"grid point arms=\['l2', 'l2'\]: .*repeats 'l2'"):
        sweep.run_sweep("grokking", {"arms": [["l2", "l2"], ["lrd"]]}, {"steps": 2}, out=tmp_path / "sweeps",
                        echo=lambda *a, **k: None)
    assert not (tmp_path / "sweeps").exists()


def test_ray_backend_without_ray_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConfigError, match="backend=ray needs Ray"):
        sweep.run_sweep("grokking", {"train_fraction": [0.4]}, FAST, out=tmp_path / "sweeps", backend="ray")
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("kw, flag", [({"workers": 0}, "--workers"), ({"threads_per_worker": 0}, "--threads"),
                                      ({"workers": 10**20}, "--workers"), ({"threads_per_worker": 10**20}, "--threads")])
def test_zero_or_too_many_workers_or_threads_is_refused_before_anything_is_written(tmp_path, kw, flag):
    """10**20 workers or threads ended in an OverflowError (multiprocessing) or ValueError (torch.set_num_threads)
    traceback, with a sweep directory left holding only sweep.json."""
    with pytest.raises(ConfigError, match=f"{flag} must be from 1 to 4096, got {next(iter(kw.values()))}"):
        sweep.run_sweep("grokking", {"train_fraction": [0.4]}, FAST, out=tmp_path / "sweeps", **kw)
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("name", sorted(__import__("specscope.labs", fromlist=["names"]).names()))
def test_every_labs_hooks_take_what_the_sweep_and_the_runner_pass(name):
    """summarize(df, cfg), claims(df, cfg), figures(df, cfg), sweep_claims(table), inputs(cfg): a hook with another
    signature breaks only at the end of a sweep, after every point has run."""
    import inspect

    from specscope import labs

    lab = labs.get(name)
    args = {"summarize": ("df", "cfg"), "claims": ("df", "cfg"), "figures": ("df", "cfg"), "sweep_claims": ("table",),
            "inputs": ("cfg",), "check": ("cfg",)}
    for hook, passed in args.items():
        if hasattr(lab, hook):
            inspect.signature(getattr(lab, hook)).bind(*passed)


def test_a_resumed_sweep_keeps_its_settings_and_grid(tmp_path):
    """`sweep --resume D --set steps=60` rewrote sweep.json and mixed two configs in summary.csv; `--grid seed=2`
    replaced the recorded seeds. --set may only repeat the recorded value; --grid may only add values."""
    quiet = lambda *a, **k: None  # noqa: E731
    d = sweep.run_sweep("grokking", {"train_fraction": [0.4]}, FAST, out=tmp_path, echo=quiet)
    recorded = (d / "sweep.json").read_text()
    with pytest.raises(ConfigError, match=r"--set steps=.* would change them: start a new sweep"):
        sweep.run_sweep("grokking", {}, {"steps": FAST["steps"] + 1}, resume=d, echo=quiet)
    with pytest.raises(ConfigError, match="the sweep being resumed has no such grid key"):
        sweep.run_sweep("grokking", {"seed": [2]}, resume=d, echo=quiet)
    assert (d / "sweep.json").read_text() == recorded
    sweep.run_sweep("grokking", {"train_fraction": [0.6]}, dict(FAST), resume=d, echo=quiet)  # same settings, one value more
    assert json.loads((d / "sweep.json").read_text())["grid"]["train_fraction"] == [0.4, 0.6]
    assert sorted(sweep.summary(d)["train_fraction"]) == [0.4, 0.6]
    sweep.run_sweep("grokking", {"train_fraction": [".6", "0.40"]}, {"steps": str(FAST["steps"])}, resume=d, echo=quiet)
    assert json.loads((d / "sweep.json").read_text())["grid"]["train_fraction"] == [0.4, 0.6]  # by value, not spelling


def test_a_sweep_with_failed_points_exits_2_naming_them(tmp_path, monkeypatch, capsys):
    import sys

    from specscope.cli import main

    args = ["specscope", "sweep", "grokking", "--grid", "p=4,5", "--out", str(tmp_path)]
    for k, v in FAST.items():
        if k != "p":
            args += ["--set", f"{k}={json.dumps(v) if isinstance(v, list) else v}"]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "1 point(s) of the sweep failed" in err and "p=4" in err.replace("'p': 4", "p=4")
    assert "Traceback" not in err


def test_sweep_resume_refuses_out(tmp_path):
    """`sweep --resume DIR --out ELSEWHERE` ignored --out without a word (`run --resume` refuses it)."""
    from typer.testing import CliRunner

    from specscope.cli import _register, app

    _register()
    res = CliRunner().invoke(app, ["sweep", "--resume", str(tmp_path), "--out", str(tmp_path / "elsewhere")])
    assert res.exit_code != 0 and "drop --out" in str(res.exception or res.output)
    assert not (tmp_path / "elsewhere").exists()


def test_summary_rows_are_sorted_by_the_grid_values(tmp_path):
    """Points run in the order given (seed 1 first here), and their runs are named by start time; the summary is
    sorted by the grid's values all the same."""
    d = sweep.run_sweep("grokking", {"seed": [1, 0]}, FAST, out=tmp_path, echo=lambda *a, **k: None)
    assert list(sweep.summary(d)["seed"]) == [0, 1]


def test_default_summary_rows_leave_out_sweep_records():
    """A lab without `summarize` gets each arm's last whole-model values; a sweep record's step is a width, so
    an arm with only sweep records (a lab's measurement part) makes no row, and no `final_` column comes from them;
    nor does the run's timing record."""
    import pandas as pd

    from specscope.records import SWEEP

    df = pd.DataFrame([
        {"step": s, "layer": "", "metric": "loss", "value": 1.0 / (s + 1), "arm": "gd", "flag": ""} for s in range(3)
    ] + [{"step": w, "layer": "", "metric": "stable_rank", "value": float(w), "arm": "", "flag": SWEEP} for w in (64, 8)]
      + [{"step": 0, "layer": "", "metric": "lab_seconds", "value": 3.7, "arm": "", "flag": ""}])
    assert sweep._default_rows(df) == [{"arm": "gd", "final_loss": 1 / 3}]


@pytest.mark.parametrize("grid, fixed, problem", [
    ([("seed", [0])], FAST, r"grid=\[\('seed', \[0\]\)\]: give a dict of config key -> list of values"),
    ({"seed": [0]}, [("steps", 2)], r"fixed=\[\('steps', 2\)\]: give a dict of config key -> value"),
])
def test_a_grid_or_fixed_that_is_no_dict_is_a_config_error(tmp_path, grid, fixed, problem):
    with pytest.raises(ConfigError, match=problem):  # an AttributeError / TypeError before
        sweep.run_sweep("grokking", grid, fixed, out=tmp_path / "sweeps", echo=lambda *a, **k: None)
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("kw, flag", [({"workers": "2"}, "--workers"), ({"workers": 1.5}, "--workers"),
                                      ({"workers": True}, "--workers"), ({"workers": float("nan")}, "--workers"),
                                      ({"threads_per_worker": 1.5}, "--threads")])
def test_workers_and_threads_that_are_no_int_are_refused_before_anything_is_written(tmp_path, kw, flag):
    """workers='2' was a TypeError, 1.5 and nan failed in the process pool, threads_per_worker=1.5 inside the worker
    after the sweep directory was made."""
    with pytest.raises(ConfigError, match=f"{flag} must be from 1 to 4096, got {re.escape(repr(next(iter(kw.values()))))}"):
        sweep.run_sweep("grokking", {"train_fraction": [0.4]}, FAST, out=tmp_path / "sweeps", echo=lambda *a, **k: None, **kw)
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("values", [[0.5, 0.5], [0.5, "0.5"], [0.5, 0.4, 0.50]])
def test_a_grid_value_given_twice_is_refused_not_run_twice(tmp_path, values):
    """The CLI's parser refuses `seed=0,0`; run_sweep itself ran both points, two runs of one config (also when the
    value was spelled twice: 0.5 and "0.5")."""
    with pytest.raises(ConfigError, match="--grid train_fraction lists one value twice .* give each value once"):
        sweep.run_sweep("grokking", {"train_fraction": values}, FAST, out=tmp_path / "sweeps", echo=lambda *a, **k: None)
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("value", [5, [], "0.4"])
def test_a_tampered_sweep_json_grid_is_a_config_error_naming_the_file(tmp_path, value):
    d = tmp_path / "grokking-x"
    d.mkdir()
    (d / "sweep.json").write_text(json.dumps({"lab": "grokking", "grid": {"train_fraction": value}, "fixed": FAST}))
    before = (d / "sweep.json").read_text()
    for call in (lambda: sweep.run_sweep("grokking", {}, resume=d, echo=lambda *a, **k: None), lambda: sweep.summary(d)):
        with pytest.raises(ConfigError, match=r"sweep\.json: grid 'train_fraction' is .*, not a non-empty list of values"):
            call()  # resume: a TypeError; summary: a table with no grid value
    assert (d / "sweep.json").read_text() == before and sorted(p.name for p in d.iterdir()) == ["sweep.json"]


def test_a_key_both_set_and_gridded_is_refused(tmp_path, monkeypatch, capsys):
    """`--set seed=5 --grid seed=0,1` ran the grid and recorded seed=5 as fixed in sweep.json."""
    import sys

    from specscope.cli import main

    monkeypatch.setattr(sys, "argv", ["specscope", "sweep", "grokking", "--set", "seed=5", "--grid", "seed=0,1",
                                      "--out", str(tmp_path / "sweeps")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and "'seed' is given both as --set seed=… and in --grid" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()


def test_a_second_process_on_a_sweep_being_run_is_refused_before_it_runs_anything(tmp_path):
    """Two `sweep --resume` of one directory at once each ran every point without a complete run: 5 runs for 3 points,
    summary.csv listing two points twice. The sweep directory is locked by the process running it now."""
    from specscope.errors import RunStoreError
    from specscope.store import lock

    quiet = lambda *a, **k: None  # noqa: E731
    d = sweep.run_sweep("grokking", {"train_fraction": [0.4]}, FAST, out=tmp_path, echo=quiet)
    held = lock.acquire(d)  # another live process running it
    try:
        with pytest.raises(RunStoreError, match="is being written by another live process"):
            sweep.run_sweep("grokking", {"train_fraction": [0.4, 0.6]}, resume=d, echo=quiet)
    finally:
        lock.release(held)
    assert len(_run_dirs(d)) == 1 and json.loads((d / "sweep.json").read_text())["grid"]["train_fraction"] == [0.4]
    sweep.run_sweep("grokking", {"train_fraction": [0.4, 0.6]}, resume=d, echo=quiet)  # the lock is gone with it
    assert len(_run_dirs(d)) == 2


def test_a_failed_write_of_the_sweeps_files_leaves_the_old_ones(tmp_path):
    """sweep.json was rewritten in place on every resume: a write cut short (here a file-size limit of 0, which kills
    the process at its first byte; a full disk or a kill alike) left it empty, and the sweep could never be resumed or
    summarized again. Each file is now written beside and renamed."""
    import subprocess
    import sys

    quiet = lambda *a, **k: None  # noqa: E731
    d = sweep.run_sweep("grokking", {"train_fraction": [0.4]}, FAST, out=tmp_path, echo=quiet)
    before = {f: (d / f).read_bytes() for f in ("sweep.json", "summary.csv", "errors.json")}
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)); from specscope import sweep; "
            "sweep.run_sweep('grokking', {}, resume=sys.argv[1], echo=print)")
    done = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, timeout=300)
    assert done.returncode != 0  # killed by SIGXFSZ at its first write
    assert {f: (d / f).read_bytes() for f in before} == before
    sweep.run_sweep("grokking", {}, resume=d, echo=quiet)


def test_a_damaged_run_in_a_sweep_names_what_to_do_in_a_sweep(tmp_path):
    """The checksum error's fix was '--salvage', which `sweep` has no option of."""
    from specscope.errors import RunStoreError

    quiet = lambda *a, **k: None  # noqa: E731
    d = sweep.run_sweep("grokking", {"train_fraction": [0.4]}, FAST, out=tmp_path, echo=quiet)
    (run,) = (d / "runs" / "grokking").iterdir()
    db = run / "metrics.sqlite"
    data = bytearray(db.read_bytes())
    data[len(data) // 2] ^= 0xFF
    db.write_bytes(bytes(data))
    with pytest.raises(RunStoreError) as e:
        sweep.summary(d)
    assert f"move its directory ({run}) out of the sweep" in str(e.value) and "--resume" in str(e.value)
    assert "; --salvage" not in str(e.value)


def test_an_odd_head_size_in_an_embed_geometry_grid_is_refused_before_the_sweep_exists(tmp_path):
    with pytest.raises(ConfigError, match="even head size"):
        sweep.run_sweep("embed-geometry", {"d_model": [16, 20]}, {"n_head": 4, "steps": 2, "device": "cpu"}, out=tmp_path,
                        echo=lambda *a, **k: None)
    assert not any(tmp_path.iterdir())


def test_runs_of_no_point_are_left_out_of_the_summary_with_a_warning(tmp_path):
    """sweep.json edited after its runs (steps 4 -> 5): the resume runs the points anew, and the summary lists only
    runs of the points it now names — the steps=4 runs sat beside the steps=5 ones, each seed twice, with no column
    telling them apart."""
    quiet = lambda *a, **k: None  # noqa: E731
    d = sweep.run_sweep("grokking", {"seed": [0, 1]}, FAST, out=tmp_path, echo=quiet)
    meta = json.loads((d / "sweep.json").read_text())
    meta["fixed"]["steps"] = 5
    (d / "sweep.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="2 complete run"):
        sweep.run_sweep("grokking", {}, resume=d, echo=quiet)
    assert len(_run_dirs(d)) == 4
    with pytest.warns(UserWarning, match="realize none of the points"):
        table = sweep.summary(d)
    assert sorted(table["seed"]) == [0, 1] and len(set(table["run"])) == 2


RF = {"dim": 8, "width": 16, "samples": 16, "outputs": 4, "steps": 3, "sweep_widths": [8, 16], "sweep_samples": 16,
      "sweep_dims": [4, 8], "activations": ["relu"], "sweep_activations": ["relu"]}


def test_a_damaged_claims_json_is_named_with_a_fix_that_works(tmp_path, monkeypatch):
    """A sweep's damaged claims.json: `claims` named `sweep --resume` as the fix, which left the file as it was for a lab
    without a sweep rule (random-features) and failed with a bare JSON error naming no file."""
    from typer.testing import CliRunner

    from specscope.cli import _register, app
    from specscope.errors import RunStoreError

    _register()
    invoke = lambda *argv: CliRunner().invoke(app, [*map(str, argv)])  # noqa: E731
    d = sweep.run_sweep("random-features", {"seed": [0]}, RF, out=tmp_path, echo=lambda *a, **k: None)
    claims, fix = d / "claims.json", f"`specscope sweep --resume {d}` rewrites it"
    claims.write_text("[1,2\n")
    res = invoke("claims", "--root", d)
    assert isinstance(res.exception, RunStoreError) and str(claims) in str(res.exception) and fix in str(res.exception)
    with monkeypatch.context() as m:  # the claims.json the sweep command prints, unwritten: named with the same fix
        m.setattr(sweep, "finish", lambda sweep_dir: None)
        res = invoke("sweep", "--resume", d)
        assert isinstance(res.exception, RunStoreError) and str(claims) in str(res.exception) and fix in str(res.exception)
    res = invoke("sweep", "--resume", d)
    assert res.exit_code == 0, res.output
    assert not claims.exists()  # random-features states no claims of a sweep: its runs' own claims speak for it
    res = invoke("claims", "--root", d, "--format", "json")
    assert res.exit_code == 0 and json.loads(res.stdout), res.output
