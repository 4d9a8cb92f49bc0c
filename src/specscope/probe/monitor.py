"""`Monitor`: st(A) of every weight's input and nr(G) of its gradient, per measured step.

    monitor = Monitor(model, every=10)
    for step in range(T):
        with monitor.step(step):            # armed only on measured steps
            loss_fn(model, batch).backward()  # any number of micro-batches
        opt.step(); monitor.after_optimizer_step()
        run.append(monitor.pop_records())

Measuring never changes training: the watch reads detached inputs under no_grad, gradients are read (never
written), and the global RNG is not used.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import math
import numbers
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from specscope.errors import ConfigError, checked_keywords, NonFiniteError, SpecscopeError
from specscope.names import layer_name
from specscope.probe import advice as _advice
from specscope.probe import distributed as D
from specscope.probe import estimators as E
from specscope.probe import roles as R
from specscope.probe.estimators import L, GramStats, GroupedStats, finish_grams, groups_of, make_stats
from specscope.probe.pairing import KINDS, Interleaved, Slot, check_patterns, expert_name, frozen_names, tracked_slots, user_level as _user_level
from specscope.probe import watch as W
from specscope.probe.watch import CallWatch, ParamWatch, Watch
from specscope.records import Record

ESTIMATORS = ("gram", "power", "exact")
EXTRAS = ("topk", "entropy_rank", "weight_stable_rank")
NONFINITE = ("raise", "warn", "skip")
GRAM_DTYPES = (torch.float64, torch.float32)  # of the gradient's Gram (nr(G) on the CPU)
GradientSource = str | Callable[[str, nn.Parameter], torch.Tensor]


def is_log_step(step: int, per_decade: int = 10) -> bool:
    """True for 0 and for steps nearest to 10^(i/per_decade): about `per_decade` measured steps per decade."""
    if step <= 0:
        return step == 0
    return step == round(10 ** (round(per_decade * math.log10(step)) / per_decade))


NO_GRADIENT = ("multiplied an input in this step's forward but had no gradient when the `with monitor.step(step)` block "
               "ended: run backward inside the block and zero_grad outside it (after optimizer.step), or its output "
               "does not reach the loss")
STACK_PRODUCTS = frozenset({"_grouped_mm", "bmm", "baddbmm"})  # batched products: a ≥ 3-D weight used so is a stack
# the one unmeasured reason that says nothing about the weight: it sat out this step (an MoE expert, a branch)
NOT_USED = "not used in this step's forward pass (no input, no gradient)"
NO_SOURCE_GRADIENT = ("multiplied an input in this step's forward, but the Monitor's gradient= callable returned None for "
                      "it: that callable gives this weight no gradient in this step")
FROZEN = ("multiplied an input in this step's forward but is frozen (requires_grad=False), so it has no gradient: "
          "leave it out with Monitor(exclude=[...]), or build the Monitor after freezing (frozen weights are not tracked)")
NEVER_ROUTED = "an expert no token has been routed to on a measured step so far: no st(A) yet"
EMPTY_BATCH = ("its inputs in this step had no rows (an empty batch, or only padding_idx tokens for an embedding), so "
               "st(A) is undefined; a step with data measures it")


def _count(value, least: int) -> bool:
    """An int (numpy's too, never a bool) of at least `least`."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def _check_split(split) -> None:
    if split is None:
        return
    if not isinstance(split, dict):
        raise ConfigError(f"Monitor(split={split!r}) must be a dict {{layer pattern: slice names}}, e.g. "
                          "{'blocks.*.attn.qkv': ['q', 'k', 'v']}")
    for key, value in split.items():
        if not isinstance(key, str):
            raise ConfigError(f"Monitor(split=...) has the pattern {key!r}: patterns are layer names (str), e.g. 'blocks.*.attn.qkv'")
        parts = value.parts if isinstance(value, Interleaved) else value
        if (not isinstance(value, (list, tuple, dict, Interleaved)) or not len(parts)
                or (isinstance(value, Interleaved) and not _count(value.heads, 1))):
            raise ConfigError(f"Monitor(split={{{key!r}: {value!r}}}): give the slices as a non-empty list of names "
                              "(['q', 'k', 'v']: equal blocks), {name: rows} or Interleaved(names, heads=H)")


def _check_values(*, every, log_spaced, gradient, estimator, nonfinite, extras, power_iters=1, power_block=4, topk=4,
                  split=None, grad_gram_dtype=torch.float64, history=1000, include=None, exclude=()) -> None:
    if every is not None and not _count(every, 1):
        raise ConfigError(f"Monitor(every={every!r}) must be a positive int or None")
    if not _count(history, 1):
        raise ConfigError(f"Monitor(history={history!r}) must be an int >= 1: the measurements advice() reads")
    check_patterns("include", include), check_patterns("exclude", exclude)  # a bare string, or a pattern that is no string
    if not isinstance(log_spaced, bool) and not _count(log_spaced, 1):
        raise ConfigError(f"Monitor(log_spaced={log_spaced!r}) must be True (10 measured steps per decade), an int >= 1 "
                          "(measured steps per decade) or False")
    if every is None and not log_spaced:
        raise ConfigError("Monitor(every=None) needs log_spaced=True, or it would never measure")
    if estimator not in ESTIMATORS:
        raise ConfigError(f"Monitor(estimator={estimator!r}) is not one of {ESTIMATORS}")
    if not callable(gradient) and gradient not in ("grad", "update"):
        raise ConfigError(f"Monitor(gradient={gradient!r}) must be 'grad', 'update' or a callable(name, param)")
    if nonfinite not in NONFINITE:
        raise ConfigError(f"Monitor(nonfinite={nonfinite!r}) must be one of {NONFINITE}")
    if isinstance(extras, str) or (bad := [e for e in extras if e not in EXTRAS]):
        raise ConfigError(f"Monitor(extras={extras!r}): give a list of names from {EXTRAS}" if isinstance(extras, str)
                          else f"Monitor(extras=...) has unknown {bad}; choose from {EXTRAS}")
    for key, value, least, what in (("power_iters", power_iters, 0, "refining iterations of the power estimator's block"),
                                    ("power_block", power_block, 1, "columns of the power estimator's block"),
                                    ("topk", topk, 1, "singular values the 'topk' extra records")):
        if not _count(value, least):
            raise ConfigError(f"Monitor({key}={value!r}) must be an int >= {least}: the {what}")
    _check_split(split)
    if grad_gram_dtype not in GRAM_DTYPES:
        raise ConfigError(f"Monitor(grad_gram_dtype={grad_gram_dtype!r}) must be torch.float64 (the default: exact) or "
                          "torch.float32: the dtype the gradient's Gram is formed in")


def _filled(st) -> bool:
    """Whether input statistics hold this step's data: a weight not used on this step keeps an emptied object."""
    return st is not None and all(t is not None for t in st.tensors())


@dataclass
class _Inputs:
    """st(A) of one weight on one step."""

    st: float
    rows: int
    n: int
    estimator: str
    flag: str


@dataclass
class _Pending:
    step: int
    inputs: dict[int, _Inputs]
    before: dict[int, torch.Tensor]


@dataclass
class _Gradients:
    """A measured step's gradient matrices by recorded name, their spectra (started: call to collect) and the
    slots that had a gradient."""

    named: list[tuple[str, Slot, torch.Tensor]]
    spectra: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    has_grad: set[int]


def _host_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[float]]:
    """Scalar tensor pairs as Python floats, with one device-to-host copy per device (not one per pair:
    on CUDA each copy is a host synchronisation)."""
    flat = [t.double().reshape(()) for pair in pairs for t in pair]
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(flat):
        by_device.setdefault(t.device, []).append(i)
    vals = [0.0] * len(flat)
    for idx in by_device.values():
        for i, v in zip(idx, torch.stack([flat[i] for i in idx]).cpu().tolist()):
            vals[i] = v
    return [vals[i : i + 2] for i in range(0, len(vals), 2)]


class Monitor:
    """Pairs each weight of `model` with the matrix of its inputs and measures st(A), nr(G) per step.

    Every trainable ≥2-D parameter is tracked. On a measured step the probe watches the operations
    themselves (probe.watch, probe.pairing): whatever multiplies a tracked weight — nn.Linear, transformers' Conv1D,
    nn.MultiheadAttention, F.linear on a raw parameter, Conv1d/2d/3d with groups, an embedding lookup —
    is that weight's input. A weight it cannot pair gets an "unmeasured" record with the reason, is
    listed in `unmeasured` (alias `unpaired`), warned about once, and has verdict "unmeasured".

    every / log_spaced: a step is measured when `step % every == 0` (every=None: never by this rule) or,
    with log_spaced (True = 10 per decade, or an int >= 1 per decade), when it is a log-spaced step. Measured
    step numbers increase (`load_state_dict` starts them afresh); one step is open at a time.
    gradient: "grad" (the accumulated .grad, read on leaving `step()`), "update" (parameter change across
    the optimizer step) or a callable(name, param) -> Tensor of the parameter's shape, or None (e.g. an
    optimizer buffer); the last two are read in `after_optimizer_step()`.
    estimator: how st(A) is measured — "gram" (default: trace and top eigenvalue of the feature-side Gram
    AᵀA, shared by weights with the same input; certified within 1e-4, or for wide inputs applied implicitly
    and accepted on an a-posteriori error estimate of 1e-4 — see probe.estimators), "power" (one-pass
    warm-started block power iteration: cheaper, a lower bound on σ_1² that can be far off when the top
    direction moves) or "exact" (keeps A; a float64 reference). nr(G) on the CPU is exact: eigenvalues
    of the smaller Gram, formed in `grad_gram_dtype` (float64 by default); on an accelerator a matmul-only
    float64 route within 1e-4 of ‖G‖_* (estimator "polar", linalg.nuclear_norms); an SVD with
    estimator="exact".
    nonfinite: a non-finite activation or gradient raises NonFiniteError naming layer and step ("raise"), or
    is recorded as NaN with flag "nonfinite" and a warning ("warn") or silently ("skip": the overflow steps of
    fp16 loss scaling, which its GradScaler skips; the framework callbacks choose it when a scaler is in use).
    split: {layer pattern: [slice names] | {name: size} | Interleaved(parts, heads)} measures a fused
    weight's output blocks separately, e.g. {"blocks.*.attn.qkv": ["q", "k", "v"]} records
    "blocks.0.attn.qkv.q"; the output dim is the weight's own (columns of a Conv1D weight stored [in, out]).
    """

    @checked_keywords
    def __init__(
        self,
        model: nn.Module,
        *,
        every: int | None = 1,
        log_spaced: bool | int = False,
        gradient: GradientSource = "grad",
        estimator: str = "gram",
        extras: Iterable[str] = (),
        split: dict | None = None,
        nonfinite: str = "raise",
        include: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        power_iters: int = 1,
        power_block: int = 4,
        topk: int = 4,
        history: int = 1000,
        grad_gram_dtype: torch.dtype = torch.float64,
    ):
        include, exclude = check_patterns("include", include), check_patterns("exclude", exclude)  # a generator read once
        _check_values(every=every, log_spaced=log_spaced, gradient=gradient, estimator=estimator, nonfinite=nonfinite, extras=extras,
                      power_iters=power_iters, power_block=power_block, topk=topk, split=split, grad_gram_dtype=grad_gram_dtype,
                      history=history, include=include, exclude=exclude)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"Monitor(model={type(model).__name__}): pass the nn.Module whose weights to measure")
        self.extras = tuple(extras)
        if estimator == "exact" and D.world_size() > 1:
            raise ConfigError("estimator='exact' keeps activations and is single-process; use 'gram' or 'power' under torch.distributed")
        ddp = False
        while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):  # either order
            ddp |= isinstance(model, nn.parallel.DistributedDataParallel)
            model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
        self.model = model  # names without DDP's `module.` or torch.compile's `_orig_mod.`
        self._grads_reduced = ddp  # DDP has already averaged .grad over ranks
        self.every, self.log_spaced = (None if every is None else int(every)), (10 if log_spaced is True else int(log_spaced))
        self.gradient, self.estimator, self.nonfinite, self.topk = gradient, estimator, nonfinite, topk
        self._stats_kw = dict(block=power_block, iters=power_iters)
        self.slots: dict[int, Slot] = tracked_slots(self.model, include=include, exclude=exclude, split=split)
        if not self.slots:
            raise ConfigError(f"Monitor: {type(self.model).__name__} has no trainable weight of ≥ 2 dims to measure "
                              "(st(A) and nr(G) are of weight matrices); pass the model that holds them")
        if meta := [s.name for s in self.slots.values() if s.param.is_meta]:
            raise ConfigError(f"Monitor: weights {meta[:4]}{' …' if len(meta) > 4 else ''} are on the meta device and have no "
                              "values to measure; materialize the model first (model.to_empty(device=...), then load or "
                              "initialize its weights), then build the Monitor")
        for pid, role in R.static_roles(self.model).items():
            if pid in self.slots:
                self.slots[pid].role = role
        self._task_heads = R.task_heads(self.model)  # heads by declaration: a measured step keeps them so
        self._fsdp = W.sharded(self.model)  # FSDP2 shards modules before a Monitor takes their weights
        self.unmeasured: dict[str, str] = {}
        self._warned: set[str] = set()
        self._stack: ExitStack | None = None
        self._watch: Watch | None = None  # the pairing state of the measured step under way
        self._heads: set[int] = set()  # weights producing the loss, from the last backward a measured step saw
        self._backward_seen = False  # a measured step's backward was seen: later ones need not see it (ParamWatch)
        self._serial = itertools.count(1)  # numbers the inputs seen (shared keys of q, k, v), across steps
        self._step: int | None = None
        self._pending: _Pending | None = None
        self._records: list[Record] = []
        self._latest_st: dict[str, float] = {}
        self._latest_inputs: dict[str, tuple[int, str]] = {}
        self._history: dict[str, deque] = {}
        self._history_len = int(history)
        self._ranks_agree = False  # checked at the first measured step under torch.distributed
        self.grad_gram_dtype = grad_gram_dtype
        self._last_measured: int | None = None
        self._last_step: int | None = None  # the last measured step whose block ended: later ones must come after it
        self._closed = False
        self._known = {layer_name(n) for n, p in self.model.named_parameters() if p.dim() >= 2}  # to name new ones once
        self._frozen = frozen_names(self.model, include=include, exclude=exclude)  # to name the ones unfrozen later once

    @classmethod
    def check_options(cls, **options) -> None:
        """ConfigError for a keyword `Monitor(model, **options)` would reject (an unknown name, a bad value),
        without a model: a framework callback that builds its Monitor later checks its options when it is made."""
        known = [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "model")]
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                raise ConfigError(f"{key!r} is not an option of Monitor; " + (f"did you mean {close[0]!r}? " if close else "")
                                  + f"its options are {known}")
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k in known}
        given = {**defaults, **options}
        _check_values(**{k: given[k] for k in ("every", "log_spaced", "gradient", "estimator", "nonfinite", "extras", "power_iters",
                                               "power_block", "topk", "split", "grad_gram_dtype", "history", "include",
                                               "exclude")})

    @property
    def unpaired(self) -> dict[str, str]:
        """The weights not measured on the last measured step, name -> reason (same dict as `unmeasured`)."""
        return self.unmeasured

    @property
    def roles(self) -> dict[str, str]:
        """Layer name -> "embedding" | "head" | "hidden" (probe.roles), from the last measured step's use."""
        return {s.name: s.role for s in self.slots.values()}

    # -- schedule ---------------------------------------------------------------------------------
    @property
    def last_step(self) -> int | None:
        """The last step this Monitor measured: None before the first, and after `load_state_dict` (a resumed run
        goes on from its checkpoint's step). Steps it measures next must come after it."""
        return self._last_step

    def is_measured(self, step: int) -> bool:
        """Whether `step` is measured under this schedule."""
        by_every = self.every is not None and step % self.every == 0
        return by_every or bool(self.log_spaced and is_log_step(step, self.log_spaced))

    @property
    def layers(self) -> list[str]:
        """Names under which weights are recorded (fused slices by their slice names)."""
        return [n for s in self.slots.values() for n in s.names()]

    # -- measuring one step -----------------------------------------------------------------------
    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Context for one optimizer step's forward/backward passes; measured steps arm the watch."""
        if self._pending is not None:
            raise SpecscopeError(
                f"step {self._pending.step} was measured with gradient={self._gradient_name()}, which is read after the "
                "optimizer step: call monitor.after_optimizer_step() after optimizer.step()"
            )
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:  # numpy ints too
            raise ConfigError(f"monitor.step({step!r}): pass the optimizer step, an int >= 0")
        step = int(step)
        if not self.is_measured(step):
            yield
            return
        if self._step is not None:  # its watch would replace the open step's, which then records this step's inputs only
            raise SpecscopeError(f"monitor.step({step}) entered while monitor.step({self._step}) is still open: one "
                                 "`with monitor.step(step)` per optimizer step, around all its micro-batches; leave the open one first")
        if self._last_step is not None and step <= self._last_step:
            raise ConfigError(f"monitor.step({step}): step {self._last_step} was measured already; pass the optimizer step, "
                              "which increases (a step number measured again would be recorded twice), or make a new Monitor "
                              "for a new run")
        self._arm(step)
        try:
            yield
        finally:
            self._disarm()
        if self._closed:  # close() inside the block: this step is not measured either
            return
        # the step counts as measured once its finish succeeds: one refused as non-finite records nothing, and the
        # same step may be taken again (on clean data)
        if self.gradient == "grad":  # the gradients' spectra start first: the inputs' solves queue behind them
            grads = self._gradients(lambda s: s.param.grad)
            self._record(step, self._finish_inputs(step), grads)
            self._last_step = step
            return
        inputs = self._finish_inputs(step)
        self._last_step = step
        before = {id(s.param): s.param.detach().clone() for s in self.slots.values()} if self.gradient == "update" else {}
        self._pending = _Pending(step, inputs, before)

    def after_optimizer_step(self) -> None:
        """Read the update (or the callable's tensor) of a measured step; a no-op otherwise."""
        p, self._pending = self._pending, None
        if p is None:
            return
        if self.gradient == "update":
            self._measure(p.step, p.inputs, lambda s: s.param.detach() - p.before[id(s.param)], reduce=False)
        else:
            self._measure(p.step, p.inputs, self._called_gradient, reduce=False)

    def _called_gradient(self, s: Slot) -> torch.Tensor | None:
        """The gradient callable's tensor for a weight (None: it has none this step), checked to be one of its shape."""
        g = self.gradient(s.name, s.param)
        if g is not None and (not isinstance(g, torch.Tensor) or g.shape != s.param.shape):
            got = f"shape {tuple(g.shape)}" if isinstance(g, torch.Tensor) else f"a {type(g).__name__}"
            raise ConfigError(f"Monitor(gradient={self._gradient_name()}) returned {got} for '{s.name}'; it must return a "
                              f"tensor of the parameter's shape {tuple(s.param.shape)} (or None: no gradient this step)")
        return g

    def observe(self, name: str, weight: nn.Parameter, inputs: torch.Tensor) -> None:
        """Pair `weight` (used as F.linear(inputs, weight)) with `inputs`, for products the probe cannot
        see (a custom kernel, an einsum); call it next to that product. A no-op outside a measured step, where its
        arguments are checked too (a wrong call fails on the first step, not the first measured one)."""
        if bad := [f"{k} is a {type(v).__name__}" for k, v in (("weight", weight), ("inputs", inputs)) if not isinstance(v, torch.Tensor)]:
            raise ConfigError(f"observe('{name}', weight, inputs): {' and '.join(bad)}; pass the weight and the input matrix "
                              "it multiplies as tensors (F.linear(inputs, weight))")
        if self._step is None or not torch.is_grad_enabled():
            return
        slot = self.slots.get(id(weight))
        n_features = slot.n_features if slot is not None and slot.kind == "observed" else weight.shape[-1]
        if inputs.shape[-1] != n_features:  # checked before anything changes: a rejected call leaves the Monitor as it was
            raise ConfigError(f"observe('{name}', ...): inputs have {inputs.shape[-1]} features, the weight takes {n_features}")
        if slot is not None and name not in slot.names():
            raise ConfigError(f"observe('{name}', ...): this weight is measured as '{slot.name}'; pass that name: "
                              f"observe('{slot.name}', weight, inputs)")
        if slot is None or slot.kind != "observed":
            if name in self.layers and slot is None:
                raise ConfigError(f"observe('{name}', ...): that name is already a measured weight; pick another")
            if slot is None:
                slot = self.slots[id(weight)] = Slot(name, weight)
            slot.name, slot.kind, slot.n_features, slot.out_dim = name, "observed", weight.shape[-1], 0
            slot.stats = self._new_stats("observed", slot.n_features)
        with torch.no_grad():
            A = inputs.detach().reshape(-1, slot.n_features)
            entry = self._watch.input(A)  # its serial number is the input's key: weights observed on one input share it
            slot.inputs.setdefault((0, weight.shape[0]), set()).add(entry[2])
            if isinstance(slot.stats, GramStats):  # (a key from id(A) could be another input's, once A is freed)
                slot.stats.add(A, entry, entry[2], source=inputs)
            else:
                slot.stats.add(A)

    def pop_records(self) -> list[Record]:
        """The records made since the last call (hand them to a store)."""
        out, self._records = self._records, []
        return out

    def stable_rank(self, name: str) -> float | None:
        """Latest measured st(A) of the input of weight `name`; None before its first measurement or
        while it is unmeasured (see `unmeasured[name]`). A step whose input was all zeros or non-finite (records
        flagged zero_input / nonfinite) has no st(A) and leaves the one before: None if there was none. A fused
        weight's slices share their input's."""
        if name in self._latest_st:
            return self._latest_st[name]
        if not isinstance(name, str):
            raise ConfigError(f"stable_rank({name!r}): pass a weight's name (a str), one of {self.layers}")
        fused = next((s for s in self.slots.values() if s.name == name and s.split is not None), None)
        if fused is not None:
            return self._latest_st.get(fused.names()[0])
        stack = next((s for s in self.slots.values() if s.name == name and s.kind == "experts"), None)
        if stack is not None:
            err = ConfigError(f"'{name}' is a stack of {stack.param.shape[0]} experts, measured expert by expert "
                              f"('{stack.names()[0]}' …), each with the rows routed to it: there is no one st(A) of the "
                              "stack. Ask for one expert's; an optimizer that scales a step by st(A) (SpecGD, AutoGeometry) "
                              "takes the stack as one matrix — give the stack to Muon with stacked=True, or to AdamW "
                              "(spectral_param_groups does)")
            err.final = True  # an answer about this weight, not a name the caller should look up elsewhere
            raise err
        if name not in self.layers:
            close = difflib.get_close_matches(name, self.layers, n=3, cutoff=0.6)
            known = close or self.layers[:6]
            more = f" and {len(self.layers) - len(known)} more (monitor.layers)" if len(self.layers) > len(known) else ""
            raise ConfigError(f"no tracked weight named '{name}'; {'closest' if close else 'known'}: {known}{more}")
        return None

    # -- watching the operations --------------------------------------------------------------------
    def _follow_replaced(self) -> None:
        """Track the tensors the model holds now. A weight replaced by another tensor under its name since the Monitor
        was built (`load_state_dict(assign=True)`, `resize_token_embeddings`, a deep copy's weights swapped in) is
        followed: its history stays, and its warm statistics go when its shape changed. A weight no longer in the
        model under its name (tied to another by `tie_weights`, parametrized by `weight_norm`) is unmeasured with that
        reason, and weights that appeared since are named once: they are not tracked."""
        now = {layer_name(n): p for n, p in self.model.named_parameters() if p.dim() >= 2}
        if self._frozen and (thawed := sorted(n for n in self._frozen if n in now and now[n].requires_grad)):
            self._frozen -= set(thawed)
            warnings.warn(f"specscope probe: weights {thawed[:4]}{' …' if len(thawed) > 4 else ''} were frozen when the "
                          "Monitor was built and are trained now; frozen weights are not tracked, so they are not measured: "
                          "build a new Monitor for the model as it is now", stacklevel=_user_level())
        if (all(now.get(s.name) is s.param and s.shape == tuple(s.param.shape) for s in self.slots.values())
                and len(now) == len(self._known)):
            return
        tracked = {id(s.param) for s in self.slots.values()}
        slots, moved = {}, {}
        for s in self.slots.values():
            p = now.get(s.name)
            if p is not None and tuple(p.shape) != s.shape:  # resized: warm starts and token counts are of the old shape
                s.stats, s.tokens, s.block_stats, s.kind, s.n_features, s.shape = None, None, {}, "", 0, tuple(p.shape)
            if p is s.param or (p is not None and id(p) in tracked):  # unchanged; or another slot's tensor (tied)
                s.gone = "" if p is s.param else (
                    f"no longer a weight of its own: '{s.name}' is now another tracked weight's tensor (tied after the "
                    "Monitor was built?); build a new Monitor for the model as it is now")
                slots[id(s.param)] = s
                continue
            if p is None:
                s.gone = (f"no longer a weight of the model under the name '{s.name}' (removed, tied to another weight, "
                          "or replaced by a parametrization after the Monitor was built); build a new Monitor for the model "
                          "as it is now")
                slots[id(s.param)] = s
                continue
            moved[id(s.param)], s.param, s.gone = id(p), p, ""
            slots[id(p)] = s
        self.slots = slots
        self._heads = {moved.get(i, i) for i in self._heads}
        self._task_heads = R.task_heads(self.model)
        for pid, role in R.static_roles(self.model).items():
            if pid in slots and pid in moved.values():
                slots[pid].role = role
        if added := sorted(set(now) - self._known):
            self._known |= set(added)
            warnings.warn(f"specscope probe: weights {added[:4]}{' …' if len(added) > 4 else ''} appeared in the model "
                          "after the Monitor was built and are not measured; build a new Monitor for the model as it is now",
                          stacklevel=_user_level())

    def _arm(self, step: int) -> None:
        self._follow_replaced()
        self._check_ranks_agree()  # before this step's forward: `power` reduces there
        self._step = step
        warm = self._last_measured == step - 1  # consecutive measurements: skip the power refinement
        self._last_measured = step
        for s in self.slots.values():
            s.begin_step()
            for st in [s.stats, *s.block_stats.values()]:
                if st is not None:
                    st.reset(refine=not warm)
            if s.tokens is not None:
                s.tokens.reset()
        self._stack = ExitStack()
        self._stack.enter_context(torch.compiler.set_stance("force_eager"))  # a compiled model runs eagerly here
        self._fsdp = self._fsdp or W.sharded(self.model)  # a model sharded after the Monitor was built (its weights followed)
        self._watch = Watch(self.model, self.slots, self._new_stats, self._serial, fsdp=self._fsdp)
        if W.PARAM_WATCH and self._backward_seen and ParamWatch.applies(self._watch):
            self._stack.enter_context(ParamWatch(self._watch))
        else:
            self._stack.enter_context(CallWatch(self._watch))

    def _disarm(self) -> None:
        stack, self._stack, self._step = self._stack, None, None
        if stack is not None:
            stack.close()
        if self._watch is not None:  # keep what the records need; drop the held inputs and copies
            if self._watch.backward_seen:
                self._heads, self._backward_seen = self._watch.heads, True
            self._watch = None

    def _new_stats(self, kind: str, n: int, groups: int = 1):
        """Fresh input statistics of this Monitor's estimator for a weight with n input features (per group)."""
        st = make_stats(kind, n, self.estimator, groups=groups, **self._stats_kw)
        st.reset(refine=True)
        return st

    # -- turning statistics into records ------------------------------------------------------------
    def _active_stats(self, s: Slot, rows: tuple[float, float] | None = None):
        """The statistics a slot is measured by this step: dense use wins over lookups (tied weights). `rows`: the
        (dense, lookup) rows of the global batch, when they differ from this process's."""
        dense, lookup = rows or (s.stats.rows if s.stats is not None else 0, s.tokens.rows if s.tokens is not None else 0)
        if s.stats is not None and dense > 0 and s.kind != "embedding":
            return s.stats
        if s.tokens is not None and lookup > 0:
            return s.tokens
        return None

    def _global_rows(self) -> dict[int, tuple[float, float]] | None:
        """Per slot, the (dense, lookup) rows of the global batch, so that every rank measures the same weights and
        reduces the same statistics (a rank whose batch was empty, or routed no token to an expert, has 0 rows of
        its own). A weight some rank has no statistics for (never multiplied there) gets a problem on every rank.
        None with one process."""
        if D.world_size() == 1:
            return None
        slots = list(self.slots.values())
        self._check_ranks_agree()
        experts = [s.kind == "experts" for s in slots]  # a stack's statistics are its experts'
        # a weight this rank used on an earlier step but not on this one has statistics emptied by the step's reset:
        # nothing to reduce (its all-reduce would be handed None), so it counts as having none here
        local = torch.tensor([[sum(b.rows for b in s.block_stats.values()) if x else s.stats.rows if s.stats is not None else 0,
                               s.tokens.rows if s.tokens is not None else 0, not s.block_stats if x else not _filled(s.stats),
                               s.tokens is None, bool(s.problem)] for s, x in zip(slots, experts)], dtype=torch.float64,
                             device=_reduce_device(slots))
        (total,) = D.all_reduce_sum([local])
        out = {}
        for s, (dense, lookup, no_stats, no_tokens, problem) in zip(slots, total.tolist()):
            if problem and not s.problem:
                s.problem = "another rank could not pair it in this step (its warning there gives the reason)"
            elif (no_stats and dense > 0) or (no_tokens and lookup > 0):
                s.problem = ("used on some ranks only so far, or in this step (e.g. an expert no token of one rank's batch "
                             "has been routed to, a task head one rank's batch skipped): its input statistics are not on "
                             "every rank, so its st(A) is not measured in this step (its gradient's nr(G) is)")
            out[id(s)] = (dense, lookup)
        return out

    def _finish_inputs(self, step: int) -> dict[int, _Inputs]:
        """Reduce the input statistics over ranks and turn them into st(A) per slot."""
        if self._heads:  # a backward pass was seen: the head is what the loss is computed from
            for pid, s in self.slots.items():
                if s.role != "embedding":
                    s.role = "head" if pid in self._heads or pid in self._task_heads else "hidden"
        for s in self.slots.values():  # added to activations or used through exp(W), never multiplied: a table
            if s.kind == "" and R.used_as_table(s.other_ops):
                s.role = "embedding"
            elif s.kind == "experts":  # a stack of hidden matrices, not a [1, tokens, d] table
                s.role = "hidden"
        active = []  # (slot, output range or None for the weight's own input, statistics)
        for s in self.slots.values():
            s.check_ranges()
        rows_of = self._global_rows()
        for s in self.slots.values():
            if s.kind == "experts":
                active += self._expert_stats(s, rows_of is not None) if not s.problem else []
                continue
            st = self._active_stats(s, rows_of and rows_of[id(s)])
            if st is not None and not s.problem:
                active.append((s, None, st))
                active += [(s, r, b) for r, b in s.block_stats.items() if s.slice_range and r != s.main_range and b.rows > 0]
        sizes = [len(st.tensors()) for *_, st in active]
        flat = [t for *_, st in active for t in st.tensors()]
        rows = torch.tensor([st.rows for *_, st in active], dtype=torch.float64,
                            device=_reduce_device(list(self.slots.values())) if rows_of is not None else None)
        *flat, rows = D.all_reduce_sum(flat + [rows])
        if rows_of is not None and any(s.kind == "experts" for s, *_ in active):  # an expert no rank routed a row to
            keep = [s.kind != "experts" or r > 0 for (s, *_), r in zip(active, rows.tolist())]
            at = [0, *itertools.accumulate(sizes)]
            flat = [t for i, k in enumerate(keep) if k for t in flat[at[i]:at[i + 1]]]
            active, rows = [a for a, k in zip(active, keep) if k], rows[torch.tensor(keep, device=rows.device)]
        i = 0
        for *_, st in active:
            k = len(st.tensors())
            st.set_tensors(flat[i : i + k])
            i += k
        active, rows = self._with_unions(active, rows)
        grams = [p for *_, st in active for p in getattr(st, "parts", [st]) if isinstance(p, GramStats)]  # one batched solve
        done = dict(zip(map(id, grams), finish_grams(grams)))

        def pair(st) -> tuple[torch.Tensor, torch.Tensor]:
            if isinstance(st, GroupedStats) and id(st.parts[0]) in done:
                return st.combine([done[id(p)] for p in st.parts])
            return done[id(st)] if id(st) in done else st.finish()

        pairs = [pair(st) for *_, st in active]
        if not pairs:
            return {}
        vals = _host_pairs(pairs)
        out, bad = {}, []
        for (s, block, st), (fro2, lam), r in zip(active, vals, rows.tolist()):
            flag = "" if math.isfinite(fro2) and math.isfinite(lam) else "nonfinite"
            if flag:
                bad.append((s, st))
            elif fro2 == 0:
                flag = "zero_input"  # st(0) is undefined: recorded as NaN with this flag, not an error
            value = fro2 / lam if not flag else float("nan")
            out[id(s.param) if block is None else (id(s.param), block)] = _Inputs(value, int(r), st.n, st.estimator, flag)
        # in forward order: the first non-finite input is where the NaN/Inf appeared, the later ones are downstream of
        # it (a tied embedding's slot comes first in the model, its input — the head's — last in the forward)
        for s, st in sorted(bad, key=lambda b: _first_seen(b[0])):
            self._bad(f"non-finite activation entering '{s.name}' at step {step}"
                      + (" (or a finite one whose float32 Gram overflowed: entries beyond ≈ 1e18)" if st.estimator == "gram" else ""))
        return out

    @staticmethod
    def _with_unions(active: list, rows: torch.Tensor) -> tuple[list, torch.Tensor]:
        """`active` and its (global) row counts, with a statistics object for each split slice that several products
        covered (`Slot.slice_union`): the sum of the Grams of the blocks holding its inputs, formed after the reduction
        over ranks; a problem where the blocks' statistics are not Grams of those inputs alone."""
        out, counts = list(active), rows.tolist()
        for s in {id(s): s for s, *_ in active if s.slice_union}.values():
            mine = [(st, r) for (slot, _, st), r in zip(active, counts) if slot is s]
            for ranges in dict.fromkeys(s.slice_union.values()):
                keys = set().union(*(s.inputs[r] for r in ranges))
                members = [(st, r) for st, r in mine if isinstance(st, GramStats) and keys & set(st.keys)]
                if any(not isinstance(st, GramStats) or (keys & set(st.keys) and set(st.keys) - keys) for st, _ in mine):
                    s.problem = (f"a slice of its split is multiplied by the inputs of several products; the probe sums "
                                 f"their Grams with estimator='gram' (this Monitor's is '{mine[0][0].estimator}') and "
                                 "where no block's input is another's; give the products' inputs their own weights")
                    keep = [slot is not s for slot, *_ in out]  # unmeasured, with that reason: no slice's st(A) is wrong
                    out, counts = [a for a, k in zip(out, keep) if k], [c for c, k in zip(counts, keep) if k]
                    break
                union = GramStats(s.n_features)
                for st, _ in members:
                    st._materialize()
                    if st.C is not None:
                        union.add_gram(st.C, st.rows, tuple(st.keys))
                out.append((s, ranges, union))
                counts.append(sum(r for _, r in members))
        return out, torch.tensor(counts, dtype=rows.dtype, device=rows.device)

    @staticmethod
    def _expert_stats(s: Slot, distributed: bool) -> list:
        """(slot, block, statistics) of the experts of a stack that were routed rows in this step; under torch.distributed
        every expert's, those with none given an empty batch, so that each rank reduces the same tensors."""
        if distributed:
            for block, st in s.block_stats.items():
                if st.rows == 0:  # a key of its own: empty inputs must not read as one shared input (finish_grams)
                    empty = torch.zeros(0, s.n_features, device=s.param.device)
                    st.add(empty, None, ("empty", s.name, block)) if isinstance(st, GramStats) else st.add(empty)
        return [(s, r, s.block_stats[r]) for r in sorted(s.block_stats) if distributed or s.block_stats[r].rows > 0]

    @staticmethod
    def _input_of(inputs: dict, s: Slot, name: str) -> _Inputs | None:
        """st(A) for a recorded weight or slice: its output block's own input where blocks differ."""
        block = s.slice_union.get(name) or s.slice_range.get(name)
        if block is not None and block != s.main_range:
            return inputs.get((id(s.param), block))
        return inputs.get(id(s.param))

    def _unmeasured_reason(self, s: Slot, has_grad: bool) -> str:
        if s.gone:
            return s.gone
        if s.problem:
            return s.problem
        if R.used_as_table(s.other_ops) and s.other_ops & R.NONLINEAR:
            return (f"used through {', '.join(sorted(s.other_ops))}, never multiplied as it stands (Mamba's A_log, used as "
                    "exp(A_log)): its entries are values of a function, not an operator on an input; routed as an embedding, "
                    "it has no input matrix")
        if s.other_ops and s.other_ops <= R.ADDITIVE and s.name.rsplit(".", 1)[-1].lower().endswith("bias"):
            return (f"a stack of biases {list(s.param.shape)} (one vector per expert, as GPT-OSS's per-expert biases), "
                    f"{', '.join(sorted(s.other_ops))} to outputs, never multiplied: routed with the biases (AdamW), it "
                    "has no input matrix")
        if s.other_ops and s.other_ops <= R.ADDITIVE:
            return (f"used as a table ({', '.join(sorted(s.other_ops))}), indexed, added to activations or fed to a layer as its "
                    "input, never multiplied as an operator (learned positions, a class token, a relative-position table, a "
                    "bare-parameter lookup): routed as an embedding, it has no input matrix")
        if s.kind == "observed" and s.inputs:  # paired by hand (its einsum/bmm is why): what it was given had no rows
            return EMPTY_BATCH
        if s.other_ops & STACK_PRODUCTS and s.param.dim() >= 3:
            return (f"multiplied by {', '.join(sorted(s.other_ops))} as a stack of matrices {list(s.param.shape)} in a way the "
                    "probe cannot split by expert: it measures a stack's experts where it sees each expert's rows — "
                    "torch._grouped_mm with offsets, one expert at a time (W[e]), or W[expert_ids] then bmm (transformers' "
                    "experts_implementation 'grouped_mm', 'eager', 'batched_mm')")
        if s.other_ops:
            how = " (a torch.einsum runs as bmm)" if "bmm" in s.other_ops else ""
            scaled = (" (if a nonlinear function follows, as in exp(-W), the weight is a table: route it with "
                      "spectral_param_groups(exclude=...))" if s.other_ops <= R.SCALING else "")
            return (f"used by {', '.join(sorted(s.other_ops))}{how}, which the probe does not pair; pass its inputs with "
                    f"monitor.observe('{s.name}', weight, inputs){scaled}")
        if s.inputs or (s.forward_seen and s.tokens is not None):  # a product or a lookup was seen, with no rows
            return EMPTY_BATCH
        if not has_grad:
            return NOT_USED
        return ("has a gradient but no product with it was seen in this step's forward: run the forward inside "
                "`with monitor.step(step)` (enter a torch.autocast region inside it too: autocast caches its cast weights "
                "across steps), or, for a product the probe cannot see, pass its inputs with monitor.observe")

    def _measure(self, step: int, inputs: dict[int, _Inputs], grad_of: Callable[[Slot], torch.Tensor | None], reduce: bool = True) -> None:
        self._record(step, inputs, self._gradients(grad_of, reduce))

    def _gradients(self, grad_of: Callable[[Slot], torch.Tensor | None], reduce: bool = True) -> _Gradients:
        """The step's gradient matrices (averaged over ranks where nothing else did), their spectra started."""
        slots, mats, has_grad = [], [], set()
        for s in self.slots.values():
            g = grad_of(s)
            if g is None:
                continue
            has_grad.add(id(s))
            slots.append(s)
            mats.append(s.grad_matrix(g.detach()))
        if reduce and self.gradient == "grad" and not self._grads_reduced:
            if D.world_size() > 1:
                slots, mats, has_grad = self._on_every_rank(slots, mats, has_grad)
            mats = D.all_reduce_mean(mats)
        named = [(nm, s, G) for s, M in zip(slots, mats) for nm, G in s.slices(M)]
        # FSDP2: sharded gradients are measured through the all-reduced Gram of their shards (probe/distributed.py)
        spectra = D.gradient_spectra_later([G for _, _, G in named], exact=self.estimator == "exact", dtype=self.grad_gram_dtype)
        return _Gradients(named, spectra, has_grad)

    def _check_ranks_agree(self) -> None:
        """A ConfigError, on every rank, when the ranks' Monitors track different weights (a weight frozen on one rank
        before its Monitor was made): their sized all-reduces would not match. Checked once, before the first."""
        if self._ranks_agree or D.world_size() == 1:
            return
        slots = list(self.slots.values())
        for s in slots:  # HSDP, tensor parallelism: one ConfigError before any collective, not a ValueError mid-step
            D.check_supported(s.param)
        names = "\n".join(f"{s.name} {tuple(s.param.shape)} {s.param.dtype}" for s in slots).encode()
        if not D.same_on_every_rank([len(slots), zlib.crc32(names)], _reduce_device(slots)):
            raise ConfigError(f"Monitor: the ranks measure different weights, or weights of other shapes or dtypes (this rank's Monitor has {len(slots)}, e.g. "
                              f"{self.layers[:3]}): build the Monitor on every rank from the same model with the same "
                              "include/exclude/split, and freeze weights (requires_grad=False) on every rank alike, before "
                              "the Monitor is made")
        settings = self._settings()  # a rank measuring steps the others skip, or reducing other statistics, waits for ever
        if not D.same_on_every_rank([zlib.crc32(repr(settings).encode())], _reduce_device(slots)):
            raise ConfigError(f"Monitor: the ranks' Monitors are set up differently (this rank's: {settings}): give every "
                              "rank the same every/log_spaced/estimator/gradient/extras/topk/power options")
        self._ranks_agree = True

    def _settings(self) -> dict:
        """What decides which steps are measured and which statistics the ranks reduce together."""
        gradient = self.gradient if isinstance(self.gradient, str) else "a callable"
        return {"every": self.every, "log_spaced": self.log_spaced, "estimator": self.estimator, "gradient": gradient,
                "extras": self.extras, "topk": self.topk, "grad_gram_dtype": str(self.grad_gram_dtype), **self._stats_kw}

    def _on_every_rank(self, slots: list[Slot], mats: list[torch.Tensor], has_grad: set[int]):
        """The weights some rank has a gradient of, in one order on every rank, a zero gradient where this rank has
        none (a branch its batch skipped, a weight frozen here): the ranks' all-reduces then agree in size (they
        once did not, and gloo aborted; NCCL hangs), and the mean counts this rank's zero as DDP's does."""
        self._check_ranks_agree()
        every = list(self.slots.values())
        mine = torch.tensor([id(s) in has_grad for s in every], dtype=torch.float64, device=_reduce_device(every))
        (anyone,) = D.all_reduce_sum([mine])
        own = {id(s): M for s, M in zip(slots, mats)}
        kept = [s for s, n in zip(every, anyone.tolist()) if n > 0]
        grads = [own[id(s)] if id(s) in own else s.grad_matrix(torch.zeros(s.param.shape, dtype=s.param.dtype,
                                                                             device=s.param.device)) for s in kept]
        return kept, grads, {id(s) for s in kept}

    def _record(self, step: int, inputs: dict[int, _Inputs], grads: _Gradients) -> None:
        """The step's records: unmeasured weights with their reasons, then, once the gradients' spectra are
        in, st(A), nr(G) and the rest per measured weight."""
        self.unmeasured.clear()
        for s in self.slots.values():
            seen = id(s.param) in inputs or (s.kind == "experts" and not s.problem and any((id(s.param), r) in inputs for r in s.block_stats))
            if not seen or id(s) not in grads.has_grad:
                why = self.unmeasured[s.name] = (self._unmeasured_reason(s, id(s) in grads.has_grad) if not seen
                                                 else FROZEN if not s.param.requires_grad
                                                 else NO_SOURCE_GRADIENT if callable(self.gradient) else NO_GRADIENT)
                shape = "x".join(map(str, s.grad_matrix(s.param.detach()).shape))
                self._records.append(Record(step, s.name, "unmeasured", 1.0, shape=shape, flag=why))
                if s.name not in self._warned:
                    self._warned.add(s.name)
                    warnings.warn(f"specscope probe: '{s.name}' is unmeasured: {why}", stacklevel=_user_level())
        if self.slots and all(v == NOT_USED for v in self.unmeasured.values()) and len(self.unmeasured) == len(self.slots) \
                and "<none used>" not in self._warned:
            self._warned.add("<none used>")
            warnings.warn(f"specscope probe: none of the {len(self.slots)} weights of this Monitor's model was used in step "
                          f"{step}: is the model that ran the forward the one the Monitor was built on? A copy (copy.deepcopy, "
                          "an EMA or teacher model, a framework that copies the model) trains other tensors: build the Monitor "
                          "on the model that runs; or the forward ran outside `with monitor.step(step)`", stacklevel=_user_level())
        fro, nuc = grads.spectra()
        named = grads.named
        if self.extras:  # the extras need whole matrices: gather sharded ones
            named = [(nm, s, D.whole(G)) for nm, s, G in named]
        nr_est = "exact" if self.estimator == "exact" else E.nuclear_route(named[0][2].device if named else torch.device("cpu"))
        fro, nuc = torch.stack([fro, nuc.to(fro.device, fro.dtype)]).tolist() if len(fro) else ([], [])  # one device-to-host copy
        for (nm, s, G), f, n in zip(named, fro, nuc):
            self._records_for(step, nm, s, G, f, n, nr_est, self._input_of(inputs, s, nm))

    def _records_for(self, step: int, name: str, slot: Slot, G: torch.Tensor, fro: float, nuc: float, nr_est: str, a: _Inputs | None) -> None:
        gshape = "x".join(map(str, G.shape))
        gflag = "" if math.isfinite(fro) else "nonfinite"
        if fro == 0:
            gflag = "zero_gradient"  # nr(0) is undefined: recorded as NaN with this flag (a zero_grad inside the block?)
        if gflag == "nonfinite":
            self._bad(f"non-finite gradient of '{name}' at step {step}")
        nr = (nuc / fro) ** 2 if fro > 0 and not gflag else float("nan")  # REFERENCE §1: ‖G‖_*² / ‖G‖_F²
        rec = self._records.append
        if a is not None:
            if math.isfinite(a.st) and a.st > 0:  # a zero or non-finite input (flagged) leaves the last defined st(A)
                self._latest_st[name] = a.st
            self._latest_inputs[name] = (a.rows, a.estimator)
            rec(Record(step, name, "stable_rank", a.st, estimator=a.estimator, rows=a.rows, shape=f"{a.rows}x{a.n}", flag=a.flag))
            rec(Record(step, name, "spectral_advantage", nr / a.st, estimator=f"{nr_est}/{a.estimator}", rows=a.rows, shape=gshape, flag=a.flag or gflag))
            if math.isfinite(nr / a.st):
                self._history.setdefault(name, deque(maxlen=self._history_len)).append((step, a.st, nr))
        rows = G.shape[0]
        rec(Record(step, name, "grad_fro_norm", fro, estimator="exact", rows=rows, shape=gshape, flag=gflag))
        if slot.param.dim() >= 3 and slot.kind not in ("conv", "experts"):  # a stack of matrices (MoE experts [E, out, in])
            return  # not measured per expert: its [E, out·in] flattening is no weight's gradient matrix, so it has no nr(G)
        rec(Record(step, name, "nuclear_rank", nr, estimator=nr_est, rows=rows, shape=gshape, flag=gflag))
        rec(Record(step, name, "grad_nuclear_norm", nuc, estimator=nr_est, rows=rows, shape=gshape, flag=gflag))
        if gflag:
            return
        if "topk" in self.extras:
            for i, sv in enumerate(L.singular_values(G.double())[: self.topk].tolist(), 1):
                rec(Record(step, name, f"grad_sigma_{i}", sv, estimator="exact", rows=rows, shape=gshape))
        if "entropy_rank" in self.extras:
            rec(Record(step, name, "entropy_rank", float(L.entropy_rank(G.double())), estimator="exact", rows=rows, shape=gshape))
        if "weight_stable_rank" in self.extras:
            W = dict(slot.slices(D.whole(slot.grad_matrix(slot.param.detach()))))[name]
            rec(Record(step, name, "weight_stable_rank", float(L.stable_rank(W)), estimator="exact", rows=rows, shape=gshape))

    def _bad(self, message: str) -> None:
        if self.nonfinite == "raise":
            self._pending = None
            err = NonFiniteError(f"{message}; lower the learning rate or check the data, or use Monitor(nonfinite='warn') to "
                                 "record it and go on (nonfinite='skip' under fp16 loss scaling, whose GradScaler skips "
                                 "such steps)")
            err.problem = message  # where and when, for a caller that words the fix its own way (the CLI)
            raise err
        if self.nonfinite == "skip":
            return
        warnings.warn(f"specscope probe: {message} (recorded with flag='nonfinite')", stacklevel=_user_level())

    def _gradient_name(self) -> str:
        return self.gradient if isinstance(self.gradient, str) else getattr(self.gradient, "__name__", "callable")

    # -- verdicts -----------------------------------------------------------------------------------
    def advice(self, window: int = 20, margin: float = _advice.MARGIN):
        """Per weight: median st(A), nr(G) and nr/st over the last `window` measurements, and a verdict
        (probe.advice.verdict: "spectral", "euclidean", "undecided", or "unmeasured" with the reason)."""
        return _advice.advice_table(self._history, self._describe(), window=window, margin=margin)

    def param_groups(self, model: nn.Module | None = None, *, window: int = 20, margin: float = _advice.MARGIN, **kwargs) -> list[dict]:
        """Optimizer parameter groups from the verdicts and the roles (see probe.advice.param_groups)."""
        model = self.model if model is None else model
        while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
            model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
        return _advice.param_groups(model, self.advice(window, margin), self.slots.values(), **kwargs)

    def _describe(self) -> dict[str, dict]:
        out = {}
        for s in self.slots.values():
            M = s.grad_matrix(s.param.detach())
            for nm, blk in s.slices(M):
                why = self.unmeasured.get(s.name, "")
                if not why and s.kind == "experts" and nm not in self._history:
                    why = NEVER_ROUTED
                default = "" if why else self.estimator if s.kind != "embedding" else "closed_form"  # unmeasured: no estimator ran
                rows, est = self._latest_inputs.get(nm, (0, default))
                kind = s.kind or ("unpaired" if why and why != NOT_USED else "unseen")  # used, by ops it cannot pair
                out[nm] = {"kind": kind, "shape": "x".join(map(str, blk.shape)), "rows": rows, "estimator": est,
                           "unmeasured": why, "unused": why in (NOT_USED, EMPTY_BATCH, NEVER_ROUTED), "role": s.role}
        return out

    # -- persistence ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Warm-start blocks, advice history and latest st(A) (resume gives the same next measurement), and what the
        measured steps learned: each weight's use and role, the unmeasured weights and their reasons, the latest
        rows and estimators (roles=monitor routing and the advice table read them after a resume)."""
        return {
            "version": 1,
            "stats": {s.name: s.stats.state() for s in self.slots.values() if s.stats is not None}
            | {f"{s.name}@{a}:{b}": st.state() for s in self.slots.values() for (a, b), st in s.block_stats.items()},
            "history": {k: list(v) for k, v in self._history.items()},
            "latest_st": dict(self._latest_st),
            "slots": {s.name: {"kind": s.kind, "n_features": s.n_features, "out_dim": s.out_dim, "role": s.role}
                      for s in self.slots.values()},
            "shapes": {s.name: list(s.param.shape) for s in self.slots.values()},  # load_state_dict checks the model
            "unmeasured": dict(self.unmeasured),
            "latest_inputs": {k: list(v) for k, v in self._latest_inputs.items()},
            "last_measured": self._last_measured,  # a measurement right after it starts warm, as it would have
            "grouped_st": "per_group",  # a grouped convolution's st(A): Σ_g‖A_g‖_F² / max_g‖A_g‖₂² (not the stacked patches')
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s state, saved by a Monitor of the same model (layer names and shapes are checked:
        a refused state leaves this Monitor as it was). Measured steps start afresh: any step number may come next."""
        if not isinstance(state, dict):
            raise ConfigError(f"Monitor.load_state_dict({type(state).__name__}): pass the dict a Monitor's state_dict() returned")
        if "version" not in state:  # a model's or an optimizer's state_dict, say
            keys = ", ".join(map(repr, list(state)[:4])) + (", …" if len(state) > 4 else "")
            raise ConfigError(f"Monitor.load_state_dict: this dict (keys {keys or 'none'}) is not a Monitor's state; pass "
                              "the dict a Monitor's state_dict() returned")
        if state["version"] != 1:
            raise ConfigError(f"Monitor state version {state['version']!r} is not supported (expected 1)")
        if missing := [k for k in ("stats", "history", "latest_st") if not isinstance(state.get(k), dict)]:
            raise ConfigError(f"Monitor state has no {missing}: pass the dict a Monitor's state_dict() returned, unchanged")
        last = state.get("last_measured")  # absent in states saved before it was kept
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
            raise ConfigError(f"Monitor state's last_measured is {last!r}, not a step (an int >= 0) or None: pass the dict a "
                              "Monitor's state_dict() returned, unchanged; nothing was loaded")
        self._check_state_layers(state)
        by_name = {s.name: s for s in self.slots.values()}
        stats, history, latest_st, slots, unmeasured, latest_inputs = _read_state(state, by_name, self._history_len)
        if state.get("grouped_st") != "per_group":  # saved when a grouped conv's st(A) was its stacked patches'
            grouped = {id(m.weight) for m in self.model.modules() if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1}
            if old := [s.name for s in self.slots.values() if id(s.param) in grouped and s.name in history]:
                warnings.warn(f"Monitor.load_state_dict: the history of the grouped convolution(s) {old[:4]} was measured "
                              "when their st(A) was that of the groups' patches stacked (up to `groups` times lower); it is "
                              "dropped, and their advice starts from the next measured step", stacklevel=2)
                for name in old:
                    history.pop(name, None)
                    latest_st.pop(name, None)
        for s, block, st in stats:  # everything read and checked: nothing below can fail half-way
            groups = len(st["V_groups"]) if "V_groups" in st else 1  # a grouped convolution's, one block per group
            fresh = make_stats(s.kind or "linear", st["V"].shape[0], self.estimator, groups=groups, **self._stats_kw)
            if block:
                s.block_stats[block] = s.block_stats.get(block) or fresh
                s.block_stats[block].load_state(st)
            else:
                s.stats = s.stats if s.stats is not None and groups_of(s.stats) == groups else fresh
                s.stats.load_state(st)
        self._history, self._latest_st = history, latest_st
        for s, seen in slots:
            s.kind, s.n_features, s.out_dim, s.role = seen
        self.unmeasured.clear()
        self.unmeasured.update(unmeasured)
        self._warned |= set(self.unmeasured)  # warned about in the run that measured it
        self._latest_inputs = latest_inputs
        self._last_step = None  # a resumed run goes on from its checkpoint's step, whatever this Monitor measured
        self._last_measured = last

    def _check_state_layers(self, state: dict) -> None:
        """ConfigError unless `state` was saved by a Monitor of the same weights: its layers are this Monitor's, with
        the same shapes and recorded names (the same split). Weights it measured through observe() are exempt: a resumed
        run observes them again (under their names: a tracked weight is observed under its own)."""
        by_name = {s.name: s for s in self.slots.values()}
        saved = state.get("slots")  # absent in states saved before it was kept: the names it records are checked then
        saved = saved if isinstance(saved, dict) else {}
        observed = {n for n, v in saved.items() if isinstance(v, dict) and v.get("kind") == "observed"}
        mine = {n for n, s in by_name.items() if s.kind != "observed"}
        extra, missing = sorted(set(saved) - observed - mine), sorted(mine - set(saved))
        shapes = state.get("shapes") or {}
        differ = sorted(n for n in mine & set(shapes) - observed if tuple(shapes[n]) != tuple(by_name[n].param.shape))
        recorded = set(state["history"]) | set(state["latest_st"]) | set(state.get("latest_inputs") or ())  # recorded names
        warm = {_stats_key(k, by_name)[0] for k in state["stats"]}  # by weight
        known = set(self.layers) | {expert_name(s.name, e) for s in by_name.values() if s.param.dim() == 3  # a stack measured
                                    for e in range(s.param.shape[0])}  # per expert there, not yet here
        unknown = sorted((recorded - known - observed) | (warm - known - set(by_name) - observed))
        if extra or (saved and missing and not observed):
            why = (f"it has layers {extra[:6]} that this Monitor has not" if extra else
                   f"this Monitor's layers {missing[:6]} are not in it")
        elif differ:
            why = "; ".join(f"'{n}' is {tuple(shapes[n])} there, {tuple(by_name[n].param.shape)} here" for n in differ[:6])
        elif unknown:
            why = f"it records {unknown[:6]}, which this Monitor does not (another split?)"
        else:
            return
        raise ConfigError(f"Monitor.load_state_dict: the state is of other weights than this Monitor's ({why}); load "
                          "the state saved with this model, or build the Monitor as that run did (same model, include, "
                          "exclude, split); nothing was loaded")

    def close(self) -> None:
        """Disarm and drop pending state; the monitor measures nothing afterwards."""
        self._disarm()
        self._pending, self._closed = None, True
        self.every, self.log_spaced = None, 0

    def __repr__(self) -> str:
        return f"Monitor({len(self.layers)} weights, every={self.every}, estimator={self.estimator!r}, unmeasured={list(self.unmeasured)})"


def _stats_key(key, names) -> tuple[str, str]:
    """(layer, "a:b" or "") of a state's stats key: a layer's own name (a ModuleDict key may hold an "@"), else
    "layer@a:b", split at its last "@"."""
    key = str(key)
    if key in names or "@" not in key:
        return key, ""
    name, _, block = key.rpartition("@")
    return name, block


def _read_state(state: dict, by_name: dict[str, Slot], history_len: int):
    """The parts of a Monitor state, each value checked (a ConfigError naming the entry): warm blocks as
    (slot, output block or None, stats state), the advice history, latest st(A), the slots' learned use, the
    unmeasured reasons and the latest inputs. Entries of weights this Monitor has not (observed ones) are skipped."""
    def bad(where: str, what: str) -> ConfigError:
        return ConfigError(f"Monitor.load_state_dict: {where} is {what}; the state was changed after it was saved: load "
                           "the dict a Monitor's state_dict() returned, unchanged; nothing was loaded")

    def positive(x) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0

    def whole(x) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0

    saved_slots = state.get("slots") if isinstance(state.get("slots"), dict) else {}
    stats = []
    for key, st in state["stats"].items():
        name, block = _stats_key(key, by_name)  # "layer@a:b": an output block with its own input
        s = by_name.get(name)
        if not isinstance(st, dict):
            raise bad(f"stats[{key!r}]", f"a {type(st).__name__}, not a dict")
        V = st.get("V")
        if s is None or V is None:  # warm blocks of "power" and "gram" only
            continue
        n = (saved_slots.get(name) or {}).get("n_features") if isinstance(saved_slots.get(name), dict) else None
        if not (isinstance(V, torch.Tensor) and V.dim() == 2 and V.is_floating_point() and V.shape[1] >= 1
                and (not whole(n) or n == 0 or V.shape[0] == n) and bool(torch.isfinite(V).all())):
            shape = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise bad(f"stats[{key!r}]['V']", f"{shape}, not a finite n × block warm start" + (f" with n = {n}" if whole(n) and n else ""))
        Vg = st.get("V_groups", [V])  # a grouped convolution's: a warm block per group, V the first
        if not (isinstance(Vg, list) and (len(Vg) >= 2 or "V_groups" not in st) and all(
                isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == V.shape and bool(torch.isfinite(v).all()) for v in Vg)):
            what = f"a list of {[tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in Vg][:4]}" \
                if isinstance(Vg, list) else f"a {type(Vg).__name__}"
            raise bad(f"stats[{key!r}]['V_groups']", f"{what}, not a list of 2 or more finite {V.shape[0]} × {V.shape[1]} warm "
                                                     "starts, one per group")
        r = None
        if block:
            parts = block.split(":")
            if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) >= int(parts[1]):
                raise bad(f"stats key {key!r}", "not 'layer@a:b' with a < b")
            r = (int(parts[0]), int(parts[1]))
        stats.append((s, r, st))
    history = {}
    for name, entries in state["history"].items():
        if not isinstance(entries, (list, tuple)) or not all(
                isinstance(e, (list, tuple)) and len(e) == 3 and whole(e[0]) and positive(e[1]) and positive(e[2]) for e in entries):
            raise bad(f"history[{name!r}]", "not a list of (step, st(A), nr(G)) with st and nr finite and positive")
        history[name] = deque(map(tuple, entries), maxlen=history_len)
    for name, v in state["latest_st"].items():
        if not positive(v):
            raise bad(f"latest_st[{name!r}]", f"{v!r}, not a finite positive stable rank")
    slots = []
    for name, seen in saved_slots.items():  # absent in states saved before it was kept
        s = by_name.get(name)
        if s is None:
            continue
        if not (isinstance(seen, dict) and seen.get("role") in R.ROLES and seen.get("kind") in KINDS
                and whole(seen.get("n_features")) and whole(seen.get("out_dim"))):
            raise bad(f"slots[{name!r}]", f"{seen!r}, not a role of {list(R.ROLES)} and a kind of {list(KINDS)} with whole "
                                          "n_features and out_dim")
        slots.append((s, (seen["kind"], int(seen["n_features"]), int(seen["out_dim"]), seen["role"])))
    unmeasured = state.get("unmeasured", {})
    if not isinstance(unmeasured, dict) or not all(isinstance(v, str) for v in unmeasured.values()):
        raise bad("unmeasured", "not a dict of reasons (text)")
    latest_inputs = state.get("latest_inputs", {})
    if not isinstance(latest_inputs, dict) or not all(
            isinstance(v, (list, tuple)) and len(v) == 2 and whole(v[0]) and isinstance(v[1], str) for v in latest_inputs.values()):
        raise bad("latest_inputs", "not a dict of (rows, estimator)")
    return (stats, history, dict(state["latest_st"]), slots, {k: v for k, v in unmeasured.items() if k in by_name},
            {k: (int(v[0]), v[1]) for k, v in latest_inputs.items()})


def _first_seen(s: Slot) -> float:
    """The serial number of the first input a slot multiplied in this step's forward (inf: none with a number)."""
    return min((k for keys in s.inputs.values() for k in keys if isinstance(k, int)), default=math.inf)


def _reduce_device(slots: list[Slot]) -> torch.device:
    """Where the probe's small all-reduced counts live: the weights' device (NCCL reduces CUDA tensors only)."""
    return slots[0].param.device if slots else torch.device("cpu")
