"""The shared loop: runs, determinism, exact resume after SIGINT, checkpoint errors, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pandas as pd
import pytest
import torch

from specscope import labs, store
from specscope.errors import ConfigError, RunStoreError
from specscope.labs.runner import run_lab
from specscope.records import Record
from specscope.store.integrity import seal
from specscope.train import load_checkpoint, save_checkpoint

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import toy_lab  # noqa: E402

VOLATILE = {"time", "lab_seconds"}


@pytest.fixture(autouse=True)
def toy_registered(monkeypatch):
    reg = dict(labs._registry())
    reg["toy"] = "toy_lab"
    monkeypatch.setattr(labs, "_registry", lambda: reg)


def metrics(run_dir) -> pd.DataFrame:
    df = store.load(run_dir)
    df = df[~df.metric.isin(VOLATILE)].drop(columns=["run_id"])
    return df.sort_values(["arm", "metric", "layer", "step"]).reset_index(drop=True)


def test_run_completes_with_summary_report_and_claims(tmp_path):
    run_dir = run_lab("toy", {"steps": 12}, out=tmp_path)
    assert store.Run.open(run_dir).status == "complete"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["claims"][0]["verdict"] == "PASS"
    assert (run_dir / "report.html").is_file()
    df = store.load(run_dir)
    assert set(df.arm) >= {"a", "b", "truth"}
    assert sorted(df[(df.metric == "val_loss") & (df.arm == "a")].step) == [0, 5, 10, 12]
    assert sorted(df[(df.metric == "loss") & (df.arm == "a")].step) == list(range(12))


def test_same_config_and_seed_give_same_metrics(tmp_path):
    a = metrics(run_lab("toy", {"steps": 10}, out=tmp_path / "1"))
    b = metrics(run_lab("toy", {"steps": 10}, out=tmp_path / "2"))
    pd.testing.assert_frame_equal(a, b)
    c = metrics(run_lab("toy", {"steps": 10, "seed": 1}, out=tmp_path / "3"))
    assert not a["value"].equals(c["value"])


@pytest.mark.parametrize("arm,at", [("a", 7), ("b", 3)])
def test_sigint_checkpoints_and_resume_is_exact(tmp_path, arm, at):
    straight = run_lab("toy", {"steps": 20}, out=tmp_path / "straight")
    toy_lab.INTERRUPT_AT[arm] = at
    with pytest.raises(KeyboardInterrupt):
        run_lab("toy", {"steps": 20}, out=tmp_path / "cut")
    cut = next((tmp_path / "cut" / "toy").iterdir())
    assert store.Run.open(cut).status == "interrupted"
    assert (cut / "checkpoints" / f"{arm}.pt").is_file()
    resumed = run_lab("", resume=cut)
    assert store.Run.open(resumed).status == "complete"
    pd.testing.assert_frame_equal(metrics(straight), metrics(resumed))


def test_resuming_a_complete_run_is_an_error(tmp_path):
    run_dir = run_lab("toy", {"steps": 3}, out=tmp_path)
    with pytest.raises(ConfigError, match="already complete"):
        run_lab("", resume=run_dir)


def test_runs_are_never_overwritten(tmp_path):
    a = run_lab("toy", {"steps": 3}, out=tmp_path, run_id="same")
    with pytest.raises(Exception, match="same"):
        run_lab("toy", {"steps": 3}, out=tmp_path, run_id="same")
    assert store.Run.open(a).status == "complete"


def test_checkpoint_roundtrip_and_bad_files(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint(p, {"x": torch.arange(3), "step": 4})
    assert load_checkpoint(p)["step"] == 4
    with pytest.raises(RunStoreError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(RunStoreError, match=f"{p} fails its checksum"):
        load_checkpoint(p)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(RunStoreError, match="no specscope checksum header"):
        load_checkpoint(foreign)
    other = tmp_path / "other.pt"  # intact, but not a specscope payload
    other.write_bytes(seal(foreign.read_bytes()))
    with pytest.raises(RunStoreError, match="not written by this specscope"):
        load_checkpoint(other)


def test_checkpoint_never_executes_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("open('%s', 'w').write('pwned')" % (tmp_path / "pwned"),))

    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(RunStoreError):
        load_checkpoint(p)
    p.write_bytes(seal(pickle.dumps(Evil())))  # a valid checksum does not make a pickle trusted: weights_only still
    with pytest.raises(RunStoreError, match="corrupt"):
        load_checkpoint(p)
    assert not (tmp_path / "pwned").exists()


def cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from specscope.cli import main

    monkeypatch.setattr(sys, "argv", ["specscope", *args])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


def test_cli_unknown_lab_suggests_closest(monkeypatch, capsys):
    code, text = cli(monkeypatch, capsys, "run", "toyy")
    assert code == 2 and "did you mean 'toy'" in text and "Traceback" not in text


def test_cli_unknown_key_lists_valid_keys(monkeypatch, capsys):
    code, text = cli(monkeypatch, capsys, "run", "toy", "--set", "widht=3")
    assert code == 2 and "unknown config key 'widht'" in text and "width (int)" in text
    assert len(text.strip().splitlines()) == 1


def test_cli_ill_typed_value_names_key_and_type(monkeypatch, capsys):
    code, text = cli(monkeypatch, capsys, "run", "toy", "--set", "steps=many")
    assert code == 2 and "'steps'" in text and "int" in text and "Traceback" not in text


def test_cli_run_and_list_lists_and_toml(monkeypatch, capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[config]\nsteps = 4\narms = ['a']\n")
    code, text = cli(monkeypatch, capsys, "run", "toy", "--config", str(cfg), "--set", "lr=0.01", "--out", str(tmp_path), "--quiet")
    assert code in (0, None), text
    run_dir = next((tmp_path / "toy").iterdir())
    conf = store.Run.open(run_dir).config
    assert conf["steps"] == 4 and conf["arms"] == ["a"] and conf["lr"] == 0.01
    assert "TOY-1" in text


def test_list_overrides_accept_commas_brackets_and_json():
    from specscope.labs.config import parse_overrides

    for raw in ("a,b", "[a,b]", '["a", "b"]'):
        assert parse_overrides(toy_lab.Config, [f"arms={raw}"])["arms"] == ["a", "b"]
    assert parse_overrides(toy_lab.Config, ["arms=[]"])["arms"] == []


def test_described_types_show_the_allowed_values():
    from typing import Annotated, Literal, Optional

    from pydantic import BaseModel, Field

    from specscope.labs.config import describe_fields

    class C(BaseModel):
        mlp: Literal["relu2", "gelu"] = "relu2"
        arms: list[Literal["adamw", "muon"]] = ["adamw"]
        rates: list[Annotated[float, Field(gt=0)]] = [0.1]
        cap: Optional[int] = None
        seeds: list[int] = Field(default=[0], min_length=1)

    text = describe_fields(C)
    assert "mlp (one of relu2|gelu) = 'relu2'" in text and "arms (list of one of adamw|muon)" in text
    assert "rates (list of float > 0)" in text and "cap (int or None) = None" in text
    assert "seeds (non-empty list of int) = [0]" in text  # `--set seeds=[]` is refused: the key says so


def test_list_keys_leave_out_a_seed_the_lab_refuses_and_start_ranges_where_the_lab_does():
    """`seed` was listed for the labs that draw theirs from `seeds` (any value but 0 is refused there), and
    sparse-mlp's `early` as `int >= 0`, where 0 is refused."""
    from specscope.labs import embed_geometry, gated_width, sparse_mlp, switching
    from specscope.labs.config import describe_fields, make_config

    for lab in (embed_geometry, gated_width, switching):
        text = describe_fields(lab.Config)
        assert "seeds (" in text and not any(part.startswith("seed (") for part in text.split(", ")), lab.NAME
    assert "early (int >= 1) = 20" in describe_fields(sparse_mlp.Config)
    from specscope.labs import sed  # its `seeds` is a count from `seed` on: `seed` is a key it takes, and listed
    text = describe_fields(sed.Config)
    assert "seeds (int >= 1) = 1" in text and any(part.startswith("seed (") for part in text.split(", "))
    with pytest.raises(ConfigError, match="early"):
        make_config(sparse_mlp.Config, {"early": 0}, "sparse-mlp")


def test_lists_of_names_a_lab_checks_show_their_names_in_list_keys():
    from typer.testing import CliRunner

    from specscope.cli import _register, app

    _register()
    out = " ".join(CliRunner().invoke(app, ["list", "--keys"], terminal_width=400).output.replace("│", " ").split())
    assert "methods (non-empty list of one of gd|specgd|auto|specgd_wrong_L) = ['gd', 'specgd', 'auto']" in out
    assert "activations (non-empty list of one of relu|relu2|gelu|silu|tanh|abs|linear|swiglu) = ['relu', 'swiglu']" in out


def test_list_keys_on_an_80_column_terminal_keeps_every_name():
    """A long list of names is folded across lines, never cut with "…" (sed's interventions)."""
    from typer.testing import CliRunner

    from specscope.cli import _register, app
    from specscope.labs import sed

    _register()
    text = CliRunner().invoke(app, ["list", "--keys"], terminal_width=80).output
    assert "…" not in text
    joined = "".join(line.split("│")[2].strip() for line in text.splitlines() if line.count("│") == 3)
    assert "|".join(sed.INTERVENTIONS) in joined


def test_list_with_a_lab_name_shows_that_lab_and_its_keys_only():
    from typer.testing import CliRunner

    from specscope.cli import _register, app
    from specscope.errors import ConfigError

    _register()
    out = " ".join(CliRunner().invoke(app, ["list", "sed"], terminal_width=400).output.replace("│", " ").split())
    assert "eps_rel (float > 0, < 1, finite) = 0.005" in out and "sparse-mlp" not in out and "grokking" not in out
    res = CliRunner().invoke(app, ["list", "sde"])
    assert isinstance(res.exception, ConfigError) and "did you mean 'sed'" in str(res.exception)


def test_an_arm_stopped_early_ends_its_progress_bar_at_that_step(tmp_path):
    """A stop rule that ends an arm at its first evaluation, step 5 of 30: the result and the bar say 5 (the bar ran to 30/30,
    as if every step had been trained)."""
    import io

    from rich.console import Console

    from specscope.train import Interrupt, Progress, Trainer

    arm = toy_lab.build(toy_lab.Config(arms=["a"]), torch.device("cpu"))[0]
    arm.steps, arm.stop = 30, lambda metrics: True  # every evaluation after step 0 stops the arm: step 5
    out = io.StringIO()
    with store.Run.create(tmp_path, "toy", {}) as run, Interrupt() as interrupt, \
            Progress(console=Console(file=out, width=120, force_terminal=False)) as bar:
        result = Trainer(run, torch.device("cpu"), seed=0, progress=bar).fit(arm, interrupt)
    assert result.steps_done == 5 and list(store.load(run.path, metric="stopped_early").step) == [5]
    assert "a (stopped early)" in out.getvalue() and "5/5" in out.getvalue() and "/30" not in out.getvalue()


def test_ctrl_c_in_a_measurement_stops_it_at_once_and_resume_redoes_it(tmp_path, monkeypatch):
    """A measurement has no step to checkpoint at: the flag the loop reads between steps was read only once the
    part had finished (a shardwise part trained to its end, 23–26 s after Ctrl-C)."""
    straight = run_lab("toy", {"steps": 6}, out=tmp_path / "straight")
    original = toy_lab.build

    def build(cfg, device):
        items = original(cfg, device)
        measure = items[-1].fn

        def slow(log, device):
            log([Record(0, "", "partial", 1.0)])  # recorded before the interrupt: gone after the resume
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)  # a long measurement; Ctrl-C must not wait for it
            measure(log, device)

        items[-1] = type(items[-1])(items[-1].name, slow)
        return items

    monkeypatch.setattr(toy_lab, "build", build)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="resume with"):
        run_lab("toy", {"steps": 6}, out=tmp_path / "cut")
    assert time.monotonic() - t0 < 20
    cut = next((tmp_path / "cut" / "toy").iterdir())
    assert store.Run.open(cut).status == "interrupted"
    monkeypatch.setattr(toy_lab, "build", original)
    resumed = run_lab("", resume=cut)
    pd.testing.assert_frame_equal(metrics(straight), metrics(resumed))


def test_a_measurement_whose_records_carry_other_arms_is_redone_without_duplicates(tmp_path, monkeypatch):
    """shardwise's parts log "global-2" / "shardwise-2" records: a resume deleted only the part's own name, so a
    part stopped after logging was redone on top of its records, and progress.json counted 0 records for it."""
    from specscope.labs.base import Measure

    original = toy_lab.build
    stop = {"after_log": False}

    def build(cfg, device):
        items = original(cfg, device)

        def measure(log, device):
            log([Record(0, "", "side", 1.0, arm="side-a"), Record(0, "", "side", 2.0, arm="side-b")])
            if stop["after_log"]:
                stop["after_log"] = False
                raise KeyboardInterrupt  # logged, not yet marked done: the worst moment for a resume

        return [*items, Measure("sides", measure, arms=("side-a", "side-b"))]

    monkeypatch.setattr(toy_lab, "build", build)
    straight = run_lab("toy", {"steps": 4}, out=tmp_path / "straight")
    assert json.loads((straight / "progress.json").read_text())["records"]["sides"] == 2
    stop["after_log"] = True
    with pytest.raises(KeyboardInterrupt):
        run_lab("toy", {"steps": 4}, out=tmp_path / "cut")
    cut = next((tmp_path / "cut" / "toy").iterdir())
    resumed = run_lab("", resume=cut)
    pd.testing.assert_frame_equal(metrics(straight), metrics(resumed))
    bad = lambda cfg, device: [*original(cfg, device), Measure("sides", print, arms=("a",))]  # noqa: E731
    monkeypatch.setattr(toy_lab, "build", bad)  # a part's arm named like another part: refused before any run
    with pytest.raises(ConfigError, match="same name"):
        run_lab("toy", {"steps": 4, "arms": ["a"]}, out=tmp_path / "clash")


def test_a_run_recorded_before_measurements_named_their_arms_loads_and_resumes(tmp_path, monkeypatch):
    """progress.json from before `Measure(arms=)`: no "arms" map, and a finished measurement counted under its own name
    (0 records, its records being under other arm names). Such a run still loads, and resumes exactly from an arm
    stopped after the measurement finished."""
    from specscope.labs.base import Measure
    from specscope.store import integrity

    original = toy_lab.build

    def build(cfg, device):
        def measure(log, device):
            log([Record(0, "", "side", 1.0, arm="side-a"), Record(0, "", "side", 2.0, arm="side-b")])

        return [Measure("sides", measure, arms=("side-a", "side-b")), *original(cfg, device)]

    monkeypatch.setattr(toy_lab, "build", build)
    straight = run_lab("toy", {"steps": 20}, out=tmp_path / "straight")
    toy_lab.INTERRUPT_AT["b"] = 3
    with pytest.raises(KeyboardInterrupt):
        run_lab("toy", {"steps": 20}, out=tmp_path / "cut")
    cut = next((tmp_path / "cut" / "toy").iterdir())
    progress = integrity.read_json(cut / "progress.json", checksum=True)
    assert progress["arms"] == {"sides": ["sides", "side-a", "side-b"]} and progress["records"]["sides"] == 2
    del progress["arms"]
    progress["records"]["sides"] = 0  # as the old runner counted it: records under the part's own name
    integrity.write_json(cut / "progress.json", progress, checksum=True)
    assert len(store.load(cut).query("arm == 'side-a' or arm == 'side-b'")) == 2
    resumed = run_lab("", resume=cut)
    assert store.Run.open(resumed).status == "complete"
    pd.testing.assert_frame_equal(metrics(straight), metrics(resumed))


def test_a_damaged_checkpoint_deleted_as_its_error_says_restarts_that_arm_and_the_resume_is_exact(tmp_path):
    """The error for a damaged checkpoint says to delete it to restart that arm from scratch; the resume then refused
    because progress.json named the checkpoint, and the run could not be resumed at all."""
    straight = run_lab("toy", {"steps": 20}, out=tmp_path / "straight")
    toy_lab.INTERRUPT_AT["b"] = 7
    with pytest.raises(KeyboardInterrupt):
        run_lab("toy", {"steps": 20}, out=tmp_path / "cut")
    cut = next((tmp_path / "cut" / "toy").iterdir())
    ck = cut / "checkpoints" / "b.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    with pytest.raises(RunStoreError, match="delete it to restart that arm from scratch"):
        run_lab("", resume=cut)
    ck.unlink()
    with pytest.warns(UserWarning, match="arm 'b' starts again from step 0"):
        resumed = run_lab("", resume=cut)
    assert store.Run.open(resumed).status == "complete"
    pd.testing.assert_frame_equal(metrics(straight), metrics(resumed))


def test_ctrl_c_after_the_last_part_stops_the_run_before_its_report(tmp_path, monkeypatch):
    """A Ctrl-C landing after the loop last read its flag (while the run's timing record was written) was lost:
    the run wrote its report, ended "complete" and exited 0. It now stops as interrupted, and the resume writes
    the report, with the same records as a run never stopped."""
    straight = run_lab("toy", {"steps": 4}, out=tmp_path / "straight")
    original = store.Run.record_count

    def record_count(self, arm=None, **kw):
        if kw.get("metric") == "lab_seconds":
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets the flag: the loop has no step left to read it
        return original(self, arm, **kw)

    monkeypatch.setattr(store.Run, "record_count", record_count)
    with pytest.raises(KeyboardInterrupt, match="resume with"):
        run_lab("toy", {"steps": 4}, out=tmp_path / "cut")
    monkeypatch.setattr(store.Run, "record_count", original)
    cut = next((tmp_path / "cut" / "toy").iterdir())
    assert store.Run.open(cut).status == "interrupted" and not (cut / "report.html").exists()
    resumed = run_lab("", resume=cut)
    pd.testing.assert_frame_equal(metrics(straight), metrics(resumed))
    assert store.Run.open(resumed).status == "complete" and (resumed / "report.html").exists()


def test_ctrl_c_before_the_first_part_prints_the_resume_command(tmp_path, monkeypatch):
    """Between making the run directory and the first part (progress.json's first write) Ctrl-C exited 130 with a
    bare "interrupted": no resume command, and the run left "running" (listed as incomplete)."""
    from specscope.labs import runner

    straight = run_lab("toy", {"steps": 4}, out=tmp_path / "straight")
    original = runner._write_progress
    monkeypatch.setattr(runner, "_write_progress", lambda run, state: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(KeyboardInterrupt, match="resume with: specscope run --resume"):
        run_lab("toy", {"steps": 4}, out=tmp_path / "cut")
    monkeypatch.setattr(runner, "_write_progress", original)
    cut = next((tmp_path / "cut" / "toy").iterdir())
    assert store.Run.open(cut).status == "interrupted"
    pd.testing.assert_frame_equal(metrics(straight), metrics(run_lab("", resume=cut)))


def test_a_second_ctrl_c_while_the_run_is_marked_interrupted_does_not_cut_it_short(tmp_path, monkeypatch):
    """Two Ctrl-C 50 ms apart: the second landed while the first's cleanup wrote the status, so the run stayed
    "running" and the resume command was never printed."""
    from specscope.labs import runner

    real_write, real_status = runner._write_progress, store.Run.set_status
    writes = []

    def write_then_ctrl_c(run, state):
        writes.append(1)
        real_write(run, state)
        if len(writes) == 2:  # the first part finished: Ctrl-C now stops at once
            raise KeyboardInterrupt

    def set_status(self, status):
        if status == "interrupted":
            os.kill(os.getpid(), signal.SIGINT)  # the impatient second Ctrl-C
        return real_status(self, status)

    monkeypatch.setattr(runner, "_write_progress", write_then_ctrl_c)
    monkeypatch.setattr(store.Run, "set_status", set_status)
    with pytest.raises(KeyboardInterrupt, match="resume with"):
        run_lab("toy", {"steps": 4}, out=tmp_path)
    monkeypatch.setattr(store.Run, "set_status", real_status)
    assert store.Run.open(next((tmp_path / "toy").iterdir())).status == "interrupted"


@pytest.mark.parametrize("change", ["optimizer", "callback"])
def test_a_checkpoint_of_another_optimizer_or_other_callbacks_is_refused_naming_it(tmp_path, monkeypatch, change):
    """A checkpoint of SGD(momentum) resumed into Adam: torch's load_state_dict took the groups and the next step raised
    a bare KeyError ('betas'); one written with a callback more or less resumed in silence, zip() dropping a state or
    leaving a callback empty, so the resume was not exact."""
    toy_lab.INTERRUPT_AT["b"] = 7
    with pytest.raises(KeyboardInterrupt):
        run_lab("toy", {"steps": 20}, out=tmp_path / "cut")
    cut = next((tmp_path / "cut" / "toy").iterdir())
    if change == "optimizer":
        monkeypatch.setattr(torch.optim, "SGD", lambda params, lr, momentum: torch.optim.Adam(params, lr=lr))
    else:  # a callback with state that the interrupted run did not have (a stateless one may come or go)
        class Counter:
            every = 1

            def state_dict(self):
                return {"n": 0}

            def load_state_dict(self, state):
                pass

        real = toy_lab.Arm
        monkeypatch.setattr(toy_lab, "Arm", lambda *a, callbacks, **k: real(*a, callbacks=[*callbacks, Counter()], **k))
    with pytest.raises(RunStoreError, match=r"b\.pt was written by another configuration of arm 'b' \((another optimizer|0 callbacks with state, this run has 1)"):
        run_lab("", resume=cut)
