"""GPT input embedding on AdamW vs ℓ₁→ℓ₂ vs spectral steps, hidden matrices on Muon, ≥ 3 seeds (001 open question 2).

The embedding multiplies one-hot tokens, so its natural operator norm is ℓ₁→ℓ₂ (the largest token-vector
norm; Scion, Pethick et al. 2025), not the spectral norm (paper 001 §1.2.1). Every arm is the gpt lab's model,
data, schedule and token budget with Muon on every hidden attention/MLP matrix and AdamW on the LM head and
gains; only the embedding's step differs:

    adamw      AdamW (the usual routing)
    l1_to_l2   each token's vector moved along its own normalized momentum, RMS-matched to AdamW:
               ΔE_j = −lr·0.2·sqrt(d)·M_j/‖M_j‖ (optim algorithm "l1_to_l2", scale="rms"; Nesterov momentum 0.95)
    spectral   Muon on the embedding, RMS-matched (adjust_lr_fn="match_rms_adamw")
    auto       (optional) AutoGeometry choosing among the three per probe step by 1 : nr/st : cr/st
               (euclidean="adamw": Adam's step or an RMS-matched spectral / ℓ₁→ℓ₂ step)

so one embedding lr (`lr_embed`) serves the three. On probe steps a callback records, for the embedding's
gradient, the ℓ₁→ℓ₂ analogue of nr(G), cr(G) = ‖G‖_{2,1}²/‖G‖_F², over st(A) = N/c_max; with the Monitor's nr/st
these are the one-step guarantees of the ℓ₁→ℓ₂ and spectral steps relative to GD's (docs/optim.md, "ℓ₁→ℓ₂ geometry").
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pandas as pd
import torch
from matplotlib.figure import Figure
from pydantic import Field

from specscope import linalg
from specscope.errors import ConfigError
from specscope.labs import _seeded_gpt as S
from specscope.labs import gpt
from specscope.labs.base import Arm, AtLeast1, Corpus, LabConfig, NonNegative, Seed, check_seed_list
from specscope.optim.l1_to_l2 import column_rank
from specscope.records import Claim, Record
from specscope.report import style

NAME = "embed-geometry"
GEOMETRIES = ("adamw", "l1_to_l2", "spectral")  # the defaults; "auto" is optional
Geometry = Literal["adamw", "l1_to_l2", "spectral", "auto"]


class Config(LabConfig):
    """Defaults: the gpt lab's 2-layer d=128 model, 200 steps, 3 seeds, 9 arms."""

    geometries: list[Geometry] = Field(default=list(GEOMETRIES), min_length=1)
    seeds: list[Seed] = Field(default=[0, 1, 2], min_length=1)
    n_layer: int = Field(2, ge=1, le=48)
    n_head: AtLeast1 = 4
    d_model: int = Field(128, ge=8, le=8192)
    mlp: Literal["relu2", "gelu", "swiglu"] = "relu2"
    corpus: Corpus = "stdlib"
    max_bytes: int | None = Field(None, ge=10_000)
    seq_len: int = Field(64, ge=2, le=4096)
    batch_size: int = Field(16, ge=1, le=4096)
    steps: int = Field(200, ge=1, le=1_000_000)
    lr_adamw: float = Field(3e-3, gt=0, le=1, allow_inf_nan=False)  # LM head and gains (AdamW in every arm)
    lr_muon: float = Field(0.01, gt=0, le=1, allow_inf_nan=False)  # hidden matrices (Muon in every arm)
    lr_embed: float = Field(3e-3, gt=0, le=1, allow_inf_nan=False)  # the embedding, whatever its geometry (all RMS-matched to AdamW)
    momentum: float = Field(0.95, ge=0, lt=1, allow_inf_nan=False)  # ℓ₁→ℓ₂ and spectral embedding steps (Nesterov)
    warmup: AtLeast1 = 30
    eval_every: AtLeast1 = 25
    eval_batches: AtLeast1 = 8
    probe_every: AtLeast1 = 25
    margin: NonNegative = 0.0  # EG-1: "lower" means lower by more than margin nats/byte


def gpt_config(cfg: Config, seed: int) -> gpt.Config:
    keys = ("n_layer", "n_head", "d_model", "mlp", "corpus", "max_bytes", "seq_len", "batch_size", "steps",
            "lr_adamw", "lr_muon", "warmup", "eval_every", "eval_batches", "probe_every")
    return gpt.Config(**{k: getattr(cfg, k) for k in keys}, arms=["muon"], seed=seed, device=cfg.device)


def embedding_group(cfg: Config, geometry: str, name: str, p: torch.Tensor) -> dict[str, Any]:
    """The embedding's param group for `geometry` (lr_embed; no weight decay)."""
    base = dict(params=[p], param_names=[name], lr=cfg.lr_embed, weight_decay=0.0)
    if geometry == "adamw":
        return {**base, "algorithm": "adamw", "betas": (0.9, 0.95)}
    if geometry == "l1_to_l2":
        return {**base, "algorithm": "l1_to_l2", "scale": "rms", "rms": 0.2, "token_dim": 0,
                "momentum": cfg.momentum, "nesterov": cfg.momentum > 0}
    if geometry == "auto":
        return {**base, "algorithm": "auto", "token_dim": 0, "euclidean": "adamw", "betas": (0.9, 0.95),
                "polar": "gram", "every": cfg.probe_every}
    return {**base, "algorithm": "muon", "adjust_lr_fn": "match_rms_adamw", "allow_non_hidden": True,
            "momentum": cfg.momentum, "nesterov": cfg.momentum > 0, "polar": "newton_schulz"}


def param_groups(cfg: Config, gcfg: gpt.Config, model: torch.nn.Module, geometry: str) -> list[dict[str, Any]]:
    """The gpt lab's "muon" routing with the embedding moved into its own group of `geometry`."""
    groups = []
    for g in gpt.param_groups(gcfg, model, "muon"):
        keep = [(n, p) for n, p in zip(g["param_names"], g["params"]) if n != "embed.weight"]
        if keep:
            groups.append({**g, "params": [p for _, p in keep], "param_names": [n for n, _ in keep]})
    return groups + [embedding_group(cfg, geometry, "embed.weight", model.embed.weight)]


class EmbeddingRanks:
    """On probe steps: cr(G) of the embedding's gradient and cr/st with st(A) = N/c_max of the batch (the
    Monitor records nr(G) and nr/st of the same gradient as `nuclear_rank`, `spectral_advantage`)."""

    def __init__(self, batches: gpt.Batches, every: int):
        self.batches, self.every = batches, every

    def after_backward(self, step: int, model, optimizer) -> list[Record]:
        G = model.embed.weight.grad
        if G is None:
            return []
        x, _ = self.batches(step)
        st = float(linalg.onehot_stable_rank(x))
        cr = column_rank(G, token_dim=0)
        meta = dict(layer="embed", estimator="exact", rows=x.numel(), shape="x".join(map(str, G.shape)))
        return [Record(step, metric="column_rank", value=cr, **meta),
                Record(step, metric="l1_to_l2_advantage", value=cr / st, **meta)]


def inputs(cfg: Config) -> dict[str, str]:
    """The corpus bytes, checked unchanged on `--resume`."""
    return gpt.inputs(cfg)


def check(cfg: Config) -> None:
    """The settings that only fail together (a sweep checks every point with this before it starts)."""
    check_seed_list(cfg)
    if len(set(cfg.geometries)) != len(cfg.geometries) or not cfg.geometries:
        raise ConfigError(f"geometries {cfg.geometries} must be non-empty without repeats; choose from {GEOMETRIES}")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds {cfg.seeds} repeat a seed")
    if cfg.d_model % cfg.n_head:
        raise ConfigError(f"d_model={cfg.d_model} must be a multiple of n_head={cfg.n_head}")
    gpt.check(gpt_config(cfg, cfg.seeds[0]))  # the model's own rules (an even head size for rotary positions), as a run checks


def build(cfg: Config, device: torch.device) -> list[Arm]:
    check(cfg)
    arms = []
    for seed in cfg.seeds:
        gcfg = gpt_config(cfg, seed)
        for geo in cfg.geometries:
            ranks = EmbeddingRanks(gpt.Batches(S._corpus(gcfg).train, gcfg), cfg.probe_every)
            arms.append(S.gpt_arm(gcfg, S.arm_name(geo, seed), lambda m, g=geo, c=gcfg: param_groups(cfg, c, m, g),
                                  device, cfg.probe_every, [ranks]))
    return arms


# ---------------------------------------------------------------- claims


def _median(df: pd.DataFrame, metric: str) -> float:
    v = df[(df["metric"] == metric) & (df["layer"] == "embed") & df["arm"].str.startswith("adamw/")]["value"]
    return float(v.median()) if len(v) else math.nan


def setting(cfg: Config) -> str:
    """The regime of EG-1/2: the model, the data, the step budget, the learning rates and seeds."""
    return (f"GPT {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.mlp} MLP, {cfg.corpus} bytes, {cfg.steps} steps of "
            f"{cfg.batch_size}×{cfg.seq_len}; lr AdamW {cfg.lr_adamw:g}, Muon {cfg.lr_muon:g}, embedding {cfg.lr_embed:g} "
            f"(RMS-matched); seeds {cfg.seeds}")


def _eg1(df: pd.DataFrame, cfg: Config) -> Claim:
    text = ("EG-1: the ℓ₁→ℓ₂ step on the input embedding reaches a lower final validation loss than both AdamW and "
            f"the spectral step (rule: lower by > {cfg.margin:g} in every seed, paired by seed; worse than one "
            "of them in every seed: FAIL; seeds disagree: INCONCLUSIVE)")
    pub = "open question (001 §1.2.1: ℓ₁→ℓ₂ 'more natural' for embeddings, untested; Scion uses it)"
    table = S.final_table(df)
    if not {"l1_to_l2", "adamw", "spectral"} <= set(table["variant"]):
        return Claim("EG-1", text, pub, "needs the three geometries", "INCONCLUSIVE")
    gains = {b: S.paired_difference(table, "l1_to_l2", b) for b in ("adamw", "spectral")}
    means = table.groupby("variant")["final"].apply(S.mean_sd)
    secs = table.groupby("variant")["seconds"].mean()
    measured = (f"final val loss over {len(gains['adamw'])} seeds (mean ± sd): "
                + ", ".join(f"{v} {means[v]} ({secs[v]:.0f} s)" for v in GEOMETRIES)
                + "; the other's loss − ℓ₁→ℓ₂'s (> 0: ℓ₁→ℓ₂ lower): "
                + ", ".join(f"{b} {S.mean_sd(g)} (> {cfg.margin:g} in {int((g > cfg.margin).sum())}/{len(g)} seeds)"
                            for b, g in gains.items()))
    if all(len(g) and (g > cfg.margin).all() for g in gains.values()):
        verdict = "PASS"
    elif any(len(g) and (g < -cfg.margin).all() for g in gains.values()):
        verdict = "FAIL"
    else:
        verdict = "INCONCLUSIVE"
    return Claim("EG-1", text, pub, measured, verdict, seeds=len(gains["adamw"]), setting=setting(cfg),
                 value=float(min(g.mean() for g in gains.values())))


def _eg2(df: pd.DataFrame, cfg: Config) -> Claim:
    """The guarantee cannot prefer the spectral step here: ‖G‖_* = ⟨G, polar(G)⟩ ≤ Σ_j ‖G_j‖·‖polar(G)_j‖ ≤ ‖G‖_{2,1}
    (every row of polar(G) has norm ≤ 1), so cr(G) ≥ nr(G) for every gradient, and on one-hot inputs both steps
    have the same smoothness constant N (docs/optim.md). The claim is therefore that the loss follows the one
    prediction the guarantee can make; the measured cr/nr says by how much it favours ℓ₁→ℓ₂."""
    text = ("EG-2: the one-step guarantee favours ℓ₁→ℓ₂ over the spectral step on every embedding gradient "
            "(cr(G) ≥ nr(G) always, since ‖G‖₂,₁ ≥ ‖G‖_*, with the same smoothness constant on one-hot inputs), and the "
            f"loss follows it: ℓ₁→ℓ₂ reaches a lower final val loss than spectral (rule: lower by > {cfg.margin:g} in "
            "every seed, paired by seed; higher in every seed: FAIL; seeds disagree: INCONCLUSIVE)")
    pub = "001 §1.2.1 / REFERENCE §3 guarantee ratio, applied to the ℓ₁→ℓ₂ geometry (docs/optim.md)"
    cr, nr = _median(df, "l1_to_l2_advantage"), _median(df, "spectral_advantage")
    d = S.paired_difference(S.final_table(df), "l1_to_l2", "spectral")
    if not (math.isfinite(cr) and math.isfinite(nr)) or d.empty:
        return Claim("EG-2", text, pub, "needs the adamw, l1_to_l2 and spectral arms", "INCONCLUSIVE")
    measured = (f"embedding gradient (AdamW arms, medians): cr/st {cr:.2f}, nr/st {nr:.2f}, guarantee ratio "
                f"ℓ₁→ℓ₂ : spectral {cr / nr:.2f}; spectral − ℓ₁→ℓ₂ final val loss {S.mean_sd(d)} "
                f"(> {cfg.margin:g} in {int((d > cfg.margin).sum())}/{len(d)} seeds)")
    verdict = "PASS" if (d > cfg.margin).all() else "FAIL" if (d < -cfg.margin).all() else "INCONCLUSIVE"
    return Claim("EG-2", text, pub, measured, verdict, seeds=len(d), setting=setting(cfg), value=float(d.mean()))


def claims(df: pd.DataFrame, cfg: Config) -> list[Claim]:
    """EG-1 (which embedding geometry trains best, paired by seed) and EG-2 (does the loss follow the guarantee's
    preference for ℓ₁→ℓ₂ over spectral, paired by seed)."""
    return [_eg1(df, cfg), _eg2(df, cfg)]


def figures(df: pd.DataFrame, cfg: Config) -> dict[str, Figure]:
    """Validation loss vs steps and vs wall-clock (mean over seeds), and the embedding's cr/st and nr/st."""
    out = {}
    fig = S.curves_figure(df, list(cfg.geometries), "embedding geometry (hidden: Muon)")
    if fig is not None:
        out["embed_geometry_val_loss"] = fig
    adv = df[(df["layer"] == "embed") & df["metric"].isin(["l1_to_l2_advantage", "spectral_advantage"])]
    if not adv.empty:
        fig = Figure(figsize=(4.8, 3.4), dpi=100, layout="constrained")
        ax = fig.subplots()
        for (metric, geo), g in adv.assign(geo=adv["arm"].map(lambda a: S.split_arm(a)[0])).groupby(["metric", "geo"]):
            s = g.groupby("step")["value"].mean()
            label = ("cr/st" if metric == "l1_to_l2_advantage" else "nr/st") + f" ({geo} arm)"
            ax.plot(s.index, s.values, label=label)
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set(xlabel="step", ylabel="embedding gradient rank / st(A)", yscale="log")
        style.legend(ax)
        out["embed_geometry_advantage"] = fig
    return out
