"""`Hybrid`: one torch.optim.Optimizer whose param groups each name an `algorithm`.

    opt = Hybrid([
        {"params": hidden, "algorithm": "muon", "lr": 0.02},
        {"params": rest, "algorithm": "adamw", "lr": 3e-4, "weight_decay": 0.0},
    ])

Algorithms: "muon", "specgd", "auto" (spectral: hidden matrices only) and "adamw", "sgd". Each group has its
own lr (so an LRScheduler can drive each), there is one state_dict, and `step()` first checks every
gradient for NaN/Inf so a bad step changes nothing. `Muon`, `SpecGD` and `AutoGeometry` are `Hybrid`s
whose default algorithm is theirs, so each of them accepts extra algorithm="adamw" groups too.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from specscope.errors import ConfigError, NonFiniteError
from specscope.linalg._checks import no_autocast
from specscope.linalg.devices import is_dtensor
from specscope.optim import _common, _distributed, _euclidean
from specscope.names import name_matches
from specscope.records import Record

Update = Callable[[Any, dict, list[Tensor], list[Tensor], list[str]], None]


@dataclass(frozen=True)
class Algorithm:
    update: Update  # update(opt, group, params, grads, names), grads all finite
    defaults: dict[str, Any]  # keys a group of this algorithm needs beyond lr
    spectral: bool  # only hidden matrices allowed
    check: Callable[[dict], None] | None = None  # raises ConfigError for a group's options that fail only together
    state: frozenset[str] | None = None  # the per-parameter state keys it keeps (load_state_dict refuses others); None: any
    # ahead(opt, group, params, grads, names): what update reads from outside the optimizer (st(A) from its source),
    # read and checked for every group before any group changes; update takes it with _common.taken_ahead
    ahead: Callable[..., Any] | None = None


ALGORITHMS: dict[str, Algorithm] = {
    "adamw": Algorithm(_euclidean.adamw_update, _euclidean.ADAMW_DEFAULTS, spectral=False,
                       state=frozenset({"exp_avg", "exp_avg_sq", "adam_step"})),
    "sgd": Algorithm(_euclidean.sgd_update, _euclidean.SGD_DEFAULTS, spectral=False, check=_euclidean.check_sgd,
                     state=frozenset({"momentum_buffer"})),
}


def register(name: str, update: Update, defaults: dict[str, Any], spectral: bool,
             check: Callable[[dict], None] | None = None, state: Iterable[str] | None = None,
             ahead: Callable[..., Any] | None = None) -> None:
    """Make `algorithm=name` available to every Hybrid-based optimizer; `check(group)` runs on each of its groups
    after the shared checks (every option a finite number in range, flags True/False). `state`: the keys `update`
    keeps in `opt.state[p]`, so that load_state_dict refuses another optimizer's state (None: not checked).
    `ahead(opt, group, params, grads, names)`: what `update` reads from outside the optimizer, read for every group
    before any group steps, so that an error there leaves every weight and buffer as it was."""
    ALGORITHMS[name] = Algorithm(update, dict(defaults), spectral, check, None if state is None else frozenset(state), ahead)


# group hyperparameters checked on every group: [low, high), each a finite real number
_RANGES = {"lr": (0.0, math.inf), "weight_decay": (0.0, math.inf), "momentum": (0.0, 1.0), "eps": (0.0, math.inf),
           "hysteresis": (0.0, 1.0), "rms": (0.0, math.inf)}  # an "auto" group's threshold (> 0) is its algorithm's check


def _number(value: Any, tensor: bool = True) -> float | None:
    """A real number's value (numpy's scalars too) or, unless tensor=False, a one-element real tensor's (an lr, which
    torch.optim takes as a tensor); None for anything else."""
    if isinstance(value, torch.Tensor):
        return float(value) if tensor and value.numel() == 1 and not value.is_complex() else None
    return float(value) if isinstance(value, numbers.Real) and not _is_bool(value) else None


def _options_text(group: dict[str, Any]) -> str:
    """A group's options as text that is the same on every rank for the same settings (a callable by its name, a number
    by its value), for `_distributed.check_same_parameters`."""
    def text(v: Any) -> str:
        if callable(v):
            return f"<{getattr(v, '__qualname__', type(v).__name__)}>"
        if isinstance(v, torch.Tensor):
            return repr(v.tolist()) if v.numel() <= 16 else f"<tensor {tuple(v.shape)}>"
        return repr(float(v)) if isinstance(v, numbers.Real) and not _is_bool(v) else repr(v)
    return ", ".join(f"{k}={text(group[k])}" for k in sorted(map(str, group)) if k not in ("params", "param_names"))


def _is_bool(value: Any) -> bool:
    """Python's or numpy's bool (np.bool_ is no Python bool, and no number to count with)."""
    return isinstance(value, bool) or type(value).__name__ in ("bool", "bool_")  # numpy 2 names it "bool"


def _check_numbers(group: dict[str, Any]) -> None:
    """One ConfigError naming the first hyperparameter of the group that is not a finite number in range (a tensor only
    for lr: the updates read the others as numbers, and one failed inside the step after the momentum had moved).
    numpy's integers and bools are stored as Python's, so that every step reads one kind of value."""
    for key, (low, high) in _RANGES.items():
        if key not in group:
            continue
        number = _number(group[key], tensor=key == "lr")
        if isinstance(group[key], torch.Tensor) and number is None:
            raise ConfigError(f"{key}={group[key]!r} is a tensor; pass a float (lr alone may be a one-element tensor, "
                              "as in torch.optim)")
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}={group[key]!r} is not a finite number; pass a float")
        if not low <= number < high:
            bound = f"in [{low:g}, {high:g})" if math.isfinite(high) else f">= {low:g}"
            raise ConfigError(f"{key} must be {bound}, got {group[key]!r}")
    if "ns_steps" in group:
        group["ns_steps"] = whole_number(group["ns_steps"], "ns_steps must be an integer in 1..99", 1, 99)
    for flag in ("nesterov", "shardwise", "allow_non_hidden", "stacked"):
        if flag not in group:
            continue
        if not _is_bool(group[flag]):
            raise ConfigError(f"{flag} must be True or False, got {group[flag]!r}")
        group[flag] = bool(group[flag])
    if group.get("adjust_lr_fn") not in (None, "original", "match_rms_adamw"):
        raise ConfigError(f"adjust_lr_fn={group['adjust_lr_fn']!r} is unknown; use None, 'original' or 'match_rms_adamw'")
    betas = group.get("betas")
    if betas is not None:
        pair = list(betas) if isinstance(betas, (tuple, list)) else []
        values = [_number(b, tensor=False) for b in pair]
        if len(pair) != 2 or any(b is None or not 0.0 <= b < 1.0 for b in values):
            raise ConfigError(f"betas={betas!r}: give two numbers in [0, 1), e.g. (0.9, 0.999)")
    if "ns_coefficients" in group:
        _common.check_ns_coefficients(group["ns_coefficients"])
    _check_token_dim(group)


def _check_token_dim(group: dict[str, Any]) -> None:
    """`token_dim`, where set: an int that is an axis of every matrix of the group (a saved group's params are
    indices: the type only; a vector is refused by the group's own check, naming AdamW). An axis past the last
    wrapped round to another one, or failed deep in the step. None: not a token group ("auto"; "l1_to_l2" refuses it)."""
    k = group.get("token_dim")
    if k is None:
        return
    k = group["token_dim"] = whole_number(k, "token_dim must be None or the integer axis that indexes tokens (0 for "
                                          "nn.Embedding's [vocab, d] weight, 1 for a Linear [out, in] fed one-hot inputs)")
    for p in group.get("params", ()):
        if isinstance(p, torch.Tensor) and p.ndim >= 2 and not -p.ndim <= k < p.ndim:
            raise ConfigError(f"token_dim={k} is not an axis of a parameter of shape {tuple(p.shape)} (axes 0..{p.ndim - 1}): "
                              "pass the axis that indexes tokens (0 for nn.Embedding, 1 for a Linear fed one-hot inputs)")


def whole_number(value: Any, what: str, low: int | None = None, high: int | None = None) -> int:
    """`value` as a Python int: an integer, numpy's too, not a bool, in low..high where given; else a ConfigError
    "<what>, got <value>"."""
    if _is_bool(value) or not isinstance(value, numbers.Integral) or not (low is None or low <= value) \
            or not (high is None or value <= high):
        raise ConfigError(f"{what}, got {value!r}")
    return int(value)


MAX_UNPOPPED_RECORDS = 100_000  # records an optimizer keeps when nobody pops them (AutoGeometry: 3 per layer and step)
CALLABLE_POLAR = "<callable>"  # a callable polar= in a saved state_dict

# keys any group may carry besides its algorithm's defaults (the optimizer's lr, the routing mark); `token_dim` is an
# option of the algorithms that use it ("auto", "l1_to_l2"): in a Muon or SpecGD group it skipped the embedding guard
GROUP_KEYS = frozenset({"lr", "allow_non_hidden"})


def check_options(algorithm: str, options: dict[str, Any], where: str) -> None:
    """One ConfigError for an option `algorithm` does not have (a typo would otherwise be stored and ignored)."""
    known = set(ALGORITHMS[algorithm].defaults) | GROUP_KEYS
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}: {key!r} is not an option of algorithm={algorithm!r}; {hint}"
                              f"its options are {sorted(known)}")


# options of torch.optim's optimizers that change the step and that no specscope algorithm implements: a group
# that sets one would be stepped as if it had not
FOREIGN_OPTIONS = frozenset({"maximize", "amsgrad", "dampening", "foreach", "fused", "capturable", "differentiable",
                             "decoupled_weight_decay", "momentum_decay", "lr_decay", "initial_accumulator_value"})


def check_group_keys(algorithm: str, group: dict[str, Any], optimizer_defaults: Mapping[str, Any] | None = None) -> None:
    """A ConfigError for a param-group key that is a typo of an option of the group's algorithm or an option of
    torch.optim's that it does not have; other keys (a "name", metadata a scheduler reads) stay, as in torch.optim."""
    known = set(ALGORITHMS[algorithm].defaults) | GROUP_KEYS | {"params", "param_names", "algorithm"}
    for key in group:
        if key in known or key in _common.SCHEDULER_KEYS or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, sorted(known - {"params", "param_names"}), n=1, cutoff=0.8)
        # a group as given (`optimizer_defaults`: before torch fills the optimizer's defaults into it) holding another
        # algorithm's option (Muon's stacked in a SpecGD group), which this one would ignore; a key of the optimizer's
        # defaults at its default value is one torch filled in (a group taken from another optimizer's param_groups)
        filled = {k for k, v in (optimizer_defaults or {}).items() if k in group and not _differs(group[k], v)}
        others = set() if optimizer_defaults is None else (
            set().union(*(a.defaults for a in ALGORITHMS.values())) - known - filled)
        theirs = [key] if key in others else difflib.get_close_matches(key, sorted(others), n=1, cutoff=0.8)
        if theirs and not close:
            owners = sorted(name for name, a in ALGORITHMS.items() if theirs[0] in a.defaults)
            raise ConfigError(f"param group key {key!r} is not an option of algorithm={algorithm!r}"
                              + (f" ({theirs[0]!r} is one of {', '.join(owners)})" if theirs[0] != key else f" but of {', '.join(owners)}")
                              + f"; its options are {sorted(known - {'params', 'param_names'})}")
        alias = key in _common.ALIASES and not any(key in a.defaults for a in ALGORITHMS.values())  # another's option: above
        if key in FOREIGN_OPTIONS or close or alias:
            hint = f"did you mean {close[0]!r}? " if close else _common.alias_hint(key, known)
            saved = (f" (a state_dict saved with it, as specscope before 2026-12-07 kept such keys: drop it from the saved "
                     f"groups, `for g in sd['param_groups']: g.pop({key!r}, None)`, then load)" if alias else "")
            raise ConfigError(f"param group key {key!r} is not an option of algorithm={algorithm!r}; {hint}"
                              f"its options are {sorted(known - {'params', 'param_names'})}{saved}")


def _differs(value: Any, default: Any) -> bool:
    """Whether a group's value is not the default (a comparison that fails or is ambiguous counts as different)."""
    try:
        return bool(value != default)
    except Exception:  # tensors of several entries, objects whose != raises
        return True


def _check_not_foreign(algorithm: str, saved: dict[str, Any]) -> None:
    """A ConfigError for a key of a saved group that is an option of another specscope algorithm or of LowRankDecay
    and not of `algorithm`: the group was saved by another optimizer (a torch.optim.Muon group has Muon's keys only)."""
    from specscope.optim.lowrank_decay import OPTIONS as LOWRANK_DECAY_OPTIONS  # lowrank_decay imports this module

    own = set(ALGORITHMS[algorithm].defaults) | GROUP_KEYS
    others = {k for a in ALGORITHMS.values() for k in a.defaults} | set(LOWRANK_DECAY_OPTIONS)
    for key in saved:
        if key in others and key not in own:
            raise ConfigError(f"its key {key!r} is an option of another optimizer, not of algorithm={algorithm!r} "
                              f"(whose options are {sorted(own)})")


class Hybrid(Optimizer):
    """Param groups with a per-group `algorithm`; see the module docstring.

    A group whose algorithm differs from the optimizer's own must set its own "lr"; its other missing
    keys come from that algorithm's defaults (AdamW: betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
    never from the constructor's arguments (Muon's eps=1e-7 is not AdamW's eps).
    `stable_rank` (a probe Monitor or a callable layer -> st(A) or None) feeds "specgd" and "auto" groups.
    """

    decoupled_weight_decay = True  # θ ← θ·(1 − lr·wd) beside the step (subspace's exclude_decay reads it)

    def __init__(self, params: Iterable, algorithm: str = "adamw", *, stable_rank: Any = None, **defaults: Any):
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm={algorithm!r} is unknown; use one of {sorted(ALGORITHMS)}")
        check_options(algorithm, defaults, "Hybrid")
        if isinstance(stable_rank, nn.Module):
            arg = "monitor" if type(self).__name__ == "AutoGeometry" else "stable_rank"
            raise ConfigError(f"{type(self).__name__}({arg}={type(stable_rank).__name__}): that is a model, not a source of "
                              "st(A); pass a probe Monitor (probe.Monitor(model)) or a callable layer name -> st(A) or None")
        if stable_rank is not None and not (callable(stable_rank) or callable(getattr(stable_rank, "stable_rank", None))):
            arg = "monitor" if type(self).__name__ == "AutoGeometry" else "stable_rank"
            raise ConfigError(f"{type(self).__name__}({arg}={stable_rank!r}): pass a probe Monitor (probe.Monitor(model)) "
                              "or a callable layer name -> st(A) or None")
        self.stable_rank_source = stable_rank
        self._records: list[Record] = []
        self.choices: dict[str, str] = {}  # "auto" groups: layer -> latest "spectral" / "euclidean"
        super().__init__(params, {**ALGORITHMS[algorithm].defaults, **defaults, "algorithm": algorithm})

    # ------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        if not isinstance(group.get("params"), (Tensor, set, list, tuple)) and group.get("params") is not None:
            group["params"] = list(group["params"])  # a generator (model.parameters()), read once
        if group.get("params") is not None:
            _common.check_once(self, group["params"])
        if self.param_groups and "param_names" in self.param_groups[0] and "param_names" not in group and _unnamed(group.get("params")):
            raise ConfigError(
                "this optimizer's param groups are named (spectral_param_groups makes them so: its steps route, look st(A) "
                "up and report by name), and the group added has bare tensors. Add (name, parameter) pairs with their "
                "algorithm, e.g. add_param_group({'params': [(n, p), ...], 'algorithm': 'adamw', 'lr': ...}); to unfreeze "
                "weights later (Lightning's BaseFinetuning adds bare tensors), build the groups with "
                "spectral_param_groups(model, ..., include_frozen=True): frozen weights are then in their role's group "
                "from the start and are stepped once they have gradients")
        own = self.defaults["algorithm"]
        alg = group.setdefault("algorithm", own)
        if alg not in ALGORITHMS:
            raise ConfigError(f"param group algorithm={alg!r} is unknown; use one of {sorted(ALGORITHMS)}")
        if "lr" not in group and ("lr" not in self.defaults or alg != own):
            raise ConfigError(f"a param group with algorithm={alg!r} needs an 'lr' (in the group or, for "
                              f"{own!r} groups, as the optimizer's lr=)")
        check_group_keys(alg, group, self.defaults)
        if alg != own:
            for key, value in ALGORITHMS[alg].defaults.items():
                group.setdefault(key, value)
        super().add_param_group(group)
        with _common.checked_group(self) as group:
            _check_numbers(group)
            if "polar" in group and ALGORITHMS[alg].spectral:
                _common.check_polar(group["polar"])
            self._check_params_fit(group, len(self.param_groups) - 1)
            if ALGORITHMS[alg].check is not None:
                ALGORITHMS[alg].check(group)
            if alg == "auto":
                self._check_stable_rank_source()

    def _check_params_fit(self, group: dict[str, Any], index: int) -> None:
        """The group's parameters fit its algorithm (floating; matrices for a spectral one, hidden unless allowed);
        noted, so that a step checks them again only after the group's algorithm was changed."""
        alg = group["algorithm"]
        names = _group_names(group, sum(len(g["params"]) for g in self.param_groups[:index]))
        _common.check_floating(group["params"], names)
        if ALGORITHMS[alg].spectral or alg == "l1_to_l2":
            _common.check_matrices(group["params"], names, alg, spectral=ALGORITHMS[alg].spectral)
        if ALGORITHMS[alg].spectral and not group.get("allow_non_hidden", False) and group.get("token_dim") is None:
            _common.check_spectral_group(group["params"], names, alg)
        self.__dict__.setdefault("_params_fit", {})[id(group)] = (group, alg)  # the group held: its id is not reused

    def _check_stable_rank_source(self) -> None:
        """An "auto" group chooses by nr(G)/st(A): without a source of st(A) it would read 1.0 for every layer
        and always choose spectral, so it refuses to start."""
        src = self.stable_rank_source
        if src is None or not (callable(src) or callable(getattr(src, "stable_rank", None))):
            kind = type(self).__name__
            if "stable_rank" not in inspect.signature(type(self).__init__).parameters and kind != "AutoGeometry":
                raise ConfigError(f"{kind} has an algorithm='auto' group, which chooses each layer's geometry by its "
                                  f"measured st(A), and {kind} takes no st(A) source: give the groups to "
                                  "AutoGeometry(groups, monitor=...) or Hybrid(groups, stable_rank=...) (a probe Monitor "
                                  "of the model), or make that group algorithm='muon'")
            arg = "monitor" if kind == "AutoGeometry" else "stable_rank"
            raise ConfigError(f"{kind}({arg}={src!r}): pass the st(A) source it chooses by — a probe "
                              "Monitor (probe.Monitor(model)) or a callable layer name -> st(A) or None; without st(A) "
                              "use SpecGD (spectral) or an AdamW/SGD group (Euclidean)")

    # ------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Check every group's options and all gradients, then run each group's algorithm. Raises ConfigError /
        NonFiniteError with nothing changed."""
        self._check_group_options()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flat = []  # (group index, param, name)
        offset = 0
        for gi, group in enumerate(self.param_groups):
            names = _group_names(group, offset)
            offset += len(group["params"])
            flat += [(gi, p, n) for p, n in zip(group["params"], names)]
        if not flat:
            return loss
        has = [p.grad is not None for _, p, _ in flat]
        for _, p, name in flat:
            if p.grad is not None and (p.grad.layout != torch.strided or torch.is_complex(p.grad)):
                raise ConfigError(f"parameter '{name}' has a {'complex' if torch.is_complex(p.grad) else 'sparse'} gradient, "
                                  "which specscope.optim does not support (nn.Embedding(..., sparse=False) gives a dense one)")
            if p.is_meta or (p.grad is not None and p.grad.is_meta):  # an optimizer built before the model was materialized
                raise _common.meta_error(name)
        with_grad = [_distributed.local(p.grad) for _, p, _ in flat if p.grad is not None]  # each rank its shard
        flags = iter(_common.nonfinite_flags(with_grad))
        bad = [next(flags) if h else False for h in has]
        if getattr(self, "_same_on_ranks", None) != len(flat):  # once (and again if groups are added)
            _distributed.check_same_parameters([n for _, _, n in flat], flat[0][1].device,
                                               [_options_text(g) for g in self.param_groups], [p for _, p, _ in flat])
            self._same_on_ranks = len(flat)
        has, bad = _distributed.agree(has, bad, flat[0][1].device)
        if not any(has):
            _warn_no_gradient(self, len(flat))
        for (_, p, name), b in zip(flat, bad):
            if b and p.grad is not None:
                _common.check_finite([(name, _distributed.local(p.grad))])
        if any(bad):
            name = flat[bad.index(True)][2]
            raise NonFiniteError(f"non-finite gradient in parameter '{name}' on another rank; nothing was changed")
        work = []  # (algorithm, group, params, grads, names) of each group with something to step
        for gi, group in enumerate(self.param_groups):
            items = [(p, n) for (j, p, n), h in zip(flat, has) if j == gi and h and p.numel()]  # zero-size: nothing to step
            if items:
                params, names = [p for p, _ in items], [n for _, n in items]
                work.append((ALGORITHMS[group["algorithm"]], group, params, [p.grad for p in params], names))
        self._ahead = {id(w[1]): w[0].ahead(self, *w[1:]) for w in work if w[0].ahead is not None}  # may raise: nothing changed yet
        for alg, group, _, grads, _ in work:
            if alg.spectral and callable(group.get("polar")):
                _common.probe_polar(self, group, grads)  # may raise: nothing changed yet
        _state_follows_parameters(self.state, [p for w in work for p in w[2]])
        try:
            with no_autocast():  # a step inside torch.autocast: its float32 products stay float32
                for alg, group, params, grads, names in work:
                    alg.update(self, group, params, grads, names)
        finally:
            self._ahead = {}
        self._bound_records()
        return loss

    def step_index(self) -> int:
        """The index of the step being taken (0 at the first), the k of a training loop's `with monitor.step(k)`: one
        past the last step any parameter with a "step" counter took (an "auto" one's is one past its last step), and
        at least the step its probe Monitor measured last (a step the optimizer did not take, as a GradScaler skips
        one, counts there). Read from the state, it goes on from a loaded one, and a step undone with its state (a
        checkpoint's state-making step) leaves it as it was."""
        taken = max((int(s["step"]) for s in self.state.values() if "step" in s), default=0)
        measured = getattr(self.stable_rank_source, "last_step", None)
        return max(taken, measured) if isinstance(measured, int) and not _is_bool(measured) else taken

    def _check_group_options(self) -> None:
        """Each group's options, at every step before anything changes: a value set after construction (an LR
        scheduler's lambda, `opt.param_groups[i]["lr"] = ...`) passes no add_param_group, and a NaN lr would write NaN
        into every weight. Python checks of a few numbers per group; no tensor is read."""
        for i, group in enumerate(self.param_groups):
            try:
                alg = group.get("algorithm")
                if not isinstance(alg, str) or alg not in ALGORITHMS:
                    raise ConfigError(f"algorithm={alg!r} is unknown; use one of {sorted(ALGORITHMS)}")
                if missing := sorted(set(ALGORITHMS[alg].defaults) - set(group)):
                    raise ConfigError(f"algorithm={alg!r} has no {missing} in the group: an algorithm set after construction "
                                      f"(param_groups[{i}]['algorithm'] = ...) brings none of its options; add a group of "
                                      "that algorithm with add_param_group instead")
                _check_numbers(group)
                if "polar" in group and ALGORITHMS[alg].spectral:
                    _common.check_polar(group["polar"])
                if self.__dict__.get("_params_fit", {}).get(id(group), (None, None))[1] != alg:
                    self._check_params_fit(group, i)  # a group loaded or changed since it was checked
                if ALGORITHMS[group["algorithm"]].check is not None:  # options valid together (nesterov with momentum …)
                    ALGORITHMS[group["algorithm"]].check(group)
            except ConfigError as e:
                raise ConfigError(f"{type(self).__name__}.step: param group {i}: {e}. Nothing was changed: a group's options "
                                  "are checked at every step, so a value set after construction (by an LR scheduler, or "
                                  f"param_groups[{i}][...] = ...) must be valid too") from None

    def _bound_records(self) -> None:
        """Records nobody pops (a training loop that never calls pop_records) would grow without end: keep the
        newest MAX_UNPOPPED_RECORDS, and say so once."""
        if len(self._records) <= MAX_UNPOPPED_RECORDS:
            return
        del self._records[:-MAX_UNPOPPED_RECORDS]
        if not getattr(self, "_warned_unpopped", False):
            self._warned_unpopped = True
            warnings.warn(f"specscope: {type(self).__name__}'s records were not popped; keeping the newest "
                          f"{MAX_UNPOPPED_RECORDS}. Call optimizer.pop_records() after each step (the HF and Lightning "
                          "callbacks do) to log or store them", stacklevel=3)

    # ------------------------------------------------------------ records and state

    def pop_records(self) -> list[Record]:
        """Records made since the last call (AutoGeometry: "geometry", "spectral_advantage", "nuclear_rank")."""
        out, self._records = self._records, []
        return out

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict; a callable `polar` is saved as the name CALLABLE_POLAR (a function would make the
        checkpoint unloadable with weights_only=True) and comes back from the loading optimizer's own group."""
        sd = super().state_dict()
        sd["param_groups"] = [{**g, "polar": CALLABLE_POLAR} if callable(g.get("polar")) else g for g in sd["param_groups"]]
        return sd

    def _loaded_groups(self, state_dict: Any) -> list[dict[str, Any]]:
        """The saved param groups, each completed with this optimizer's value of every key it lacks, after the checks of
        load_state_dict's docstring (nothing is changed here)."""
        where = f"{type(self).__name__}.load_state_dict"
        saved = _common.saved_groups(state_dict, self.param_groups, where)
        groups, params, offset = [], {}, 0
        for i, (mine, theirs) in enumerate(zip(self.param_groups, saved)):
            group = _common.merged_group(mine, theirs)
            if group.get("polar") == CALLABLE_POLAR:
                if not callable(mine.get("polar")):
                    raise ConfigError(f"param group {i} of this checkpoint was saved with a callable polar=; build the "
                                      "optimizer with the same callable before loading it")
                group["polar"] = mine["polar"]
            alg = group.get("algorithm")
            try:
                if not isinstance(alg, str) or alg not in ALGORITHMS:
                    raise ConfigError(f"algorithm={alg!r} is unknown; use one of {sorted(ALGORITHMS)} (register() a custom "
                                      "one before loading)")
                if alg != mine["algorithm"]:
                    raise ConfigError(f"algorithm={alg!r}, but this optimizer's group {i} is {mine['algorithm']!r} (the "
                                      "state_dict was saved with other param groups)")
                check_group_keys(alg, group)
                if "algorithm" not in theirs:  # not saved by a Hybrid: torch.optim.Muon's loads, other optimizers' not
                    _check_not_foreign(alg, theirs)
                _check_numbers(group)
                if "polar" in group and ALGORITHMS[alg].spectral:
                    _common.check_polar(group["polar"])
                if ALGORITHMS[alg].check is not None:
                    ALGORITHMS[alg].check({**group, "params": mine["params"]})
            except ConfigError as e:
                raise ConfigError(f"{where}: param group {i} of the state_dict: {e}. Nothing was loaded; pass a state_dict "
                                  f"saved by a {type(self).__name__} with these param groups (or a torch.optim.Muon's, for "
                                  "Muon groups)") from None
            names = _group_names(mine, offset)
            offset += len(mine["params"])
            params.update((k, (p, n, alg)) for k, p, n in zip(theirs["params"], mine["params"], names))
            groups.append(group)
        for key, entry in state_dict["state"].items():
            if key not in params:
                raise ConfigError(f"{where}: the state_dict holds state for parameter {key!r}, which none of its param groups "
                                  "lists: it is damaged; pass a state_dict as optimizer.state_dict() returns it")
            p, name, alg = params[key]
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{where}: the state of parameter '{name}' is a {type(entry).__name__}, not a dict: the "
                                  "state_dict is damaged; pass a state_dict as optimizer.state_dict() returns it")
            keeps = ALGORITHMS[alg].state
            other = [] if keeps is None else sorted(map(str, set(entry) - keeps))
            if other:
                raise ConfigError(f"{where}: the state of parameter '{name}' holds {other}, which algorithm={alg!r} does not "
                                  f"keep (it keeps {sorted(keeps or ())}): the state_dict is another optimizer's (torch.optim."
                                  "AdamW keeps 'exp_avg', 'exp_avg_sq', 'step'). Nothing was loaded; pass a state_dict "
                                  f"saved by a {type(self).__name__} with these param groups")
            for k, value in entry.items():
                _check_state_value(where, name, p, k, value, known=keeps is not None)
        return groups

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, then each buffer in the dtype a step keeps it in (`_euclidean.state_dtype`): the parameter's,
        float32 for a bf16/fp16 parameter — torch casts every buffer to the parameter's dtype, which would round a
        bf16 parameter's float32 buffers; a state saved in another dtype (float32 into float64 parameters, a
        torch.optim.Muon state of bf16 parameters, whose buffers are bf16) is converted from the saved values.

        A saved group keeps this optimizer's value of every key it lacks: a torch.optim.Muon state has no `algorithm`,
        `polar`, … and loads into the matching specscope group with its buffers. Each group is checked as
        add_param_group checks one, and the state against the parameters, before anything changes: another
        optimizer's state (torch.optim.AdamW's, SGD's, LowRankDecay's), an unknown algorithm, a value out of range or a
        buffer of another shape raises one ConfigError and leaves this optimizer as it was."""
        with _common.load_pre_hooks_first(self, state_dict) as state_dict:
            groups = self._loaded_groups(state_dict)
            state_dict = {**state_dict, "param_groups": groups}
            super().load_state_dict(state_dict)
        # saved keys are positions, or parameter names when torch.distributed.checkpoint wrote them
        saved_keys = [k for g in state_dict["param_groups"] for k in g["params"]]
        by_key = dict(zip(saved_keys, (p for g in self.param_groups for p in g["params"])))
        for key, saved in state_dict["state"].items():
            p = by_key[key]
            want = _euclidean.state_dtype(p)
            for key, value in saved.items():
                if torch.is_tensor(value) and value.is_floating_point() and value.ndim and self.state[p][key].dtype != want:
                    self.state[p][key] = value.to(device=p.device, dtype=want, copy=True)


def _warn_no_gradient(opt: Optimizer, count: int) -> None:
    """Once per optimizer: a step on which none of its parameters has a gradient changes nothing, which is what an
    optimizer built before its model's parameters were replaced does at every step — fully_shard (FSDP2), to_empty
    or load_state_dict(assign=True) put new Parameter objects in the model, and the backward pass fills theirs."""
    if opt.__dict__.get("_warned_no_gradient"):
        return
    opt._warned_no_gradient = True
    warnings.warn(f"specscope: step() found no gradient on any of the optimizer's {count} parameters, so it changed "
                  "nothing. If the model's backward pass ran, the optimizer holds parameters the model no longer uses: build "
                  "it after fully_shard / to_empty / load_state_dict(assign=True), which replace them",
                  stacklevel=_outside_level())


_INSIDE = tuple(str(Path(m.__file__).resolve().parent) + os.sep for m in (torch, sys.modules["specscope"]))  # not torchtune/


def _outside_level() -> int:
    """warnings.warn's stacklevel, for its caller, that points at the first frame outside specscope and torch: the
    user's `opt.step()` line, past torch's step wrappers (and a warning per line, not one for every optimizer
    whose step reached the same torch frame)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level


def _state_follows_parameters(state: dict, params: list[Tensor]) -> None:
    """Buffers in the dtype and on the device a step keeps them (`_euclidean.state_dtype`), as load_state_dict leaves
    them: a model moved after steps (model.double(), .to(device)) would otherwise meet its old buffers part-way
    through a step, after other groups had stepped. Python checks of each buffer's dtype and device; a copy only
    where one moved."""
    for p in params:
        st = state.get(p)
        if not st:
            continue
        want = _euclidean.state_dtype(p)
        for key in BUFFERS & st.keys():
            value = st[key]
            if torch.is_tensor(value) and (value.dtype != want or value.device != p.device):
                st[key] = value.to(device=p.device, dtype=want)


BUFFERS = frozenset({"momentum_buffer", "exp_avg", "exp_avg_sq"})  # state of the parameter's shape
COUNTERS = frozenset({"adam_step", "step", "geometry"})  # whole numbers ≥ 0 (geometry: a code, auto.py)


def _check_state_value(where: str, name: str, p: Tensor, key: str, value: Any, known: bool = True) -> None:
    """One saved state entry of parameter `name` fits it: a buffer a dense floating-point tensor of p's shape with
    finite entries, a counter a whole number ≥ 0 (`geometry` 0, 1 or 2); the keys of an algorithm registered without
    its `state` (known=False): any tensor of more than 0 dimensions is of p's shape, dense, floating, finite. A
    ConfigError naming the entry otherwise."""
    def damaged(what: str) -> ConfigError:
        return ConfigError(f"{where}: state {key!r} of parameter '{name}' {what}: the state_dict is damaged (a step would "
                           "write it into the weights). Nothing was loaded; load an earlier checkpoint, or start this "
                           "optimizer's state afresh")
    if known and key in COUNTERS:
        number = value.item() if torch.is_tensor(value) and value.numel() == 1 and not value.is_complex() else value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                or number < 0 or number != int(number) or (key == "geometry" and number > 2):
            raise damaged(f"is {value!r}, not {'0, 1 or 2' if key == 'geometry' else 'a whole number ≥ 0'}")
        return
    buffer = known and key in BUFFERS
    if buffer and not torch.is_tensor(value):
        raise damaged(f"is a {type(value).__name__}, not a tensor")
    if not torch.is_tensor(value) or (value.ndim == 0 and not buffer):
        return
    if value.shape != p.shape:
        raise ConfigError(f"{where}: state {key!r} of parameter '{name}' has shape {tuple(value.shape)}, the "
                          f"parameter {tuple(p.shape)}: the state_dict was saved for other parameters (another "
                          "model, or another order). Nothing was loaded; build the optimizer over the parameters "
                          "it was saved with, in the same order")
    if value.layout != torch.strided:
        raise damaged(f"is a {value.layout} tensor, not a dense one")
    if is_dtensor(value):  # each rank checks its own shard: no collective inside a load
        value = value.to_local()
    if not value.is_floating_point():
        raise damaged(f"is {value.dtype}, not floating point")
    if not bool(value.isfinite().all()):
        raise damaged(f"holds {int((~value.isfinite()).sum())} NaN or infinite entries")


def _group_names(group: dict[str, Any], offset: int) -> list[str]:
    """Parameter names of a group: its "param_names" (named params) or "param{k}" by global position."""
    if "param_names" in group:
        return list(group["param_names"])
    return [f"param{offset + k}" for k in range(len(group["params"]))]


def spectral_param_groups(
    model: nn.Module,
    lr_spectral: float,
    lr_adamw: float,
    *,
    algorithm: str = "muon",
    weight_decay: float | None = None,
    adamw_weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    exclude: Iterable[str] = (),
    roles: Any = None,
    include_frozen: bool = False,
    **options: Any,
) -> list[dict[str, Any]]:
    """Route a model by role: hidden ≥2-D matrices to `algorithm`; embeddings, output heads, gains,
    biases and names matching `exclude` to AdamW. Returns named param groups for `Hybrid`/`Muon`/...
    Frozen parameters (requires_grad=False) are left out, as HF's Trainer leaves them; include_frozen=True routes them
    too (no gradient, no step while frozen), for unfreezing them later (Lightning's BaseFinetuning).

    Roles (specscope.probe.roles): an embedding is looked up by index or tied to such a weight; the head
    produces the outputs. `roles`: a probe Monitor (roles seen on its measured steps, the head found from
    the loss), a {parameter or layer name: role} dict, or None for the model's structure alone
    (nn.Embedding weights, `get_output_embeddings()`, a transformers task model's head outside its
    `base_model`, a Linear with as many outputs as an embedding has tokens). Each routed matrix is marked, so
    the spectral group's check agrees with the routing. A model wrapped by torch.compile or DDP is routed by the
    names of the model inside (a Monitor's names). `exclude`: fnmatch patterns on parameter or layer names, or
    module prefixes ("cls" excludes cls.*); each must match some parameter. `options` (momentum, polar,
    ns_steps, …) go into the spectral group and must be options of `algorithm`.
    """
    from specscope.probe.roles import ROLES, static_roles  # optim may use probe (DESIGN.md layers)

    if not isinstance(model, nn.Module):
        raise ConfigError(f"spectral_param_groups: pass the model (an nn.Module), not {type(model).__name__}: routing reads "
                          "its modules (embeddings, heads); for hand-made groups build Hybrid/Muon param groups directly")
    for name, value in (("lr_spectral", lr_spectral), ("lr_adamw", lr_adamw), ("weight_decay", weight_decay),
                        ("adamw_weight_decay", adamw_weight_decay)):
        number = _number(value) if value is not None or name != "weight_decay" else 0.0
        if number is None or not math.isfinite(number) or number < 0:
            raise ConfigError(f"spectral_param_groups: {name}={value!r} must be a finite number >= 0")

    if algorithm not in ALGORITHMS or not ALGORITHMS[algorithm].spectral:
        spectral = sorted(k for k, a in ALGORITHMS.items() if a.spectral)
        raise ConfigError(f"algorithm={algorithm!r} is not a spectral algorithm; use one of {spectral}")
    check_options(algorithm, options, "spectral_param_groups")
    if "lr" in options:
        raise ConfigError("spectral_param_groups: pass the spectral group's lr as lr_spectral, not lr=")
    if not _is_bool(include_frozen):
        raise ConfigError(f"spectral_param_groups: include_frozen={include_frozen!r} must be True or False")
    include_frozen = bool(include_frozen)
    _check_numbers({**options, "betas": betas})  # as the optimizer would check them, here where they were given
    if "stacked" in options:
        raise ConfigError(f"spectral_param_groups: stacked={options['stacked']!r} is set per group by the routing: the "
                          "mixture-of-experts stacks it finds get a group of their own with stacked=True, the 2-D weights "
                          "one without; to keep the stacks on AdamW pass exclude=['*.experts.*'] (docs/optim.md, 'Stacked "
                          "expert weights')")
    inner = _unwrapped(model)
    role_of = static_roles(inner)
    every = {_common.parameter_name(n): p for n, p in inner.named_parameters(remove_duplicate=False)}  # tied: each name
    named = {_common.layer_name(n): p for n, p in every.items()} | every
    for key, role in _given_roles(roles, named, ROLES).items():
        role_of[id(named[key])] = role
    if isinstance(exclude, str):
        raise ConfigError(f"exclude={exclude!r}: give a list of patterns, e.g. exclude=[{exclude!r}]")
    exclude = tuple(exclude)
    excluded = {pat: [n for n in every if _excluded(n, pat)] for pat in exclude}
    unmatched = [pat for pat, hits in excluded.items() if not hits]
    if unmatched:
        raise ConfigError(f"exclude patterns {unmatched} match no parameter of the model (fnmatch on parameter or layer "
                          f"names, or a module prefix); parameters look like {list(every)[:4]}")
    out = {id(every[n]) for hits in excluded.values() for n in hits}
    experts, vectors = _expert_stacks(inner)
    experts |= {id(s.param) for s in getattr(roles, "slots", {}).values() if getattr(s, "kind", "") == "experts"}  # measured so
    if algorithm != "muon":
        experts = set()
    from specscope.probe.roles import conv_kernels

    kernels = conv_kernels(inner, gains=True)
    hidden, stacks, rest = [], [], []
    for name, p in inner.named_parameters():
        name = _common.parameter_name(name)
        if not (p.requires_grad or include_frozen):
            continue
        if id(p) in experts and id(p) not in out:
            _common.mark_non_hidden(p, non_hidden=False)
            stacks.append((name, p))
            continue
        if p.ndim >= 3 and id(p) not in kernels:  # a stack ([experts, out, in], a [1, tokens, d] table) is no one matrix:
            rest.append((name, p))                 # AdamW (warned about below) unless Muon took it with stacked=True
            continue
        if p.ndim >= 2:
            vector_stack = id(p) in vectors or "bias" in name.rsplit(".", 1)[-1].lower()
            role = role_of.get(id(p))  # none from the structure: an output head of the user's own may still say so by name
            _common.mark_non_hidden(p, non_hidden=vector_stack or (role != "hidden" if role else _common.head_by_name(name)))
        other = _common.is_non_hidden(p, name) or id(p) in out
        (rest if other else hidden).append((name, p))
    _warn_stacked(inner, [(n, p) for n, p in rest if id(p) not in out], algorithm)  # not what exclude= sent there
    spectral_group: dict[str, Any] = {"params": hidden, "algorithm": algorithm, "lr": lr_spectral, **options}
    if weight_decay is not None:
        spectral_group["weight_decay"] = weight_decay
    stacked_group = {**spectral_group, "params": stacks, "stacked": True}
    adamw_group = {"params": rest, "algorithm": "adamw", "lr": lr_adamw,
                   "weight_decay": adamw_weight_decay, "betas": betas}
    groups = [g for g in (spectral_group, stacked_group, adamw_group) if g["params"]]
    if not groups:
        raise ConfigError(f"spectral_param_groups: {type(inner).__name__} has no trainable parameter (all have "
                          "requires_grad=False); unfreeze the weights to train, e.g. model.requires_grad_(True)")
    return groups


def _unnamed(params: Any) -> bool:
    """Whether a group's params are given as bare tensors (not (name, tensor) pairs)."""
    items = [params] if isinstance(params, Tensor) else list(params) if isinstance(params, (list, tuple)) else []
    return bool(items) and all(isinstance(p, Tensor) for p in items)


def _expert_stacks(model: nn.Module) -> tuple[set[int], set[int]]:
    """ids of mixture-of-experts weight stacks, and of their stacks of vectors.

    A weight stack: a ≥ 3-D parameter, leading dimension > 1, of a module whose name has "expert" in it
    (transformers' `…mlp.experts.gate_up_proj` [experts, 2·inter, hidden]), never a convolution kernel. Other
    ≥ 3-D tensors (a [1, tokens, d] table, a multi-codebook embedding) are no stacks of hidden matrices that a
    name can vouch for. A stack of vectors: a 2-D parameter of such a module with the stacks' leading dimension
    (GPT-OSS's `gate_up_proj_bias` [experts, 2·inter]): one bias per expert, not a matrix."""
    stacks: set[int] = set()
    vectors: set[int] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) or "expert" not in module_name.lower():
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        leading = {p.shape[0] for p in own if p.ndim >= 3 and p.shape[0] > 1}
        stacks |= {id(p) for p in own if p.ndim >= 3 and p.shape[0] > 1}
        vectors |= {id(p) for p in own if p.ndim == 2 and p.shape[0] in leading}
    return stacks, vectors


def _warn_stacked(model: nn.Module, rest: list[tuple[str, Tensor]], algorithm: str) -> None:
    """Say which ≥ 3-D parameters that are no convolution kernel and no [1, …] table were routed to AdamW: a
    spectral step takes a ≥ 3-D tensor for a conv kernel [out, in·…], one matrix, unless its group has
    stacked=True (Muon), and the st(A)-driven algorithms have no per-expert st(A)."""
    from specscope.probe.roles import conv_kernels

    kernels = conv_kernels(model, gains=True)
    stacked = [(n, p) for n, p in rest if p.ndim >= 3 and id(p) not in kernels and p.shape[0] > 1]
    if stacked:
        name, p = stacked[0]
        fix = ("route a stack of hidden matrices to Muon by hand, in a group with stacked=True" if algorithm == "muon"
               else "algorithm='muon' orthogonalizes mixture-of-experts stacks expert by expert")
        warnings.warn(f"spectral_param_groups: {len(stacked)} parameter(s) of ≥ 3 dims that are not convolution kernels "
                      f"go to AdamW (e.g. '{name}' {tuple(p.shape)}); {fix} (docs/optim.md, 'Stacked expert weights')",
                      stacklevel=3)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP's and torch.compile's wrappers, in either order (the names a Monitor records)."""
    while True:
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else getattr(model, "_orig_mod", model)
        if inner is model:
            return model
        model = inner


def _given_roles(roles: Any, named: dict[str, Tensor], valid: tuple[str, ...]) -> dict[str, str]:
    """A Monitor's roles, or a {parameter or layer name: role} dict checked against the model."""
    if hasattr(roles, "roles"):
        return {k: r for k, r in roles.roles.items() if k in named}  # a Monitor's names may include fused slices
    if roles is not None and not isinstance(roles, Mapping):
        raise ConfigError(f"roles={roles!r}: pass a probe Monitor (roles seen on its measured steps) or a dict "
                          "{parameter or layer name: role}, e.g. roles={'lm_head': 'head'}")
    given = dict(roles or {})
    for key, role in given.items():
        if key not in named:
            close = difflib.get_close_matches(str(key), list(named), n=1)
            raise ConfigError(f"roles: {key!r} is not a parameter or layer of the model"
                              + (f"; did you mean {close[0]!r}?" if close else f"; layers look like {list(named)[:4]}"))
        if role not in valid:
            raise ConfigError(f"roles[{key!r}] = {role!r} is not a role; use one of {list(valid)}")
    return given


def _excluded(name: str, pattern: str) -> bool:
    prefix = pattern if pattern.endswith(".") else pattern + "."
    return (name_matches(name, pattern) or name_matches(_common.layer_name(name), pattern)
            or name.startswith(prefix))
