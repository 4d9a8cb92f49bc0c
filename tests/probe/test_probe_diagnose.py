"""`specscope diagnose` end to end through the CLI, and the Python `diagnose` function."""

import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from specscope import store
from specscope.cli import _register, app
from specscope.models.builtin import TRANSFORMER, language_batches
from specscope.errors import ConfigError

_register()


def invoke(*args):
    return CliRunner().invoke(app, ["diagnose", *args])


def test_transformer_table_run_and_embedding_closed_form(tmp_path):
    res = invoke("--steps", "4", "--every", "2", "--out", str(tmp_path), "--seed", "3")
    assert res.exit_code == 0, res.output
    for text in ("blocks.0.attn.q", "blocks.1.mlp.down", "embed", "closed_form", "verdict", "nr/st"):
        assert text in res.output
    (run_dir,) = (tmp_path / "diagnose").iterdir()
    df = store.load(run_dir)
    assert sorted(df[df.metric == "stable_rank"].step.unique()) == [0, 2]
    assert set(df[df.metric == "loss"].step) == {0, 1, 2, 3}
    emb = df[(df.metric == "stable_rank") & (df.layer == "embed")].set_index("step")
    batches = language_batches(3, TRANSFORMER["vocab_size"], TRANSFORMER["seq_len"])
    for step in range(3):
        ids = next(batches)[:, :-1]
        if step in emb.index:
            n, cmax = ids.numel(), torch.bincount(ids.flatten()).max().item()
            assert emb.loc[step, "value"] == pytest.approx(n / cmax, rel=1e-12)
            assert emb.loc[step, "rows"] == n
    assert store.list_runs(tmp_path).status.tolist() == ["complete"]


def test_mlp_and_user_factory(tmp_path, monkeypatch):
    res = invoke("--model", "mlp", "--steps", "2", "--out", str(tmp_path))
    assert res.exit_code == 0 and "layers.2" in res.output, res.output
    (tmp_path / "my_factory.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build(seed):
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
            batches = iter([(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(3)])
            return model, batches, lambda m, b: (m(b[0]) - b[1]).square().mean()

        def bad():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    res = invoke("--model", "my_factory:build", "--steps", "3", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert "│ 2 " in res.output and "│ 0 " in res.output  # both Linear layers of the user's model
    res = invoke("--model", "my_factory:build", "--steps", "4", "--out", str(tmp_path))
    assert isinstance(res.exception, ConfigError) and "ended after 3 batches" in str(res.exception)
    for spec, msg in [("nonsense", "module:function"), ("no_such_mod_xyz:f", "cannot import"),
                      ("my_factory:missing", "no function"), ("my_factory:bad", "must return")]:
        res = invoke("--model", spec, "--steps", "1", "--out", str(tmp_path))
        assert isinstance(res.exception, ConfigError) and msg in str(res.exception), (spec, res.exception)
    sys.modules.pop("my_factory", None)


def test_python_diagnose_function():
    from specscope.probe import diagnose

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    batches = ((torch.randn(16, 4), torch.randn(16, 2)) for _ in range(5))
    seen = []
    res = diagnose(model, batches, lambda m, b: (m(b[0]) - b[1]).square().mean(), 5, sink=seen.extend)
    assert list(res.advice.layer) == ["0", "2"] and set(res.advice.measurements) == {5}
    assert len(res.losses) == 5 and seen == res.records
