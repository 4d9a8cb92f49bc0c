"""AutoGeometry: per block and step, take the spectral or the Euclidean step, whichever is predicted
to descend more (REFERENCE §3).

For each matrix, on decision steps (the optimizer's steps k with k % every == 0, and a block's first step):
    P, ‖D‖_*   <- one eigendecomposition of D (linalg.polar_with_nuclear_norm)
    nr         =  ‖D‖_*² / ‖D‖_F²
    st         =  st(A) of the block's input, read from a probe Monitor (or a callable)
    spectral   iff nr/st > threshold·(1 − h) when the block is spectral now, > threshold·(1 + h) when not
and then
    spectral:  ΔW = −lr·(‖D‖_*/st)·polar(D)     (geometry-matched: same lr as the Euclidean step)
    Euclidean: ΔW = −lr·E
D and E by `euclidean`:
    "sgd"      D = E = G
    "momentum" D = E = torch.optim.SGD's buffer b <- μ·b + G (Nesterov: G + μ·b)
    "adamw"    E = AdamW's m̂/(sqrt(v̂)+eps), D = m̂; Adam's step has no ‖G‖ scale, so the spectral branch
               is RMS-matched to it instead: ΔW = −lr·0.2·sqrt(max(rows, cols))·polar(m̂) (Moonshot's rule).
Moments are updated on every step whichever branch runs, so a switch never starts from cold state.
A block without a measured st(A) (yet), or one the probe could not pair ("unmeasured", warned once with
the reason), takes the Euclidean step. Choices are kept in `choices` and
emitted as Records ("geometry": 1 spectral / 0 Euclidean, "spectral_advantage", "nuclear_rank") labelled with the
optimizer's step (`Hybrid.step_index`: the k of a loop's `with monitor.step(k)`), so they line up with a Monitor's.
A group that sets `token_dim` holds one-hot-input weights (embeddings; allowed in an "auto" group) and
chooses among three geometries: Euclidean, spectral and ℓ₁→ℓ₂ ("geometry" 2; see `embedding_update`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from specscope.errors import ConfigError, checked_keywords
from specscope.linalg.devices import is_dtensor
from specscope.optim import _common, _euclidean, l1_to_l2
from specscope.optim.hybrid import Hybrid, _number, register, whole_number
from specscope.optim.specgd import layer_stable_ranks, unmeasured_layers
from specscope.records import Record

EUCLIDEAN = ("sgd", "momentum", "adamw")
AUTO_DEFAULTS: dict[str, Any] = dict(
    threshold=1.0, hysteresis=0.1, every=1, euclidean="sgd", momentum=0.9, nesterov=False,
    betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, polar="gram", ns_coefficients=(3.4445, -4.775, 2.0315),
    ns_steps=5, shardwise=False, token_dim=None,
)


def choose(previous: int | None, advantage: float, threshold: float, hysteresis: float) -> int:
    """1 (spectral) or 0 (Euclidean): switch only when nr/st crosses the threshold by the hysteresis band."""
    if previous is None:
        return int(advantage > threshold)
    band = 1 - hysteresis if previous == 1 else 1 + hysteresis
    return int(advantage > threshold * band)


def _directions(state: dict, g: Tensor, group: dict) -> tuple[Tensor, Tensor]:
    """(D, E): the matrix the spectral branch orthogonalizes and the Euclidean direction."""
    kind = group["euclidean"]
    if kind == "adamw":
        m, v, step = _euclidean.adam_moments(state, g, group["betas"])
        return m / (1 - group["betas"][0] ** step), _euclidean.adam_direction(m, v, step, group["betas"], group["eps"])
    momentum = group["momentum"] if kind == "momentum" else 0.0
    d = _euclidean.sgd_direction(state, g, momentum, group["nesterov"])
    return d, d


def auto_update(opt, group: dict, params: list[Tensor], grads: list[Tensor], names: list[str]) -> None:
    """One AutoGeometry step on a group (see the module docstring)."""
    if group["token_dim"] is not None:
        return embedding_update(opt, group, params, grads, names)
    lr, wd = float(group["lr"]), group["weight_decay"]
    sts, step = _common.taken_ahead(opt, group, lambda: auto_ahead(opt, group, params, grads, names))
    states = [opt.state[p] for p in params]
    dirs = [_directions(s, g, group) for s, g in zip(states, grads)]
    deciding = [st is not None and (step % group["every"] == 0 or "geometry" not in s) for s, st in zip(states, sts)]
    need = [i for i, s in enumerate(states) if deciding[i] or (sts[i] is not None and s.get("geometry") == 1)]
    exact = dict(zip(need, _common.unit_polar_with_nuclear_norm([_common.as_matrix(dirs[i][0]) for i in need], group)))
    for i, (p, name, s, st) in enumerate(zip(params, names, states, sts)):
        D, E = dirs[i]
        rec = dict(step=step, layer=_common.layer_name(name), shape="x".join(map(str, p.shape)))
        if st is None:
            s["geometry"] = 0
        elif deciding[i]:
            nr = nuclear_rank(D, *exact[i][1:], shardwise=group.get("shardwise", False))
            s["geometry"] = choose(s.get("geometry"), nr / st, group["threshold"], group["hysteresis"])
            opt._records += [Record(metric="nuclear_rank", value=nr, estimator="gram", **rec),
                             Record(metric="spectral_advantage", value=nr / st, estimator="gram", **rec)]
        if s["geometry"] == 1:
            P, nuc, k = exact[i]
            length = 0.2 * math.sqrt(max(P.shape[-2], P.shape[-1])) if group["euclidean"] == "adamw" else _common.nuclear_length(nuc, k) / st
            _euclidean.apply_scaled(p, P, length, lr, wd)
        else:
            _euclidean.apply(p, E, lr, wd)
        s["step"] = step + 1
        flag = "" if st else "unmeasured" if rec["layer"] in unmeasured_layers(opt) else "no_stable_rank"
        opt._records.append(Record(metric="geometry", value=float(s["geometry"]), flag=flag, **rec))
        opt.choices[rec["layer"]] = "spectral" if s["geometry"] == 1 else "euclidean"


def auto_ahead(opt, group: dict, params: list[Tensor], grads: list[Tensor], names: list[str]) -> tuple[list[float | None], int]:
    """st(A) of each parameter's layer (None: the Euclidean step) and the optimizer's step index (its records' step),
    read before the step changes anything: a group stepped before would have moved the index."""
    return layer_stable_ranks(opt, names, required=False), opt.step_index()


def nuclear_rank(D: Tensor, nuc: Tensor, k: Tensor | None, shardwise: bool = False) -> float:
    """nr(D) = ‖D‖_*²/‖D‖_F² from `unit_polar_with_nuclear_norm`'s (‖D·k‖_*, k): both norms at unit scale (the
    ratio does not change with it), so neither overflows; a DTensor's whole ‖D‖_F, not its shard's, unless
    `shardwise` (then ‖D‖_* is the local shard's, and so is ‖D‖_F: each rank's row shard is its own matrix)."""
    if shardwise and is_dtensor(D):
        D = D.to_local()
    fro2 = _common.fro_squared(D if k is None else D * k)
    return float(nuc) ** 2 / fro2 if fro2 > 0 else 1.0


# ---------------------------------------------------------------- embeddings: a third geometry


def choose_among(previous: int | None, advantages: dict[int, float], threshold: float, hysteresis: float) -> int:
    """The geometry with the largest guarantee (0 Euclidean at `threshold`, else its rank/st); a change of
    geometry needs the winner to beat the current one by the factor 1 + hysteresis."""
    values = {EUCLIDEAN_GEOMETRY: threshold, **advantages}
    best = max(values, key=values.get)
    if previous is None or previous not in values:
        return best
    return best if values[best] > values[previous] * (1 + hysteresis) else previous


EUCLIDEAN_GEOMETRY, SPECTRAL_GEOMETRY, L1_TO_L2_GEOMETRY = 0, 1, 2
GEOMETRY_NAMES = {0: "euclidean", 1: "spectral", 2: "l1_to_l2"}


def embedding_update(opt, group: dict, params: list[Tensor], grads: list[Tensor], names: list[str]) -> None:
    """AutoGeometry on a group of one-hot-input weights (`token_dim` set): Euclidean, spectral or ℓ₁→ℓ₂.

    For one-hot inputs L_{1→2}/L_E = N/c_max = st(A), the spectral ratio, so the guarantees compare as
    1 : nr(D)/st : cr(D)/st with cr = ‖D‖_{2,1}²/‖D‖_F² (docs/optim.md). The ℓ₁→ℓ₂ step is geometry-matched
    (−lr·(‖D‖_{2,1}/st)·colnorm(D)) or, under euclidean="adamw", RMS-matched (−lr·0.2·sqrt(d)·colnorm(m̂)).
    """
    lr, wd, k = float(group["lr"]), group["weight_decay"], group["token_dim"]
    sts, step = _common.taken_ahead(opt, group, lambda: auto_ahead(opt, group, params, grads, names))
    states = [opt.state[p] for p in params]
    dirs = [_directions(s, g, group) for s, g in zip(states, grads)]
    polar = _common.unit_polar_with_nuclear_norm([_common.as_matrix(D) for D, _ in dirs], group)
    l12 = dict(token_dim=k, rms=0.2, scale="rms" if group["euclidean"] == "adamw" else "matched")
    for p, name, s, st, (D, E), (P, nuc, unit) in zip(params, names, states, sts, dirs, polar):
        rec = dict(step=step, layer=_common.layer_name(name), shape="x".join(map(str, p.shape)))
        if st is None:
            s["geometry"] = EUCLIDEAN_GEOMETRY
        elif step % group["every"] == 0 or "geometry" not in s:
            nr = nuclear_rank(_common.as_matrix(D), nuc, unit, shardwise=group.get("shardwise", False))
            cr = l1_to_l2.column_rank(D, k)
            s["geometry"] = choose_among(s.get("geometry"), {SPECTRAL_GEOMETRY: nr / st, L1_TO_L2_GEOMETRY: cr / st},
                                         group["threshold"], group["hysteresis"])
            opt._records += [Record(metric="nuclear_rank", value=nr, estimator="gram", **rec),
                             Record(metric="spectral_advantage", value=nr / st, estimator="gram", **rec),
                             Record(metric="column_rank", value=cr, estimator="exact", **rec),
                             Record(metric="l1_to_l2_advantage", value=cr / st, estimator="exact", **rec)]
        g = s["geometry"]
        if g == SPECTRAL_GEOMETRY:
            length = 0.2 * math.sqrt(max(P.shape)) if group["euclidean"] == "adamw" else _common.nuclear_length(nuc, unit) / st
            _euclidean.apply_scaled(p, P, length, lr, wd)
        elif g == L1_TO_L2_GEOMETRY:
            _euclidean.apply_scaled(p, *l1_to_l2.step_direction(D, l12, st), lr, wd)
        else:
            _euclidean.apply(p, E, lr, wd)
        s["step"] = step + 1
        opt._records.append(Record(metric="geometry", value=float(g), flag="" if st else "no_stable_rank", **rec))
        opt.choices[rec["layer"]] = GEOMETRY_NAMES[g]


def check_group(group: dict) -> None:
    """An "auto" group's own options (given to AutoGeometry or in a param group, e.g. through spectral_param_groups)."""
    if group["euclidean"] not in EUCLIDEAN:
        raise ConfigError(f"euclidean={group['euclidean']!r} is unknown; use one of {EUCLIDEAN}")
    group["every"] = whole_number(group["every"], "every must be an integer >= 1 (decide every k-th step)", 1)
    threshold = _number(group["threshold"], tensor=False)
    if threshold is None or not math.isfinite(threshold) or threshold <= 0:
        raise ConfigError(f"threshold must be a finite number > 0 (spectral iff nr/st exceeds it), got {group['threshold']!r}")
    if group["nesterov"] and group["euclidean"] == "momentum" and float(group["momentum"]) == 0:
        raise ConfigError("nesterov=True needs momentum > 0 (euclidean='momentum')")
    _common.check_iteration_options(group, AUTO_DEFAULTS, read={"eps"} if group["euclidean"] == "adamw" else ())


register("auto", auto_update, AUTO_DEFAULTS, spectral=True, check=check_group,
         state={"momentum_buffer", "exp_avg", "exp_avg_sq", "adam_step", "geometry", "step"}, ahead=auto_ahead)


class AutoGeometry(Hybrid):
    """Per-block automatic choice between the spectral and the Euclidean step; see the module docstring.

    `monitor`: a probe Monitor (`.stable_rank(layer)`) or a callable layer -> st(A) | None. Pass named
    parameters (`model.named_parameters()`) so layer names match the monitor's. `choices` maps each
    layer to its latest "spectral"/"euclidean"; `pop_records()` returns the per-step Records.
    """

    @checked_keywords
    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        monitor: Any = None,
        threshold: float = 1.0,
        hysteresis: float = 0.1,
        every: int = 1,
        euclidean: str = "sgd",
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        polar: _common.PolarSpec = "gram",
        shardwise: bool = False,
    ) -> None:
        super().__init__(
            params, "auto", stable_rank=monitor, **({} if lr is None else {"lr": lr}), threshold=threshold, hysteresis=hysteresis, every=every,
            euclidean=euclidean, momentum=momentum, nesterov=nesterov, betas=betas, eps=eps,
            weight_decay=weight_decay, polar=polar, shardwise=shardwise,
        )
        self._check_stable_rank_source()  # also when every group was given another algorithm
