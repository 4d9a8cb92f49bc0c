"""Names read from disk are data: validated before they become paths, escaped when printed or drawn."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import fingerprint, one_line_error
from specscope.errors import ConfigError
from specscope.names import check_name, markup, mathtext


def set_meta(run: Path, **changes) -> None:
    meta = json.loads((run / "config.json").read_text())
    meta.update(changes)
    (run / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("run_id", ["../../x", "/abs/path", "a/b", "..", ".hidden", "", "x" * 300])
def test_hostile_run_id_never_becomes_a_path(finished, copy_of, cli, tmp_path, monkeypatch, run_id):
    run = copy_of(finished)
    set_meta(run, run_id=run_id)
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before, outside = fingerprint(run), fingerprint(tmp_path)
    rc, _, err = cli("export", run)  # the default output name comes from run_id
    one_line_error(rc, err, run / "config.json", "not a plain name")
    assert fingerprint(run) == before and fingerprint(tmp_path) == outside  # nothing written anywhere


def test_hostile_lab_name_is_refused(finished, copy_of, cli):
    run = copy_of(finished)
    set_meta(run, lab="../grokking")
    rc, _, err = cli("run", "--resume", run)
    one_line_error(rc, err, run / "config.json", "lab")


def test_markup_in_names_prints_as_typed(finished, copy_of, cli):
    run = copy_of(finished)
    hostile = run.parent / "[bold]x"
    run.rename(hostile)  # a directory name is read back as the run id of an unreadable run
    set_meta(hostile, run_id="[/nope]")
    rc, out, err = cli("runs", "--root", hostile.parent.parent)
    assert rc == 0, err
    assert "[bold]x" in out and "unreadable" in out  # listed under its directory name, verbatim


def test_diagnose_with_markup_layer_names(cli, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    rc, out, err = cli("diagnose", "--model", "hostile_model:markup_only", "--steps", "3", "--out", tmp_path)
    assert rc == 0, err
    assert "[/nope]" in out and "[bold]head" in out
    (run,) = (tmp_path / "diagnose").iterdir()
    assert json.loads((run / "config.json").read_text())["status"] == "complete"


def test_check_name_and_escapes():
    assert check_name("arm", "l2") == "l2"
    for bad in ["../x", "/x", "a\\b", "", ".", "a b", None, 5]:
        with pytest.raises(ConfigError, match="not a plain name"):
            check_name("arm", bad)
    assert markup("[/nope]") == r"\[/nope]"
    assert mathtext(r"a$\x{$") == r"a\$\x{\$"


def test_mathtext_escape_renders(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_title(mathtext(r"a$\undefinedcommand{$"))
    fig.savefig(tmp_path / "t.png")  # unescaped, this raises ValueError in the mathtext parser
    plt.close(fig)


@pytest.mark.parametrize("arm", ["relu/gd", "../../x", "/abs", "..", "a b[1]"])
def test_arm_names_never_leave_the_checkpoint_directory(tmp_path, arm):
    from types import SimpleNamespace

    from specscope.train import Trainer

    trainer = Trainer(SimpleNamespace(checkpoints_dir=tmp_path / "checkpoints"), None, 0)
    path = trainer.checkpoint_path(arm)
    assert path.parent == tmp_path / "checkpoints" and path.name.endswith(".pt") and "/" not in path.name


def test_control_characters_read_from_a_summary_print_escaped(finished, copy_of, cli, tmp_path):
    """A summary.json whose checksum was recomputed (it is unkeyed) can hold anything: an OSC/ANSI sequence in a
    claim's setting retitled the terminal, and an end marker in it corrupted README on the next --into."""
    from specscope.store.integrity import write_json

    run = copy_of(finished)
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("sha256")
    hostile = "\x1b]0;TITLE\x07\x1b[31mRED <!-- claims:end --> | cell"
    summary["claims"][0]["setting"] = hostile
    write_json(run / "summary.json", summary, checksum=True)
    rc, out, _ = cli("claims", "--root", tmp_path / "runs")
    assert rc == 0 and "\x1b" not in out and "\x07" not in out and "\\x1b]0;TITLE\\x07" in out.replace("\n", "")
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- claims:begin -->\nold\n<!-- claims:end -->\nbottom\n")
    for _ in range(2):  # the marker inside a cell is no marker: the file keeps one table, twice written
        rc, _, err = cli("claims", "--root", tmp_path / "runs", "--format", "markdown", "--into", readme)
        assert rc == 0, err
    text = readme.read_text()
    assert text.startswith("top\n<!-- claims:begin -->\n") and text.endswith("<!-- claims:end -->\nbottom\n")
    assert text.count("\n<!-- claims:end -->\n") == 1 and "\x1b" not in text


@pytest.mark.parametrize("content, message", [
    ("x\n<!-- claims:end -->\nmid\n<!-- claims:begin -->\ny\n", "line followed by an '<!-- claims:end -->' line"),
    ("a <!-- claims:begin --> b\n<!-- claims:end -->\n", "line followed by"),
    # the second begin line fell inside the replaced region and was dropped without a word
    ("<!-- claims:begin -->\n<!-- claims:begin -->\n<!-- claims:end -->\n", "line more than once"),
    ("<!-- claims:begin -->\n<!-- claims:end -->\n<!-- claims:end -->\n", "line more than once"),
])
def test_claims_into_a_file_whose_markers_are_out_of_order_is_one_error(finished, copy_of, cli, tmp_path, content, message):
    copy_of(finished)
    target = tmp_path / "f.md"
    target.write_text(content)
    rc, _, err = cli("claims", "--root", tmp_path / "runs", "--format", "markdown", "--into", target)
    one_line_error(rc, err, message)
    assert target.read_text() == content
    target.write_bytes(b"\xff\xfe<!-- claims:begin -->\n")
    rc, _, err = cli("claims", "--root", tmp_path / "runs", "--format", "markdown", "--into", target)
    one_line_error(rc, err, "is not UTF-8 text")


def test_report_never_writes_through_a_link_in_the_run(finished, copy_of, cli, tmp_path):
    """figures/loss.png replaced by a link to a file outside: `report` wrote the PNG into that file."""
    run = copy_of(finished)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (figure,) = [f for f in (run / "figures").iterdir() if f.suffix == ".png"][:1]
    figure.unlink()
    figure.symlink_to(victim)
    rc, _, err = cli("report", run)
    assert rc == 0, err
    assert victim.read_text() == "keep me" and figure.is_file() and not figure.is_symlink()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    import shutil

    shutil.rmtree(run / "figures")
    (run / "figures").symlink_to(outside)
    rc, _, err = cli("report", run)
    one_line_error(rc, err, "is a link to", "remove the link")
    assert not any(outside.iterdir())


def test_a_folder_where_the_page_goes_is_refused_before_anything_is_written(finished, copy_of, cli):
    """report.html made a folder: the report rewrote summary.json and every figure, then failed on the page."""
    run = copy_of(finished)
    (run / "report.html").unlink()
    (run / "report.html").mkdir()
    before = fingerprint(run)
    rc, _, err = cli("report", run)
    one_line_error(rc, err, run / "report.html", "is a folder, not the report page", "move it away")
    assert fingerprint(run) == before


def test_claims_from_a_salvaged_summary_say_so(finished, copy_of, cli, tmp_path):
    """`report --salvage` writes verdicts from what was readable; `claims` showed them unmarked (and --into
    carried them into a README as if whole)."""
    from specscope.store.integrity import write_json

    run = copy_of(finished)
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("sha256")
    write_json(run / "summary.json", {**summary, "salvaged": "3 of 40 pages unreadable"}, checksum=True)
    for fmt in ("table", "markdown", "json"):
        rc, out, err = cli("claims", "--root", tmp_path / "runs", "--format", fmt)
        assert rc == 0 and "salvaged from a damaged database" in out, (fmt, err)


def test_claims_into_keeps_a_links_target_the_files_mode_and_its_line_endings(finished, copy_of, cli, tmp_path):
    import os

    copy_of(finished)
    real = tmp_path / "real.md"
    real.write_bytes(b"top\r\n<!-- claims:begin -->\r\nold\r\n<!-- claims:end -->\r\nbottom\r\n")
    os.chmod(real, 0o600)
    link = tmp_path / "link.md"
    link.symlink_to(real)
    rc, _, err = cli("claims", "--root", tmp_path / "runs", "--format", "markdown", "--into", link)
    assert rc == 0, err
    assert link.is_symlink() and (os.stat(real).st_mode & 0o777) == 0o600
    data = real.read_bytes()
    assert b"old" not in data and b"| lab |" in data and data.count(b"\n") == data.count(b"\r\n")


def test_a_newline_or_tab_in_a_path_shows_escaped_in_the_one_line_error(cli, tmp_path):
    hostile = tmp_path / "run\nid\tx"
    rc, _, err = cli("run", "--resume", hostile)
    one_line_error(rc, err, "run\\nid\\tx")


@pytest.mark.parametrize("argv", [("compare", "a", "b", "--out", ""), ("runs", "--root", ""), ("runs", "--root=")])
def test_an_empty_path_option_is_refused_not_read_as_the_current_folder(cli, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(*argv)
    one_line_error(rc, err, "is empty; give a path")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["device", "fifo", "folder"])
def test_claims_into_what_is_not_a_regular_file_is_refused_before_reading_it(finished, copy_of, cli, tmp_path, kind):
    """`--into /dev/zero` read the device until the kernel's out-of-memory killer ended the process (exit 137); a
    FIFO would block forever."""
    copy_of(finished)
    target = {"device": Path("/dev/zero"), "fifo": tmp_path / "pipe", "folder": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    rc, _, err = cli("claims", "--root", tmp_path / "runs", "--format", "markdown", "--into", target)
    one_line_error(rc, err, "is not a regular file")


def test_claims_as_json_with_nothing_recorded_is_an_empty_list(cli, tmp_path):
    (tmp_path / "runs").mkdir()
    rc, out, err = cli("claims", "--root", tmp_path / "runs", "--format", "json")
    assert rc in (0, None) and json.loads(out) == [] and "no recorded claims" in err
    rc, out, err = cli("claims", "--root", tmp_path / "runs", "--format", "markdown")  # a table, or nothing
    assert rc in (0, None) and out == "" and "no recorded claims" in err


def test_claims_into_a_file_with_nothing_recorded_is_refused_and_the_file_kept(cli, tmp_path):
    """It exited 0 and left the earlier table, which read as a table rewritten from the (absent) runs."""
    (tmp_path / "runs").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- claims:begin -->\n| an earlier table |\n<!-- claims:end -->\n")
    before = readme.read_bytes()
    rc, out, err = cli("claims", "--root", tmp_path / "runs", "--format", "markdown", "--into", readme)
    one_line_error(rc, err, "no recorded claims under", f"nothing was written into {readme}")
    assert readme.read_bytes() == before and out == ""


def test_claims_markdown_cannot_carry_an_html_tag():
    """A gpt run on a corpus folder named `"><img src=x onerror=alert(1)>` put the tag, raw, into the Markdown table
    `claims --into README.md` writes (Markdown passes inline HTML through); the HTML pages escaped it."""
    from specscope.cli.commands.claims import Row, markdown
    from specscope.records import Claim

    claim = Claim("GPT-1a", "text", "published", "measured", "PASS",
                  setting='corpus "><img src=x onerror=alert(1)>; rule: st(A) < 1.5 </td>')
    table = markdown([Row("gpt", claim, ["r1"], "2026-12-06")])
    assert "<img" not in table and "</td" not in table and "&lt;img src=x" in table and "st(A) < 1.5" in table


@pytest.mark.parametrize("command", [["report"], ["run", "--resume"]])
def test_a_run_named_dot_dot_slash_x_is_not_looked_up_beside_the_root(finished, copy_of, cli, tmp_path, monkeypatch, command):
    """`../x` is no run id: with a run at ./x and the root runs/, it resolved to runs/../x (the `lab/run_id` form was
    tried before the name was checked), and `report ../x` wrote there. Now the name is refused as a path that is not there."""
    import shutil

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    shutil.copytree(finished, tmp_path / "x")
    before = fingerprint(tmp_path / "x")
    rc, _, err = cli(*command, "../x")
    one_line_error(rc, err, "../x")
    assert fingerprint(tmp_path / "x") == before
