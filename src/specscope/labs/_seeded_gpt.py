"""Pieces shared by the multi-seed GPT labs (embed-geometry, gated-width): arms named `<variant>/s<seed>`,
built from the gpt lab's model, data, schedule and evaluation, and read back paired by seed."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from specscope.labs import gpt
from specscope.labs.base import Arm
from specscope.optim import Hybrid
from specscope.probe import Monitor
from specscope.report import style


def arm_name(variant: str, seed: int) -> str:
    return f"{variant}/s{seed}"


def split_arm(arm: str) -> tuple[str, int]:
    variant, s = arm.rsplit("/s", 1)
    return variant, int(s)


def gpt_arm(gcfg: gpt.Config, name: str, groups: Callable[[torch.nn.Module], list[dict[str, Any]]],
            device: torch.device, probe_every: int, callbacks: list | None = None) -> Arm:
    """One GPT arm: the model seeded by gcfg.seed, the gpt lab's batches, schedule, val/train loss and Monitor."""
    corpus = _corpus(gcfg)
    torch.manual_seed(gcfg.seed)
    model = gpt.make_model(gcfg).to(device)
    monitor = Monitor(model, every=probe_every, estimator=gcfg.probe_estimator)
    opt = Hybrid(groups(model), algorithm="adamw", stable_rank=monitor)
    batches = gpt.Batches(corpus.train, gcfg)
    return Arm(name, model, opt, batches, gpt.loss_fn, gcfg.steps, gpt.make_evaluate(corpus, gcfg, device),
               gcfg.eval_every, monitor=monitor, callbacks=[gpt.Schedule(opt, gcfg), *(callbacks or [])],
               grad_clip=gcfg.grad_clip or None)


def _corpus(gcfg: gpt.Config):
    """The corpus of every arm of a run (read once: `load_corpus` keeps it while its files are unchanged)."""
    return gpt.make_corpus(gcfg)


def final_table(df: pd.DataFrame, metric: str = "val_loss") -> pd.DataFrame:
    """variant × seed: the last recorded whole-model `metric` (and `time`) of every arm."""
    d = df[(df["metric"].isin([metric, "time"])) & (df["layer"] == "") & df["arm"].str.contains("/s")]
    rows = []
    for arm, g in d.groupby("arm"):
        variant, seed = split_arm(arm)
        last = g.sort_values("step").groupby("metric")["value"].last()
        rows.append(dict(variant=variant, seed=seed, final=float(last.get(metric, math.nan)),
                         seconds=float(last.get("time", math.nan))))
    return pd.DataFrame(rows, columns=["variant", "seed", "final", "seconds"])


def paired_difference(table: pd.DataFrame, a: str, b: str) -> pd.Series:
    """final(b) − final(a) per seed present in both (> 0: a is lower)."""
    t = table.pivot_table(index="seed", columns="variant", values="final")
    if a not in t or b not in t:
        return pd.Series(dtype=float)
    return (t[b] - t[a]).dropna()


def mean_sd(x: pd.Series) -> str:
    x = x.dropna()
    if len(x) == 0:
        return "n/a"
    return f"{x.mean():.3f} ± {x.std(ddof=1):.3f}" if len(x) > 1 else f"{x.mean():.3f}"


def curves_figure(df: pd.DataFrame, variants: list[str], title: str) -> Figure | None:
    """Validation loss against steps and against wall-clock seconds, mean over seeds (band: min–max)."""
    fig = Figure(figsize=(9, 3.4), dpi=100, layout="constrained")
    ax_s, ax_t = fig.subplots(1, 2)
    drawn = False
    for v in variants:
        arms = [a for a in df["arm"].unique() if isinstance(a, str) and a.startswith(v + "/s")]
        val = _stack(df, arms, "val_loss")
        if val.empty:
            continue
        drawn = True
        t = _stack(df, arms, "time").reindex(val.index).mean(axis=1)
        line = ax_s.plot(val.index, val.mean(axis=1), label=f"{v} ({val.shape[1]} seeds)")[0]
        ax_s.fill_between(val.index, val.min(axis=1), val.max(axis=1), color=line.get_color(), alpha=0.2)
        ax_t.plot(t.values, val.mean(axis=1).values, color=line.get_color(), label=v)
    if not drawn:
        return None
    ax_s.set(xlabel="step", ylabel="validation loss (nats/byte)", title=title)
    ax_t.set(xlabel="wall-clock seconds (mean over seeds)", ylabel="validation loss (nats/byte)")
    style.legend(ax_s)
    return fig


def _stack(df: pd.DataFrame, arms: list[str], metric: str) -> pd.DataFrame:
    d = df[df["arm"].isin(arms) & (df["metric"] == metric) & (df["layer"] == "")]
    return d.pivot_table(index="step", columns="arm", values="value", aggfunc="last").sort_index()


def per_layer_median(df: pd.DataFrame, arms: list[str], metric: str) -> pd.Series:
    """Median over steps and arms of a per-layer metric, by weight type (gpt.weight_type)."""
    d = df[df["arm"].isin(arms) & (df["metric"] == metric) & (df["layer"] != "")]
    d = d[np.isfinite(d["value"])]
    return d.groupby(d["layer"].map(gpt.weight_type))["value"].median()
