"""Rolling gradient SVD: SED centroid coupling, projection interventions, multitask (paper 003, SED-1..3).

θ_attn is every attention weight matrix (W_Q, W_K, W_V, W_O of every block, no biases), flattened. Every
`snapshot_every` steps the gradient of the loss on a fixed training batch goes into a RollingSVD(window, k)
(gradient SED) and the update Δθ since the previous snapshot into another (update SED; `update_delta=step`:
the one optimizer step θ_t − θ_{t−1}). Once the windows
are full, every `coupling_every` steps, R_1..R_k and R̄ of each SED are measured against the centroids
μ_x = ∂(correct-class logit)/∂(token + position embedding) on `n_probe` fixed inputs (REFERENCE §5).

Parts, in order:
- `<intervention>-s<i>` for each intervention and seed: the paper-003 encoder on a single task, with the
  attention gradient projected before the optimizer step once the window is full (control: none;
  keep/remove the gradient SED-k subspace; keep/remove a random k-dim subspace, fixed or `*_fresh` each
  step; `project_after_clip`, `project_from=start` move the projection after clipping / to step 1). The coupling curves
  are measured on the first `coupling_seeds` control arms (`control-s0`, …). Grok steps as in the grokking lab.
- `multitask`: one shared encoder with a head per task in `multitask`; aggregated update SED,
  aggregated gradient SED and per-task gradient SED, each coupled to each task's centroids.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import replace
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from specscope.data.modular import ModularData, all_pairs, modular_dataset
from specscope.errors import ConfigError
from specscope.labs.base import Arm, AtLeast1, Betas, Fraction, LabConfig, NonNegative, Positive, Unit
from specscope.labs.grokking import Batches, Tracker, grok_steps, loss_fn, make_evaluate
from specscope.models.modular import Kernel, ModularTransformer, check_heads, enc003
from specscope.records import Claim, Record, over_seeds
from specscope.subspace import GradientProjection, coupling_ratios
from specscope.subspace.snapshots import UPDATE, GatedProjection, SEDTracker

NAME = "sed"
GRADIENT = "gradient-sed"
Intervention = Literal["control", "keep_sed", "remove_sed", "keep_random", "remove_random", "keep_random_fresh",
                       "remove_random_fresh"]
MULTITASK_COMMAND = "specscope run sed --set 'interventions=[]' --set multitask=add,sub,mul,sum_sq"  # SED-3
CORE: tuple[str, ...] = ("control", "keep_sed", "remove_sed", "keep_random", "remove_random")  # SED-2's rule
INTERVENTIONS: tuple[str, ...] = (*CORE, "keep_random_fresh", "remove_random_fresh")  # *_fresh: a new subspace each step


class Config(LabConfig):
    task: str = "add"  # the single-task runs (coupling curves, interventions)
    # SED-3's tasks, e.g. add,sub,mul,sum_sq (MULTITASK_COMMAND); off by default: the arm trains ≈ 11k steps
    multitask: list[str] = []
    p: AtLeast1 = 97
    train_fraction: Fraction = 0.5
    split: Literal["random", "commutative"] = "random"
    d_model: AtLeast1 = 128
    n_heads: AtLeast1 = 4
    d_ff: AtLeast1 = 256
    n_layers: AtLeast1 = 2
    lr: Positive = 1e-3
    weight_decay: NonNegative = 1.0
    betas: Betas = (0.9, 0.98)
    batch_size: AtLeast1 = 512
    grad_clip: NonNegative = 1.0  # 0: no clipping
    fused_adamw: bool = True  # AdamW(fused=True); False: torch's per-tensor loop (other rounding, slower on CPU)
    kernel: Kernel = "explicit"  # attention by broadcast products (cheaper for 2 tokens); "sdpa": the torch kernel
    steps: AtLeast1 = 6000  # at most, per single-task arm
    multitask_steps: AtLeast1 = 12000  # at most; the four-task model groks (stable) at ≈ 10.5k steps, then stops
    eval_every: AtLeast1 = 50
    eval_train: bool = False  # also evaluate the training set (no claim or figure reads it; the step loss is recorded)
    grok_threshold: Unit = 0.98
    grok_window: AtLeast1 = 10  # evaluations test accuracy must stay >= grok_threshold (the stable grok step)
    stop_after_grok: bool = True
    # rolling SVD and coupling (REFERENCE §5)
    window: AtLeast1 = 20
    k: AtLeast1 = 3
    snapshot_every: AtLeast1 = 25
    fixed_batch: AtLeast1 = 512  # training examples of the fixed gradient batch
    n_probe: AtLeast1 = 1024
    n_random: AtLeast1 = 20
    eps_rel: Fraction = 0.005  # coupling step eps_rel·‖θ‖ along each direction
    # update SED of θ(snapshot) − θ(previous snapshot), or of the one optimizer step at each snapshot
    update_delta: Literal["snapshots", "step"] = "snapshots"
    update_excludes_decay: bool = False  # with update_delta=step: Δθ + lr·wd·θ (the Adam direction)
    coupling_every: AtLeast1 = 250
    coupling_seeds: AtLeast1 = 1  # control arms with coupling curves (control-s0 …); SED-1 over these seeds
    multitask_coupling_every: AtLeast1 = 500  # each multitask checkpoint couples 3 SEDs to each task's centroids
    # interventions
    interventions: list[Intervention] = list(CORE)  # add keep_random_fresh, remove_random_fresh for the fresh subspace
    seeds: AtLeast1 = 1
    random_fixed: bool = True  # random arms: one subspace drawn when projection starts (False: fresh each step)
    project_after_clip: bool = False  # False: project the raw gradient, then clip (paper 003's order); True: clip first
    project_from: Literal["window", "start"] = "window"  # start: from step 1 (SED arms once the window holds k snapshots)


# ---------------------------------------------------------------- model pieces


def attention_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """θ_attn: the weight matrices of every attention module's linear maps (no biases), in model order."""
    out = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "attn":
            for sub, lin in module.named_children():
                if isinstance(lin, torch.nn.Linear):
                    out[f"{name}.{sub}"] = lin.weight
    if not out:
        raise ConfigError("the model has no modules named '*.attn' with nn.Linear children; θ_attn would be empty")
    return out


def embed(model: ModularTransformer, x: Tensor) -> Tensor:
    """The embedded input h0 = token embedding + position embedding, [B, T, d]."""
    return model.embed(x) + model.pos[: x.shape[1]]


def forward_from_embeddings(model: ModularTransformer, h: Tensor) -> list[Tensor]:
    """The model's forward from the embedded input: one logits tensor [B, p] per task head."""
    for block in model.blocks:
        h = block(h)
    h = model.norm(h[:, model.readout])
    return [head(h) for head in model.heads]


def centroids(model: ModularTransformer, x: Tensor, y: Tensor, task: int = 0) -> Tensor:
    """μ_x = ∂ logit_{y_x}(x) / ∂ h0(x), flattened: [B, T·d].

    Inputs do not interact in the forward pass (attention is within a sequence), so the gradient of the
    summed correct-class logits w.r.t. the batch of embeddings is the per-input gradient."""
    h = embed(model, x).detach().requires_grad_(True)
    logits = forward_from_embeddings(model, h)[task]
    (g,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), h)
    return g.reshape(x.shape[0], -1)


# ---------------------------------------------------------------- coupling callback


class Coupling:
    """Every `every` steps once the tracked windows are full: R_1..R_k and R̄ of each SED in `pairs[c]`
    against centroid set c, with one random-direction baseline per centroid set (REFERENCE §5).

    Records (layer = SED name, or "SED:task" for a multitask centroid set): coupling_R1..Rk, coupling_Rbar,
    coupling_baseline; and coupling_seconds for the whole checkpoint.
    """

    def __init__(self, params: list[Tensor], tracker: SEDTracker, centroid_fns: dict[str, Callable[[], Tensor]],
                 pairs: dict[str, list[str]], every: int, n_random: int, eps_rel: float, seed: int):
        self.params, self.tracker, self.centroid_fns, self.pairs = params, tracker, centroid_fns, pairs
        self.every, self.n_random, self.eps_rel, self.seed = every, n_random, eps_rel, seed

    def after_step(self, step: int, model, optimizer) -> list[Record]:
        if not all(self.tracker.seds[s].full for seds in self.pairs.values() for s in seds):
            return []
        t0 = time.perf_counter()
        out = []
        for cname, fn in self.centroid_fns.items():
            seds = self.pairs[cname]
            blocks = [self.tracker.seds[s].directions() for s in seds]
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            ratios, baseline = coupling_ratios(fn, self.params, torch.cat(blocks), n_random=self.n_random,
                                               eps_rel=self.eps_rel, generator=gen)
            offset = 0
            for s, V in zip(seds, blocks):
                layer = f"{s}:{cname}" if cname else s
                r = ratios[offset:offset + len(V)]
                offset += len(V)
                out += [Record(step, layer, f"coupling_R{i + 1}", v, estimator="finite_difference") for i, v in enumerate(r)]
                out += [Record(step, layer, "coupling_Rbar", float(np.mean(r)), estimator="finite_difference")] if r else []
                out += [Record(step, layer, "coupling_baseline", baseline, estimator="finite_difference")]
        out.append(Record(step, "", "coupling_seconds", time.perf_counter() - t0))
        return out


# ---------------------------------------------------------------- build


def make_data(cfg: Config, tasks: list[str], device: torch.device) -> ModularData:
    return modular_dataset(tasks, cfg.p, cfg.train_fraction, cfg.split, cfg.seed, device=device)


def make_model(cfg: Config, n_tasks: int, seed: int, device: torch.device) -> ModularTransformer:
    torch.manual_seed(seed)
    return enc003(cfg.p, n_tasks, d_model=cfg.d_model, n_heads=cfg.n_heads, d_ff=cfg.d_ff,
                  n_layers=cfg.n_layers, kernel=cfg.kernel).to(device)


def fixed_inputs(data: ModularData, n_fixed: int, n_probe: int, seed: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(fixed gradient batch from the training set, probe inputs drawn from all pairs), same every step."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randperm(len(data.x_train), generator=g)[:n_fixed].to(data.x_train.device)
    x_all, y_all = torch.cat([data.x_train, data.x_test]), torch.cat([data.y_train, data.y_test])
    j = torch.randperm(len(x_all), generator=g)[:n_probe].to(x_all.device)
    return (data.x_train[i], data.y_train[i]), (x_all[j], y_all[j])


def task_loss(model: torch.nn.Module, batch: tuple[Tensor, Tensor], t: int) -> Tensor:
    x, y = batch
    logits = model(x).reshape(x.shape[0], -1, model.heads[0].out_features)
    return F.cross_entropy(logits[:, t], y[:, t])


def _arm(cfg: Config, name: str, model, data: ModularData, seed: int, callbacks: list, steps: int) -> Arm:
    """With project_after_clip the clipping runs as a callback ahead of the projection (same call, same result
    for arms that do not project)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            fused=cfg.fused_adamw or None)
    tracker = Tracker(cfg.grok_threshold, cfg.grok_window)
    splits = ("train", "test") if cfg.eval_train else ("test",)
    stop = (lambda m, t=tracker: t.grokked) if cfg.stop_after_grok else None
    clip_first = bool(cfg.project_after_clip and cfg.grad_clip)
    if clip_first:
        at = next((i for i, cb in enumerate(callbacks) if isinstance(cb, (GatedProjection, GradientProjection))), len(callbacks))
        callbacks = [*callbacks[:at], Clip(cfg.grad_clip), *callbacks[at:]]
    return Arm(name=name, model=model, optimizer=opt, batch=Batches(data, cfg.batch_size, seed), loss=loss_fn,
               steps=steps, evaluate=make_evaluate(data, tracker, splits), eval_every=cfg.eval_every,
               callbacks=[tracker, *callbacks], grad_clip=None if clip_first else (cfg.grad_clip or None), stop=stop)


class Clip:
    """Gradient-norm clipping as a callback, so a projection placed after it acts on the clipped gradient."""

    every = 1

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def after_backward(self, step: int, model, optimizer) -> list[Record]:
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_norm)
        return []


def _projection(cfg: Config, iv: str, params: list[Tensor], tracker: SEDTracker, seed: int):
    """The projection of `iv`: from the first full window (project_from=window), or from step 1 (the SED
    subspace once the window holds k snapshots); random arms draw one subspace (fresh each step for *_fresh)."""
    mode, kind = iv.split("_", 1)
    sed = tracker.seds[GRADIENT]
    early = cfg.project_from == "start"
    if kind == "sed":
        subspace = (lambda: sed.directions(cfg.k) if len(sed) >= cfg.k else None) if early else sed
    else:
        subspace = "random"
    proj = GradientProjection(params, subspace, mode=mode, k=cfg.k, fixed=cfg.random_fixed and kind == "random", seed=seed)
    return proj if early else GatedProjection(proj, lambda: sed.full)


def update_options(cfg: Config) -> dict[str, Any]:
    return {"update_delta": cfg.update_delta, "exclude_decay": cfg.update_excludes_decay}


def intervention_arm(cfg: Config, iv: str, s: int, data: ModularData, device: torch.device) -> Arm:
    """One single-task arm: SED tracking, the projection of `iv`, and (for the first `coupling_seeds` control
    arms) coupling curves."""
    seed = cfg.seed + s
    model = make_model(cfg, 1, seed, device)
    params = list(attention_weights(model).values())
    fixed, (xp, yp) = fixed_inputs(data, cfg.fixed_batch, cfg.n_probe, cfg.seed)
    measure = iv == "control" and s < cfg.coupling_seeds
    tracker = SEDTracker(params, {GRADIENT: lambda: loss_fn(model, fixed)}, window=cfg.window, k=cfg.k,
                         every=cfg.snapshot_every, update=measure, **update_options(cfg))
    callbacks: list[Any] = [tracker]
    if iv != "control":
        callbacks.append(_projection(cfg, iv, params, tracker, seed * 7919 + INTERVENTIONS.index(iv)))
    if measure:
        fn = lambda: centroids(model, xp, yp[:, 0])  # noqa: E731
        callbacks.append(Coupling(params, tracker, {"": fn}, {"": [GRADIENT, UPDATE]}, cfg.coupling_every,
                                  cfg.n_random, cfg.eps_rel, cfg.seed))
    return _arm(cfg, f"{iv}-s{s}", model, data, seed, callbacks, cfg.steps)


def multitask_arm(cfg: Config, device: torch.device) -> Arm:
    """Shared encoder, one head per task: aggregated update/gradient SED and per-task gradient SED."""
    data = make_data(cfg, cfg.multitask, device)
    model = make_model(cfg, len(cfg.multitask), cfg.seed, device)
    params = list(attention_weights(model).values())
    fixed, (xp, yp) = fixed_inputs(data, cfg.fixed_batch, cfg.n_probe, cfg.seed)
    losses = {GRADIENT: lambda: loss_fn(model, fixed)}
    losses.update({f"task-{t}-sed": (lambda i=i: task_loss(model, fixed, i)) for i, t in enumerate(cfg.multitask)})
    tracker = SEDTracker(params, losses, window=cfg.window, k=cfg.k, every=cfg.snapshot_every, update=True,
                         **update_options(cfg))
    fns = {t: (lambda i=i: centroids(model, xp, yp[:, i], task=i)) for i, t in enumerate(cfg.multitask)}
    pairs = {t: [UPDATE, GRADIENT, f"task-{t}-sed"] for t in cfg.multitask}
    coupling = Coupling(params, tracker, fns, pairs, cfg.multitask_coupling_every, cfg.n_random, cfg.eps_rel, cfg.seed)
    return _arm(cfg, "multitask", model, data, cfg.seed, [tracker, coupling], cfg.multitask_steps)


def check(cfg: Config) -> None:
    if cfg.k > cfg.window:
        raise ConfigError(f"k={cfg.k} exceeds window={cfg.window}; the window matrix has rank ≤ window")
    if not cfg.interventions and not cfg.multitask:
        raise ConfigError("nothing to run: interventions and multitask are both empty; for SED-3 alone: "
                          + MULTITASK_COMMAND)
    if len(set(cfg.interventions)) != len(cfg.interventions):
        raise ConfigError(f"interventions {cfg.interventions} repeats an arm; give each at most once")
    if cfg.update_excludes_decay and cfg.update_delta != "step":
        raise ConfigError("update_excludes_decay removes one optimizer step's decay; add --set update_delta=step")
    if cfg.coupling_seeds > cfg.seeds:
        raise ConfigError(f"coupling_seeds={cfg.coupling_seeds} exceeds seeds={cfg.seeds}; the coupling curves are "
                          f"measured on control arms, one per seed: add --set seeds={cfg.coupling_seeds}")
    if len(cfg.multitask) == 1:
        raise ConfigError("multitask needs ≥ 2 tasks (or [] to skip it), e.g. --set multitask=add,sub,mul,sum_sq")
    if cfg.d_model < 2:
        raise ConfigError(f"d_model={cfg.d_model}: a LayerNorm over one feature outputs a constant, so the model ignores "
                          "its input and the centroids the coupling is measured against are zero; use d_model ≥ 2")
    if cfg.eps_rel <= torch.finfo(torch.float32).eps:  # what coupling_ratios refuses at the first coupling step
        raise ConfigError(f"eps_rel={cfg.eps_rel:g} is at or below float32's rounding ({torch.finfo(torch.float32).eps:.3g}): "
                          "the coupling step eps_rel·‖θ‖ would not change the float32 parameters; use eps_rel ≥ 1e-6 "
                          "(default 0.005)")
    check_heads(cfg.d_model, cfg.n_heads)


def build(cfg: Config, device: torch.device) -> list[Arm]:
    """Intervention arms (seed-major, control first), then the multitask arm."""
    check(cfg)
    arms = []
    if cfg.interventions:
        data = make_data(cfg, [cfg.task], device)
        ivs = ["control"] + [iv for iv in cfg.interventions if iv != "control"]
        arms += [intervention_arm(cfg, iv, s, data, device) for s in range(cfg.seeds) for iv in ivs]
    if cfg.multitask:
        arms.append(multitask_arm(cfg, device))
    return arms


# ---------------------------------------------------------------- analysis


def _series(df: pd.DataFrame, arm: str, metric: str, layer: str = "") -> pd.Series:
    d = df[(df["arm"] == arm) & (df["metric"] == metric) & (df["layer"] == layer)]
    return d.groupby("step")["value"].mean().sort_index()


def peak_rbar(df: pd.DataFrame, arm: str, layer: str) -> float:
    """R̄ reported as its peak over checkpoints (REFERENCE §5); NaN when never measured."""
    s = _series(df, arm, "coupling_Rbar", layer)
    return float(s.max()) if len(s) else math.nan


def last_rbar(df: pd.DataFrame, arm: str, layer: str) -> tuple[float, int]:
    """(R̄ at the last checkpoint, its step); (NaN, -1) when never measured."""
    s = _series(df, arm, "coupling_Rbar", layer)
    return (float(s.iloc[-1]), int(s.index[-1])) if len(s) else (math.nan, -1)


def intervention_table(df: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """One row per (intervention, seed): grok steps (first ≥ threshold, stable), steps run, speedups vs the
    same seed's control (control grok / arm grok; for an arm that never grokked: at most control / steps run)."""
    rows = []
    ivs = ["control"] + [iv for iv in cfg.interventions if iv != "control"]
    for s in range(cfg.seeds):
        for iv in ivs:
            acc = _series(df, f"{iv}-s{s}", "test_acc")
            if acc.empty:
                continue
            first, stable = grok_steps(acc.index, acc.values, cfg.grok_threshold, cfg.grok_window)
            rows.append({"intervention": iv, "seed": s, "grok_first": first, "grok_stable": stable,
                         "steps_run": int(acc.index[-1]), "final_test_acc": float(acc.iloc[-1])})
    t = pd.DataFrame(rows)
    if t.empty:
        return t
    for kind in ("first", "stable"):
        ctrl = t[t.intervention == "control"].set_index("seed")[f"grok_{kind}"]
        base = t["seed"].map(ctrl)
        arm = t[f"grok_{kind}"].where(t[f"grok_{kind}"].notna(), t["steps_run"])
        t[f"speedup_{kind}"] = base / arm
        t[f"speedup_{kind}_bound"] = t[f"grok_{kind}"].isna()  # True: an upper bound (the arm never grokked)
    return t


def _fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.1f}"


def _update_kind(cfg: Config) -> str:
    if cfg.update_delta == "snapshots":
        return f"Δθ over the {cfg.snapshot_every} steps between snapshots"
    return "one optimizer step Δθ + lr·wd·θ, decay excluded" if cfg.update_excludes_decay else "one optimizer step Δθ"


def probes(cfg: Config) -> int:
    """Probe inputs the coupling uses: n_probe, or every input pair when there are fewer (`fixed_inputs`)."""
    return min(cfg.n_probe, len(all_pairs(cfg.p, [cfg.task])))


def _sed1_seed(df: pd.DataFrame, cfg: Config, s: int) -> Claim:
    """SED-1 on control-s<s>: peak R̄ of gradient vs update SED."""
    text = "Gradient SED couples to centroid features far more than update SED"
    published = "R̄ 100–330× (gradient SED) vs 3–9× (update SED), single task"
    g, u = peak_rbar(df, f"control-s{s}", GRADIENT), peak_rbar(df, f"control-s{s}", UPDATE)
    if math.isnan(g) or math.isnan(u):
        return Claim("SED-1", text, published, "no coupling checkpoint recorded (needs the control arm and "
                     "steps > window·snapshot_every)", "INCONCLUSIVE")
    update = _update_kind(cfg)
    measured = (f"peak R̄ gradient SED {g:.1f} vs update SED ({update}) {u:.1f} ({g / u:.1f}×), task {cfg.task}, "
                f"{probes(cfg)} probes, {cfg.n_random} random directions; PASS needs gradient ≥ 30 and ≥ 10× update")
    return Claim("SED-1", text, published, measured, "PASS" if g >= 30 and g >= 10 * u else "FAIL",
                 setting=setting(cfg) + f"; coupling on control-s{s} (no projection)", value=g / u)


def _sed1_claim(df: pd.DataFrame, cfg: Config) -> Claim:
    """SED-1 on each of the first `coupling_seeds` control arms, combined: the verdict most seeds reach."""
    per_seed = [_sed1_seed(df, cfg, s) for s in range(cfg.coupling_seeds)]
    if len(per_seed) == 1:
        return per_seed[0]
    c = over_seeds(per_seed, [cfg.seed + s for s in range(cfg.coupling_seeds)])
    # one run's setting ("seeds a..b" are this run's arms): over_seeds' rewrite is for one run per seed
    return replace(c, setting=re.sub(r"control-s\d+", "control-s0…s" + str(cfg.coupling_seeds - 1), per_seed[0].setting))


def grok_rule(cfg: Config) -> str:
    return (f"grok = first evaluation with test acc ≥ {cfg.grok_threshold} ('first'), or the first after which it "
            f"stays ≥ {cfg.grok_threshold} for {cfg.grok_window} evaluations every {cfg.eval_every} steps ('stable')")


def setting(cfg: Config) -> str:
    """The settings an SED verdict rests on, including those paper 003 leaves open."""
    order = "clip, then project" if cfg.project_after_clip else "project, then clip"
    start = "from step 1" if cfg.project_from == "start" else f"from the first full window (step {(cfg.window - 1) * cfg.snapshot_every})"
    return (f"{cfg.task} mod {cfg.p}, fraction {cfg.train_fraction:g}, enc003, AdamW lr {cfg.lr:g} wd {cfg.weight_decay:g}, "
            f"clip {cfg.grad_clip:g}; SED window {cfg.window} × every {cfg.snapshot_every}, k {cfg.k}; projection "
            f"{order}, {start}; seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1}")


def _speedups(table: pd.DataFrame, iv: str, kind: str) -> str:
    d = table[table.intervention == iv][f"speedup_{kind}"]
    bound = "≤ " if table[table.intervention == iv][f"speedup_{kind}_bound"].any() else ""
    return f"{bound}{d.mean():.2f}× [{d.min():.2f}–{d.max():.2f}]"


def _sed2_claim(table: pd.DataFrame, cfg: Config) -> Claim:
    text = f"Keeping any {cfg.k}-D subspace of the attention gradient speeds grokking ≈ 2.2–2.4×; removing it changes nothing"
    published = "keep SED-3 2.20×, keep random-3 2.36×, remove SED-3 1.02×, remove random-3 1.00× (control 3358 steps)"
    rule = ("rule (on the 'stable' definition, mean over seeds): keep_sed and keep_random ≥ 1.5× and remove_sed, "
            "remove_random within 0.8–1.25×; 'first' and the fresh random subspaces reported beside it")
    where = setting(cfg) + "; " + grok_rule(cfg) + "; " + rule
    if table.empty or not set(CORE) <= set(table.intervention):
        return Claim("SED-2", text, published, "needs the five interventions " + ", ".join(CORE), "INCONCLUSIVE",
                     setting=where)
    ctrl = table[table.intervention == "control"]
    if ctrl["grok_stable"].isna().any():
        return Claim("SED-2", text, published, f"control did not grok (stable) within {cfg.steps} steps in "
                     f"{int(ctrl['grok_stable'].isna().sum())} of {len(ctrl)} seeds", "INCONCLUSIVE", seeds=len(ctrl),
                     setting=where)
    ivs = [iv for iv in INTERVENTIONS[1:] if iv in set(table.intervention)]
    parts = [f"{iv} {_speedups(table, iv, 'stable')} (first {_speedups(table, iv, 'first')})" for iv in ivs]
    measured = (f"speedup vs control, stable (first), mean [min–max] over {cfg.seeds} seed(s); control stable "
                f"{ctrl['grok_stable'].mean():.0f}, first {ctrl['grok_first'].mean():.0f} steps: " + ", ".join(parts))
    mean = table.groupby("intervention")["speedup_stable"].mean()
    keep = all(mean[iv] >= 1.5 for iv in ("keep_sed", "keep_random"))
    remove = all(0.8 <= mean[iv] <= 1.25 for iv in ("remove_sed", "remove_random"))
    spread = "keep_sed " + _speedups(table, "keep_sed", "stable") if cfg.seeds > 1 else ""
    return Claim("SED-2", text, published, measured, "PASS" if keep and remove else "FAIL", seeds=cfg.seeds,
                 spread=spread, setting=where, value=float(min(mean["keep_sed"], mean["keep_random"])))


def multitask_layers(task: str) -> dict[str, str]:
    """The three SEDs coupled to `task`'s centroids in the multitask arm: column -> recorded layer name."""
    return {"update-sed": f"{UPDATE}:{task}", "gradient-sed": f"{GRADIENT}:{task}", "task-sed": f"task-{task}-sed:{task}"}


def multitask_table(df: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """Per task, R̄ of the aggregated update SED, aggregated gradient SED and that task's gradient SED:
    the peak over checkpoints (REFERENCE §5) and the value at the last checkpoint (`<sed> last`)."""
    rows = []
    for t in cfg.multitask:
        row: dict[str, Any] = {"task": t}
        for col, layer in multitask_layers(t).items():
            row[col] = peak_rbar(df, "multitask", layer)
            row[f"{col} last"], row["last step"] = last_rbar(df, "multitask", layer)
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt_acc(df: pd.DataFrame) -> str:
    acc = _series(df, "multitask", "test_acc")
    return f"{acc.iloc[-1]:.3f} at step {int(acc.index[-1])}" if len(acc) else "n/a"


def _sed3_claim(df: pd.DataFrame, cfg: Config) -> Claim:
    text = "Multitask: aggregated update SED fails (R̄ ≤ 1), per-task gradient SED recovers 20–45×"
    published = "update SED R̄ ≤ 1; per-task gradient SED R̄ 20–45× (four operations)"
    t = multitask_table(df, cfg)
    if t.empty or t[["update-sed", "task-sed"]].isna().any().any():
        why = "too few steps" if cfg.multitask else "the multitask arm is not in the default run"
        return Claim("SED-3", text, published, f"no multitask coupling recorded ({why}); run: {MULTITASK_COMMAND}",
                     "INCONCLUSIVE")
    measured = f"peak R̄ update ({_update_kind(cfg)}) / aggregated gradient / per-task gradient SED: " + "; ".join(
        f"{r.task} {_fmt(r['update-sed'])} / {_fmt(r['gradient-sed'])} / {_fmt(r['task-sed'])}" for _, r in t.iterrows()
    ) + f" (at the last checkpoint, step {int(t['last step'].max())}: " + "; ".join(
        f"{r.task} {_fmt(r['update-sed last'])} / {_fmt(r['gradient-sed last'])} / {_fmt(r['task-sed last'])}"
        for _, r in t.iterrows()
    ) + f"; multitask test acc {_fmt_acc(df)}); PASS needs peak update ≤ 2 and per-task ≥ 10 for every task"
    ok = bool((t["update-sed"] <= 2).all() and (t["task-sed"] >= 10).all())
    where = (f"tasks {', '.join(cfg.multitask)} on one enc003 encoder, ≤ {cfg.multitask_steps} steps, coupling every "
             f"{cfg.multitask_coupling_every}; " + grok_rule(cfg) + " (the arm stops at the 'stable' grok)")
    return Claim("SED-3", text, published, measured, "PASS" if ok else "FAIL", setting=where,
                 value=float(t["update-sed"].max()))


def claims(df: pd.DataFrame, cfg: Config) -> list[Claim]:
    return [_sed1_claim(df, cfg), _sed2_claim(intervention_table(df, cfg), cfg), _sed3_claim(df, cfg)]


# ---------------------------------------------------------------- figures


def figures(df: pd.DataFrame, cfg: Config) -> dict[str, Any]:
    from specscope.report.style import subplots

    out = {}
    curves = {layer: _series(df, "control-s0", "coupling_Rbar", layer) for layer in (GRADIENT, UPDATE)}
    if any(len(s) for s in curves.values()):  # none without the control arm (interventions=[]) or a full window
        fig, ax = subplots(figsize=(7, 4))
        for (layer, s), style in zip(curves.items(), ("-o", "-s")):
            ax.plot(s.index, s.values, style, ms=3, label=f"{layer} R̄")
        acc = _series(df, "control-s0", "test_acc")
        ax2 = ax.twinx()
        ax2.plot(acc.index, acc.values, color="gray", alpha=0.5, label="test acc")
        ax2.set_ylabel("test accuracy")
        ax.set(xlabel="step", ylabel="R̄ (vs median random direction)", yscale="log",
               title=f"centroid coupling, {cfg.task} mod {cfg.p} (control-s0)")
        ax.legend(loc="upper left", fontsize=8)
        out["sed_coupling"] = fig

    table = intervention_table(df, cfg)
    if not table.empty:
        fig, (ax, axt) = subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 1.3]})
        ivs = list(dict.fromkeys(table.intervention))
        for i, iv in enumerate(ivs):
            d = table[table.intervention == iv]
            ax.scatter([i] * len(d), d["grok_stable"], color="C0", label="stable" if i == 0 else None)
            ax.scatter([i + 0.15] * len(d), d["grok_first"], color="C1", marker="x", label="first" if i == 0 else None)
        ax.set_xticks(range(len(ivs)), ivs, rotation=20)
        grokked = table[["grok_first", "grok_stable"]].notna().any().any()
        ax.set(ylabel="grok step", title="grok step per seed" + ("" if grokked else f": none within {cfg.steps} steps"))
        ax.legend(fontsize=8)
        agg = table.groupby("intervention", sort=False).agg(
            first=("grok_first", "mean"), stable=("grok_stable", "mean"),
            speedup_first=("speedup_first", "mean"), speedup_stable=("speedup_stable", "mean")).reset_index()
        times = lambda x: "n/a" if x != x else f"{x:.2f}×"  # noqa: E731
        cells = [[r.intervention, _fmt(r.first), _fmt(r.stable), times(r.speedup_first), times(r.speedup_stable)]
                 for r in agg.itertuples()]
        axt.axis("off")
        tab = axt.table(cells, colLabels=["intervention", "grok first", "grok stable", "speedup first", "speedup stable"],
                        loc="center")
        tab.auto_set_font_size(False)
        tab.set_fontsize(9)
        tab.scale(1, 1.5)
        axt.set_title(f"mean over {cfg.seeds} seed(s)")
        out["sed_interventions"] = fig

    mt = multitask_table(df, cfg)
    if not mt.empty and mt[["update-sed", "task-sed"]].notna().any().any():
        fig, (ax, axc) = subplots(1, 2, figsize=(12, 4))
        x = np.arange(len(mt))
        for j, col in enumerate(("update-sed", "gradient-sed", "task-sed")):
            ax.bar(x + (j - 1) * 0.27, mt[col].fillna(0), 0.27, label=col, color=f"C{j}")
        ax.axhline(1, color="k", lw=0.7)
        ax.set_xticks(x, mt.task)
        ax.set(ylabel="peak R̄", yscale="log", title="multitask: aggregated vs per-task SED, peak R̄")
        ax.set_ylim(top=4 * float(np.nanmax(mt[["update-sed", "gradient-sed", "task-sed"]].to_numpy())))
        ax.legend(fontsize=8, loc="upper left", ncol=3)  # in the headroom above the bars
        for i, t in enumerate(cfg.multitask):
            for j, (col, layer) in enumerate(multitask_layers(t).items()):
                r = _series(df, "multitask", "coupling_Rbar", layer)
                axc.plot(r.index, r.values, color=f"C{j}", alpha=0.7, lw=1, label=col if i == 0 else None)
        acc = _series(df, "multitask", "test_acc")
        axa = axc.twinx()
        axa.plot(acc.index, acc.values, color="gray", alpha=0.5)
        axa.set_ylabel("test accuracy (mean over tasks)")
        axc.axhline(1, color="k", lw=0.7)
        axc.set(xlabel="step", ylabel="R̄ (one line per task)", yscale="log", title="R̄ over training")
        axc.legend(fontsize=8, loc="lower left")
        out["sed_multitask"] = fig
    return out
