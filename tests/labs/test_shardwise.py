"""shardwise lab: config checks, the summary table, and a tiny run on 2 gloo processes."""

import json
from pathlib import Path

import pandas as pd
import pytest

from specscope.errors import ConfigError
from specscope.labs import shardwise as lab
from specscope.labs.config import make_config
from specscope.records import Record


@pytest.mark.parametrize("ranks", [[], [1]])
def test_rank_counts_must_be_at_least_two_when_the_config_is_made(ranks):
    with pytest.raises(ConfigError, match="ranks"):
        make_config(lab.Config, {"ranks": ranks}, lab.NAME)


def test_rank_counts_must_divide_the_batch():
    with pytest.raises(ConfigError, match="ranks"):
        lab.build(lab.Config(ranks=[3], batch_size=16), device=None)


def shardwise_records():
    recs = [Record(s, f"blocks.{b}.attn.q", "update_cosine", c, arm="global-2") for s, b, c in [(0, 0, 0.7), (10, 0, 0.9), (0, 1, 0.8)]]
    recs += [Record(s, "", "val_loss", v, arm=a) for a, s, v in [("global-2", 0, 5.0), ("global-2", 10, 3.0),
                                                                 ("shardwise-2", 0, 5.0), ("shardwise-2", 10, 3.5)]]
    return recs


def test_summary_reads_cosines_per_weight_type_and_final_losses():
    df = pd.DataFrame([r.as_dict() for r in shardwise_records()])
    (row,) = lab.summarize(df, lab.Config())
    assert row == dict(ranks=2, weight="attn.q", cosine_median=0.8, cosine_min=0.7, val_loss_global=3.0, val_loss_shardwise=3.5)


def test_a_sweep_over_shardwise_tabulates_its_summary(tmp_path):
    """The sweep calls the lab's `summarize(df, cfg)`; shardwise's took the records only, so a finished sweep
    ended in a TypeError instead of writing summary.csv."""
    from specscope import store, sweep

    sweep_dir = tmp_path / "shardwise-1"
    sweep_dir.mkdir()
    (sweep_dir / sweep.SWEEP_FILE).write_text(json.dumps({"lab": "shardwise", "grid": {"seed": [0]}, "fixed": {}}))
    with store.Run.create(sweep_dir / "runs", "shardwise", {"seed": 0}) as run:
        run.append(shardwise_records())
    (row,) = sweep.summary(sweep_dir).to_dict("records")
    assert row["seed"] == 0 and row["weight"] == "attn.q" and row["cosine_min"] == 0.7 and row["val_loss_shardwise"] == 3.5


def test_run_and_report_print_the_measured_rows_of_a_lab_without_claims(tmp_path):
    """shardwise states no claims (an open question), so the console and the report show what it measured."""
    from typer.testing import CliRunner

    import specscope.cli
    from specscope import store
    from specscope.cli import app
    from specscope.store import integrity

    specscope.cli._register()
    with store.Run.create(tmp_path, "shardwise", {"seed": 0}, progress=True) as run:  # as a lab run is made
        run.append(shardwise_records())
        integrity.write_json(run.path / "progress.json", {"run_id": run.id}, checksum=True)
    res = CliRunner().invoke(app, ["report", str(run.path)], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if "attn.q" in x)
    assert [c.strip() for c in line.split("│")[1:-1]] == ["2", "attn.q", "0.8", "0.7", "3", "3.5"]
    page = (Path(run.path) / "report.html").read_text()
    assert "<h2>Measured</h2>" in page and "<td>attn.q</td>" in page.replace(' class="num"', "")


def test_tiny_run_on_two_processes(tmp_path):
    """The lab end to end at the smallest size (its one run through the optimizers: a group option the optimizer
    came to refuse stopped every run, and only this test, then slow, could see it)."""
    cfg = lab.Config(ranks=[2], steps=3, d_model=16, n_layer=1, n_head=2, seq_len=8, batch_size=4, eval_every=3,
                     cosine_every=1, eval_batches=1, max_bytes=50_000)
    (item,) = lab.build(cfg, device=None)
    recs = []
    item.fn(recs.extend, None)
    df = pd.DataFrame([r.as_dict() for r in recs])
    cos = df[df.metric == "update_cosine"]
    assert len(cos) == 3 * 6 and cos.value.between(-1, 1).all() and (cos.value < 0.999).any()
    assert set(df[df.metric == "val_loss"].arm) == {"global-2", "shardwise-2"}


@pytest.mark.slow
def test_a_run_longer_than_the_silence_limit_finishes(monkeypatch):
    """spawn's timeout bounded the whole part: a run with more steps than fit in 600 s was killed midway, with a fix
    (spawn's timeout=) a lab user cannot reach. Each step now sends a heartbeat and the limit bounds a silence."""
    import time

    monkeypatch.setattr(lab, "SILENCE_LIMIT", 8.0)
    cfg = lab.Config(ranks=[2], steps=400, d_model=16, n_layer=1, n_head=2, seq_len=8, batch_size=4, eval_every=400,
                     cosine_every=400, eval_batches=1, max_bytes=50_000)
    (item,) = lab.build(cfg, device=None)
    recs, t0 = [], time.monotonic()
    item.fn(recs.extend, None)
    assert time.monotonic() - t0 > 2 * lab.SILENCE_LIMIT
    assert {r.arm for r in recs if r.metric == "val_loss"} == {"global-2", "shardwise-2"}


def test_a_relative_corpus_is_stored_absolute_and_fingerprinted_for_resume(tmp_path, monkeypatch):
    """As in the gpt lab: the recorded config names the file the run read wherever it is resumed from, and
    `--resume` refuses a corpus that changed since."""
    (tmp_path / "text.txt").write_text("some text to train on\n" * 2000)
    monkeypatch.chdir(tmp_path)
    cfg = make_config(lab.Config, {"corpus": "text.txt", "max_bytes": 20_000}, lab.NAME)
    assert cfg.corpus == str(tmp_path / "text.txt")
    assert set(lab.inputs(cfg)) == {"corpus"}


def test_the_warmup_range_shown_is_the_one_accepted():
    with pytest.raises(ConfigError, match="'warmup' = 0"):
        make_config(lab.Config, {"warmup": 0}, lab.NAME)
