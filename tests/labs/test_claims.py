"""`specscope claims`: one table of every recorded claim, combined over seeds, from run and sweep directories."""

import json
from dataclasses import replace

from typer.testing import CliRunner

from specscope.cli import _register, app
from specscope.records import Claim, over_seeds
from specscope.store.integrity import digest, write_json


def _run(root, lab, run_id, config, claims, status="complete"):
    d = root / lab / run_id
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"run_id": run_id, "lab": lab, "config": config, "config_sha256": digest(config),
                                               "status": status, "created": f"2026-12-01T00:00:{run_id[-2:]}Z"}))
    write_json(d / "summary.json", {"lab": lab, "claims": [c.as_dict() for c in claims]}, checksum=True)


def _claim(verdict, value, cid="X-1"):
    return Claim(cid, "a claim", "published", f"measured {value}", verdict, setting="p = 97", value=value)


def invoke(*args):
    _register()
    return CliRunner().invoke(app, ["claims", *args])


def test_over_seeds_takes_the_majority_and_reports_mean_and_range():
    c = over_seeds([_claim("PASS", 1.0), _claim("FAIL", 2.0), _claim("PASS", 3.0)], [0, 1, 2])
    assert (c.verdict, c.seeds, c.value) == ("PASS", 3, 2.0)
    assert c.spread.startswith("2 [1–3]") and "PASS, FAIL, PASS" in c.spread and "seed 1: measured 2.0" in c.measured
    assert over_seeds([_claim("PASS", 1.0), _claim("FAIL", 2.0)]).verdict == "INCONCLUSIVE"
    seeded = [replace(_claim("PASS", 1.0), setting=f"p = 97, seed {s}; rule: seed-free") for s in (3, 4)]
    assert over_seeds(seeded, [3, 4]).setting == "p = 97, seeds 3, 4; rule: seed-free"  # not the first seed's


def test_claims_combine_seeds_prefer_decisive_verdicts_and_read_sweeps(tmp_path):
    for seed, v in ((0, 1.0), (1, 3.0), (2, 2.0)):
        _run(tmp_path, "lab-a", f"r{seed}0", {"seed": seed, "p": 97}, [_claim("PASS", v)])
    _run(tmp_path, "lab-a", "r90", {"seed": 0, "p": 5}, [_claim("INCONCLUSIVE", None)])  # newer, undecided
    _run(tmp_path, "lab-a", "r95", {"seed": 0, "p": 7}, [_claim("FAIL", 9.0)], status="running")  # not complete
    sweep = tmp_path / "sweeps" / "lab-b-20261201-000000"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"lab": "lab-b", "grid": {}, "fixed": {}}))
    (sweep / "claims.json").write_text(json.dumps([_claim("FAIL", 0.5, "Y-2").as_dict()]))
    out = invoke("--root", str(tmp_path), "--format", "json")
    assert out.exit_code == 0, out.output
    rows = {r["id"]: r for r in json.loads(out.stdout)}  # stdout stays JSON; the left-out run is named on stderr
    assert "1 run(s) under" in out.stderr and "r95 (running)" in " ".join(out.stderr.split())
    assert rows["X-1"]["seeds"] == 3 and rows["X-1"]["verdict"] == "PASS" and rows["X-1"]["runs"] == ["r00", "r10", "r20"]
    assert rows["X-1"]["spread"].startswith("2 [1–3]") and rows["Y-2"]["verdict"] == "FAIL"
    every = json.loads(invoke("--root", str(tmp_path), "--format", "json", "--all").stdout)
    assert sorted(r["verdict"] for r in every) == ["FAIL", "INCONCLUSIVE", "PASS"]


def test_a_sweeps_runs_speak_through_its_claims_and_the_labs_setting_wins_a_tie(tmp_path):
    for seed in (0, 1, 2):
        _run(tmp_path, "lab-c", f"d{seed}0", {"seed": seed, "p": 97}, [_claim("FAIL", 1.0, "Z-1")])
    sweep = tmp_path / "sweeps" / "lab-c-20261201-000000"
    for seed in (0, 1, 2):  # the sweep's own runs: newer, decisive, three seeds — still not a group of their own
        _run(sweep / "runs", "lab-c", f"s{seed}9", {"seed": seed, "p": 13}, [_claim("PASS", 5.0, "Z-1")])
    (sweep / "sweep.json").write_text(json.dumps({"lab": "lab-c", "grid": {}, "fixed": {}}))
    swept = replace(_claim("PASS", 5.0, "Z-1"), seeds=3)
    (sweep / "claims.json").write_text(json.dumps([swept.as_dict(), replace(swept, id="Z-2").as_dict()]))
    rows = {r["id"]: r for r in json.loads(invoke("--root", str(tmp_path), "--format", "json").stdout)}
    assert rows["Z-1"]["runs"] == ["d00", "d10", "d20"] and rows["Z-1"]["verdict"] == "FAIL"  # tie on seeds: the lab's runs
    assert rows["Z-2"]["runs"] == ["sweep lab-c-20261201-000000"]
    every = json.loads(invoke("--root", str(tmp_path), "--format", "json", "--all").stdout)
    assert not any(r["runs"][0].startswith("s") and not r["runs"][0].startswith("sweep") for r in every)


def test_markdown_into_a_file_between_markers(tmp_path):
    _run(tmp_path, "lab-a", "r00", {"seed": 0}, [_claim("PASS", 1.0)])
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- claims:begin -->\nold\n<!-- claims:end -->\ntail\n")
    out = invoke("--root", str(tmp_path), "--format", "markdown", "--into", str(readme))
    assert out.exit_code == 0, out.output
    text = readme.read_text()
    assert "old" not in text and "| lab-a | X-1 | PASS | 1 |" in text and text.endswith("<!-- claims:end -->\ntail\n")


def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    import pytest

    from specscope.cli import main

    for args, needle in ((["--root", str(tmp_path / "none")], "not a directory"),
                         (["--root", str(tmp_path), "--format", "csv"], "unknown")):
        monkeypatch.setattr("sys.argv", ["specscope", "claims", *args])
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 2 and needle in capsys.readouterr().err


def test_a_demo_is_counted_once_through_the_lab_runs_inside_it(tmp_path):
    _run(tmp_path, "demo", "dm01", {"quick": False}, [_claim("PASS", 1.0, "RF-1")])  # the demo's copy of its labs' claims
    _run(tmp_path / "demo" / "dm01", "random-features", "rf02", {"seed": 0}, [_claim("PASS", 1.0, "RF-1")])
    rows = json.loads(invoke("--root", str(tmp_path), "--format", "json", "--all").stdout)
    assert [(r["lab"], r["id"], r["runs"]) for r in rows] == [("random-features", "RF-1", ["rf02"])]


def test_the_table_keeps_names_verdicts_and_ids_whole_when_piped(tmp_path):
    """Piped or captured output (no terminal): names, verdicts and run ids on one line each, the long
    setting wrapped beside them — not "random-fea / tures", "UNDECIDABL / E"."""
    long = replace(_claim("UNDECIDABLE", None, "MLP-1a"), setting="a long setting, " * 20)
    _run(tmp_path, "random-features", "20261203T071936Z-1d9911", {"seed": 0}, [long])
    out = invoke("--root", str(tmp_path))
    assert out.exit_code == 0, out.output
    assert "random-features" in out.output and "UNDECIDABLE" in out.output
    assert "20261203T071936Z-1d9911" in out.output and "a long setting" in out.output


def test_an_undecidable_quick_run_never_outranks_an_inconclusive_group_of_more_seeds(tmp_path):
    for seed, v in enumerate(("PASS", "FAIL", "PASS", "FAIL")):
        _run(tmp_path, "lab-q", f"r{seed}0", {"seed": seed, "p": 97}, [_claim(v, 1.0)])
    _run(tmp_path, "lab-q", "q99", {"seed": 0, "quick": True}, [_claim("UNDECIDABLE", None)])  # newer, 1 seed
    rows = json.loads(invoke("--root", str(tmp_path), "--format", "json").stdout)
    assert [(r["verdict"], r["seeds"]) for r in rows] == [("INCONCLUSIVE", 4)]


def test_a_narrow_terminal_gets_every_field_of_every_claim_whole(tmp_path, monkeypatch):
    """At 80 (and at 120 with three runs' ids) the row table would drop or cut columns: each claim is a
    block instead, with its verdict, seeds, spread, setting and every run id whole."""
    from rich.console import Console

    for seed in range(3):
        _run(tmp_path, "random-features", f"20261203T07193{seed}Z-1d99{seed}0", {"seed": seed},
             [replace(_claim("PASS", 1.0 + seed, "RF-1"), setting="a long setting, " * 12)])
    for width in (80, 120):
        monkeypatch.setattr("specscope.cli.commands.claims.stdout_console",
                            lambda w=width: Console(width=w, force_terminal=True, color_system=None))
        out = invoke("--root", str(tmp_path))
        assert out.exit_code == 0, out.output
        lines = out.output.splitlines()
        assert max(len(line.rstrip()) for line in lines) <= width
        assert any(line.startswith("random-features RF-1 PASS  3 seeds") for line in lines), out.output
        assert all(f"20261203T07193{s}Z-1d99{s}0" in out.output for s in range(3))
        words = " ".join(out.output.split())
        assert "2 [1–3]" in words and words.count("a long setting") == 12


def test_a_sweep_without_claims_of_its_own_lets_its_seed_runs_be_combined(tmp_path):
    """`sweep LAB --grid seed=0,1,2` over a lab with no sweep rule writes no claims.json: its runs are then
    an ordinary group over seeds, not hidden."""
    sweep = tmp_path / "sweeps" / "lab-d-20261201-000000"
    for seed in (0, 1, 2):
        _run(sweep / "runs", "lab-d", f"s{seed}0", {"seed": seed, "p": 13}, [_claim("PASS", 1.0 + seed, "W-1")])
    (sweep / "sweep.json").write_text(json.dumps({"lab": "lab-d", "grid": {"seed": [0, 1, 2]}, "fixed": {}}))
    rows = json.loads(invoke("--root", str(tmp_path), "--format", "json").stdout)
    assert [(r["id"], r["verdict"], r["seeds"], r["runs"]) for r in rows] == [("W-1", "PASS", 3, ["s00", "s10", "s20"])]


def test_a_sweeps_claims_file_with_an_unknown_verdict_is_refused_not_shown(tmp_path):
    sweep = tmp_path / "sweeps" / "lab-c-20261201-000000"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"lab": "lab-c", "grid": {}, "fixed": {}}))
    (sweep / "claims.json").write_text(json.dumps([dict(_claim("PASS", 5.0, "Z-1").as_dict(), verdict="MAYBE")]))
    result = invoke("--root", str(tmp_path), "--format", "json")  # `specscope claims`: this error, exit 2
    from specscope.errors import RunStoreError

    assert isinstance(result.exception, RunStoreError) and "MAYBE" not in result.stdout, result.output
    message = str(result.exception)
    assert "unknown verdict 'MAYBE'; use one of PASS, FAIL, INCONCLUSIVE" in message
    assert "claims.json" in message and "specscope sweep --resume" in message


def test_a_runs_resealed_summary_with_an_unknown_verdict_is_refused_not_shown(tmp_path):
    """summary.json's checksum stops an edit, not a resealed one: its claims are checked as a sweep's are."""
    _run(tmp_path, "lab-c", "r1", {}, [_claim("PASS", 5.0, "Z-1")])
    d = tmp_path / "lab-c" / "r1"
    write_json(d / "summary.json", {"lab": "lab-c", "claims": [dict(_claim("PASS", 5.0, "Z-1").as_dict(), verdict="MAYBE")]},
               checksum=True)
    result = invoke("--root", str(tmp_path), "--format", "json")
    from specscope.errors import RunStoreError

    assert isinstance(result.exception, RunStoreError) and "MAYBE" not in result.stdout, result.output
    assert "unknown verdict 'MAYBE'" in str(result.exception) and "summary.json" in str(result.exception)


def test_json_output_is_strict_json_when_a_recorded_value_is_not_a_number(tmp_path):
    """A summary.json written before NaN values became null (GPT-2a when Muon never reached AdamW's loss):
    `--format json` prints null, never the bare NaN that strict JSON readers (jq, JSON.parse) refuse."""
    _run(tmp_path, "lab-a", "r10", {"seed": 0}, [_claim("FAIL", float("nan"))])
    out = invoke("--root", str(tmp_path), "--format", "json")
    assert out.exit_code == 0, out.output

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    (row,) = json.loads(out.output, parse_constant=refuse)
    assert row["value"] is None and row["verdict"] == "FAIL"


def test_a_resealed_summary_whose_value_is_not_a_number_is_refused_not_a_crash(tmp_path):
    """The seeds' values are averaged: a value "high" in a resealed summary.json is one error naming the file."""
    for seed in (0, 1):
        _run(tmp_path, "lab-a", f"r{seed}0", {"seed": seed}, [replace(_claim("PASS", 1.0), value="high")])
    result = invoke("--root", str(tmp_path))
    from specscope.errors import RunStoreError

    assert isinstance(result.exception, RunStoreError), result.exception
    assert "value 'high'" in str(result.exception) and "summary.json" in str(result.exception)
