"""Shard-wise vs global Muon under FSDP2: how far apart are the two updates, and does it matter for the loss?

Under FSDP2 (`fully_shard`) each rank holds a row block of every weight. Global Muon (specscope's default)
orthogonalizes each whole matrix on one owner rank, so its update equals one process's; shard-wise Muon
(`shardwise=True`) orthogonalizes each rank's row block on its own, with no communication: polar of each
block, not a block of the polar. Paper 002 leaves open how much this changes training. For each rank
count in `ranks` (gloo CPU processes started by the lab) this lab trains the gpt lab's model (same data,
initialization, schedule and routing as its "muon" arm) twice, and records

    update_cosine   per hidden matrix, every `cosine_every` steps of the *global* run: the cosine between
                    polar(U) and the shard-wise polar of the same momentum U (1 = the same direction)
    val_loss        every `eval_every` steps, for both runs (arms "global-N" and "shardwise-N")
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pandas as pd
import torch
from pydantic import Field

from specscope.errors import ConfigError
from specscope.labs import gpt
from specscope.labs.base import AtLeast1, AtLeast2, Betas, Corpus, LabConfig, Measure, NonNegative, Positive, Unit
from specscope.optim import Hybrid, _common, _distributed
from specscope.records import Claim, Record

NAME = "shardwise"
SILENCE_LIMIT = 600.0  # seconds a rank may go without a step (spawn's timeout: per silent stretch, not the whole run)
GPT_FIELDS = ("n_layer", "n_head", "d_model", "seq_len", "batch_size", "steps", "lr_muon", "lr_adamw", "betas",
              "warmup", "decay", "min_lr_ratio", "grad_clip", "muon_polar", "eval_batches", "max_bytes", "corpus")


class Config(LabConfig):
    ranks: list[AtLeast2] = Field(default=[2, 4], min_length=1)  # gloo CPU processes per pair of runs
    # the gpt lab's model, data and schedule (smaller defaults: the whole lab runs in minutes on a CPU)
    n_layer: AtLeast1 = 2
    n_head: AtLeast1 = 4
    d_model: AtLeast1 = 64
    seq_len: AtLeast2 = 32
    batch_size: AtLeast1 = 16  # global batch; each rank takes batch_size / ranks sequences
    corpus: Corpus = "stdlib"  # stored absolute, as in the gpt lab
    max_bytes: AtLeast1 | None = 2_000_000
    steps: AtLeast1 = 150
    lr_muon: Positive = 0.01
    lr_adamw: Positive = 3e-3
    betas: Betas = (0.9, 0.95)
    warmup: AtLeast1 = 15
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: Unit = 0.1
    grad_clip: NonNegative = 1.0
    muon_polar: Literal["newton_schulz", "polar_express", "gram", "svd"] = "newton_schulz"
    eval_every: AtLeast1 = 25
    eval_batches: AtLeast1 = 4
    cosine_every: AtLeast1 = 10


def gpt_config(cfg: Config) -> gpt.Config:
    return gpt.Config(seed=cfg.seed, device="cpu", arms=["muon"], **{k: getattr(cfg, k) for k in GPT_FIELDS})


def inputs(cfg: Config) -> dict[str, str]:
    """What `--resume` checks is unchanged: the corpus bytes (as the gpt lab's)."""
    return gpt.inputs(gpt_config(cfg))


def check(cfg: Config) -> None:
    """The settings that only fail together (a sweep checks every point with this before it starts)."""
    bad = [n for n in cfg.ranks if n < 2 or cfg.batch_size % n]
    if not cfg.ranks or bad:
        raise ConfigError(f"ranks={cfg.ranks}: each must be >= 2 and divide batch_size={cfg.batch_size}")
    if cfg.eval_every < 1 or cfg.cosine_every < 1:
        raise ConfigError("eval_every and cosine_every must be >= 1")
    gpt.check(gpt_config(cfg))


# ---------------------------------------------------------------- one rank of one pair of runs


def update_cosines(opt: Hybrid, step: int) -> list[Record]:
    """Per Muon matrix: cos(polar(U), shard-wise polar(U)) for the momentum U the step just used."""
    out = []
    for group in opt.param_groups:
        if group["algorithm"] != "muon":
            continue
        mu, params = group["momentum"], group["params"]
        us = [_common.as_matrix(p.grad.lerp(opt.state[p]["momentum_buffer"], mu) if group["nesterov"]
                                else opt.state[p]["momentum_buffer"]) for p in params]
        fn = _common.polar_fn(group)
        whole = _distributed.owner_map(us, fn, shardwise=False)
        shard = _distributed.owner_map(us, fn, shardwise=True)
        sums = torch.tensor([[float((_distributed.local(a[0]).float() * _distributed.local(b[0]).float()).sum()),
                              float(_distributed.local(a[0]).float().square().sum()),
                              float(_distributed.local(b[0]).float().square().sum())] for a, b in zip(whole, shard)],
                            dtype=torch.float64)
        torch.distributed.all_reduce(sums)
        for name, (dot, aa, bb) in zip(group["param_names"], sums.tolist()):
            out.append(Record(step, _common.layer_name(name), "update_cosine", dot / math.sqrt(aa * bb), estimator="exact"))
    return out


def _train(rank: int, world: int, cfg_json: dict[str, Any]) -> list[dict]:
    """Both runs on this rank; every rank returns the same records."""
    from specscope.train.distributed import heartbeat, shard

    cfg = Config(**cfg_json)
    g = gpt_config(cfg)
    corpus = gpt.make_corpus(g)
    batches, evaluate = gpt.Batches(corpus.train, g), gpt.make_evaluate(corpus, g, torch.device("cpu"))
    rows = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    out: list[Record] = []
    for mode in ("global", "shardwise"):
        arm = f"{mode}-{world}"
        torch.manual_seed(cfg.seed)
        model = gpt.make_model(g)
        shard(model, model.blocks)
        groups = gpt.param_groups(g, model, "muon")
        for grp in groups:  # Muon's option: an AdamW group refuses it
            if grp.get("algorithm") == "muon":
                grp["shardwise"] = mode == "shardwise"
        opt = Hybrid(groups, algorithm="adamw")
        schedule = gpt.Schedule(opt, g)
        for step in range(cfg.steps + 1):
            heartbeat()  # for SILENCE_LIMIT
            if step % cfg.eval_every == 0 or step == cfg.steps:
                with torch.no_grad():
                    out.append(Record(step, "", "val_loss", evaluate(model)["val_loss"], arm=arm))
            if step == cfg.steps:
                break
            x, y = batches(step)
            opt.zero_grad()
            gpt.loss_fn(model, (x[rows], y[rows])).backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if mode == "global" and step % cfg.cosine_every == 0:
                out += [Record(**{**r.as_dict(), "arm": arm}) for r in update_cosines(opt, step)]
            schedule.after_step(step, model, opt)
    return [r.as_dict() for r in out]


def build(cfg: Config, device: torch.device) -> list[Measure]:
    """One Measure per rank count: it starts that many gloo processes and logs rank 0's records."""
    check(cfg)
    from specscope.train.distributed import spawn

    def pair(world: int):
        def fn(log, device) -> None:
            log([Record(**r) for r in spawn(_train, world, cfg.model_dump(mode="json"), timeout=SILENCE_LIMIT)[0]])

        return fn

    return [Measure(f"ranks-{n}", pair(n), arms=(f"global-{n}", f"shardwise-{n}")) for n in cfg.ranks]


# ---------------------------------------------------------------- reading the records


def summarize(df: pd.DataFrame, cfg: Config) -> list[dict[str, Any]]:
    """Per rank count and weight type: median and min update_cosine over training; final val_loss of both runs
    (the rows of the report's "Measured" table, of `specscope run`'s console and of a sweep's summary.csv)."""
    rows = []
    cos = df[df.metric == "update_cosine"]
    val = df[df.metric == "val_loss"].sort_values("step")
    for arm in sorted(cos.arm.unique(), key=lambda a: int(a.split("-")[1])):
        n = arm.split("-")[1]
        d = cos[cos.arm == arm]
        final = {m: float(val[val.arm == f"{m}-{n}"].value.iloc[-1]) for m in ("global", "shardwise")
                 if (val.arm == f"{m}-{n}").any()}
        for wt, g in d.groupby(d.layer.map(gpt.weight_type)):
            rows.append(dict(ranks=int(n), weight=wt, cosine_median=float(g.value.median()),
                             cosine_min=float(g.value.min()), val_loss_global=final.get("global", math.nan),
                             val_loss_shardwise=final.get("shardwise", math.nan)))
    return rows


def claims(df: pd.DataFrame, cfg: Config) -> list[Claim]:
    return []  # an open question (paper 002), measured: see summarize() and the figures


def figures(df: pd.DataFrame, cfg: Config) -> dict[str, Any]:
    from specscope.report.style import legend, subplots

    cos = df[df.metric == "update_cosine"]
    worlds = sorted({int(arm.split("-")[1]) for arm in cos.arm.unique()})
    panels = 1 + max(1, len(worlds))
    fig, axes = subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax, *bxs = axes[0]
    val = df[df.metric == "val_loss"]
    for arm, d in sorted(val.groupby("arm")):
        d = d.sort_values("step")
        ax.plot(d.step, d.value, "--" if arm.startswith("shardwise") else "-", label=arm)
    ax.set(xlabel="step", ylabel="val_loss (nats/byte)", title="global vs shard-wise Muon under FSDP2")
    legend(ax)
    for bx, world in zip(bxs, worlds):  # one panel per rank count: each weight type named in its legend
        c = cos[cos.arm.map(lambda a: int(a.split("-")[1])) == world]
        for wt, d in sorted(c.groupby(c.layer.map(gpt.weight_type))):
            d = d.groupby("step").value.median()
            bx.plot(d.index, d.values, label=wt)
        bx.set(xlabel="step", ylabel="cos(global, shard-wise update)",
               title=f"{world} ranks: per weight type, median over layers")
        legend(bx, cap=12)
    return {"shardwise": fig}
