"""Low-Rank Decay (paper 004): decoupled nuclear-norm decay applied after any base optimizer's step.

    opt.step(); decay.step()

Per matrix W, with η = group["lr"] (so an LRScheduler can drive it) and λ = weight_decay:
    "polar"    W <- W − η·λ·polar(W)          exact polar factor (the subgradient of λ‖W‖_*), default
    "prox"     W <- U·max(Σ − η·λ, 0)·Vᵀ      the proximal step: every σ_i drops by exactly η·λ, clipped at 0
    "ns"       W <- W − η·λ·NS_K(W)           K Newton–Schulz steps from a Frobenius-normalized start
                                              (cubic by default): a "soft" polar that barely moves small σ
    "l2"       W <- (1 − η·λ)·W               decoupled L2 decay, for comparison (σ_i <- (1 − η·λ)σ_i)
    "elastic"  W <- W − η·λ·polar(W) − η·l2·W both, from the same W, with their own strengths
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from specscope import linalg
from specscope.errors import ConfigError, checked_keywords, NonFiniteError
from specscope.linalg._checks import no_autocast
from specscope.linalg.polar import ITERATIVE_DTYPES
from specscope.optim import _common, _distributed
from specscope.optim.hybrid import FOREIGN_OPTIONS, _is_bool, _number, _options_text, whole_number

MODES = ("polar", "prox", "ns", "l2", "elastic")
OPTIONS = ("lr", "weight_decay", "mode", "ns_steps", "ns_coefficients", "l2", "polar_method", "ns_dtype", "shardwise", "stacked")
CUBIC = (1.5, -0.5, 0.0)  # X <- 1.5·X − 0.5·(X Xᵀ) X
EXACT_POLAR = ("svd", "gram")


class LowRankDecay(Optimizer):
    """Decoupled Low-Rank Decay on chosen matrices; call `.step()` after the base optimizer's step.

    `polar_method` picks the exact backend for "polar"/"elastic" ("svd" default, float64; "gram" is faster
    for rectangular W). "ns" runs in `ns_dtype` (float32; torch.bfloat16 to mimic Muon's arithmetic).
    Under FSDP2 each matrix is mapped whole on one owner rank; shardwise=True maps each row shard instead.
    A parameter of ≥ 3 dims is one matrix W.flatten(1) (a conv kernel [out, in, k…]); stacked=True decays each matrix
    of a stack [..., rows, cols] on its own instead (mixture-of-experts weights [experts, out, in]), as Muon's.
    """

    @checked_keywords
    def __init__(
        self,
        params: Iterable,
        lr: float,
        weight_decay: float,
        mode: str = "polar",
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] | list = CUBIC,
        l2: float = 0.0,
        polar_method: str = "svd",
        ns_dtype: torch.dtype = torch.float32,
        shardwise: bool = False,
        stacked: bool = False,
    ) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, mode=mode, ns_steps=ns_steps, ns_coefficients=ns_coefficients,
                        l2=l2, polar_method=polar_method, ns_dtype=ns_dtype, shardwise=shardwise, stacked=stacked)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_keys(param_group)
        if not isinstance(param_group.get("params"), (Tensor, set, list, tuple)) and param_group.get("params") is not None:
            param_group = {**param_group, "params": list(param_group["params"])}  # a generator, read once
        if param_group.get("params") is not None:
            _common.check_once(self, param_group["params"])
        super().add_param_group(param_group)
        with _common.checked_group(self) as group:
            _check_options(group)
            offset = sum(len(g["params"]) for g in self.param_groups[:-1])
            names = group.get("param_names", [f"param{offset + k}" for k in range(len(group["params"]))])
            _common.check_floating(group["params"], names)
            for name, p in zip(names, group["params"]):
                if p.ndim < 2:
                    raise ConfigError(f"LowRankDecay acts on matrices; got '{name}' of shape {tuple(p.shape)} "
                                      "(leave biases and gains out)")
            _check_stacked(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, after the checks add_param_group makes on each saved group (completed with this optimizer's value
        of every key it lacks): another optimizer's state_dict (a group without `mode`, per-parameter state, which
        LowRankDecay does not keep) or a value out of range raises one ConfigError and leaves the decay as it was."""
        with _common.load_pre_hooks_first(self, state_dict) as state_dict:
            self._load_checked(state_dict)

    def _load_checked(self, state_dict: Any) -> None:
        where = "LowRankDecay.load_state_dict"
        saved = _common.saved_groups(state_dict, self.param_groups, where)
        fix = "Nothing was loaded; pass the state_dict a LowRankDecay saved (decay.state_dict())"
        if state_dict["state"]:
            raise ConfigError(f"{where}: the state_dict holds per-parameter state, which LowRankDecay does not keep: it is "
                              f"another optimizer's. {fix}")
        groups = []
        for i, (mine, theirs) in enumerate(zip(self.param_groups, saved)):
            group = _common.merged_group(mine, theirs)
            try:
                if "mode" not in theirs:
                    raise ConfigError("it has no 'mode', which every LowRankDecay group has (another optimizer's group?)")
                _check_keys(group)
                _check_options(group)
                _check_stacked({**group, "params": mine["params"]})  # this optimizer's parameters, not the saved ids
            except ConfigError as e:
                raise ConfigError(f"{where}: param group {i} of the state_dict: {str(e).removeprefix('LowRankDecay ')}. "
                                  f"{fix}") from None
            groups.append(group)
        super().load_state_dict({**state_dict, "param_groups": groups})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Apply the decay to every matrix; a group option out of range (set after construction, e.g. by an LR
        scheduler) or a non-finite weight raises before anything changes."""
        for i, group in enumerate(self.param_groups):
            try:
                _check_options(group)  # a few Python checks per group; no tensor is read
                _check_stacked(group)
            except ConfigError as e:
                raise ConfigError(f"LowRankDecay.step: param group {i}: {str(e).removeprefix('LowRankDecay ')}. Nothing was "
                                  "changed: a group's options are checked at every step, so a value set after construction "
                                  f"(by an LR scheduler, or param_groups[{i}][...] = ...) must be valid too") from None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        named = [(group.get("param_names", [f"param{k} of group {gi}"] * (k + 1))[k], p)
                 for gi, group in enumerate(self.param_groups) for k, p in enumerate(group["params"])]
        for name, p in named:
            if p.is_meta:
                raise _common.meta_error(name)
        trained = set()
        if named:  # each rank checks its shard; all ranks agree before anything changes
            self._check_ranks(named)
            bad = [not bool(torch.isfinite(_distributed.local(p)).all()) for _, p in named]
            trains, bad = _distributed.agree([p.requires_grad for _, p in named], bad, named[0][1].device)
            if any(bad):
                raise NonFiniteError(f"non-finite weight in '{named[bad.index(True)][0]}' before LowRankDecay; nothing was changed")
            trained = {id(p) for (_, p), t in zip(named, trains) if t}
        with no_autocast():  # inside torch.autocast the exact polar's float32 products would run in bfloat16
            for group in self.param_groups:
                self._decay_group(group, trained)
        return loss

    def _check_ranks(self, named: list[tuple[str, Tensor]]) -> None:
        """Under torch.distributed, once (and again if groups are added): a ConfigError on every rank when the ranks'
        decays hold other parameters, shapes or options. Each rank would decide alone whether a group enters the owner
        map's collectives (a weight_decay of 0 or mode "l2" skips them: the others wait for ever), size them by its own
        matrices (gloo aborts), or decay each matrix by its owner rank's settings (a mix of two runs)."""
        if getattr(self, "_same_on_ranks", None) == len(named):
            return
        _distributed.check_same_parameters([n for n, _ in named], named[0][1].device,
                                           [_options_text(g) for g in self.param_groups], [p for _, p in named])
        self._same_on_ranks = len(named)

    def _decay_group(self, group: dict[str, Any], trained: set[int]) -> None:
        """Decay the group's weights in `trained` (ids: weights that require grad on every rank, so that every rank maps
        the same matrices) that are not empty; a frozen weight stays as it is (torch.optim's decay too)."""
        lr, l2 = _number(group["lr"]), _number(group["l2"])  # numbers: checked by _check_options
        tau = lr * _number(group["weight_decay"])
        mode = group["mode"]
        params = [p for p in group["params"] if id(p) in trained and p.numel()]
        if tau == 0 and (mode != "elastic" or lr * l2 == 0):
            return  # nothing to do (and an SVD round trip would not be bitwise the identity)
        if mode == "l2":
            for p in params:
                p.mul_(1 - tau)
            return
        stacked = group.get("stacked", False)
        per = [_common.matrices(p, stacked) for p in params]  # one matrix a parameter, or each of a stack's
        mats = [m.to(_state_dtype(p)) for p, ms in zip(params, per) for m in ms]
        if mode == "prox":
            new = iter(_common.batched_polar(mats, lambda X: linalg.singular_value_soft_threshold(X, tau), group.get("shardwise", False)))
            for p, ms in zip(params, per):
                p.copy_(torch.stack([next(new) for _ in ms]).view_as(p) if stacked else next(new).view_as(p))
            return
        if mode == "ns":
            fn = lambda X: linalg.polar(X, method="newton_schulz", ns_steps=group["ns_steps"],  # noqa: E731
                                        ns_coefficients=group["ns_coefficients"], dtype=group["ns_dtype"])
        else:
            fn = _common.polar_map(group["polar_method"])
        shrink = lr * l2 if mode == "elastic" else 0.0
        new = iter([w - tau * P.to(w.dtype) - shrink * w for w, P in zip(mats, _common.batched_polar(mats, fn, group.get("shardwise", False)))])
        for p, ms in zip(params, per):
            p.copy_(torch.stack([next(new) for _ in ms]).view_as(p) if stacked else next(new).view_as(p))


def _check_stacked(group: dict[str, Any]) -> None:
    """stacked=True: every parameter of the group a local stack of matrices [..., rows, cols] (≥ 3-D, not a DTensor);
    checked where a group is made, loaded (a saved stacked=True over 2-D weights) or stepped (one set after)."""
    if not group.get("stacked", False):
        return
    names = group.get("param_names", [f"param{k}" for k in range(len(group["params"]))])
    for name, p in zip(names, group["params"]):
        if p.ndim < 3 or _distributed.is_dtensor(p):
            raise ConfigError(f"LowRankDecay stacked=True: '{name}' of shape {tuple(p.shape)} is "
                              + ("a DTensor (FSDP2), and stacks are decayed matrix by matrix only on local tensors: "
                                 "leave it out of the decay, or decay it as one matrix (stacked=False)"
                                 if p.ndim >= 3 else "not a stack of matrices [..., rows, cols]; put 2-D weights in a "
                                 "group without stacked"))


def _check_keys(group: dict[str, Any]) -> None:
    """A ConfigError for a group key that is a typo of an option or an option of torch.optim's that LowRankDecay does not
    have (Hybrid's rule, `check_group_keys`); other keys (a "name", scheduler metadata) stay, as in torch.optim."""
    known = set(OPTIONS) | {"params", "param_names"}
    for key in group:
        if key in known or key in _common.SCHEDULER_KEYS or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, sorted(OPTIONS), n=1, cutoff=0.8)
        if key in FOREIGN_OPTIONS or close or key in _common.ALIASES:
            hint = f"; did you mean {close[0]!r}? " if close else "; " + _common.alias_hint(key, set(OPTIONS))
            raise ConfigError(f"LowRankDecay param group key {key!r} is not an option{hint}its options are {list(OPTIONS)}")


def _check_options(group: dict[str, Any]) -> None:
    """A group's options (not its parameters): checked when it is made or loaded and at every step."""
    if group["mode"] not in MODES:
        raise ConfigError(f"LowRankDecay mode={group['mode']!r} is unknown; use one of {MODES}")
    for key in ("lr", "weight_decay", "l2"):
        value = _number(group[key])  # a one-element tensor too (an LRScheduler may set one), as the other optimizers take
        if value is None or not math.isfinite(value) or value < 0:
            raise ConfigError(f"LowRankDecay {key} must be a finite number >= 0, got {group[key]!r}")
    _check_ns(group)
    if group["polar_method"] not in EXACT_POLAR:
        raise ConfigError(f"LowRankDecay polar_method={group['polar_method']!r}: modes 'polar' and 'elastic' take "
                          f"the exact polar factor, so use one of {EXACT_POLAR} (mode='ns' is the soft, iterative one)")


def _check_ns(group: dict[str, Any]) -> None:
    """The "ns" mode's options, checked when the group is made rather than at its first step."""
    group["ns_steps"] = whole_number(group["ns_steps"], "LowRankDecay ns_steps must be an integer in 1..99", 1, 99)
    if group["ns_dtype"] not in ITERATIVE_DTYPES:
        names = ", ".join(f"torch.{str(d).removeprefix('torch.')}" for d in ITERATIVE_DTYPES)
        raise ConfigError(f"LowRankDecay ns_dtype={group['ns_dtype']!r}: pass a torch dtype, one of {names}")
    for flag in ("shardwise", "stacked"):
        if not _is_bool(group.get(flag, False)):
            raise ConfigError(f"LowRankDecay {flag} must be True or False, got {group[flag]!r}")
        if flag in group:
            group[flag] = bool(group[flag])  # numpy's bool as Python's
    try:
        _common.check_ns_coefficients(group["ns_coefficients"])
    except ConfigError as e:
        raise ConfigError(f"LowRankDecay {e}") from None


def _state_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype
