"""Small pieces shared by the optimizers: names, routing checks, matrix views, polar dispatch.

Nothing here holds state; the optimizers compose these functions.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor

from specscope import linalg
from specscope.errors import ConfigError, NonFiniteError
from specscope.names import layer_name, parameter_name  # noqa: F401  (re-exported: optim.layer_name)
from specscope.optim import _distributed
from specscope.optim._distributed import transposable
from specscope.optim._euclidean import state_dtype

PolarSpec = Union[str, Callable[[Tensor], Tensor]]
POLAR_METHODS = ("auto", "svd", "gram", "newton_schulz", "polar_express", "gram_newton_schulz")

# Fallback for parameters no role was given to (hand-built groups): a dotted name component that can
# only be an embedding or an LM head. Routing itself goes by role (probe.roles); "output" is not here,
# since BERT's `attention.output.dense` is a hidden matrix.
_NON_HIDDEN = re.compile(r"(embed|^wte$|^wpe$|^head$|^lm_head$|^classifier$)")  # any segment of the name
NON_HIDDEN_ATTR = "_specscope_non_hidden"


@contextlib.contextmanager
def checked_group(opt: torch.optim.Optimizer):
    """Around the checks of the group torch.optim has just appended: a rejected group is removed again, so a
    failed add_param_group leaves the optimizer as it was (no NaN lr left to step with)."""
    n = len(opt.param_groups)
    try:
        yield opt.param_groups[-1]
    except BaseException:
        del opt.param_groups[n - 1:]
        raise


# keys torch's LR schedulers write into every param group (OneCycleLR and CyclicLR cycle momentum through the last
# two; SWALR): allowed beside an algorithm's options, never taken for a typo of one ("max_momentum" of "momentum")
SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "swa_lr"})

# other names users give an option (other libraries', abbreviations, the other optimizer's name of it): never metadata,
# always an option the step would ignore; a group holding one is refused, naming the option it stands for where the
# algorithm has it
ALIASES = {"wd": "weight_decay", "weight_decay_rate": "weight_decay", "learning_rate": "lr", "LR": "lr", "mom": "momentum",
           "beta1": "betas", "beta2": "betas", "ns_iters": "ns_steps", "nesterov_momentum": "nesterov",
           "polar_method": "polar", "polar": "polar_method"}


def alias_hint(key: str, known: set[str] | frozenset[str]) -> str:
    """"did you mean 'weight_decay'? " for an alias of an option in `known`, else ""."""
    return f"did you mean {ALIASES[key]!r}? " if ALIASES.get(key) in known else ""


@contextlib.contextmanager
def load_pre_hooks_first(opt: torch.optim.Optimizer, state_dict: Any):
    """The state_dict after `opt`'s load_state_dict pre-hooks, which torch runs before anything reads it (a hook that
    converts another optimizer's state must run before the checks); inside the block the hooks are off, so that
    torch's own load, called there, does not run them a second time. Their handles stay valid (the same dict)."""
    if isinstance(state_dict, Mapping):
        state_dict = dict(state_dict)  # torch's shallow copy
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result
    hooks = opt._optimizer_load_state_dict_pre_hooks
    opt._optimizer_load_state_dict_pre_hooks = type(hooks)()
    try:
        yield state_dict
    finally:
        opt._optimizer_load_state_dict_pre_hooks = hooks


def merged_group(mine: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """A saved param group completed with this optimizer's value of every key it lacks. The parameters keep this
    optimizer's names: a checkpoint's `param_names` (another wrapper's prefixes, a damaged or shorter list) would
    rename them, and a shorter list stopped the ones past its end from stepping."""
    return {**{k: v for k, v in mine.items() if k != "params"}, **{k: v for k, v in theirs.items() if k != "param_names"}}


def saved_groups(state_dict: Any, param_groups: Sequence[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """The param groups of an optimizer state_dict to be loaded, after a ConfigError for anything that is not one
    (None, a model's state_dict) or whose groups hold other numbers of parameters than `param_groups`."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
    if (not isinstance(groups, (list, tuple)) or not isinstance(state_dict.get("state"), Mapping)
            or not all(isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in groups)):
        what = f"a dict with keys {list(state_dict)[:4]}" if isinstance(state_dict, Mapping) else repr(state_dict)[:80]
        raise ConfigError(f"{where}: pass an optimizer's state_dict (as optimizer.state_dict() returns it: a dict with "
                          f"'state' and 'param_groups', each group with its 'params'), got {what}")
    sizes, mine = [len(g["params"]) for g in groups], [len(g["params"]) for g in param_groups]
    if sizes != mine:
        raise ConfigError(f"{where}: the state_dict's param groups hold {sizes} parameters, this optimizer's {mine}: it was "
                          "saved over other parameters or groups. Nothing was loaded; build the optimizer with the param "
                          "groups it was saved with, in the same order")
    return [dict(g) for g in groups]


# ---------------------------------------------------------------- names and routing


def mark_non_hidden(*params: Tensor, non_hidden: bool = True) -> None:
    """Mark parameters (an embedding, a tied or untied LM head) that must never take a spectral step;
    non_hidden=False marks a matrix whose role is known to be hidden, whatever its name."""
    for p in params:
        setattr(p, NON_HIDDEN_ATTR, non_hidden)


def is_non_hidden(p: Tensor, name: str) -> bool:
    """True for 1-D/0-D tensors and tensors whose role is embedding/head (marked by role); for unmarked
    matrices, names that can only be an embedding or an LM head."""
    if p.ndim < 2:
        return True
    marked = getattr(p, NON_HIDDEN_ATTR, None)
    if marked is not None:
        return bool(marked)
    return any(_NON_HIDDEN.search(part) for part in name.lower().split("."))


HEAD_MODULES = frozenset({"head", "lm_head", "classifier"})


def head_by_name(name: str) -> bool:
    """Whether a parameter belongs to a module named as an output head, or lies inside one (`…classifier.weight`,
    `head.weight`, `head.2.weight` of a Sequential head): what routing by structure falls back to for a user's own head,
    which no structure marks."""
    return any(part in HEAD_MODULES for part in name.lower().split(".")[:-1])


def check_spectral_group(params: Sequence[Tensor], names: Sequence[str], algorithm: str) -> None:
    """A spectral group holds only hidden matrices; anything else raises with the routing fix."""
    for p, name in zip(params, names):
        if not is_non_hidden(p, name):
            continue
        what = f"{p.ndim}-D" if p.ndim < 2 else "an embedding / LM head"
        raise ConfigError(
            f"parameter '{name}' (shape {tuple(p.shape)}) is {what} and was put in a spectral "
            f"('{algorithm}') group. Route it to AdamW: put it in a group with algorithm='adamw' "
            "(specscope.optim.spectral_param_groups(model, ...) does this for a whole model), or pass "
            "allow_non_hidden=True in that group if you really mean it."
        )


def check_matrices(params: Sequence[Tensor], names: Sequence[str], algorithm: str, spectral: bool = True) -> None:
    """Every parameter of a spectral group (or an ℓ₁→ℓ₂ one: a vector per token) ≥ 2-D, whatever allow_non_hidden /
    token_dim say: a vector has no polar factor (its first step failed with an IndexError inside `as_matrix`;
    torch.optim.Muon refuses it too), nor tokens."""
    why = ("a spectral ('{a}') group, which steps matrices only (allow_non_hidden=True admits embeddings and heads, not "
           "vectors)" if spectral else "an '{a}' group, which steps one vector per token of a ≥ 2-D weight").format(a=algorithm)
    for p, name in zip(params, names):
        if p.ndim < 2:
            raise ConfigError(
                f"parameter '{name}' (shape {tuple(p.shape)}) is {p.ndim}-D and was put in {why}. "
                "Route it to AdamW: put it in a group with algorithm='adamw' (specscope.optim.spectral_param_groups(model, "
                "...) does this for a whole model)"
            )


def check_floating(params: Sequence[Tensor], names: Sequence[str]) -> None:
    """Every parameter a real floating-point tensor: an integer one failed deep inside the first step."""
    for p, name in zip(params, names):
        if not p.is_floating_point():
            raise ConfigError(f"parameter '{name}' (shape {tuple(p.shape)}) has dtype {p.dtype}; the optimizers step real "
                              "floating-point parameters only (float32, float64, bfloat16, float16): leave it out of the "
                              "optimizer or make it floating point (e.g. p.float())")


def meta_error(name: str) -> ConfigError:
    """The error for a parameter (or gradient) on the meta device, which has no data to step."""
    return ConfigError(f"parameter '{name}' is on the meta device (no data), so it cannot be stepped; nothing was changed. "
                       "Materialize the model first (model.to_empty(device=...), then initialize or load its weights), and "
                       "build the optimizer from the materialized model: to_empty() makes new tensors, and an optimizer "
                       "built before it still holds the meta ones")


def check_finite(named_grads: Iterable[tuple[str, Tensor]]) -> None:
    """Raise if any gradient holds NaN/Inf, naming the first such parameter."""
    for name, g in named_grads:
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteError(
                f"non-finite gradient (NaN or Inf) in parameter '{name}' (shape {tuple(g.shape)}); "
                "no parameter or optimizer state was changed. Lower the learning rate, check the loss "
                "for overflow, or skip this step (e.g. torch.amp.GradScaler does)."
            )


def nonfinite_flags(grads: Sequence[Tensor]) -> list[bool]:
    """Which gradients hold NaN/Inf: one fused norm over all of them and one host sync.

    A non-finite entry makes the norm non-finite; a finite norm proves the gradient finite. The rare
    finite gradient whose norm overflows is re-checked entry by entry.
    """
    if not grads:
        return []
    norms = torch.stack([n.float() for n in torch._foreach_norm(list(grads))]).tolist()
    return [not math.isfinite(n) and not bool(torch.isfinite(g).all()) for n, g in zip(norms, grads)]


# ---------------------------------------------------------------- matrix views


def as_matrix(t: Tensor) -> Tensor:
    """2-D view of a weight: a conv kernel [out, in, kh, kw] becomes [out, in*kh*kw] (rows = outputs)."""
    return t if t.ndim == 2 else t.flatten(1)  # flatten, not reshape(out, -1): a zero-size kernel has no -1


def matrices(t: Tensor, stacked: bool = False) -> list[Tensor]:
    """The matrices a spectral step orthogonalizes in t: `as_matrix(t)`, or with stacked=True each matrix of a
    stack [..., rows, cols] (views)."""
    return list(t.flatten(0, -3).unbind(0)) if stacked else [as_matrix(t)]


def matrix_shape(p: Tensor, stacked: bool = False) -> torch.Size:
    """The shape `adjust_lr` scales by: the parameter's, or one matrix's [rows, cols] of a stack."""
    return p.shape[-2:] if stacked else p.shape


def adjust_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's update scale, on the matrix shape (a conv weight: [out, in*kh*kw])."""
    rows, cols = shape[0], math.prod(shape[1:])
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))  # torch's order of operations: the same float, bit for bit
    raise ConfigError(f"adjust_lr_fn={adjust_lr_fn!r} is unknown; use None, 'original' or 'match_rms_adamw'")


def buckets_by_shape(mats: Sequence[Tensor]) -> dict[tuple, list[int]]:
    """Indices of same-shape (and dtype/device) matrices, so each bucket is one batched polar call."""
    out: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        out.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    return out


# ---------------------------------------------------------------- polar dispatch


def check_polar(polar: PolarSpec) -> None:
    if not (callable(polar) or polar in POLAR_METHODS):
        raise ConfigError(f"polar={polar!r} is unknown; use one of {POLAR_METHODS} or a callable G -> polar(G)")


def check_ns_coefficients(coefficients: Any) -> None:
    """A ConfigError unless `coefficients` is what linalg's Newton–Schulz accepts when it reads them (the rule of
    linalg.polar._coefficient_schedule: one (a, b, c) of numbers, or a non-empty list of (a, b, c) triples), with
    every number finite (a NaN coefficient would make the step write NaN into the weights). Cheap: a few Python
    checks, run on every group when it is made or loaded and at every step."""
    try:
        if len(coefficients) == 3 and all(isinstance(c, numbers.Real) for c in coefficients):  # numpy's too
            schedule = [tuple(float(c) for c in coefficients)]
        else:
            schedule = [tuple(float(c) for c in abc) for abc in coefficients]
    except (TypeError, ValueError):
        schedule = []
    if not schedule or any(len(abc) != 3 or not all(math.isfinite(c) for c in abc) for abc in schedule):
        raise ConfigError(f"ns_coefficients={coefficients!r}: give (a, b, c) or a non-empty list of (a, b, c) triples, "
                          "all finite numbers, e.g. (3.4445, -4.775, 2.0315)")


# the iteration options each polar backend reads; the others are refused when set (they would be ignored)
USES = {"newton_schulz": {"ns_steps", "ns_coefficients", "eps"}, "polar_express": {"ns_steps", "eps"},
        "gram_newton_schulz": {"eps"}}


def check_iteration_options(group: dict[str, Any], defaults: Mapping[str, Any], read: Iterable[str] = ()) -> None:
    """A ConfigError for ns_steps, ns_coefficients or eps set to other than its default in a group whose polar backend
    does not read it (nor the group's algorithm otherwise: `read`, e.g. an "auto" group's AdamW eps): it would be
    stored and ignored."""
    polar = group["polar"]
    uses = (set() if callable(polar) else USES.get(polar, set())) | set(read)
    for key in ("ns_steps", "ns_coefficients", "eps"):
        if key not in uses and key in group and not _same(group[key], defaults[key]):
            readers = [name for name, keys in USES.items() if key in keys]
            raise ConfigError(f"{key}={group[key]!r} has no effect with polar={getattr(polar, '__name__', polar)!r} (it drives "
                              f"{' and '.join(map(repr, readers))}): drop {key}, or pass one of those polar backends")


def _same(value: Any, default: Any) -> bool:
    """A group's option equal to its default (coefficients as a list or tuple of the same numbers)."""
    if isinstance(default, tuple):
        try:
            return len(value) == len(default) and all(float(a) == b for a, b in zip(value, default))
        except TypeError:
            return False
    return value == default


def polar_fn(group: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    """The batched polar map a group asked for: a linalg backend name or the user's callable.

    Iterative backends get their compute dtype's input — bfloat16 for "newton_schulz" (as torch.optim.Muon casts
    its update), `linalg.iteration_dtype` of the device for the others (bfloat16 where it multiplies bfloat16 in
    hardware, float32 elsewhere) — and go straight to linalg's kernels: the step has already checked the gradients
    (one fused norm), so the per-call validation of `linalg.polar` — a host sync per bucket on CUDA — is skipped,
    and the factor is added to the parameter directly. The group's ns_steps / ns_coefficients drive "newton_schulz"
    (ns_steps also "polar_express"); "gram_newton_schulz" runs its own four-step schedule.
    "gram"/"svd"/"auto" go through `linalg.polar` (float64 decompositions). "gram_newton_schulz" and
    "polar_express" are marked `transposable`: a tall matrix is iterated transposed beside the wide ones of its
    shape (as the backend would iterate it anyway), so a d×4d and a 4d×d matrix are one batched call (on a GPU
    a step's launches, not its flops, set its time). "newton_schulz" keeps torch.optim.Muon's one iteration per
    matrix: its steps equal torch's bit for bit on CPU, which a batch's products (baddbmm) or a transposed copy's
    (another summation order) would not always.
    """
    polar = group["polar"]
    if callable(polar):
        return checked_callable(polar)
    eps, bf16 = group["eps"], torch.bfloat16
    if polar == "newton_schulz":  # matrix by matrix, as torch: a batch's baddbmm rounds otherwise than addmm now and then
        return lambda X: torch.stack([linalg.newton_schulz(x.to(bf16), group["ns_steps"], group["ns_coefficients"], eps)
                                      for x in X.unbind(0)])
    if polar == "polar_express":
        return transposable(lambda X: linalg.polar_express(X.to(linalg.iteration_dtype(X.device)), group["ns_steps"], eps))
    if polar == "gram_newton_schulz":
        return transposable(lambda X: linalg.gram_newton_schulz(X.to(linalg.iteration_dtype(X.device)), eps=eps))
    return polar_map(polar)


def checked_callable(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The user's polar callable, its result checked for a tensor of the batch's shape (a transposed or reshaped
    result would otherwise be reshaped into the weight's shape and applied scrambled). Shape only: no entry read."""
    def call(X: Tensor) -> Tensor:
        out = fn(X)
        if not isinstance(out, Tensor) or out.shape != X.shape:
            got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise ConfigError(f"polar={getattr(fn, '__name__', fn)!r} returned {got} for a batch of shape {tuple(X.shape)}; "
                              "a polar callable maps a batch [..., m, n] to its polar factors, a tensor of the same shape")
        return out
    return call


def probe_polar(opt: Any, group: dict[str, Any], grads: Sequence[Tensor]) -> None:
    """A group's polar callable checked (`checked_callable`) on one matrix of each shape it will be given, before any
    group of the step changes: inside the update a wrong shape raised after the groups before it had stepped and its
    own momentum had moved. The probe is a gradient's matrix in the dtype the update passes; each (callable, shape,
    dtype, device) is probed once per optimizer. A DTensor's matrices (FSDP2) are left to the check inside the step."""
    fn, probed = group["polar"], opt.__dict__.setdefault("_polar_probed", set())
    for g in grads:
        if _distributed.is_dtensor(g):
            continue
        m = matrices(g, group.get("stacked", False))[0].to(state_dtype(g))
        key = (id(fn), tuple(m.shape), m.dtype, m.device)
        if key not in probed:
            try:
                checked_callable(fn)(m.unsqueeze(0))
            except ConfigError as e:
                raise ConfigError(f"{e}. Nothing was changed") from None
            probed.add(key)


def polar_map(method: str) -> Callable[[Tensor], Tensor]:
    """linalg.polar with `method`, one call per shape bucket; for "gram" a `LaterMap` that `owner_map` starts
    on all matrices at once (`linalg.polar_later`: on a CPU their jobs share the one-thread workers)."""
    now = lambda X: linalg.polar(X, method=method)  # noqa: E731
    return _distributed.LaterMap(now, lambda mats: linalg.polar_later(mats, "gram", check=False)) if method == "gram" else now


def batched_polar(mats: Sequence[Tensor], fn: Callable[[Tensor], Tensor], shardwise: bool = False) -> list[Tensor]:
    """fn on every matrix, one call per shape bucket; under torch.distributed each matrix is mapped whole on
    one owner rank (DTensor shards included), or shard by shard with shardwise=True (optim/_distributed.py)."""
    return [r[0] for r in _distributed.owner_map(mats, fn, shardwise)]


def check_once(opt: Any, params: Any) -> None:
    """A ConfigError naming a parameter of a group being added that is in an earlier group, or twice in this one: it
    would be stepped twice per step (torch.optim refuses the first with a ValueError naming none, and only warns of
    the second)."""
    items = [params] if isinstance(params, Tensor) else list(params)
    pairs = [(x[0], x[1]) if isinstance(x, tuple) and len(x) == 2 else (None, x) for x in items]
    earlier = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
    seen: set[int] = set()
    for k, (name, p) in enumerate(pairs):
        if not isinstance(p, Tensor):
            continue
        label = f"'{name}'" if isinstance(name, str) else f"the parameter of shape {tuple(p.shape)} at position {k} of the group"
        if id(p) in earlier:
            raise ConfigError(f"{label} is in param group {earlier[id(p)]} already: a parameter in two groups would be "
                              "stepped twice per step; put each parameter in one group")
        if id(p) in seen:
            raise ConfigError(f"{label} is listed twice in one param group: it would be stepped twice per step; list each "
                              "parameter once (model.parameters() lists a tied weight once)")
        seen.add(id(p))


def fro_squared(D: Tensor) -> float:
    """‖D‖_F² as a float64 number (D.square() overflows float32 beyond 1e19); a DTensor's whole, not its shard's."""
    return _distributed.number(torch.linalg.vector_norm(D, dtype=torch.float64)) ** 2


def unit_polar_with_nuclear_norm(mats: Sequence[Tensor], group: dict[str, Any]) -> list[tuple[Tensor, Tensor, Tensor | None]]:
    """(polar(D), ‖D·k‖_*, k) per matrix, D taken at unit scale D·k (k = linalg._scale.pow2_scale(D): exact, polar(D)
    unchanged) so that its nuclear norm fits D's dtype (a float32 D of entries ≈ 1e36 on a 64×64 has ‖D‖_* beyond
    float32's range): ‖D‖_* = ‖D·k‖_*/k, to be formed in float64. A DTensor (FSDP2) is taken as it is, k None."""
    from specscope.linalg._scale import pow2_scale

    scales = [pow2_scale(D) if type(D) is Tensor else None for D in mats]
    unit = batched_polar_with_nuclear_norm([D if k is None else D * k for D, k in zip(mats, scales)], group)
    return [(P, nuc, k) for (P, nuc), k in zip(unit, scales)]


def nuclear_length(nuc: Tensor, k: Tensor | None) -> Tensor:
    """‖D‖_* as a float64 0-D tensor from `unit_polar_with_nuclear_norm`'s (‖D·k‖_*, k)."""
    return nuc.double() if k is None else nuc.double() / k.reshape(()).double()


def batched_polar_with_nuclear_norm(mats: Sequence[Tensor], group: dict[str, Any]) -> list[tuple[Tensor, Tensor]]:
    """(polar(M), ‖M‖_*) per matrix, one call per shape bucket.

    "gram"/"svd": both from one eigendecomposition (linalg.polar_with_nuclear_norm), exact. Any other
    backend: ‖M‖_* ≈ ⟨M, P⟩ with its approximate P (exact only when P is). With shardwise=True both are
    of each local shard.
    """
    method = group["polar"]
    if method in ("gram", "svd"):

        def now(X: Tensor) -> tuple[Tensor, Tensor]:
            P, nuc = linalg.polar_with_nuclear_norm(X, method=method)
            return P, nuc.reshape(X.shape[0])

        start = lambda mats: linalg.polar_with_nuclear_norm_later(mats, "gram", check=False)  # noqa: E731
        fn: Callable = _distributed.LaterMap(now, start) if method == "gram" else now
    else:
        approx = polar_fn(group)

        def fn(X: Tensor) -> tuple[Tensor, Tensor]:
            P = approx(X).to(X.dtype)
            return P, (X * P).sum(dim=(-2, -1))

    return [(P, nuc) for P, nuc in _distributed.owner_map(mats, fn, group.get("shardwise", False), extras=1)]


# ---------------------------------------------------------------- stable-rank sources


def untracked_reason(source: Any, layer: str) -> str | None:
    """Why a probe Monitor has no st(A) for `layer`, a weight of its model that it does not track (left out by its
    include= / exclude=, or frozen when the Monitor was made); None for a name no weight of its model has, or a source
    that is no Monitor."""
    model = getattr(source, "model", None)
    if not isinstance(model, torch.nn.Module):
        return None
    if layer not in {layer_name(n) for n, _ in model.named_parameters(remove_duplicate=False)}:
        return None
    return "the Monitor does not track it: its include=/exclude= leave it out, or it was frozen when the Monitor was made"


def taken_ahead(opt, group: dict, read: Callable[[], Any]) -> Any:
    """What the optimizer's step read for `group` before any group changed (Algorithm.ahead), or `read()` now when
    the update runs on its own."""
    ahead = opt.__dict__.get("_ahead", {})
    return ahead.pop(id(group)) if id(group) in ahead else read()


def read_stable_rank(source: Any, layer: str) -> float | None:
    """st(A) of a layer's input from a probe Monitor (`.stable_rank(name)`) or any callable name -> float|None."""
    if source is None:
        return None
    get = source.stable_rank if hasattr(source, "stable_rank") else source
    st = get(layer)
    if st is None:
        return None
    try:  # a number, numpy's scalars and 0-d arrays, a one-element tensor; not text, a flag or a list
        if isinstance(st, (str, bytes)) or type(st).__name__ in ("bool", "bool_"):
            raise TypeError
        st = float(st)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"stable_rank source returned {st!r} for layer '{layer}'; it must return st(A) as a number (or None "
                          "where it has none)") from None
    if not math.isfinite(st):
        raise NonFiniteError(f"stable_rank source returned {st} for layer '{layer}'; st(A) must be a finite number >= 1")
    if st < 0.999:  # ‖A‖_F² ≥ ‖A‖₂²; a float32 estimate of a rank-1 input may read a rounding below 1, never 0.5 or 1e-300
        raise ConfigError(f"stable_rank source returned {st} for layer '{layer}'; st(A) = ‖A‖_F²/‖A‖₂² is >= 1 by definition: "
                          "return the input's stable rank (a probe Monitor's stable_rank(name)), not another quantity")
    return st
