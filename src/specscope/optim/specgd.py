"""SpecGD: the exact spectral step ΔW = −lr·(‖D‖_*/st(A))·polar(D) (REFERENCE §3).

D is the gradient, or torch.optim.SGD's momentum buffer (b <- μ·b + G) when momentum > 0.
Without a stable-rank source st(A) = 1: ΔW = −lr·‖D‖_*·polar(D), the steepest descent step in the
spectral norm with lr = 1/L_S. With a source (a probe Monitor or a callable layer -> st(A)) it is the
geometry-matched step: the lr that suits GD (1/‖A‖_2²) suits it too, since L_S = st(A)·L_E.
polar(D) and ‖D‖_* come from one eigendecomposition (polar="gram", the default, or "svd").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from specscope.errors import ConfigError, checked_keywords
from specscope.optim import _common, _euclidean
from specscope.optim.hybrid import Hybrid, _outside_level, register

SPECGD_DEFAULTS: dict[str, Any] = dict(
    momentum=0.0, nesterov=False, weight_decay=0.0, polar="gram",
    ns_coefficients=(3.4445, -4.775, 2.0315), ns_steps=5, eps=1e-7, shardwise=False,
)


def layer_stable_ranks(opt, names: list[str], required: bool,
                       directions: Callable[[int], Tensor] | None = None) -> list[float | None]:
    """st(A) for each parameter's layer from the optimizer's source (1.0 without a source).

    A layer the source's probe could not pair (`source.unmeasured[layer]`), or a layer of a Monitor's model that the
    Monitor does not track (its include=/exclude=), has none: with required=False (AutoGeometry) it takes the
    Euclidean step and is warned about once, with the reason. A Monitor that has measured no step at all is named as
    the cause, with its fix (an error with required=True, one warning otherwise). `directions(i)`
    (SpecGD's): the direction parameter i would take; a layer with no st(A) whose direction is all zeros — an input
    that was zero at every measurement so far, e.g. behind ReLUs that are all dead — has no step for st(A) to scale;
    it gets 1.0 instead of an error (one host read per such layer).
    """
    source = opt.stable_rank_source
    if source is None:
        return [1.0] * len(names)
    out = [_read(opt, source, _common.layer_name(n)) for n in names]
    if out and all(st is None for st in out) and _measured_no_step(source):
        _no_step_measured(opt, required)
    if directions is not None:
        out = [1.0 if st is None and not bool(directions(i).any()) else st for i, st in enumerate(out)]
    unmeasured = unmeasured_layers(opt)
    missing = [_common.layer_name(n) for n, st in zip(names, out) if st is None]
    if required and missing:
        untracked = missing[0] in opt.__dict__.get("_untracked", {})  # that reason reads alone
        why = f" ({'' if untracked else 'the probe could not pair it: '}{unmeasured[missing[0]]})" if missing[0] in unmeasured else ""
        if not why and callable(getattr(source, "is_measured", None)):  # a Monitor that pairs it: no non-zero input seen
            why = (" (the Monitor has measured no non-zero input of it yet: an input that was all zeros on the measured "
                   "steps, e.g. behind a zero-initialized or dead layer, and is not on this one leaves a gradient with no "
                   "st(A) to scale it; measure every step, Monitor(every=1), so st(A) is there whenever the gradient is not zero)")
        raise ConfigError(
            f"the stable_rank source has no st(A) for layer '{missing[0]}'{why}; measure that layer's input "
            "(probe Monitor on it, with a measurement before the first step, or monitor.observe) or drop stable_rank="
        )
    warned = opt.__dict__.setdefault("_warned_unmeasured", set())
    for layer in missing:
        if layer in unmeasured and layer not in warned:
            warned.add(layer)
            warnings.warn(f"specscope: '{layer}' is unmeasured by the probe ({unmeasured[layer]}); it takes the Euclidean step", stacklevel=4)
    return out


def _measured_no_step(source: Any) -> bool:
    """Whether `source` is a probe Monitor that has measured no step (nor loaded an st(A)): a training loop without
    `with monitor.step(step):`, which no layer's input explains."""
    return callable(getattr(source, "is_measured", None)) and getattr(source, "last_step", 0) is None


def _no_step_measured(opt, required: bool) -> None:
    """SpecGD (required): a ConfigError; AutoGeometry: a warning, once, that every layer steps Euclidean."""
    fix = ("run each step's forward and backward passes inside `with monitor.step(step):` (step: the optimizer step, "
           "0, 1, …), so that it measures the layers' inputs before optimizer.step()")
    if required:
        raise ConfigError(f"the Monitor has measured no step yet, so it has no st(A) for any layer: {fix}")
    if not opt.__dict__.get("_warned_no_step"):
        opt._warned_no_step = True
        warnings.warn(f"specscope: the Monitor has measured no step yet, so every layer takes the Euclidean step: {fix}",
                      stacklevel=_outside_level())  # the user's opt.step() line


def _read(opt, source: Any, layer: str) -> float | None:
    """st(A) of a layer from the source; None for a layer of the Monitor's model that it does not track (kept, with the
    reason, in `opt._untracked`; asked again each step, as monitor.observe may start tracking it). A name no weight of
    the Monitor's model has raises."""
    untracked = opt.__dict__.setdefault("_untracked", {})
    try:
        st = _common.read_stable_rank(source, layer)
    except ConfigError as e:
        if getattr(e, "final", False):  # the source's own answer about this layer (a stack of experts)
            raise
        if layer in untracked:
            return None
        if getattr(source, "model", None) is None:
            raise
        why = _common.untracked_reason(source, layer)
        if why is None:
            raise ConfigError(f"{e}. The optimizer asks for st(A) by its parameters' names ('{layer}'): pass named "
                              "parameters of the Monitor's model (model.named_parameters(), or spectral_param_groups(model, "
                              "...))") from None
        untracked[layer] = why
        return None
    untracked.pop(layer, None)
    return st


def unmeasured_layers(opt) -> dict[str, str]:
    """Layer -> reason for the layers the source has no st(A) for by design: those its probe could not pair
    (`source.unmeasured`) and those a Monitor does not track."""
    return {**getattr(opt.stable_rank_source, "unmeasured", {}), **opt.__dict__.get("_untracked", {})}


def specgd_update(opt, group: dict, params: list[Tensor], grads: list[Tensor], names: list[str]) -> None:
    """One SpecGD step on a group; ‖D‖_* stays on the device (no host sync).

    D is taken at unit scale (D·2^-e, exact; polar(D) does not change) and the step's length lr·‖D‖_*/st(A) is formed in
    float64 before it becomes a number of P's dtype: ‖D‖_* of a float32 D can exceed float32's range (entries ≈ 1e36 on
    a 64×64) while the step, lr times it, does not."""
    lr, wd = float(group["lr"]), group["weight_decay"]
    sts = _common.taken_ahead(opt, group, lambda: specgd_stable_ranks(opt, group, params, grads, names))
    dirs = [
        _common.as_matrix(_euclidean.sgd_direction(opt.state[p], g, group["momentum"], group["nesterov"]))
        for p, g in zip(params, grads)
    ]
    for p, (P, nuc, k), st in zip(params, _common.unit_polar_with_nuclear_norm(dirs, group), sts):
        _euclidean.apply_scaled(p, P, _common.nuclear_length(nuc, k) / st, lr, wd)


def specgd_stable_ranks(opt, group: dict, params: list[Tensor], grads: list[Tensor], names: list[str]) -> list[float | None]:
    """st(A) of each parameter's layer, read before the step changes anything (a missing or bad value raises with
    the momentum buffers as they were); a missing one is forgiven where the direction would be all zeros, which is
    then taken on a copy of the state."""
    def direction(i: int) -> Tensor:
        state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[params[i]].items()}
        return _euclidean.sgd_direction(state, grads[i], group["momentum"], group["nesterov"])

    return layer_stable_ranks(opt, names, required=True, directions=direction)


def check_group(group: dict) -> None:
    """nesterov only with momentum; the iteration options only where the group's polar backend reads them."""
    if group["nesterov"] and float(group["momentum"]) == 0:
        raise ConfigError("nesterov=True needs momentum > 0")
    _common.check_iteration_options(group, SPECGD_DEFAULTS)


register("specgd", specgd_update, SPECGD_DEFAULTS, spectral=True, check=check_group, state={"momentum_buffer"},
         ahead=specgd_stable_ranks)


class SpecGD(Hybrid):
    """Exact spectral gradient descent, optionally geometry-matched by a measured st(A); see the module doc.

    `stable_rank`: a probe Monitor (its `.stable_rank(layer)`) or a callable layer -> st(A); layer names
    come from named parameters (`model.named_parameters()`), `blocks.0.mlp.down.weight` -> `blocks.0.mlp.down`.
    shardwise=True: under FSDP2, polar(D) and ‖D‖_* of each rank's row shard (a different update; see Muon).
    """

    @checked_keywords
    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        momentum: float = 0.0,
        nesterov: bool = False,
        stable_rank: Any = None,
        polar: _common.PolarSpec = "gram",
        weight_decay: float = 0.0,
        shardwise: bool = False,
    ) -> None:
        super().__init__(
            params, "specgd", stable_rank=stable_rank, **({} if lr is None else {"lr": lr}), momentum=momentum, nesterov=nesterov,
            polar=polar, weight_decay=weight_decay, shardwise=shardwise,
        )
