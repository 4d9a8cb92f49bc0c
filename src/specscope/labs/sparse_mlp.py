"""Sparse-function MLP: GD vs SpecGD on the hidden layers, ReLU vs SwiGLU, a batch-size sweep (MLP-1).

Paper 001 Fig. 1, 17, 18 (§1.1, §1.2.1, App. A): Gaussian inputs x ∈ R^d, the sparse target y = x₁x₂x₃, a
network x → h₁ → h₂ → h₃ → y with three hidden post-activations and four weight matrices (the paper calls it
"three layer" in §1.1 and "four-layer" in App. A; both describe this network), trained full batch on
½·mean (f(x) − y)². SpecGD takes spectral steps on the internal weights only — layers 2 and 3, whose inputs
are the post-activations h₁, h₂ — and Euclidean steps on the first layer (raw inputs) and the output head
(§1.2.1). The spectral step is the geometry-matched one (REFERENCE §3): with the GD learning rate η,
ΔW = −η·(‖G‖_*/st(A))·polar(G), st(A) read every step from the probe Monitor. Since L_S = st(A)·L_E this is the
paper's 1/L_S spectral step whenever η = 1/L_E is GD's step.

Claims (MLP-1, split in three): (a) the hidden post-activations keep a low stable rank through training;
(b) SpecGD on layers 2–3 reaches a lower loss than GD early; (c) with SwiGLU, st(A) grows with the batch size
and SpecGD's early advantage fades as the batch grows.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from specscope.data.synthetic import ACTIVATION_NAMES, check_activation, generator, sparse_regression
from specscope.errors import ConfigError
from specscope.labs.base import Arm, AtLeast1, LabConfig, Measure, Positive, Share
from specscope.labs.config import names_from
from specscope.linalg import stable_rank
from specscope.records import SWEEP, Claim, Record
from specscope.report import style

NAME = "sparse-mlp"
METHODS = ("gd", "specgd")
SPECTRAL_LAYERS = ("layers.1", "layers.2")  # the paper's layers 2 and 3


# ---------------------------------------------------------------------------------------------------
# Model: three hidden layers (optionally SwiGLU-gated) and a linear head.
# ---------------------------------------------------------------------------------------------------

class Hidden(nn.Module):
    """h = σ(W a), or for SwiGLU h = silu(W a) ⊙ (V a): `up` is W, `gate` is V (both read the same input a)."""

    def __init__(self, d_in: int, d_out: int, activation: str):
        super().__init__()
        self.activation = check_activation(activation)
        self.up = nn.Linear(d_in, d_out, bias=False)
        self.gate = nn.Linear(d_in, d_out, bias=False) if activation == "swiglu" else None

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        from specscope.data.synthetic import activate

        return activate(self.activation, self.up(a), None if self.gate is None else self.gate(a))


# Hidden weights are N(0, g²/fan_in), g = 1 (the paper's Gaussian init) except SwiGLU: at g = 1 its
# post-activation RMS falls ≈ 3× per layer (g²·E[silu(gz)²] = 0.36) and h₃ is nearly zero; g = 1.1 keeps
# h₁..h₃ within 0.3–0.8. The variance-preserving g ≈ 1.28 makes the degree-8 network diverge at any lr tried.
# Squared ReLU (the paper's Fig. 1 activation) at g = 1 grows the RMS ≈ 1.3 → 2.1 → 9.6 through h₁..h₃ and the
# loss is NaN by step 2 at lr 0.05 (also at 0.005); g = 0.8 keeps h₁..h₃ at 0.8 → 0.56 → 0.42 and trains at lr 0.05.
INIT_GAIN = {"swiglu": 1.1, "relu2": 0.8}


class SparseMLP(nn.Module):
    """x (samples × dim) → layers.0 → layers.1 → layers.2 → head → y (samples × 1); no biases.

    Hidden weights are N(0, g²/fan_in) with the activation's INIT_GAIN g, the head N(0, 1/fan_in), all from an
    explicit seed, so the GD and SpecGD arms start from the same point.
    """

    def __init__(self, dim: int, width: int, activation: str, seed: int, depth: int = 3):
        super().__init__()
        sizes = [dim] + [width] * depth
        self.layers = nn.ModuleList(Hidden(a, b, activation) for a, b in zip(sizes[:-1], sizes[1:]))
        self.head = nn.Linear(width, 1, bias=False)
        gen, gain = generator(seed), INIT_GAIN.get(activation, 1.0)
        with torch.no_grad():
            for name, p in self.named_parameters():
                g = 1.0 if name.startswith("head") else gain
                p.copy_(torch.randn(p.shape, generator=gen) * (g / math.sqrt(p.shape[1])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def post_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[h₁, h₂, h₃]: the inputs of layers.1, layers.2 and head."""
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """½·mean (f(x) − y)²: the per-sample average keeps one learning rate valid at every batch size."""
    x, y = batch
    return 0.5 * (model(x) - y).square().mean()


def make_optimizer(method: str, model: SparseMLP, lr: float, monitor):
    """gd: torch.optim.SGD on everything. specgd: SpecGD (geometry-matched, st(A) from `monitor`) on layers 2–3,
    plain SGD groups (algorithm="sgd", same lr) on the first layer and the head."""
    from specscope.optim import SpecGD

    if method == "gd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if method != "specgd":
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    named = list(model.named_parameters())
    spectral = [(n, p) for n, p in named if n.startswith(tuple(s + "." for s in SPECTRAL_LAYERS))]
    names = {n for n, _ in spectral}
    rest = [(n, p) for n, p in named if n not in names]
    return SpecGD([{"params": spectral}, {"params": rest, "algorithm": "sgd", "lr": lr}],
                  lr=lr, stable_rank=monitor, polar="gram")


# ---------------------------------------------------------------------------------------------------
# The lab
# ---------------------------------------------------------------------------------------------------

class Config(LabConfig):
    """Sparse-function MLP; defaults reproduce MLP-1 in a few minutes on 2 CPU cores."""

    activations: list[str] = names_from(["relu", "swiglu"], ACTIVATION_NAMES)  # each trained at `samples`
    methods: list[str] = names_from(["gd", "specgd"], METHODS)
    dim: AtLeast1 = 32  # input dimension d
    width: AtLeast1 = 256  # hidden width h
    samples: AtLeast1 = 256  # full batch n of every activation's arms
    support: AtLeast1 = 3  # target x₁⋯x_support (the paper's cubic)
    steps: AtLeast1 = 100
    lr: Positive = 0.05  # one η for both geometries (geometry-matched spectral step)
    sweep_activation: str = "swiglu"  # also trained at each extra batch size below (Fig. 18)
    batch_sweep: list[AtLeast1] = [32, 1024]
    st_batches: list[AtLeast1] = [16, 32, 64, 128, 256, 512, 1024, 2048]  # st(A) at initialisation vs n (Fig. 17)
    test_samples: AtLeast1 = 1024
    probe_every: AtLeast1 = 1  # Monitor cadence; SpecGD uses the latest st(A), so 1 = exact every step
    eval_every: AtLeast1 = 25
    early: AtLeast1 = 20  # "early in training": the step at which MLP-1b/c compare the losses
    margin: Share = 0.9  # SpecGD "beats" GD when its loss is below margin × GD's (≤ 1: above 1 a worse loss would "beat")
    low_st: Share = 0.05  # MLP-1a: "low" means st(A) ≤ low_st × min(width, samples) (st(A) never exceeds that min)


def arm_specs(cfg: Config) -> list[tuple[str, int]]:
    """(activation, batch size) of every trained pair, in order, without repeats."""
    pairs = [(a, cfg.samples) for a in cfg.activations] + [(cfg.sweep_activation, n) for n in cfg.batch_sweep]
    return list(dict.fromkeys(pairs))


def arm_name(act: str, n: int, method: str) -> str:
    return f"{act}/n{n}/{method}"


def _data(cfg: Config, n: int, device, offset: int = 0):
    return sparse_regression(cfg.dim, n, cfg.seed + offset, support=cfg.support, device=device)


def _arm(cfg: Config, act: str, n: int, method: str, device) -> Arm:
    from specscope.probe import Monitor

    model = SparseMLP(cfg.dim, cfg.width, act, cfg.seed + 1).to(device)
    monitor = Monitor(model, every=cfg.probe_every, estimator="gram")
    train, test = _data(cfg, n, device), _data(cfg, cfg.test_samples, device, offset=10_000)
    return Arm(
        name=arm_name(act, n, method), model=model, optimizer=make_optimizer(method, model, cfg.lr, monitor),
        batch=lambda step: train, loss=mse, steps=cfg.steps, monitor=monitor,
        evaluate=lambda m: {"val_loss": float(mse(m, test))}, eval_every=cfg.eval_every,
    )


def _init_stable_ranks(cfg: Config):
    """st(A) of each post-activation h_ℓ at initialisation vs batch size for each activation (paper Fig. 17), exact."""
    acts = list(dict.fromkeys([*cfg.activations, cfg.sweep_activation]))

    def fn(log, device) -> None:
        for act in acts:
            model = SparseMLP(cfg.dim, cfg.width, act, cfg.seed + 1).to(device)
            for n in cfg.st_batches:
                x, _ = _data(cfg, n, device)
                with torch.no_grad():
                    hs = model.post_activations(x)
                log([Record(n, f"{act}/h{i + 1}", "stable_rank", float(stable_rank(h)), estimator="exact",
                            rows=n, shape=f"{n}x{cfg.width}", flag=SWEEP) for i, h in enumerate(hs)])  # step = batch size
    return fn


def check(cfg: Config) -> None:
    """The settings that only fail together (a sweep checks every point with this before it starts)."""
    for act in [*cfg.activations, cfg.sweep_activation]:
        check_activation(act)
    if bad := [m for m in cfg.methods if m not in METHODS]:
        raise ConfigError(f"unknown method {bad[0]!r} in methods; choose from {', '.join(METHODS)}")
    if not 0 < cfg.early < cfg.steps:
        raise ConfigError(f"early={cfg.early} must be between 1 and steps−1={cfg.steps - 1}: losses are recorded at "
                          f"steps 0 … {cfg.steps - 1}")


def build(cfg: Config, device: torch.device) -> list[Arm | Measure]:
    """GD and SpecGD arms per (activation, batch size), then st(A) at initialisation vs batch size."""
    check(cfg)
    items: list[Arm | Measure] = [_arm(cfg, a, n, m, device) for a, n in arm_specs(cfg) for m in cfg.methods]
    return items + [Measure("init-st", _init_stable_ranks(cfg))]


# ------------------------------------------------------------------------- reading the records back

POST_ACTIVATION_INPUTS = ("layers.1", "layers.2", "head")  # the weights whose input is h₁, h₂, h₃


def _series(df: pd.DataFrame, arm: str, metric: str, layer: str | None = None) -> pd.Series:
    sel = df[(df["arm"] == arm) & (df["metric"] == metric)]
    if layer is not None:
        sel = sel[sel["layer"] == layer]
    return sel.groupby("step")["value"].last().sort_index()


def post_activation(layer: str) -> str | None:
    """The post-activation h1, h2 or h3 that `layer` multiplies (SwiGLU's up and gate share one), else None.
    Named as the init-st records name them."""
    for h, w in zip(("h1", "h2", "h3"), POST_ACTIVATION_INPUTS):
        if layer == w or layer.startswith(w + "."):
            return h
    return None


def hidden_stable_ranks(df: pd.DataFrame, arm: str) -> pd.DataFrame:
    """st(A) the Monitor recorded for the post-activations of one arm: step × h1..h3, each input once (the
    weights that share an input record the same st, so SwiGLU's up and gate are not counted twice)."""
    sel = df[(df["arm"] == arm) & (df["metric"] == "stable_rank")]
    sel = sel.assign(h=sel["layer"].map(post_activation)).dropna(subset=["h"])
    return sel.pivot_table(index="step", columns="h", values="value", aggfunc="mean")


def loss_at(df: pd.DataFrame, arm: str, step: int) -> float:
    """Training loss recorded at `step` (the loss of the parameters before update `step`)."""
    s = _series(df, arm, "loss", "")
    return float(s.get(step, math.nan))


def early_ratio(df: pd.DataFrame, act: str, n: int, step: int) -> float:
    """loss(SpecGD) / loss(GD) at `step`: < 1 means SpecGD is ahead."""
    return loss_at(df, arm_name(act, n, "specgd"), step) / loss_at(df, arm_name(act, n, "gd"), step)


def _verdict(checks: list[bool]) -> str:
    return "PASS" if all(checks) else "FAIL"


def setting(cfg: Config) -> str:
    """The regime of MLP-1: the sparse target, sizes, full-batch steps, the shared step size, seed."""
    return (f"target x₁⋯x_{cfg.support} on d {cfg.dim}, width {cfg.width}, {cfg.samples} samples (full batch), "
            f"{cfg.steps} steps at lr {cfg.lr:g} for both geometries; activations {cfg.activations}; seed {cfg.seed}")


def _mlp1a(df: pd.DataFrame, cfg: Config) -> Claim:
    text = ("MLP-1 (a): the hidden post-activations h₁, h₂, h₃ of the ReLU-type network keep a low stable rank "
            "through training (GD and SpecGD).")
    pub = "st(A) small relative to the dimension along GD and SpecGD runs (001 Fig. 1)"
    bound = cfg.low_st * min(cfg.width, cfg.samples)
    parts, checks = [], []
    for act in [a for a in cfg.activations if a != "swiglu"]:
        for m in cfg.methods:
            st = hidden_stable_ranks(df, arm_name(act, cfg.samples, m))
            if st.empty:
                continue
            worst = float(st.max().max())
            checks.append(worst <= bound)
            parts.append(f"{act}/{m}: st(A) {float(st.min().min()):.2f}–{worst:.2f} over {len(st)} measured steps")
    if not checks:
        return Claim("MLP-1a", text, pub, "no ReLU-type arm recorded st(A)", "INCONCLUSIVE")
    for act in [a for a in cfg.activations if a == "swiglu"]:
        st = hidden_stable_ranks(df, arm_name(act, cfg.samples, cfg.methods[0]))
        if not st.empty:
            parts.append(f"(contrast {act}: {float(st.min().min()):.1f}–{float(st.max().max()):.1f})")
    measured = "; ".join(parts) + f"; bound {cfg.low_st:g}·min(width, n) = {bound:.1f}"
    worst = max(float(hidden_stable_ranks(df, arm_name(a, cfg.samples, m)).max().max())
                for a in cfg.activations if a != "swiglu" for m in cfg.methods
                if not hidden_stable_ranks(df, arm_name(a, cfg.samples, m)).empty)
    where = f"'low' = st(A) ≤ {cfg.low_st:g}·min(width, n) is this project's threshold (paper 001 shows curves); {setting(cfg)}"
    return Claim("MLP-1a", text, pub, measured, _verdict(checks), setting=where, value=worst)


def _mlp1b(df: pd.DataFrame, cfg: Config) -> Claim:
    text = f"MLP-1 (b): SpecGD on layers 2–3 reaches a lower training loss than GD early (step {cfg.early})."
    pub = "SpecGD well below GD early in training, while nr(G) is large (001 Fig. 18 / §1.2)"
    parts, checks = [], []
    for act in [a for a in cfg.activations if a != "swiglu"]:
        r = early_ratio(df, act, cfg.samples, cfg.early)
        if not math.isfinite(r):
            continue
        final = early_ratio(df, act, cfg.samples, cfg.steps - 1)
        nr = _series(df, arm_name(act, cfg.samples, "gd"), "nuclear_rank", SPECTRAL_LAYERS[0] + ".up")
        nr_early = float(nr[nr.index <= cfg.early].max()) if len(nr) else math.nan
        checks.append(r < cfg.margin)
        parts.append(f"{act}: loss SpecGD/GD = {r:.3f} at step {cfg.early}, {final:.3f} at step {cfg.steps - 1}; "
                     f"max nr(G) of {SPECTRAL_LAYERS[0]}.up (GD) up to step {cfg.early}: {nr_early:.1f}")
    if not checks:
        return Claim("MLP-1b", text, pub, "no ReLU-type GD/SpecGD pair recorded", "INCONCLUSIVE")
    ratios = [early_ratio(df, a, cfg.samples, cfg.early) for a in cfg.activations if a != "swiglu"]
    where = f"'beats' = loss ratio < {cfg.margin:g} at step {cfg.early} is this project's threshold; {setting(cfg)}"
    return Claim("MLP-1b", text, pub, "; ".join(parts) + f" (beats: ratio < {cfg.margin:g})", _verdict(checks),
                 setting=where, value=max(r for r in ratios if math.isfinite(r)))


def batch_rows(df: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """Per batch size of the sweep activation: st(A) at step 0 (mean over h₁..h₃) and the early loss ratio."""
    act = cfg.sweep_activation
    rows = []
    for a, n in arm_specs(cfg):
        if a != act:
            continue
        r = early_ratio(df, act, n, cfg.early)
        st = hidden_stable_ranks(df, arm_name(act, n, "gd"))
        if not math.isfinite(r) or st.empty or st.index.min() != 0:
            continue
        rows.append(dict(batch=n, st0=float(st.loc[0].mean()), ratio=r))
    return pd.DataFrame(rows, columns=["batch", "st0", "ratio"]).sort_values("batch").reset_index(drop=True)


def _mlp1c(df: pd.DataFrame, cfg: Config) -> Claim:
    act = cfg.sweep_activation
    text = (f"MLP-1 (c): with {act}, st(A) of the post-activations grows with the batch size and SpecGD's early "
            "advantage over GD fades as the batch grows.")
    pub = "st(A) at init grows with n; SpecGD ahead at small n, ≈ GD at large n (001 App. A, Fig. 17, 18)"
    rows = batch_rows(df, cfg)
    if len(rows) < 2:
        return Claim("MLP-1c", text, pub, f"needs {act} GD/SpecGD pairs at ≥ 2 batch sizes", "INCONCLUSIVE")
    adv = -np.log(rows["ratio"].to_numpy())  # log(GD/SpecGD): > 0 while SpecGD is ahead
    small, large = rows.iloc[0], rows.iloc[-1]
    checks = [large.st0 > small.st0, small.ratio < cfg.margin, adv[-1] < 0.5 * adv[0]]
    measured = "; ".join(f"n={int(r.batch)}: st(A) at init {r.st0:.1f}, loss SpecGD/GD at step {cfg.early} "
                         f"{r.ratio:.3f} (log-advantage {x:.3f})" for r, x in zip(rows.itertuples(), adv))
    kept = adv[-1] / adv[0] if adv[0] > 0 else math.nan
    if math.isfinite(kept):
        sensitivity = ", ".join(f"{f:g}: {'fades' if adv[-1] < f * adv[0] else 'does not'}" for f in (0.25, 0.5, 0.75))
        measured += f"; log-advantage at the largest n = {kept:.2f} × the smallest's; 'fades' at threshold {sensitivity}"
    else:  # nothing to fade: the claim's premise (SpecGD ahead at small n) already fails
        measured += f"; SpecGD is not ahead at the smallest n (log-advantage {adv[0]:.3f} ≤ 0), so 'fades' does not apply"
    where = ("'fades' = log-advantage at the largest n < ½ of the smallest's is this project's threshold (paper 001 "
             f"shows curves only); batch sizes {sorted({cfg.samples, *cfg.batch_sweep})}, early step {cfg.early}; {setting(cfg)}")
    return Claim("MLP-1c", text, pub, measured, _verdict(checks), setting=where,
                 value=float(kept) if math.isfinite(kept) else None)


def claims(df: pd.DataFrame, cfg: Config) -> list[Claim]:
    """MLP-1 (a, b, c) from the recorded losses and the Monitor's st(A), nr(G) (never from constants)."""
    return [_mlp1a(df, cfg), _mlp1b(df, cfg), _mlp1c(df, cfg)]


def figures(df: pd.DataFrame, cfg: Config) -> dict:
    """Fig. 1 (st(A) over steps), Fig. 17 (st(A) at init vs batch), Fig. 18 (losses and nr(G) per pair)."""
    from specscope.report.style import subplots

    out = {}
    first = cfg.activations[0]
    fig, axes = subplots(1, len(cfg.methods), figsize=(4.5 * len(cfg.methods), 3.3), squeeze=False)
    for ax, m in zip(axes[0], cfg.methods):
        st = hidden_stable_ranks(df, arm_name(first, cfg.samples, m))
        for col in st.columns:
            ax.plot(st.index, st[col], label=col)
        ax.set(title=f"{first} / {m}", xlabel="step", ylabel="st(A) of the input")
        style.legend(ax)
    out["mlp_post_activation_stable_rank"] = fig

    fig, ax = subplots(figsize=(5, 3.5))
    init = df[df["arm"] == "init-st"]
    for layer, g in init.groupby("layer"):
        s = g.groupby("step")["value"].last().sort_index()
        ax.loglog(s.index, s.values, "o-", label=layer, ms=3)
    ax.set(xlabel="batch size n", ylabel="st(A) at initialisation", title="post-activation stable rank vs batch")
    style.legend(ax)
    out["mlp_init_stable_rank_vs_batch"] = fig

    pairs = arm_specs(cfg)
    fig, axes = subplots(1, len(pairs), figsize=(3.4 * len(pairs), 3.2), squeeze=False)
    for ax, (act, n) in zip(axes[0], pairs):
        for m in cfg.methods:
            s = _series(df, arm_name(act, n, m), "loss", "")
            ax.semilogy(s.index, s.values, label=m)
        ax.axvline(cfg.early, color="grey", lw=0.5, ls=":")
        ax.set(title=f"{act}, n = {n}", xlabel="step")
        nr = _series(df, arm_name(act, n, "gd"), "nuclear_rank", SPECTRAL_LAYERS[0] + ".up")
        if len(nr):
            twin = ax.twinx()
            twin.plot(nr.index, nr.values, color="grey", lw=0.8, ls="--")
            twin.set_ylabel(f"nr(G) {SPECTRAL_LAYERS[0]}.up (GD)", fontsize=7)
    axes[0][0].set_ylabel("training loss")
    style.legend(axes[0][0])
    out["mlp_loss_gd_vs_specgd"] = fig
    return out
