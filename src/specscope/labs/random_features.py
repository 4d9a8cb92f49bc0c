"""Random-feature regression: GD vs SpecGD vs AutoGeometry, st(A) vs width, nr(G) at steps 0 and 1 (RF-1..3).

f(W) = ½‖W A − Y‖_F² with random features A = σ(B X) (features × samples) and realizable labels Y = W̄ A
(paper 001 §1.2, §3; REFERENCE §3 "Quadratic check"). The Hessian is ΔW ↦ ΔW A Aᵀ, so
‖ΔW A‖_F² ≤ ‖A‖_2²‖ΔW‖_F² (Euclidean, L_E = ‖A‖_2²) and ≤ ‖A‖_F²‖ΔW‖_2² (spectral, L_S = ‖A‖_F² = st(A)·L_E).
With these exact constants both steps are guaranteed to decrease f:
    GD:      ΔW = −G / L_E                    decrease ≥ ‖G‖_F² / (2 L_E)
    SpecGD:  ΔW = −(‖G‖_* / L_S) · polar(G)   decrease ≥ ‖G‖_*² / (2 L_S)
and the ratio of the guarantees is nr(G)/st(A). ReLU features have a mean spike (st(A) ≈ π at any width),
SwiGLU features are nearly centred (st(A) grows with width), which decides the winner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from specscope.data.synthetic import ACTIVATION_NAMES, RFProblem, check_activation, rf_regression
from specscope.labs.base import Arm, AtLeast1, LabConfig, Margin, Measure, NonNegative, Positive
from specscope.labs.config import names_from
from specscope.linalg import nuclear_rank, stable_rank
from specscope.records import SWEEP, Claim, Record
from specscope.report import style

NAME = "random-features"


# ---------------------------------------------------------------------------------------------------
# The quadratic check: plain tensor math, shared by `specscope demo` and the lab's measures.
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Constants:
    """Exact smoothness constants of f in the two geometries (REFERENCE §3)."""

    L_E: float  # ‖A‖_2²: Euclidean
    L_S: float  # ‖A‖_F²: spectral
    st: float  # st(A) = L_S / L_E


def constants(A: torch.Tensor) -> Constants:
    """L_E = λ_max of the smaller Gram matrix (float64, exact eigensolver), L_S its trace = ‖A‖_F².

    Exact rather than power iteration: an underestimated ‖A‖_2 would void the descent guarantee.
    """
    A64 = A.detach().double()
    C = A64 @ A64.T if A64.shape[0] <= A64.shape[1] else A64.T @ A64
    L_E = float(torch.linalg.eigvalsh(C)[-1])
    L_S = float(A64.square().sum())
    return Constants(L_E=L_E, L_S=L_S, st=L_S / L_E)


class RFModel(torch.nn.Module):
    """The trained layer y = W a, W zero at start; fed Aᵀ (samples × features), the nn.Linear layout."""

    def __init__(self, width: int, outputs: int, *, dtype: torch.dtype = torch.float64, device=None):
        super().__init__()
        self.W = torch.nn.Linear(width, outputs, bias=False, dtype=dtype, device=device)
        torch.nn.init.zeros_(self.W.weight)

    def forward(self, At: torch.Tensor) -> torch.Tensor:
        return self.W(At)


def rf_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """f(W) = ½‖W A − Y‖_F² for a batch (Aᵀ, Yᵀ); its gradient is (W A − Y) Aᵀ."""
    At, Yt = batch
    return 0.5 * (model(At) - Yt).square().sum()


METHODS = ("gd", "specgd", "auto", "specgd_wrong_L")


def make_optimizer(method: str, model: RFModel, c: Constants, threshold: float = 1.0, hysteresis: float = 0.1):
    """The exact-constant steps as optimizers, all with lr = 1/L_E (one implementation of each step):

    gd              torch.optim.SGD:  ΔW = −G/L_E
    specgd          SpecGD fed st(A): ΔW = −(1/L_E)(‖G‖_*/st(A))·polar(G) = −(‖G‖_*/L_S)·polar(G)
    auto            AutoGeometry: per step the one of the two above with the larger guarantee (nr/st vs 1)
    specgd_wrong_L  SpecGD without st(A): ΔW = −(‖G‖_*/L_E)·polar(G), the known mistake (REFERENCE §3)
    """
    from specscope.optim import AutoGeometry, SpecGD

    lr, st = 1.0 / c.L_E, (lambda layer: c.st)
    named = list(model.named_parameters())
    if method == "gd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if method == "specgd":
        return SpecGD(named, lr=lr, stable_rank=st, polar="svd")
    if method == "auto":
        return AutoGeometry(named, lr=lr, monitor=st, threshold=threshold, hysteresis=hysteresis,
                            euclidean="sgd", polar="svd")
    if method == "specgd_wrong_L":
        return SpecGD(named, lr=lr, polar="svd")
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


@dataclass
class Trajectory:
    """Per step t = 0..steps of one method from W = 0: f(W_t), ‖G_t‖_F², ‖G_t‖_*, nr(G_t)."""

    method: str
    objective: list[float] = field(default_factory=list)
    grad_fro2: list[float] = field(default_factory=list)
    grad_nuclear: list[float] = field(default_factory=list)
    nuclear_rank: list[float] = field(default_factory=list)


def descend(problem: RFProblem, method: str, steps: int, c: Constants | None = None) -> Trajectory:
    """Run `method` ∈ METHODS for `steps` steps from W = 0, recording the trajectory at t = 0..steps."""
    A, Y = problem.A, problem.Y
    c = c or constants(A)
    model = RFModel(A.shape[0], Y.shape[0], dtype=A.dtype, device=A.device)
    opt = make_optimizer(method, model, c)
    batch = (A.T, Y.T)
    traj = Trajectory(method)
    for t in range(steps + 1):
        opt.zero_grad()
        loss = rf_loss(model, batch)
        loss.backward()
        G = model.W.weight.grad
        fro2 = float(G.square().sum())
        traj.objective.append(float(loss.detach()))
        traj.grad_fro2.append(fro2)
        nr = float(nuclear_rank(G)) if fro2 > 0 else math.nan
        traj.nuclear_rank.append(nr)
        traj.grad_nuclear.append(math.sqrt(nr * fro2) if fro2 > 0 else 0.0)  # ‖G‖_*² = nr(G)·‖G‖_F²
        if t < steps:
            opt.step()
    return traj


def first_step_ranks(problem: RFProblem, c: Constants | None = None) -> tuple[float, float]:
    """nr(G) at W = 0 and after one exact GD step (the paper's step 0 → step 1 jump)."""
    traj = descend(problem, "gd", 1, c)
    return traj.nuclear_rank[0], traj.nuclear_rank[1]


def predicted(nr: float, st: float) -> str:
    """The geometry whose one-step guarantee is larger: spectral when nr(G)/st(A) > 1."""
    return "spectral" if nr > st else "euclidean"


# ---------------------------------------------------------------------------------------------------
# The lab: arms through the shared loop, two sweeps, claims from the recorded metrics.
# ---------------------------------------------------------------------------------------------------

class Config(LabConfig):
    """Random-feature regression; defaults reproduce RF-1..RF-3 in a few minutes on 2 CPU cores."""

    activations: list[str] = names_from(["relu", "swiglu", "gelu", "tanh"], ACTIVATION_NAMES)
    methods: list[str] = names_from(["gd", "specgd", "auto"], METHODS)
    dim: AtLeast1 = 128  # input dimension d of X (d × samples)
    width: AtLeast1 = 1024  # random features (rows of A)
    samples: AtLeast1 = 1024  # columns of A
    outputs: AtLeast1 = 64  # rows of W and Y
    steps: AtLeast1 = 30
    sweep_activations: list[str] = names_from(["relu", "swiglu"], ACTIVATION_NAMES)  # activations of the two sweeps
    sweep_widths: list[AtLeast1] = Field(default=[128, 256, 512, 1024, 2048], min_length=1)  # st(A) vs width ...
    sweep_samples: AtLeast1 = 2048  # ... at this many samples (≥ the widths, else st(A) saturates at ~samples)
    sweep_dims: list[AtLeast1] = Field(default=[32, 64, 128, 256], min_length=1)  # nr(G) at steps 0, 1 vs d, with width = samples = 8d, outputs = d/2
    decisive: Margin = 1.5  # RF-3 tests the sign only where nr/st > decisive or < 1/decisive (≥ 1: 1 tests every ratio)
    threshold: Positive = 1.0  # AutoGeometry: spectral when nr/st > threshold
    hysteresis: NonNegative = 0.1


def _problem(cfg: Config, act: str, device, dim=None, width=None, samples=None, outputs=None) -> RFProblem:
    return rf_regression(dim or cfg.dim, width or cfg.width, samples or cfg.samples, outputs or cfg.outputs,
                         act, cfg.seed, device=device)


class RankRecorder:
    """Records nr(G) of W's gradient and the exact st(A) of its fixed input on every step (lab metrics)."""

    every = 1

    def __init__(self, c: Constants, rows: int, shape: str):
        self.c, self.rows, self.shape = c, rows, shape

    def after_backward(self, step: int, model: RFModel, optimizer) -> list[Record]:
        G = model.W.weight.grad
        if not G.abs().max() > 0:
            return []
        nr = float(nuclear_rank(G))
        meta = dict(layer="W", rows=self.rows, shape=self.shape)
        return [Record(step, metric="stable_rank", value=self.c.st, estimator="exact", **meta),
                Record(step, metric="nuclear_rank", value=nr, estimator="exact", **meta),
                Record(step, metric="spectral_advantage", value=nr / self.c.st, estimator="exact", **meta)]


def _arm(cfg: Config, act: str, method: str, device) -> Arm:
    p = _problem(cfg, act, device)
    c = constants(p.A)
    model = RFModel(cfg.width, cfg.outputs, dtype=p.A.dtype, device=device)
    batch = (p.A.T.contiguous(), p.Y.T.contiguous())
    return Arm(
        name=f"{act}/{method}", model=model, optimizer=make_optimizer(method, model, c, cfg.threshold, cfg.hysteresis),
        batch=lambda step: batch, loss=rf_loss, steps=cfg.steps,
        evaluate=lambda m: {"objective": float(rf_loss(m, batch).detach())}, eval_every=cfg.steps,
        callbacks=[RankRecorder(c, cfg.samples, f"{cfg.samples}x{cfg.width}")],
    )


def _width_sweep(cfg: Config):
    def fn(log, device) -> None:
        for act in cfg.sweep_activations:
            for w in cfg.sweep_widths:
                A = _problem(cfg, act, device, width=w, samples=cfg.sweep_samples, outputs=1).A
                log([Record(w, act, "stable_rank", float(stable_rank(A)), estimator="exact",  # step = width
                            rows=cfg.sweep_samples, shape=f"{cfg.sweep_samples}x{w}", flag=SWEEP)])
    return fn


def _dim_sweep(cfg: Config):
    def fn(log, device) -> None:
        for act in cfg.sweep_activations:
            for d in cfg.sweep_dims:
                p = _problem(cfg, act, device, dim=d, width=8 * d, samples=8 * d, outputs=max(d // 2, 1))
                c = constants(p.A)
                tr = descend(p, "gd", 1, c)
                for t in (0, 1):
                    log([Record(d, act, "nuclear_rank", tr.nuclear_rank[t], f"dim-sweep/step{t}", "exact", flag=SWEEP),
                         Record(d, act, "stable_rank", c.st, f"dim-sweep/step{t}", "exact", rows=8 * d, flag=SWEEP)])
    return fn


def check(cfg: Config) -> None:
    """Names a `--set` cannot check by itself (a sweep checks every point with this before it starts)."""
    for act in [*cfg.activations, *cfg.sweep_activations]:
        check_activation(act)
    for m in cfg.methods:
        if m not in METHODS:
            from specscope.errors import ConfigError

            raise ConfigError(f"unknown method {m!r} in methods; choose from {', '.join(METHODS)}")


def build(cfg: Config, device: torch.device) -> list[Arm | Measure]:
    """Arms activation × method (exact constants, W = 0 start), then the width and dimension sweeps."""
    check(cfg)
    items: list[Arm | Measure] = [_arm(cfg, a, m, device) for a in cfg.activations for m in cfg.methods]
    return items + [Measure("width-sweep", _width_sweep(cfg)), Measure("dim-sweep", _dim_sweep(cfg))]


# ------------------------------------------------------------------------- reading the records back

def _series(df: pd.DataFrame, arm: str, metric: str, layer: str | None = None) -> pd.Series:
    """value indexed by step for one arm/metric (/layer); empty when absent."""
    sel = df[(df["arm"] == arm) & (df["metric"] == metric)]
    if layer is not None:
        sel = sel[sel["layer"] == layer]
    return sel.groupby("step")["value"].last().sort_index()


def final_objective(df: pd.DataFrame, act: str, method: str) -> float:
    s = _series(df, f"{act}/{method}", "objective")
    return float(s.iloc[-1]) if len(s) else math.nan


def step_ratio(df: pd.DataFrame, act: str, step: int = 1) -> tuple[float, float]:
    """(nr(G), st(A)) recorded on the GD arm at `step` (step 1: after one exact GD step)."""
    nr, st = _series(df, f"{act}/gd", "nuclear_rank"), _series(df, f"{act}/gd", "stable_rank")
    return (float(nr.get(step, math.nan)), float(st.get(step, math.nan)))


def loglog_slope(s: pd.Series) -> float:
    """Least-squares slope of log value vs log step (the exponent of a power law)."""
    s = s[(s > 0) & np.isfinite(s)]
    if len(s) < 2:
        return math.nan
    return float(np.polyfit(np.log(s.index.to_numpy(float)), np.log(s.to_numpy(float)), 1)[0])


def _verdict(checks: list[bool | None]) -> str:
    if any(c is None for c in checks):
        return "INCONCLUSIVE"
    return "PASS" if all(checks) else "FAIL"


def _finite(*xs: float) -> bool:
    return all(math.isfinite(x) for x in xs)


def _ratio(a: float, b: float) -> float:
    """a / b; NaN where b is 0 (a method that reached the optimum exactly, e.g. GD on a rank-one A at width 1)."""
    return a / b if b != 0 else math.nan


def setting(cfg: Config) -> str:
    """The regime of RF-1..3 and the settings the paper leaves open (the thresholds are the project's)."""
    return (f"d {cfg.dim}, width {cfg.width}, samples {cfg.samples}, outputs {cfg.outputs}, {cfg.steps} steps "
            f"(GD lr 1/‖A‖₂², SpecGD step ‖G‖_*/‖A‖_F²); width sweep {cfg.sweep_widths} at {cfg.sweep_samples} samples, "
            f"d sweep {cfg.sweep_dims}; seed {cfg.seed}")


def _rf1(df: pd.DataFrame, cfg: Config) -> Claim:
    text = ("ReLU random features: st(A) stays O(1) (≈ 3) as width grows; nr(G) is O(1) at W = 0 and grows "
            "with d after one GD step; SpecGD reaches a much lower loss than GD at equal steps.")
    pub = "st(A) ≈ π; nr(G₀) = O(1), nr(G₁) = Ω(d); SpecGD ≪ GD (001 §1.2, §3, Fig. 3, 15)"
    st = _series(df, "width-sweep", "stable_rank", "relu")
    nr0, nr1 = (_series(df, f"dim-sweep/step{t}", "nuclear_rank", "relu") for t in (0, 1))
    gd, spec = final_objective(df, "relu", "gd"), final_objective(df, "relu", "specgd")
    if st.empty or nr1.empty or not _finite(gd, spec):
        return Claim("RF-1", text, pub, "relu or the sweeps not recorded", "INCONCLUSIVE")
    s0, s1 = loglog_slope(nr0), loglog_slope(nr1)
    # the paper's O(1), Ω(d) and ≪ as the project's thresholds (the rule is printed in `setting`)
    checks = [st.max() < 1.5 * st.min() and st.max() < 10, nr0.max() < 10, s1 > 0.75, spec < 0.5 * gd]
    measured = (f"st(A) {st.min():.2f}–{st.max():.2f} over width {st.index.min()}–{st.index.max()}; "
                f"nr(G₀) {nr0.iloc[0]:.1f}→{nr0.iloc[-1]:.1f} (slope {s0:.2f}), nr(G₁) {nr1.iloc[0]:.1f}→"
                f"{nr1.iloc[-1]:.1f} (slope {s1:.2f}) over d {nr1.index.min()}–{nr1.index.max()}; "
                f"objective at step {cfg.steps}: f_SpecGD / f_GD = {_ratio(spec, gd):.3f}")
    rule = ("; rule (the project's thresholds for O(1), Ω(d), ≪): st(A) max < 1.5 × min and < 10, nr(G₀) < 10, "
            "log-log slope of nr(G₁) in d > 0.75, SpecGD/GD < 0.5")
    return Claim("RF-1", text, pub, measured, _verdict(checks), setting=setting(cfg) + rule, value=_ratio(spec, gd))


def _rf2(df: pd.DataFrame, cfg: Config) -> Claim:
    text = "SwiGLU random features: st(A) grows with width, nr(G) < st(A), and GD beats SpecGD."
    pub = "st(A) ∝ width; nr(G) below st(A); GD ≪ SpecGD (001 §1.2.2, Fig. 11)"
    st = _series(df, "width-sweep", "stable_rank", "swiglu")
    nr1, st_arm = step_ratio(df, "swiglu")
    gd, spec = final_objective(df, "swiglu", "gd"), final_objective(df, "swiglu", "specgd")
    if st.empty or not _finite(nr1, st_arm, gd, spec):
        return Claim("RF-2", text, pub, "swiglu arms or the width sweep not recorded", "INCONCLUSIVE")
    slope = loglog_slope(st)
    checks = [slope > 0.2, nr1 < st_arm, gd < spec]  # ReLU's slope is ≈ 0
    measured = (f"st(A) {st.iloc[0]:.1f}→{st.iloc[-1]:.1f} over width {st.index.min()}–{st.index.max()} "
                f"(log-log slope {slope:.2f}); step 1: nr(G) {nr1:.1f} vs st(A) {st_arm:.1f}; "
                f"f at step {cfg.steps}: GD/SpecGD = {_ratio(gd, spec):.3f}")
    rule = "; rule (the project's thresholds): log-log slope of st(A) in width > 0.2 (ReLU's ≈ 0), nr(G₁) < st(A), GD < SpecGD"
    return Claim("RF-2", text, pub, measured, _verdict(checks), setting=setting(cfg) + rule, value=_ratio(gd, spec))


def rf3_rows(df: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """Per activation: nr/st after one GD step, the predicted geometry, the winner at the last step."""
    rows = []
    for act in cfg.activations:
        nr, st = step_ratio(df, act)
        gd, spec = final_objective(df, act, "gd"), final_objective(df, act, "specgd")
        if not _finite(nr, st, gd, spec):
            continue
        ratio = nr / st
        rows.append(dict(activation=act, ratio=ratio, predicted=predicted(nr, st),
                         won="spectral" if spec < gd else "euclidean",
                         decisive=ratio > cfg.decisive or ratio < 1 / cfg.decisive))
    return pd.DataFrame(rows, columns=["activation", "ratio", "predicted", "won", "decisive"])


def _rf3(df: pd.DataFrame, cfg: Config) -> Claim:
    text = "The sign of log(nr(G)/st(A)) after one GD step predicts which geometry reaches the lower loss."
    pub = "spectral wins iff nr/st > 1 (001 (1.5); ReLU vs SwiGLU)"
    rows = rf3_rows(df, cfg)
    dec = rows[rows["decisive"]] if len(rows) else rows
    parts = [f"{r.activation}: nr/st {r.ratio:.2f}, predicted {r.predicted}, won {r.won}"
             + ("" if r.decisive else " (borderline, not tested)") for r in rows.itertuples()]
    measured = "; ".join(parts) or "no activation recorded"
    where = setting(cfg) + f"; activations {cfg.activations}; tested where nr/st > {cfg.decisive:g} or < 1/{cfg.decisive:g} (the project's margin)"
    if len(dec) == 0 or dec["predicted"].nunique() < 2:
        return Claim("RF-3", text, pub, measured + "; needs decisive cases of both signs", "INCONCLUSIVE", setting=where)
    agree = float((dec["predicted"] == dec["won"]).mean())
    return Claim("RF-3", text, pub, measured, "PASS" if agree == 1 else "FAIL", setting=where, value=agree)


def claims(df: pd.DataFrame, cfg: Config) -> list[Claim]:
    """RF-1..RF-3 from the recorded sweeps and arm metrics (never from constants)."""
    return [_rf1(df, cfg), _rf2(df, cfg), _rf3(df, cfg)]


def figures(df: pd.DataFrame, cfg: Config) -> dict:
    """st(A) vs width, nr(G) at steps 0 and 1 vs d, and f/f₀ per activation and method."""
    from specscope.report.style import subplots

    out = {}  # a figure none of whose series was recorded (a salvaged run that lost its sweeps) is left out
    fig, ax = subplots(figsize=(5, 3.5))
    for act in cfg.sweep_activations:
        s = _series(df, "width-sweep", "stable_rank", act)
        if len(s):
            ax.loglog(s.index, s.values, "o-", label=act)
    ax.set(xlabel="width (features)", ylabel="st(A)", title="stable rank of random features vs width")
    style.legend(ax)
    if ax.lines:
        out["rf_stable_rank_vs_width"] = fig

    fig, ax = subplots(figsize=(5, 3.5))
    for act in cfg.sweep_activations:
        for t, line in ((0, "--"), (1, "-")):
            s = _series(df, f"dim-sweep/step{t}", "nuclear_rank", act)
            if len(s):
                ax.loglog(s.index, s.values, "o" + line, label=f"{act} step {t}")
    ax.set(xlabel="input dimension d (width = samples = 8d)", ylabel="nr(G)", title="nr(G) at W = 0 and after one GD step")
    style.legend(ax)
    if ax.lines:
        out["rf_nuclear_rank_vs_dim"] = fig

    fig, axes = subplots(1, len(cfg.activations), figsize=(3.2 * len(cfg.activations), 3), squeeze=False)
    for ax, act in zip(axes[0], cfg.activations):
        for m in cfg.methods:
            s = _series(df, f"{act}/{m}", "loss")
            if len(s):
                ax.semilogy(s.index, s.values / s.iloc[0], label=m)
        ax.set(title=act, xlabel="step")
    axes[0][0].set_ylabel("f / f(0)")
    style.legend(axes[0][0])
    if any(ax.lines for ax in axes[0]):
        out["rf_loss"] = fig
    return out
