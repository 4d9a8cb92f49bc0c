"""GD for T steps, then SpecGD: loss at a fixed budget vs T, nr(G)/st(A) over the burn-in (002's experiment 3).

Paper 001 (§3.1.4, Theorems 3.6 and 3.11, spiked random features) proves that nr(G) is O(1) at initialization
and grows after a short burn-in of GD, so a spectral step pays once nr(G)/st(A) > 1; paper 002's third
suggested experiment is this switching point. This lab runs, for a grid of switch times T, GD for T steps and the
geometry-matched SpecGD step afterwards (same lr; REFERENCE §3), on two setups of the existing labs:

    rf/<act>    random-feature regression ½‖W A − Y‖² from W = 0 (random-features lab), exact constants:
                GD lr 1/‖A‖₂², SpecGD −(‖G‖_*/‖A‖_F²)·polar(G); st(A) and nr(G) exact every step
    mlp/<act>   the sparse-function MLP (sparse-mlp lab): GD everywhere, then SpecGD on layers 2–3 (st(A) from
                the probe Monitor every step), GD on the first layer and the head

T = steps is plain GD, whose recorded nr(G)/st(A) is the burn-in curve; T_cross is the first step at which it
exceeds 1 (for the MLP: on every spectral layer). An AutoGeometry arm (threshold 1, hysteresis 0.1) records
its own first spectral step. Every (setup, seed) gets every T; the budget loss is the training loss after
`steps` steps.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure
from pydantic import Field

from specscope.data.synthetic import check_activation, rf_regression, sparse_regression
from specscope.errors import ConfigError
from specscope.labs import random_features as rf
from specscope.labs import sparse_mlp as mlp
from specscope.labs.base import Arm, AtLeast0, LabConfig, NonNegative, Seed, check_seed_list
from specscope.records import Claim
from specscope.report import style

NAME = "switching"
KINDS = ("rf", "mlp")


class Config(LabConfig):
    """Defaults: rf/relu, rf/swiglu, mlp/relu × 3 seeds × the T grid (+ AutoGeometry), ≈ 3 min on 2 idle cores."""

    setups: list[str] = Field(default=["rf/relu", "rf/swiglu", "mlp/relu"], min_length=1)
    seeds: list[Seed] = Field(default=[0, 1, 2], min_length=1)
    rf_steps: int = Field(30, ge=1, le=100_000)
    rf_switch: list[AtLeast0] = [0, 1, 2, 3, 5, 8, 12, 20, 30]  # T grid; T = rf_steps is plain GD
    rf_dim: int = Field(128, ge=2)
    rf_width: int = Field(1024, ge=2)
    rf_samples: int = Field(1024, ge=2)
    rf_outputs: int = Field(64, ge=1)
    mlp_steps: int = Field(100, ge=1, le=100_000)
    mlp_switch: list[AtLeast0] = [0, 2, 5, 10, 20, 40, 70, 100]
    mlp_dim: int = Field(32, ge=3)
    mlp_width: int = Field(256, ge=2)
    mlp_samples: int = Field(256, ge=2)
    mlp_lr: float = Field(0.05, gt=0, le=10, allow_inf_nan=False)
    tolerance: NonNegative = 0.05  # SW-1: loss at the predicted T within (1 + tolerance) × the best


def _parse(setup: str) -> tuple[str, str]:
    kind, _, act = setup.partition("/")
    if kind not in KINDS or not act:
        raise ConfigError(f"setup {setup!r} is not '<kind>/<activation>' with kind in {KINDS}, e.g. 'rf/relu'")
    check_activation(act)
    return kind, act


def budget(cfg: Config, kind: str) -> tuple[int, list[int]]:
    steps, grid = (cfg.rf_steps, cfg.rf_switch) if kind == "rf" else (cfg.mlp_steps, cfg.mlp_switch)
    return steps, sorted(set(min(t, steps) for t in grid) | {steps})


def arm_name(setup: str, seed: int, T: int | str) -> str:
    return f"{setup}/s{seed}/T{T}"


def split_arm(arm: str) -> tuple[str, int, str]:
    setup, s, t = arm.rsplit("/", 2)
    return setup, int(s[1:]), t[1:]


class Switch:
    """GD for the first `at` steps, then the spectral optimizer; both stateless (no momentum), so the switch
    carries nothing over. Counts its own steps, saved in its state_dict."""

    def __init__(self, gd: torch.optim.Optimizer, spectral: torch.optim.Optimizer, at: int):
        self.gd, self.spectral, self.at, self.k = gd, spectral, at, 0

    def step(self) -> None:
        (self.gd if self.k < self.at else self.spectral).step()
        self.k += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.gd.zero_grad(set_to_none=set_to_none)
        self.spectral.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "gd": self.gd.state_dict(), "spectral": self.spectral.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k = state["k"]
        self.gd.load_state_dict(state["gd"])
        self.spectral.load_state_dict(state["spectral"])

    def pop_records(self) -> list:
        return []


def _rf_arms(cfg: Config, act: str, seed: int, device) -> list[Arm]:
    p = rf_regression(cfg.rf_dim, cfg.rf_width, cfg.rf_samples, cfg.rf_outputs, act, seed, device=device)
    c = rf.constants(p.A)
    batch = (p.A.T.contiguous(), p.Y.T.contiguous())
    steps, grid = budget(cfg, "rf")
    arms = []
    for T in [*grid, "auto"]:
        model = rf.RFModel(cfg.rf_width, cfg.rf_outputs, dtype=p.A.dtype, device=device)
        if T == "auto":
            opt = rf.make_optimizer("auto", model, c)
        else:
            opt = Switch(rf.make_optimizer("gd", model, c), rf.make_optimizer("specgd", model, c), T)
        arms.append(Arm(arm_name(f"rf/{act}", seed, T), model, opt, lambda step: batch, rf.rf_loss, steps,
                        evaluate=lambda m: {"train_loss": float(rf.rf_loss(m, batch).detach())}, eval_every=steps,
                        callbacks=[rf.RankRecorder(c, cfg.rf_samples, f"{cfg.rf_samples}x{cfg.rf_width}")]))
    return arms


def _mlp_optimizer(T: int | str, model: mlp.SparseMLP, lr: float, monitor):
    if T != "auto":
        return Switch(mlp.make_optimizer("gd", model, lr, monitor), mlp.make_optimizer("specgd", model, lr, monitor), T)
    from specscope.optim import AutoGeometry

    named = list(model.named_parameters())
    spectral = [(n, p) for n, p in named if n.startswith(tuple(s + "." for s in mlp.SPECTRAL_LAYERS))]
    rest = [(n, p) for n, p in named if n not in {n for n, _ in spectral}]
    return AutoGeometry([{"params": spectral}, {"params": rest, "algorithm": "sgd", "lr": lr}], lr=lr,
                        monitor=monitor, euclidean="sgd", polar="gram")


def _mlp_arms(cfg: Config, act: str, seed: int, device) -> list[Arm]:
    from specscope.probe import Monitor

    train = sparse_regression(cfg.mlp_dim, cfg.mlp_samples, seed, device=device)
    steps, grid = budget(cfg, "mlp")
    arms = []
    for T in [*grid, "auto"]:
        model = mlp.SparseMLP(cfg.mlp_dim, cfg.mlp_width, act, seed + 1).to(device)
        monitor = Monitor(model, every=1, estimator="gram")
        arms.append(Arm(arm_name(f"mlp/{act}", seed, T), model, _mlp_optimizer(T, model, cfg.mlp_lr, monitor),
                        lambda step: train, mlp.mse, steps, monitor=monitor,
                        evaluate=lambda m: {"train_loss": float(mlp.mse(m, train).detach())}, eval_every=steps))
    return arms


def check(cfg: Config) -> None:
    """The settings that only fail together (a sweep checks every point with this before it starts)."""
    parsed = [_parse(s) for s in cfg.setups]
    if len(set(cfg.setups)) != len(cfg.setups) or len(set(cfg.seeds)) != len(cfg.seeds) or not parsed:
        raise ConfigError(f"setups {cfg.setups} and seeds {cfg.seeds} must be non-empty without repeats")
    check_seed_list(cfg)
    for kind in sorted({kind for kind, _ in parsed}):
        steps, grid = (cfg.rf_steps, cfg.rf_switch) if kind == "rf" else (cfg.mlp_steps, cfg.mlp_switch)
        key = f"{kind}_switch"
        if any(t < 0 or t > steps for t in grid) or len(set(grid)) != len(grid):
            raise ConfigError(f"{key}={grid}: switch times must be distinct, in 0..{kind}_steps={steps}")
        if not [t for t in grid if t < steps]:
            raise ConfigError(f"{key}={grid} has no switch time before {kind}_steps={steps}: SW-1/SW-2 compare switch "
                              f"times, so give at least one, e.g. --set {key}=[0,{steps // 2}]")


def build(cfg: Config, device: torch.device) -> list[Arm]:
    """For every setup and seed: one arm per switch time T of the grid, and an AutoGeometry arm."""
    check(cfg)
    parsed = [_parse(s) for s in cfg.setups]
    make = {"rf": _rf_arms, "mlp": _mlp_arms}
    return [a for kind, act in parsed for seed in cfg.seeds for a in make[kind](cfg, act, seed, device)]


# ---------------------------------------------------------------- reading the records back


def _spectral_layers(setup: str) -> tuple[str, ...]:
    return ("W",) if setup.startswith("rf/") else tuple(f"{s}.up" for s in mlp.SPECTRAL_LAYERS)


def burn_in(df: pd.DataFrame, setup: str, seed: int, steps: int) -> pd.DataFrame:
    """step × spectral layer: nr(G)/st(A) recorded on the plain-GD arm (T = steps)."""
    d = df[(df["arm"] == arm_name(setup, seed, steps)) & (df["metric"] == "spectral_advantage")
           & df["layer"].isin(_spectral_layers(setup))]
    return d.pivot_table(index="step", columns="layer", values="value", aggfunc="last").sort_index()


def crossing(adv: pd.DataFrame, steps: int) -> int:
    """First step at which nr/st > 1 on every spectral layer; `steps` (never switch) if it never happens."""
    if adv.empty:
        return -1
    hit = adv.index[(adv > 1).all(axis=1).to_numpy()]
    return int(hit[0]) if len(hit) else steps


def auto_switch(df: pd.DataFrame, setup: str, seed: int, steps: int) -> int:
    """First step at which the AutoGeometry arm took the spectral step on every spectral layer (`steps`: never)."""
    d = df[(df["arm"] == arm_name(setup, seed, "auto")) & (df["metric"] == "geometry")
           & df["layer"].isin(_spectral_layers(setup))]
    if d.empty:
        return -1
    g = d.pivot_table(index="step", columns="layer", values="value", aggfunc="last").sort_index()
    hit = g.index[(g >= 1).all(axis=1).to_numpy()]
    return int(hit[0]) if len(hit) else steps


def final_losses(df: pd.DataFrame, setup: str, seed: int) -> dict[str, float]:
    """Switch time ("0", "5", ..., "auto") -> training loss after the budget."""
    d = df[df["arm"].str.startswith(f"{setup}/s{seed}/T") & (df["metric"] == "train_loss") & (df["layer"] == "")]
    return {split_arm(a)[2]: float(g.sort_values("step")["value"].iloc[-1]) for a, g in d.groupby("arm")}


def table(df: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """One row per (setup, seed): T_cross, the predicted grid T, T_best, AutoGeometry's switch, the loss ratios."""
    rows = []
    for setup in cfg.setups:
        kind, _ = _parse(setup)
        steps, grid = budget(cfg, kind)
        for seed in cfg.seeds:
            losses = final_losses(df, setup, seed)
            fixed = {int(t): v for t, v in losses.items() if t != "auto"}
            cross = crossing(burn_in(df, setup, seed, steps), steps)
            if not fixed or cross < 0:
                continue
            pred = min((t for t in grid if t >= cross), default=steps)
            best = min(fixed, key=fixed.get)
            rows.append(dict(setup=setup, seed=seed, t_cross=cross, t_pred=pred, t_best=best,
                             t_auto=auto_switch(df, setup, seed, steps), loss_best=fixed[best],
                             pred_over_best=fixed.get(pred, math.nan) / fixed[best],
                             gd_over_best=fixed[steps] / fixed[best], spec_over_best=fixed[0] / fixed[best] if 0 in fixed else math.nan,
                             auto_over_best=losses.get("auto", math.nan) / fixed[best]))
    return pd.DataFrame(rows)


def setting(cfg: Config) -> str:
    """The regime of SW-1/2: setups, sizes, step budgets, T grids and seeds."""
    return (f"setups {cfg.setups}; RF d {cfg.rf_dim}, width {cfg.rf_width}, samples {cfg.rf_samples}, {cfg.rf_steps} steps, "
            f"T grid {cfg.rf_switch}; MLP d {cfg.mlp_dim}, width {cfg.mlp_width}, samples {cfg.mlp_samples}, "
            f"lr {cfg.mlp_lr:g}, {cfg.mlp_steps} steps, T grid {cfg.mlp_switch}; seeds {cfg.seeds}; "
            f"tolerance {cfg.tolerance:g} (the project's)")


def _sw1(df: pd.DataFrame, cfg: Config) -> Claim:
    text = ("SW-1: the best switch time T is where nr(G)/st(A) of the GD burn-in first crosses 1 (rule: per setup, "
            f"the median over seeds of loss(T_pred)/loss(T_best) ≤ 1 + {cfg.tolerance:g}, T_pred = the first grid T "
            "≥ the crossing step, or plain GD if it never crosses)")
    pub = "switch once nr(G) ≥ st(A) after a short GD burn-in (001 §3.1.4, Thm 3.6, 3.11; 002's experiment 3)"
    t = table(df, cfg)
    if t.empty:
        return Claim("SW-1", text, pub, "no burn-in or budget losses recorded", "INCONCLUSIVE")
    parts, ok = [], []
    for setup, g in t.groupby("setup", sort=False):
        r = float(g["pred_over_best"].median())
        ok.append(r <= 1 + cfg.tolerance)
        steps = budget(cfg, _parse(setup)[0])[0]
        where = ("an interior crossing" if ((g.t_cross > 0) & (g.t_cross < steps)).any() else
                 "no interior crossing: tests the sign at the grid's ends")
        parts.append(f"{setup} ({where}): T_cross {_vals(g.t_cross)}, T_best {_vals(g.t_best)}, AutoGeometry {_vals(g.t_auto)}; "
                     f"loss(T_pred)/best {r:.3f}, plain GD/best {g.gd_over_best.median():.2f}, "
                     f"SpecGD from 0/best {g.spec_over_best.median():.2f}")
    worst = float(t.groupby("setup", sort=False)["pred_over_best"].median().max())
    measured, verdict = _unruled(t, cfg, f"{t.seed.nunique()} seeds; " + "; ".join(parts), all(ok))
    return Claim("SW-1", text, pub, measured, verdict, seeds=int(t.seed.nunique()), setting=setting(cfg), value=worst)


def _unruled(t: pd.DataFrame, cfg: Config, measured: str, ok: bool) -> tuple[str, str]:
    """(measured, verdict) of a claim every setup must meet: a setup of the config with no row in `t` (no finite
    nr(G)/st(A) in its burn-in, or no budget loss: a network dead at this size) leaves it INCONCLUSIVE, unless
    another setup already fails it, and is named."""
    missing = [s for s in cfg.setups if s not in set(t["setup"])]
    if not missing:
        return measured, "PASS" if ok else "FAIL"
    note = (f"; not ruled: {', '.join(missing)} (no finite nr(G)/st(A) in the GD burn-in or no budget loss recorded: "
            "a network whose units are all inactive at this size reads NaN)")
    return measured + note, "FAIL" if not ok else "INCONCLUSIVE"


def _sw2(df: pd.DataFrame, cfg: Config) -> Claim:
    text = (f"SW-2: AutoGeometry's own switch reaches a budget loss within 1 + {cfg.tolerance:g} of the best fixed "
            "switch time (median over seeds, every setup)")
    pub = "AutoGeometry (REFERENCE §3): per step, the geometry with the larger guarantee"
    t = table(df, cfg)
    if t.empty or t["auto_over_best"].isna().all():
        return Claim("SW-2", text, pub, "no AutoGeometry arm recorded", "INCONCLUSIVE")
    med = t.groupby("setup", sort=False)["auto_over_best"].median()
    measured, verdict = _unruled(t, cfg, "; ".join(f"{s}: AutoGeometry/best {v:.3f}" for s, v in med.items()),
                                 bool((med <= 1 + cfg.tolerance).all()))
    return Claim("SW-2", text, pub, measured, verdict, seeds=int(t.seed.nunique()), setting=setting(cfg),
                 value=float(med.max()))


def _vals(s: pd.Series) -> str:
    v = sorted(set(int(x) for x in s))
    return str(v[0]) if len(v) == 1 else "{" + ", ".join(map(str, v)) + "}"


def claims(df: pd.DataFrame, cfg: Config) -> list[Claim]:
    """SW-1 (is the best T the crossing of nr/st = 1) and SW-2 (AutoGeometry's switch vs the best T)."""
    return [_sw1(df, cfg), _sw2(df, cfg)]


def figures(df: pd.DataFrame, cfg: Config) -> dict[str, Figure]:
    """Per setup: budget loss vs T (one line per seed, AutoGeometry dotted) and nr(G)/st(A) over the GD burn-in."""
    setups = list(cfg.setups)
    fig = Figure(figsize=(3.8 * len(setups), 6.4), dpi=100, layout="constrained")
    axes = fig.subplots(2, len(setups), squeeze=False)
    t = table(df, cfg)
    for j, setup in enumerate(setups):
        kind, _ = _parse(setup)
        steps, _ = budget(cfg, kind)
        top, bottom = axes[0][j], axes[1][j]
        for seed in cfg.seeds:
            losses = final_losses(df, setup, seed)
            fixed = sorted((int(k), v) for k, v in losses.items() if k != "auto")
            if not fixed:
                continue
            line = top.plot([k for k, _ in fixed], [v for _, v in fixed], "o-", ms=3, label=f"seed {seed}")[0]
            if "auto" in losses:
                top.axhline(losses["auto"], color=line.get_color(), ls=":", lw=1)
            adv = burn_in(df, setup, seed, steps)
            for layer in adv.columns:
                bottom.plot(adv.index, adv[layer], color=line.get_color(), lw=1)
        row = t[t.setup == setup] if not t.empty else t
        for x in (row["t_cross"].unique() if len(row) else []):
            top.axvline(x, color="grey", ls="--", lw=0.8)
        top.set(title=setup, xlabel="switch time T", ylabel="training loss after the budget", yscale="log")
        bottom.axhline(1.0, color="grey", ls="--", lw=1)
        bottom.set(xlabel="step (plain GD)", ylabel="nr(G)/st(A)", yscale="log")
        style.legend(top)
    return {"switching_loss_vs_T": fig}
