"""Labs registered by other packages (entry-point group `specscope.labs`): a name that is not the module's NAME, a
module:attr value or a module that does not import is one clear error, and `specscope list` lists the rest."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

import specscope.cli
from specscope import labs, store
from specscope.cli import app
from specscope.errors import ConfigError

specscope.cli._register()

LAB = '''"""A toy lab from another package."""
NAME = "toy"


def build(cfg):
    raise NotImplementedError
'''


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """An installed distribution `toylab` (a dist-info beside its module) with the entry points given."""
    def install(entries: str) -> None:
        (tmp_path / "toylab").mkdir(exist_ok=True)
        (tmp_path / "toylab" / "__init__.py").write_text(LAB)
        info = tmp_path / "toylab-0.1.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toylab\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[specscope.labs]\n{entries}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        labs._registry.cache_clear()

    yield install
    labs._registry.cache_clear()
    sys.modules.pop("toylab", None)


def test_an_entry_point_named_other_than_the_labs_NAME_is_refused(outside):
    """`mytoy = toylab` (NAME "toy") ran, recorded its runs under runs/toy/, which `--resume` then looked up as lab
    'toy' (unknown) and its sweep looked for under runs/mytoy/ (none complete: every point ran again)."""
    outside("mytoy = toylab")
    with pytest.raises(ConfigError, match=r"lab 'mytoy': module toylab is registered under that name, but its NAME is 'toy'"):
        labs.get("mytoy")
    res = CliRunner().invoke(app, ["list"])
    assert res.exit_code == 0 and "mytoy" in res.output and "does not load" in res.output


@pytest.mark.parametrize("entry, says", [("toy = toylab:build", "give the module path, `toy = toylab`"),
                                         ("toy = nosuchmodule_xyz", "failed to import (ModuleNotFoundError")])
def test_an_entry_point_that_does_not_load_is_one_line_and_list_goes_on(outside, entry, says):
    """`specscope list` ended in a traceback (exit 1) for either."""
    outside(entry)
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")):
        labs.get("toy")
    res = CliRunner().invoke(app, ["list", "--keys"])
    assert res.exit_code == 0 and "toy" in res.output and "grokking" in res.output
    assert isinstance(CliRunner().invoke(app, ["run", "toy"]).exception, ConfigError)


def test_report_of_a_lab_run_whose_lab_is_not_installed_changes_nothing(tmp_path):
    """It was taken for a user's own loop: report.html rewritten as a per-weight page, the claims figure deleted."""
    with store.Run.create(tmp_path, "toy", {"seed": 0}, progress=True) as run:
        run.log(0, {"loss": 1.0})
    (run.path / "report.html").write_text("the lab's own report")
    res = CliRunner().invoke(app, ["report", str(run.path)])
    assert isinstance(res.exception, ConfigError) and "unknown lab 'toy'" in str(res.exception)
    assert (run.path / "report.html").read_text() == "the lab's own report"


def test_every_seed_a_config_allows_gives_each_step_a_seed_torch_takes():
    """seed·1_000_003 + step overflowed torch.manual_seed's range above seed ≈ 9.2e12 (Seed allows < 2⁶³): grokking and
    spiked runs failed with a traceback. Below that the seeds are the ones labs have always drawn."""
    import torch

    from specscope.labs.base import step_seed

    for seed in (0, 7, 9_223_372_036_854_775_807):
        for step in (0, 1, 10**6):
            torch.Generator().manual_seed(step_seed(seed, step))
    assert step_seed(7, 12) == 7 * 1_000_003 + 12
