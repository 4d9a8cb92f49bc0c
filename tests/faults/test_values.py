"""Out-of-range values and unreadable inputs: one line, exit 2, and no run directory is made."""

from __future__ import annotations

import shutil

import pytest

from conftest import fingerprint, one_line_error

QUICK_ARGS = ["--set", "p=5", "--set", "steps=2", "--set", "d_model=8", "--set", "d_ff=16", "--set", "n_heads=2",
              "--set", "device=cpu"]


@pytest.mark.parametrize("lab,pair", [
    ("grokking", "grad_clip=-1"), ("grokking", "lr=-1"), ("grokking", "lr=NaN"), ("grokking", "lr=Infinity"),
    ("grokking", "d_model=-4"), ("grokking", "betas=[2,3]"), ("grokking", "betas=[0.9,1]"),
    ("grokking", f"seed={10**20}"), ("grokking", "seed=-1"), ("grokking", "steps=-5"), ("grokking", "steps=0"),
    ("grokking", "eval_every=-1"), ("grokking", "checkpoint_every=-1"), ("grokking", "batch_size=-1"),
    ("grokking", "train_fraction=1"), ("grokking", "weight_decay=-0.1"), ("grokking", "grok_threshold=2"),
    ("random-features", "dim=0"), ("random-features", "width=-1"), ("sparse-mlp", "lr=0"),
    ("gpt", "seq_len=1"), ("gpt", "betas=[0.9,-0.1]"), ("sed", "grad_clip=-1"), ("spiked", "energy_q=0"),
    ("random-features", "outputs=true"), ("random-features", "sweep_widths=[true,2]"), ("grokking", "lr=false"),
    ("switching", "mlp_lr=nan"), ("embed-geometry", "momentum=nan"), ("gated-width", "lr_muon=inf"),
])
def test_out_of_range_value_fails_before_a_run_directory(cli, tmp_path, lab, pair):
    rc, _, err = cli("run", lab, "--set", pair, "--out", tmp_path / "runs")
    one_line_error(rc, err, pair.split("=")[0])
    assert not (tmp_path / "runs").exists()


def test_every_value_of_every_lab_has_a_range():
    """No float without a finiteness bound, no int size without a lower bound (Literal, bool, str are closed)."""
    import typing

    from specscope import labs

    open_fields = []
    for name in labs.names():
        for key, f in labs.get(name).Config.model_fields.items():
            tp = f.annotation
            inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if any(t in (int, float) for t in inner) and not f.metadata:
                open_fields.append(f"{name}.{key}")
            # a float refuses NaN/inf by name ("should be a finite number"), not by a bound it fails ("<= 10")
            if float in inner and not any(getattr(m, "allow_inf_nan", None) is False for m in f.metadata):
                open_fields.append(f"{name}.{key} (NaN)")
    assert not open_fields, open_fields


@pytest.mark.parametrize("content,named", [
    (b"\xff\xfe\x00 not utf-8", "not UTF-8"), (b"config = 5", "must be a table"), (b"p = = 5", "not valid TOML"),
    (b"[grokking]\nsteps = 3", "table [grokking] is not read; put the keys under [config]"),
    # beside a [config] table, a key or table elsewhere would be silently dropped
    (b"seed = 3\n[config]\nsteps = 3", "key seed is outside [config] and is not read; put it under [config]"),
    (b"[config]\nsteps = 3\n[grokking]\np = 5", "table [grokking] is outside [config] and is not read; put its keys under [config]"),
])
def test_bad_config_file(cli, tmp_path, content, named):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(content)
    rc, _, err = cli("run", "grokking", "--config", bad, "--out", tmp_path / "runs")
    one_line_error(rc, err, bad, named)
    assert not (tmp_path / "runs").exists()


def test_a_boolean_in_a_config_file_is_not_read_as_a_number(cli, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[config]\nsteps = true\n")
    rc, _, err = cli("run", "grokking", "--config", cfg, "--out", tmp_path / "runs")
    one_line_error(rc, err, "'steps' = True", "true/false is not a value of this key (expected int >= 1)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where,named", [("folder", "is a folder"), ("/dev/null", "not a regular file"),
                                         ("missing.toml", "does not exist")])
def test_config_file_that_is_not_a_file(cli, tmp_path, where, named):
    path = tmp_path if where == "folder" else where if where.startswith("/") else tmp_path / where
    rc, _, err = cli("run", "grokking", "--config", path, "--out", tmp_path / "runs")
    one_line_error(rc, err, path, named)


@pytest.mark.parametrize("out", ["/dev/null", "file"])
def test_run_out_that_is_not_a_directory(cli, tmp_path, out):
    target = tmp_path / "file" if out == "file" else out
    if out == "file":
        target.write_text("x")
    rc, _, err = cli("run", "grokking", *QUICK_ARGS, "--out", target, "--quiet")
    one_line_error(rc, err, target)


@pytest.mark.parametrize("where", ["missing dir", "a dir", "under a file", "name too long"])
def test_export_out_that_cannot_be_written(finished, cli, tmp_path, where):
    """A name over 255 bytes was reported as "<out>/config.json: File name too long", a file nobody named."""
    (tmp_path / "file").write_text("x")
    out = {"missing dir": tmp_path / "nope" / "x.csv", "a dir": tmp_path,
           "under a file": tmp_path / "file" / "x.csv", "name too long": tmp_path / ("é" * 130 + ".csv")}[where]
    rc, _, err = cli("export", finished, "--out", out)
    one_line_error(rc, err, out, *(["264 bytes", "shorter --out"] if where == "name too long" else []))
    assert "config.json" not in err
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("target", ["metrics.sqlite", "config.json", "checkpoints/new.csv", "link"])
def test_export_never_writes_into_a_run_directory(finished, copy_of, cli, tmp_path, target):
    """`export RUN --out RUN/metrics.sqlite` replaced the database with CSV (exit 0): the run was lost."""
    import hashlib

    run = copy_of(finished)
    (tmp_path / "link").symlink_to(run / "metrics.sqlite")
    out = tmp_path / "link" if target == "link" else run / target
    before = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in run.rglob("*") if f.is_file()}
    rc, _, err = cli("export", run, "--out", out)
    one_line_error(rc, err, "inside the run directory", "outside every run (and sweep) directory")
    assert {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in run.rglob("*") if f.is_file()} == before


@pytest.mark.parametrize("command,fix", [
    (("report", "RUN"), "copy the run directory to a writable disk and report the copy"),
    (("claims", "--root", "ROOT", "--format", "markdown", "--into", "README"), "give --into a file on a writable disk"),
    (("export", "RUN", "--out", "OUT"), "pass --out FILE somewhere writable"),
])
def test_a_read_only_disk_names_the_way_out_this_command_has(finished, copy_of, cli, tmp_path, monkeypatch,
                                                             command, fix):
    """EROFS as the kernel raises it (root ignores permission bits, so it is injected at the write)."""
    import errno
    import os

    run = copy_of(finished)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- claims:begin -->\n<!-- claims:end -->\n")
    real_replace = os.replace

    def read_only(src, dst, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))

    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr("pathlib.Path.write_text", lambda self, *a, **k: read_only(None, self))
    args = [{"RUN": run, "ROOT": run.parent.parent, "README": readme, "OUT": tmp_path / "x.csv"}.get(a, a)
            for a in command]
    rc, _, err = cli(*args)
    monkeypatch.setattr(os, "replace", real_replace)
    one_line_error(rc, err, "Read-only file system", fix)


@pytest.mark.parametrize("command", [("report", "RUN"), ("export", "RUN", "--out", "OUT"),
                                     ("claims", "--root", "ROOT", "--format", "markdown", "--into", "README")])
def test_a_read_only_disk_names_the_file_not_its_temporary(finished, copy_of, cli, tmp_path, monkeypatch, command):
    """On a read-only file system the temporary file's removal fails too (EROFS): its error replaced the write's,
    and the message named `.summary.json.PID.tmp` instead of summary.json."""
    import errno
    import os
    import pathlib

    run = copy_of(finished)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- claims:begin -->\n<!-- claims:end -->\n")
    real_unlink, real_write_bytes = pathlib.Path.unlink, pathlib.Path.write_bytes

    def refused(path):
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def no_temporary_writes(self, *a, **k):  # the temporary is created (a new file), its removal refused
        if self.name.endswith(".tmp"):
            raise refused(self)
        return real_unlink(self, *a, **k)

    def write_bytes(self, data):
        if self.name.endswith(".tmp"):
            raise refused(self)
        return real_write_bytes(self, data)

    def replace(src, dst, *a, **k):
        raise refused(src)  # rename(2) names the source on EROFS as Python reports it

    monkeypatch.setattr(pathlib.Path, "unlink", no_temporary_writes)
    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    monkeypatch.setattr(os, "replace", replace)
    target = {"report": run / "summary.json", "export": tmp_path / "x.csv", "claims": readme}[command[0]]
    args = [{"RUN": run, "ROOT": run.parent.parent, "README": readme, "OUT": tmp_path / "x.csv"}.get(a, a)
            for a in command]
    rc, _, err = cli(*args)
    monkeypatch.undo()
    one_line_error(rc, err, "Read-only file system")
    assert ".tmp" not in err and (str(target) in err or str(target.name) in err), err


def test_a_read_only_disk_under_a_resume_says_copy_and_resume(killed, copy_of, cli, monkeypatch):
    """`run --resume` has no --out: the way out is a writable copy (it said "write elsewhere (--out)")."""
    import errno
    import os

    run = copy_of(killed)

    def read_only(src, dst, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))

    monkeypatch.setattr(os, "replace", read_only)
    rc, _, err = cli("run", "--resume", run)
    monkeypatch.undo()
    one_line_error(rc, err, "Read-only file system", "resume the copy")
    assert "--out" not in err


def test_compare_out_under_a_file(finished, copy_of, cli, tmp_path):
    (tmp_path / "file").write_text("x")
    rc, _, err = cli("compare", finished, copy_of(finished), "--out", tmp_path / "file" / "cmp")
    one_line_error(rc, err, tmp_path / "file")


def test_compare_refuses_one_run_given_twice_by_path_id_or_link(finished, copy_of, cli, tmp_path):
    """`compare ID ID` drew one run twice, as if two runs agreed exactly."""
    run = copy_of(finished)
    (tmp_path / "link").symlink_to(run)
    for a, b in ((run, run), ("done", run), (run, tmp_path / "link")):
        rc, _, err = cli("compare", a, b, "--root", tmp_path / "runs", "--out", tmp_path / "cmp")
        one_line_error(rc, err, "are the same run", "give each run once")
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("flag", ["--steps", "--every"])
def test_diagnose_zero_leaves_no_run_directory(cli, tmp_path, flag):
    rc, _, err = cli("diagnose", "--model", "mlp", flag, "0", "--out", tmp_path / "runs")
    assert rc == 2 and flag in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_sizes_beyond_memory_fail_on_one_line_naming_them(cli, tmp_path):
    """A = σ(B X) of 5e6 × 5e6 float64 is 200 TB, beyond any address space: torch's allocator refuses it
    at once, and the user reads which sizes asked for it — not a 60-line RuntimeError."""
    rc, _, err = cli("run", "random-features", "--set", "dim=1", "--set", "width=5000000", "--set", "samples=5e6",
                     "--set", "activations=[\"relu\"]", "--out", tmp_path / "runs")
    one_line_error(rc, err, "out of memory", "200.0 TB on cpu", "width=5000000 (default 1024)", "samples=5000000", "lower")
    assert not (tmp_path / "runs").exists()


def test_memory_running_out_mid_run_marks_the_run_failed_on_one_line(cli, tmp_path, monkeypatch):
    import json

    import torch

    from specscope.labs import runner

    real = runner._run_items

    def grows(items, cfg, run, *args):
        real(items[:1], cfg, run, *args)
        torch.empty(2**50, dtype=torch.uint8)  # 1 PB: refused by torch's allocator

    monkeypatch.setattr(runner, "_run_items", grows)
    rc, _, err = cli("run", "grokking", *QUICK_ARGS, "--quiet", "--out", tmp_path / "runs")
    one_line_error(rc, err, "grokking: out of memory", "1.1 PB", "p=5 (default", "steps=2")
    (run_dir,) = (tmp_path / "runs" / "grokking").iterdir()
    assert json.loads((run_dir / "config.json").read_text())["status"] == "failed"


def test_a_key_with_control_characters_is_shown_escaped_not_cleaned_into_a_valid_name(cli, tmp_path):
    """A terminal escape in a key must not print as the valid key it hides ('wi<ESC>[2Jdth' is not 'width')."""
    rc, _, err = cli("run", "random-features", "--set", "wi\x1b[2Jdth=3", "--out", tmp_path / "runs")
    one_line_error(rc, err, "unknown config key 'wi\\x1b[2Jdth'")


def test_report_on_an_unfinished_run_says_so_and_refuses_a_live_one(killed, copy_of, cli):
    """`report` on a killed run gave verdicts from part of the records with nothing saying so; on a live run it
    wrote summary.json and report.html under the writer."""
    import fcntl
    import json
    import os

    run = copy_of(killed)
    rc, out, err = cli("report", run)
    assert rc == 0, err
    (warning,) = err.splitlines()  # one line on stderr: stdout keeps the report's path for scripts
    assert warning.startswith("warning: ") and "is incomplete: the claims and the report cover only the steps recorded so far" in warning
    assert f"report: {run / 'report.html'}" in out.splitlines()  # the path whole on one line, however long
    assert "<title>INCOMPLETE RUN, RECORDS SO FAR" in (run / "report.html").read_text()
    meta = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**meta, "status": "running", "pid": os.getpid()}))
    with open(run / "run.lock", "a+") as held:  # the writer's lock, held as a live run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = fingerprint(run)
        rc, _, err = cli("report", run)
        assert fingerprint(run) == before
    one_line_error(rc, err, "is being written by a live process")


def test_compare_never_writes_into_a_run_and_a_file_in_the_way_has_a_fix(finished, copy_of, cli, tmp_path):
    run = copy_of(finished)
    before = fingerprint(run)
    rc, _, err = cli("compare", finished, run, "--out", run)
    one_line_error(rc, err, "is inside the run directory")
    assert fingerprint(run) == before
    (tmp_path / "taken").write_text("x")
    rc, _, err = cli("compare", finished, run, "--out", tmp_path / "taken")
    one_line_error(rc, err, "a file is in the way")


@pytest.mark.parametrize("name", ["metrics.sqlite", "config.json", "summary.json"])
def test_a_folder_in_place_of_a_runs_file_is_named_as_such(finished, copy_of, cli, tmp_path, name):
    import shutil

    run = copy_of(finished)
    (run / name).unlink()
    (run / name).mkdir()
    rc, _, err = cli("claims" if name == "summary.json" else "export", *(("--root", tmp_path / "runs") if name == "summary.json"
                                                                       else (run, "--out", tmp_path / "x.csv")))
    one_line_error(rc, err, name, "is a folder")
    shutil.rmtree(run / name)


def test_compare_without_out_writes_beside_the_runs_of_its_root(finished, copy_of, cli, tmp_path, monkeypatch):
    run = copy_of(finished)
    shutil.copytree(run, run.with_name("other"))
    monkeypatch.chdir(tmp_path / "runs" / "grokking")  # not where the runs' root is
    rc, out, err = cli("compare", "done", "other", "--root", tmp_path / "runs")
    assert rc == 0, err
    assert str(tmp_path / "runs" / "compare") in out.replace("\n", "") and not (tmp_path / "runs" / "grokking" / "runs").exists()


def test_export_never_writes_into_a_sweep_directory(finished, cli, tmp_path):
    sweep_dir = tmp_path / "grokking-1"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.json").write_text('{"lab": "grokking", "grid": {}, "fixed": {}}')
    rc, _, err = cli("export", finished, "--out", sweep_dir / "sweep.json")
    one_line_error(rc, err, "inside the run directory")
    assert (sweep_dir / "sweep.json").read_text().startswith("{")


SED_QUICK = [*QUICK_ARGS, "--set", "multitask_steps=2", "--set", "interventions=[]"]


@pytest.mark.parametrize("lab,pair,named", [
    # the list named 'add' twice and one task-add-sed window was recorded
    ("sed", "multitask=add,add", "repeats 'add'"), ("switching", "seeds=[0,0]", "--set seeds=0"),
    ("grokking", "arms=l2,lrd,l2", "--set arms=l2,lrd"), ("sed", "multitask=add,", "an empty item"),
    ("sed", f"steps={10**23}", "below 2**63"), ("grokking", f"eval_every={2**63}", "below 2**63"),
    # pydantic read 1, yes, on as true; a typo such as `ture` must not pass for a value
    ("sed", "fused_adamw=ture", "give true or false"), ("sed", "fused_adamw=1", "give true or false"),
    ("sed", "fused_adamw=yes", "give true or false"), ("grokking", "stop_after_grok=0", "give true or false"),
    # it said "'betas.1' = [0.9]: Field required"
    ("sed", "betas=0.9", "betas takes 2 values"), ("grokking", "betas=[0.9,0.9,0.9]", "e.g. --set betas=[0.9,0.98]"),
])
def test_a_value_the_run_would_misread_fails_on_one_line_naming_the_fix(cli, tmp_path, lab, pair, named):
    quick = SED_QUICK if lab == "sed" else []  # without the fix, a tiny run (the others fail on their own keys)
    key = pair.split("=")[0]
    quick = [a for i, a in enumerate(quick) if not any(x.startswith(key + "=") for x in quick[i:i + 2])]  # given once
    rc, _, err = cli("run", lab, *quick, "--set", pair, "--out", tmp_path / "runs")
    one_line_error(rc, err, f"'{pair.split('=')[0]}'" if "empty" not in named else pair.split("=")[0], named)
    assert not (tmp_path / "runs").exists()


def test_true_and_false_are_the_booleans_of_set_and_of_a_config_file(tmp_path):
    from specscope.labs.config import make_config, parse_overrides
    from specscope.labs.sed import Config

    assert make_config(Config, parse_overrides(Config, ["fused_adamw=false", "eval_train=true"])).fused_adamw is False
    assert make_config(Config, parse_overrides(Config, ["fused_adamw=False"])).fused_adamw is False  # Python's spelling
    assert make_config(Config, parse_overrides(Config, ["fused_adamw=TRUE"])).fused_adamw is True
    assert make_config(Config, parse_overrides(Config, ["multitask=add,sub", "interventions=[]"])).multitask == ["add", "sub"]
    assert make_config(Config, {"steps": 2**63 - 1}).steps == 2**63 - 1
    from specscope.errors import ConfigError
    with pytest.raises(ConfigError, match="give true or false"):
        make_config(Config, {"fused_adamw": 1})  # a TOML `fused_adamw = 1`


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_set_key_given_twice_is_refused(cli, tmp_path, command):
    """`--set dim=3 --set dim=4` ran with dim=4 and said nothing (a --grid key given twice was already refused)."""
    extra = ["--grid", "seed=0,1"] if command == "sweep" else []
    rc, _, err = cli(command, "random-features", "--set", "dim=3", "--set", "dim=4", *extra, "--out", tmp_path / "runs")
    one_line_error(rc, err, "--set dim is given twice (3 and 4)", "give each key once")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("lab,pair", [("sparse-mlp", "lr=1e300"), ("gpt", "lr_adamw=1e39"), ("grokking", "weight_decay=1e300")])
def test_a_rate_that_float32_cannot_hold_is_refused_before_the_run_starts(cli, tmp_path, lab, pair):
    """'finite' was checked as a float64: lr=1e300 passed, a run directory was made, and torch's step raised
    "value cannot be converted to type float without overflow" with a traceback, exit 1."""
    rc, _, err = cli("run", lab, "--set", pair, "--out", tmp_path / "runs")
    one_line_error(rc, err, f"'{pair.split('=')[0]}'", "less than or equal to 3.40282e+38")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,named", [(["--lr", "1e300"], "that float32 holds"),
                                        (["--steps", str(10**23)], "below 2**63"),
                                        (["--every", str(2**63)], "below 2**63")])
def test_diagnose_refuses_a_rate_or_count_out_of_range(cli, tmp_path, args, named):
    rc, _, err = cli("diagnose", "--model", "mlp", *args, "--out", tmp_path / "runs")
    one_line_error(rc, err, args[0], named)
    assert not (tmp_path / "runs").exists()


def test_a_rate_that_adams_bias_correction_overflows_is_one_line(cli, tmp_path):
    """lr=3e38 is a float32, but Adam's first step size lr / (1 − β₁) is not: torch's error is one line, exit 2."""
    rc, _, err = cli("diagnose", "--model", "mlp", "--steps", "2", "--lr", "3e38", "--out", tmp_path / "runs")
    one_line_error(rc, err, "overflowed float32", "lower the learning rate")


def test_compare_does_not_replace_a_comparison_unasked(finished, copy_of, cli, tmp_path):
    """`compare --out DIR` replaced the comparison.html already in DIR without a word (export refuses a file)."""
    out = tmp_path / "precious"
    out.mkdir()
    (out / "comparison.html").write_text("precious")
    run = copy_of(finished)
    rc, _, err = cli("compare", finished, run, "--out", out)
    one_line_error(rc, err, "already holds a comparison.html", "--force")
    assert (out / "comparison.html").read_text() == "precious"
    rc, _, err = cli("compare", finished, run, "--out", out, "--force")
    assert rc in (0, None) and (out / "comparison.html").read_text().startswith("<!DOCTYPE")


def test_an_empty_run_name_is_named_not_taken_for_the_current_folder(finished, cli):
    rc, _, err = cli("compare", finished, "")
    one_line_error(rc, err, "a run named '' (empty)")


@pytest.mark.parametrize("argv, names", [
    (("sweep", "random-features", "--grid", "seed=0,1", "dim=8,16"), ("dim=8,16", "repeat --grid or --set before each")),
    (("run", "random-features", "--set", "steps=1", "dim=8"), ("dim=8", "repeat --set before each")),
    (("diagnose", "--exclude", "layers.0", "layers.1"), ("layers.1", "--exclude")),
])
def test_several_values_after_one_repeatable_flag_say_to_repeat_it(cli, tmp_path, argv, names):
    """`--grid a=1,2 b=3,4` reads like two values of one flag; click said only "unexpected extra argument", now the
    line says to repeat the flag. Nothing runs."""
    rc, _, err = cli(*argv, "--out", tmp_path)
    one_line_error(rc, err, *names)
    assert not any(tmp_path.iterdir())


def test_a_run_on_a_read_only_disk_names_the_run_not_its_hidden_stage(cli, tmp_path, monkeypatch):
    """`run --out <read-only>` named `.<run_id>.<pid>.creating`, the hidden folder a run is made in."""
    import errno
    import os
    import pathlib

    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *a, **k):
        if self.name.endswith(".creating"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    rc, _, err = cli("run", "grokking", *QUICK_ARGS, "--out", tmp_path / "runs")
    monkeypatch.undo()
    one_line_error(rc, err, "Read-only file system", str(tmp_path / "runs" / "grokking"))
    assert ".creating" not in err


@pytest.mark.parametrize("raw, reads", [("1e-400", "0.0"), ("1e400", "inf"), ("-2e999", "-inf")])
def test_a_set_number_beyond_float64_is_named_as_typed_not_as_its_rounding(raw, reads):
    """`--set lr=1e-400` was refused as "'lr' = 0.0: Input should be greater than 0": the value typed never appeared."""
    from specscope.errors import ConfigError
    from specscope.labs.config import parse_overrides
    from specscope.labs.sparse_mlp import Config

    with pytest.raises(ConfigError, match=rf"lr={raw}: beyond a float64's range \(it reads as {reads}\)"):
        parse_overrides(Config, [f"lr={raw}"])
    assert parse_overrides(Config, ["lr=0.0", "width=0e5"]) == {"lr": 0.0, "width": 0.0}  # zeros typed as zeros


@pytest.mark.parametrize("args, option", [
    (["run", "random-features", "--config", "a.toml", "--config", "b.toml"], "--config"),
    (["run", "random-features", "--out", "o1", "--out=o2"], "--out"),
    (["diagnose", "--steps", "2", "--steps", "3"], "--steps"),
    (["export", "some-run", "-oa.csv", "-o", "b.csv"], "-o"),
])
def test_an_option_of_one_value_given_twice_is_refused(cli, tmp_path, monkeypatch, args, option):
    """click keeps the last value of a repeated option and drops the others: a second --config file silently threw
    away every key of the first, and the run went ahead at the lab's defaults. One line naming the option, exit 2,
    nothing made; `--set`, given once per key, still repeats."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.toml").write_text("[config]\nwidth = 64\n")
    (tmp_path / "b.toml").write_text("[config]\ndim = 12\n")
    rc, _, err = cli(*args)
    one_line_error(rc, err, option, "give it once")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.toml", "b.toml"]


@pytest.mark.parametrize("out, words", [("", "--out run.csv"), ("-", "not standard output")])
def test_export_to_an_empty_or_dash_path_is_refused_naming_a_file(cli, tmp_path, monkeypatch, out, words):
    """export's --out is a file: '' is refused with a file for an example (not a folder, as for run's --out), and '-'
    — which wrote a file named '-' here and said "wrote -" — with the reason (no standard output)."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli("export", "some-run", "--out", out)
    one_line_error(rc, err, words)
    assert not any(tmp_path.iterdir())


def test_help_with_a_repeated_option_still_prints_the_help(cli):
    rc, out, err = cli("run", "gpt", "--out", "a", "--out", "b", "--help")
    assert rc == 0 and "Usage" in out and not err
