"""benchmarks/_timing.py, which every figure of the README's performance section goes through: ratios to a baseline
timed in the same round, the printed duration estimate, and the ratio's printed digits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from _timing import Timing, _figure, eta, interleaved  # noqa: E402


def test_ratios_are_per_round_medians_against_the_same_rounds_baseline(monkeypatch, capsys):
    """Each candidate's ratio in a round is its median there over the baseline's median there; the order of the turn
    rotates by one candidate a round."""
    import _timing

    clock = {"base": iter([10, 30, 20, 10, 10, 10]), "half": iter([5, 15, 10, 5, 5, 5])}
    order = []

    def fake_ms(fn, sync):
        name = fn()
        order.append(name)
        return next(clock[name])

    monkeypatch.setattr(_timing, "_ms", fake_ms)
    out = interleaved({"base": lambda: "base", "half": lambda: "half"}, "base", rounds=2, repeats=3, warmup=0,
                      first_ms={"base": 20.0, "half": 10.0})
    assert order == ["base", "half"] * 3 + ["half", "base"] * 3
    assert out["half"].ratios == (0.5, 0.5) and out["base"].ratios == (1.0, 1.0)
    assert "2 candidates, 2 rounds of 3: under a second" in capsys.readouterr().err


@pytest.mark.parametrize("x, text", [(1.234, "1.23"), (0.5, "0.50"), (0.0078, "0.0078"), (0.0151, "0.015"),
                                     (4e-5, "0.000040"), (0.0, "0.00")])
def test_small_ratios_keep_two_significant_digits(x, text):
    assert _figure(x) == text
    assert Timing("t", 1.0, (x, x, x)).ratio_text() == f"{text} [{text}–{text}]"


@pytest.mark.parametrize("ms, calls, text", [([100.0], 1, "under a second"), ([400.0, 600.0], 30, "about 30 s"),
                                             ([80_400.0, 700.0], 30, "about 41 min"), ([80_400.0], 300, "about 6.7 h")])
def test_the_duration_estimate_is_calls_times_one_call_of_each(ms, calls, text):
    assert eta(ms, calls) == text


def test_benchmark_options_out_of_range_are_one_argparse_error(capsys):
    """--block -2 printed a table of ratios of loops that ran nothing, exit 0; --rounds 0, --dims -5, --device cuda
    without a GPU ended in tracebacks."""
    import argparse

    from _timing import parse

    ap = argparse.ArgumentParser(prog="bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dims", type=int, nargs="+", default=[256])
    ap.add_argument("--moe", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    assert parse(ap, ["--moe", "0"]).rounds == 3
    for argv, says in ((["--rounds", "0"], "--rounds 0: give a whole number ≥ 1"),
                       (["--dims", "8", "-5"], "--dims -5"), (["--moe", "-1"], "≥ 0"),
                       (["--device", "foo"], "no torch device")):
        with pytest.raises(SystemExit) as e:
            parse(ap, argv)
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_the_distributed_benchmarks_optimizers_are_built():
    """benchmarks/distributed.py wrote shardwise=False into the AdamW groups too, which Hybrid refuses: the documented
    command ended in a WorkerError at every world size."""
    import torch

    import distributed as bench
    from specscope.labs import gpt

    cfg = gpt.Config(d_model=16, n_layer=1, seq_len=8, batch_size=2, muon_polar="newton_schulz")
    torch.manual_seed(0)
    opts = bench._optimizers(gpt.make_model(cfg), cfg)
    assert set(opts) == {"adamw", "muon-global", "muon-shardwise"}
    assert [g.get("shardwise") for g in opts["muon-shardwise"].param_groups if g.get("algorithm") == "muon"] == [True]


def test_the_grouped_conv_benchmark_runs_and_its_loop_is_the_per_group_estimator(capsys):
    """benchmarks/grouped_conv.py, one tiny round: its reference candidate keeps one PowerStats per group."""
    import torch
    from torch import nn

    import grouped_conv as bench
    from specscope.probe import Monitor, estimators as E

    bench.main(["--channels", "4", "--kernel", "3", "--batch", "1", "--size", "4", "--rounds", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| power, one group at a time |" in out and "| gram (default) |" in out
    conv = nn.Conv2d(4, 4, 3, groups=4)
    mon = bench.looped_power(Monitor(conv, estimator="power"))
    with mon.step(0):
        conv(torch.randn(1, 4, 5, 5)).sum().backward()
    slot = next(iter(mon.slots.values()))
    assert isinstance(slot.stats, E.GroupedStats) and all(isinstance(p, E.PowerStats) for p in slot.stats.parts)
