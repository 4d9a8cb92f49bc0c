"""Names read from disk are data: validated before they become paths, escaped when printed or drawn."""

from __future__ import annotations

import json
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
