"""GPT ReLU² vs SwiGLU MLPs, AdamW vs Muon, ≥ 3 seeds at a larger width/depth: does gating remove Muon's gain? (001 open question 1)

Paper 001 §1.2.2 and Table 2: SwiGLU post-activations are nearly centred, so their stable rank grows with
width and the spectral advantage nr(G)/st(A) of the down-projection shrinks; whether this removes Muon's
advantage in larger transformers is open. Every arm is the gpt lab's model (RMSNorm, QK-norm, rotary),
data, schedule and token budget at `d_model` × `n_layer` (d_ff = 4·d for ReLU², 8/3·d for SwiGLU, so the
MLPs have about the same parameters); arms `<mlp>-<optimizer>/s<seed>` differ in the MLP and in the hidden
matrices' optimizer (gpt lab arms "adamw" and "muon": AdamW on the embedding, head and gains in both). A
probe Monitor records st(A) and nr(G) of every weight every `probe_every` steps.
"""

from __future__ import annotations

from typing import Literal

import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from pydantic import Field

from specscope.errors import ConfigError
from specscope.labs import _seeded_gpt as S
from specscope.labs import gpt
from specscope.labs.base import Arm, AtLeast1, Corpus, LabConfig, NonNegative, Seed, check_seed_list
from specscope.report.style import legend
from specscope.records import Claim

NAME = "gated-width"
MLPS = ("relu2", "swiglu")
OPTIMIZERS = ("adamw", "muon")


class Config(LabConfig):
    """Defaults: d_model 192, 2 layers, 80 steps of 16×64 tokens, 3 seeds, 12 arms (a few CPU minutes: the
    smoke-sized run). WIDE is the measured larger size (about 90 min on one CPU core); raise d_model, n_layer,
    steps further on a bigger machine."""

    mlps: list[Literal["relu2", "swiglu"]] = Field(default=list(MLPS), min_length=1)
    seeds: list[Seed] = Field(default=[0, 1, 2], min_length=1)
    n_layer: int = Field(2, ge=1, le=96)
    n_head: AtLeast1 = 6
    d_model: int = Field(192, ge=8, le=16384)
    corpus: Corpus = "stdlib"
    max_bytes: int | None = Field(None, ge=10_000)
    seq_len: int = Field(64, ge=2, le=8192)
    batch_size: int = Field(16, ge=1, le=4096)
    steps: int = Field(80, ge=1, le=1_000_000)
    lr_adamw: float = Field(3e-3, gt=0, le=1, allow_inf_nan=False)
    lr_muon: float = Field(0.01, gt=0, le=1, allow_inf_nan=False)
    warmup: AtLeast1 = 20
    eval_every: AtLeast1 = 20
    eval_batches: AtLeast1 = 4
    probe_every: AtLeast1 = 20
    margin: NonNegative = 0.0  # GW-1: Muon's gain counts when AdamW − Muon > margin (nats/byte)


# d 384, 4 layers, 300 steps of 8×128 bytes: the largest size whose 12 arms fit ≈ 90 min on one CPU core, with
# the learning rates of a 100-step check at this size (docs/lab-gated-width.md)
WIDE = dict(d_model=384, n_layer=4, n_head=6, batch_size=8, seq_len=128, steps=300, warmup=30, lr_adamw=1e-3,
            lr_muon=0.02, eval_every=50, eval_batches=8, probe_every=50)


def gpt_config(cfg: Config, mlp: str, seed: int) -> gpt.Config:
    keys = ("n_layer", "n_head", "d_model", "corpus", "max_bytes", "seq_len", "batch_size", "steps", "lr_adamw",
            "lr_muon", "warmup", "eval_every", "eval_batches", "probe_every")
    return gpt.Config(**{k: getattr(cfg, k) for k in keys}, mlp=mlp, arms=list(OPTIMIZERS), seed=seed,
                      device=cfg.device)


def inputs(cfg: Config) -> dict[str, str]:
    """The corpus bytes, checked unchanged on `--resume`."""
    return gpt.inputs(cfg)


def check(cfg: Config) -> None:
    """The settings that only fail together (a sweep checks every point with this before it starts)."""
    check_seed_list(cfg)
    if not cfg.mlps or len(set(cfg.mlps)) != len(cfg.mlps) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"mlps {cfg.mlps} and seeds {cfg.seeds} must be non-empty without repeats")
    if cfg.d_model % cfg.n_head:
        raise ConfigError(f"d_model={cfg.d_model} must be a multiple of n_head={cfg.n_head}")


def build(cfg: Config, device: torch.device) -> list[Arm]:
    check(cfg)
    arms = []
    for seed in cfg.seeds:
        for mlp in cfg.mlps:
            gcfg = gpt_config(cfg, mlp, seed)
            for opt in OPTIMIZERS:
                arms.append(S.gpt_arm(gcfg, S.arm_name(f"{mlp}-{opt}", seed),
                                      lambda m, o=opt, c=gcfg: gpt.param_groups(c, m, o), device, cfg.probe_every))
    return arms


# ---------------------------------------------------------------- claims


def gains(df: pd.DataFrame) -> dict[str, pd.Series]:
    """Per MLP: AdamW − Muon final validation loss per seed (> 0: Muon ahead)."""
    t = S.final_table(df)
    return {m: S.paired_difference(t, f"{m}-muon", f"{m}-adamw") for m in MLPS}


def setting(cfg: Config) -> str:
    return (f"d_model {cfg.d_model}, {cfg.n_layer} layers, {cfg.steps} steps of {cfg.batch_size}×{cfg.seq_len} bytes, "
            f"lr AdamW {cfg.lr_adamw:g} / Muon {cfg.lr_muon:g}")


def spread(x: pd.Series) -> str:
    """The mean [min–max] over seeds, as `specscope claims` shows it."""
    return f"{x.mean():.3g} [{x.min():.3g}–{x.max():.3g}]" if len(x) else ""


def _arms(df: pd.DataFrame, variant: str) -> list[str]:
    return [a for a in df["arm"].unique() if isinstance(a, str) and a.startswith(variant + "/s")]


def _gw1(df: pd.DataFrame, cfg: Config) -> Claim:
    text = (f"GW-1: at d_model {cfg.d_model}, {cfg.n_layer} layers, {cfg.steps} steps, SwiGLU removes Muon's advantage "
            f"over AdamW (rule: AdamW − Muon final val loss ≤ {cfg.margin:g} in every seed with SwiGLU while > margin "
            "in every seed with ReLU² (an advantage to remove): PASS; SwiGLU's > margin in every seed: FAIL; seeds "
            "disagree, or no ReLU² gain: INCONCLUSIVE)")
    pub = "open question; published gated ablation 3.884 → 3.513 (Muon still ahead at 124M, 001 Table 2)"
    g = gains(df)
    if g["swiglu"].empty:
        return Claim("GW-1", text, pub, "needs swiglu-adamw and swiglu-muon arms", "INCONCLUSIVE")
    t = S.final_table(df)
    finals = t.groupby("variant")["final"].apply(S.mean_sd)
    secs = t.groupby("variant")["seconds"].mean()
    measured = ("final val loss (mean ± sd over seeds): " + ", ".join(f"{v} {finals[v]} ({secs[v]:.0f} s)" for v in finals.index)
                + "; Muon gain (AdamW − Muon): " + ", ".join(f"{m} {S.mean_sd(s)} (> {cfg.margin:g} in {int((s > cfg.margin).sum())}/{len(s)} seeds)"
                                                        for m, s in g.items() if not s.empty))
    sw = g["swiglu"]
    if len(g["relu2"]) and g["relu2"].mean() > 0:
        measured += f"; SwiGLU keeps {sw.mean() / g['relu2'].mean():.0%} of ReLU²'s gain"
    verdict = "PASS" if (sw <= cfg.margin).all() else "FAIL" if (sw > cfg.margin).all() else "INCONCLUSIVE"
    relu2 = g["relu2"]
    if verdict == "PASS" and (relu2.empty or not (relu2 > cfg.margin).all()):  # nothing shown to be removed
        verdict = "INCONCLUSIVE"
        measured += ("; no ReLU² arms to show an advantage to remove" if relu2.empty else
                     f"; ReLU²'s gain is not > {cfg.margin:g} in every seed either: no advantage shown to remove")
    return Claim("GW-1", text, pub, measured, verdict, seeds=len(sw), spread=spread(sw), setting=setting(cfg),
                 value=float(sw.mean()))


def _gw2(df: pd.DataFrame, cfg: Config) -> Claim:
    text = ("GW-2: the mechanism: the MLP down-projection's nr(G)/st(A) (median over layers, probed steps, seeds and "
            "both optimizers) is smaller with SwiGLU than with ReLU², because st(A) of its input is larger")
    pub = "SwiGLU post-activations nearly centred: larger st(A), smaller nr/st (001 §1.2.2, Fig. 11)"
    med = {}
    for m in MLPS:
        arms = [a for o in OPTIMIZERS for a in _arms(df, f"{m}-{o}")]
        adv, st = S.per_layer_median(df, arms, "spectral_advantage"), S.per_layer_median(df, arms, "stable_rank")
        if "mlp.down" in adv.index:
            med[m] = (float(adv["mlp.down"]), float(st["mlp.down"]))
    if len(med) < 2:
        return Claim("GW-2", text, pub, "needs per-layer records of both MLPs", "INCONCLUSIVE")
    measured = "; ".join(f"{m}: mlp.down nr/st {a:.2f}, st(A) {s:.1f}" for m, (a, s) in med.items())
    ok = med["swiglu"][0] < med["relu2"][0] and med["swiglu"][1] > med["relu2"][1]
    seeds = len({S.split_arm(a)[1] for a in df["arm"].unique() if isinstance(a, str) and "/s" in a})
    return Claim("GW-2", text, pub, measured, "PASS" if ok else "FAIL", seeds=seeds, setting=setting(cfg),
                 value=med["swiglu"][0] - med["relu2"][0])


def claims(df: pd.DataFrame, cfg: Config) -> list[Claim]:
    """GW-1 (does SwiGLU remove Muon's gain, paired by seed) and GW-2 (the nr/st mechanism on mlp.down)."""
    return [_gw1(df, cfg), _gw2(df, cfg)]


def figures(df: pd.DataFrame, cfg: Config) -> dict[str, Figure]:
    """Validation loss per arm (mean over seeds, vs steps and seconds) and per-layer nr/st over training."""
    out = {}
    variants = [f"{m}-{o}" for m in cfg.mlps for o in OPTIMIZERS]
    fig = S.curves_figure(df, variants, f"d_model {cfg.d_model}, {cfg.n_layer} layers")
    if fig is not None:
        out["gated_width_val_loss"] = fig
    fig = Figure(figsize=(4.2 * len(variants), 3.4), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(variants), squeeze=False)[0]
    drawn = False
    adv = df[(df["metric"] == "spectral_advantage") & (df["layer"] != "")]
    types = sorted(set(adv["layer"].map(gpt.weight_type)))
    colour = {wt: f"C{i % 10}" for i, wt in enumerate(types)}  # one colour per weight type in every panel
    for ax, v in zip(axes, variants):
        d = adv[adv["arm"].isin(_arms(df, v))]
        for wt, g in d.groupby(d["layer"].map(gpt.weight_type)):
            s = g.groupby("step")["value"].median()
            ax.plot(s.index, s.values, label=wt, color=colour[wt])
            drawn = True
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set(title=v, xlabel="step", yscale="log")
    axes[0].set_ylabel("nr(G)/st(A) (median over layers, seeds)")
    handles = [Line2D([], [], color=colour[wt]) for wt in types]
    legend(axes[-1], handles, types, cap=12, where="right")  # every weight type named: GW-2 rules on mlp.down
    if drawn:
        out["gated_width_spectral_advantage"] = fig
    return out
