"""`Monitor`: st(A) of every weight's input and nr(G) of its gradient, per measured step.

    monitor = Monitor(model, every=10)
    for step in range(T):
        with monitor.step(step):            # hooks armed only on measured steps
            loss_fn(model, batch).backward()  # any number of micro-batches
        opt.step(); monitor.after_optimizer_step()
        run.append(monitor.pop_records())

Measuring never changes training: hooks read detached inputs under no_grad, gradients are read (never
written), and the global RNG is not used.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from specscope.errors import ConfigError, NonFiniteError, SpecscopeError
from specscope.probe import advice as _advice
from specscope.probe import distributed as D
from specscope.probe.estimators import L, make_stats
from specscope.probe.pairing import Slot, find_slots, input_matrix
from specscope.records import Record

ESTIMATORS = ("power", "gram", "exact")
EXTRAS = ("topk", "entropy_rank", "weight_stable_rank")
GradientSource = str | Callable[[str, nn.Parameter], torch.Tensor]


def is_log_step(step: int, per_decade: int = 10) -> bool:
    """True for 0 and for steps nearest to 10^(i/per_decade): about `per_decade` measured steps per decade."""
    if step <= 0:
        return step == 0
    return step == round(10 ** (round(per_decade * math.log10(step)) / per_decade))


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


class Monitor:
    """Pairs each weight of `model` with the matrix of its inputs and measures st(A), nr(G) per step.

    every / log_spaced: a step is measured when `step % every == 0` (every=None: never by this rule) or,
    with log_spaced (True = 10 per decade, or an int), when it is a log-spaced step.
    gradient: "grad" (the accumulated .grad, read on leaving `step()`), "update" (parameter change across
    the optimizer step) or a callable(name, param) -> Tensor (e.g. an optimizer buffer); the last two are
    read in `after_optimizer_step()`.
    estimator: how st(A) is measured — "power" (default, one-pass warm-started block power iteration),
    "gram" (exact up to rounding, n² memory per weight) or "exact" (keeps A; a reference). nr(G) is
    always exact: eigenvalues of the smaller Gram ("gram", formed in `grad_gram_dtype`, float64 by
    default; float32 is ~2x cheaper but spurious singular values ~3e-4·σ_1 then inflate ‖G‖_* of
    low-rank gradients), or an SVD with estimator="exact". The power block is refined `power_iters`
    times on a step's first micro-batch unless the previous step was measured too (it is then warm).
    split: {module pattern: [slice names]} or {pattern: {name: rows}} measures a fused weight's output
    row blocks separately, e.g. {"blocks.*.attn.qkv": ["q", "k", "v"]} records "blocks.0.attn.qkv.q".
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int | None = 1,
        log_spaced: bool | int = False,
        gradient: GradientSource = "grad",
        estimator: str = "power",
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
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ConfigError(f"Monitor(every={every!r}) must be a positive int or None")
        if every is None and not log_spaced:
            raise ConfigError("Monitor(every=None) needs log_spaced=True, or it would never measure")
        if estimator not in ESTIMATORS:
            raise ConfigError(f"Monitor(estimator={estimator!r}) is not one of {ESTIMATORS}")
        if not callable(gradient) and gradient not in ("grad", "update"):
            raise ConfigError(f"Monitor(gradient={gradient!r}) must be 'grad', 'update' or a callable(name, param)")
        if nonfinite not in ("raise", "warn"):
            raise ConfigError(f"Monitor(nonfinite={nonfinite!r}) must be 'raise' or 'warn'")
        self.extras = tuple(extras)
        if bad := [e for e in self.extras if e not in EXTRAS]:
            raise ConfigError(f"Monitor(extras=...) has unknown {bad}; choose from {EXTRAS}")
        if estimator == "exact" and D.world_size() > 1:
            raise ConfigError("estimator='exact' keeps activations and is single-process; use 'gram' or 'power' under torch.distributed")
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.model = model.module if ddp else model
        self._grads_reduced = ddp  # DDP has already averaged .grad over ranks
        self.every, self.log_spaced = every, (10 if log_spaced is True else int(log_spaced))
        self.gradient, self.estimator, self.nonfinite, self.topk = gradient, estimator, nonfinite, topk
        self._stats_kw = dict(block=power_block, iters=power_iters)
        slots, self.unpaired, self._uses = find_slots(self.model, include=include, exclude=tuple(exclude), split=split)
        self.slots: dict[int, Slot] = slots
        for s in slots.values():
            s.stats = make_stats(s.kind, s.n_features, estimator, **self._stats_kw)
        self._handles: list = []
        self._step: int | None = None
        self._pending: _Pending | None = None
        self._records: list[Record] = []
        self._latest_st: dict[str, float] = {}
        self._latest_inputs: dict[str, tuple[int, str]] = {}
        self._history: dict[str, deque] = {}
        self._history_len = history
        self.grad_gram_dtype = grad_gram_dtype
        self._last_measured: int | None = None

    # -- schedule ---------------------------------------------------------------------------------
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
        """Context for one optimizer step's forward/backward passes; measured steps arm the hooks."""
        if self._pending is not None:
            raise SpecscopeError(
                f"step {self._pending.step} was measured with gradient={self._gradient_name()}, which is read after the "
                "optimizer step: call monitor.after_optimizer_step() after optimizer.step()"
            )
        if not self.is_measured(step):
            yield
            return
        self._arm(step)
        try:
            yield
        finally:
            self._disarm()
        inputs = self._finish_inputs(step)
        if self.gradient == "grad":
            self._measure(step, inputs, lambda s: s.param.grad)
        else:
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
            self._measure(p.step, p.inputs, lambda s: self.gradient(s.name, s.param), reduce=False)

    def observe(self, name: str, weight: nn.Parameter, inputs: torch.Tensor) -> None:
        """Pair `weight` (used as F.linear(inputs, weight)) with `inputs`; call it next to that F.linear.

        A no-op outside a measured step, so it can stay in the forward pass.
        """
        if self._step is None or not torch.is_grad_enabled():
            return
        slot = self.slots.get(id(weight))
        if slot is None:
            if name in self.layers:
                raise ConfigError(f"observe('{name}', ...): that name is already a measured weight; pick another")
            slot = Slot(name, weight, "observed", weight.shape[-1], modules=[name])
            slot.stats = make_stats("observed", slot.n_features, self.estimator, **self._stats_kw)
            slot.stats.reset(refine=True)
            self.slots[id(weight)] = slot
            for pname, p in self.model.named_parameters():
                if p is weight:
                    self.unpaired.pop(pname, None)
        if inputs.shape[-1] != slot.n_features:
            raise ConfigError(f"observe('{name}', ...): inputs have {inputs.shape[-1]} features, the weight takes {slot.n_features}")
        with torch.no_grad():
            slot.stats.add(inputs.detach().reshape(-1, slot.n_features))

    def pop_records(self) -> list[Record]:
        """The records made since the last call (hand them to a store)."""
        out, self._records = self._records, []
        return out

    def stable_rank(self, name: str) -> float | None:
        """Latest measured st(A) of the input of weight `name` (None before its first measurement)."""
        if name not in self.layers:
            raise ConfigError(f"no measured weight named '{name}'; known: {self.layers}")
        return self._latest_st.get(name)

    # -- hooks --------------------------------------------------------------------------------------
    def _arm(self, step: int) -> None:
        self._step = step
        warm = self._last_measured == step - 1  # consecutive measurements: skip the power refinement
        self._last_measured = step
        for s in self.slots.values():
            s.stats.reset(refine=not warm)
        for _, module, slot in self._uses:
            self._handles.append(module.register_forward_pre_hook(self._hook(slot), with_kwargs=True))

    def _disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._step = [], None

    @staticmethod
    def _hook(slot: Slot):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not torch.is_grad_enabled():  # evaluation passes do not produce this step's gradient
                return
            x = args[0] if args else next(iter(kwargs.values()))
            with torch.no_grad():
                slot.stats.add(x.detach() if slot.kind == "embedding" else input_matrix(module, x.detach()))

        return hook

    # -- turning statistics into records ------------------------------------------------------------
    def _finish_inputs(self, step: int) -> dict[int, _Inputs]:
        """Reduce the input statistics over ranks and turn them into st(A) per slot."""
        active = [s for s in self.slots.values() if s.stats.rows > 0]
        flat = [t for s in active for t in s.stats.tensors()]
        rows = torch.tensor([s.stats.rows for s in active], dtype=torch.float64)
        *flat, rows = D.all_reduce_sum(flat + [rows])
        i = 0
        for s in active:
            k = len(s.stats.tensors())
            s.stats.set_tensors(flat[i : i + k])
            i += k
        pairs = [s.stats.finish() for s in active]
        if not pairs:
            return {}
        vals = torch.stack([torch.stack([f.double().cpu(), l.double().cpu()]) for f, l in pairs]).tolist()
        out = {}
        for s, (fro2, lam), r in zip(active, vals, rows.tolist()):
            flag = "" if math.isfinite(fro2) and math.isfinite(lam) else "nonfinite"
            if flag:
                self._bad(f"non-finite activation entering '{s.name}' at step {step}")
            elif fro2 == 0:
                flag = "zero_input"  # st(0) is undefined: recorded as NaN with this flag, not an error
            st = fro2 / lam if not flag else float("nan")
            out[id(s.param)] = _Inputs(st, int(r), s.n_features, s.stats.estimator, flag)
        return out

    def _measure(self, step: int, inputs: dict[int, _Inputs], grad_of: Callable[[Slot], torch.Tensor | None], reduce: bool = True) -> None:
        slots, mats = [], []
        for s in self.slots.values():
            g = grad_of(s)
            if g is None:
                continue
            if id(s.param) not in inputs and s.kind != "observed" and s.name not in self.unpaired:
                self.unpaired[s.name] = "has a gradient but its module's forward was never called (weight used functionally?); pass its inputs with monitor.observe"
                warnings.warn(f"specscope probe: {s.name}: {self.unpaired[s.name]}", stacklevel=3)
            slots.append(s)
            mats.append(s.grad_matrix(g.detach()))
        if reduce and self.gradient == "grad" and not self._grads_reduced:
            mats = D.all_reduce_mean(mats)
        named = [(nm, s, G[a:b]) for s, G in zip(slots, mats) for nm, a, b in (s.slices or [(s.name, 0, G.shape[0])])]
        # FSDP2: sharded gradients are measured through the all-reduced Gram of their shards (probe/distributed.py)
        fro, nuc = D.gradient_spectra([G for _, _, G in named], exact=self.estimator == "exact", dtype=self.grad_gram_dtype)
        if self.extras:  # the extras need whole matrices: gather sharded ones
            named = [(nm, s, D.whole(G)) for nm, s, G in named]
        nr_est = "exact" if self.estimator == "exact" else "gram"
        for (nm, s, G), f, n in zip(named, fro.tolist(), nuc.tolist()):
            self._records_for(step, nm, s, G, f, n, nr_est, inputs.get(id(s.param)))

    def _records_for(self, step: int, name: str, slot: Slot, G: torch.Tensor, fro: float, nuc: float, nr_est: str, a: _Inputs | None) -> None:
        gshape = "x".join(map(str, G.shape))
        gflag = "" if math.isfinite(fro) else "nonfinite"
        if gflag:
            self._bad(f"non-finite gradient of '{name}' at step {step}")
        nr = (nuc / fro) ** 2 if fro > 0 and not gflag else float("nan")  # REFERENCE §1: ‖G‖_*² / ‖G‖_F²
        rec = self._records.append
        if a is not None:
            self._latest_st[name] = a.st
            self._latest_inputs[name] = (a.rows, a.estimator)
            rec(Record(step, name, "stable_rank", a.st, estimator=a.estimator, rows=a.rows, shape=f"{a.rows}x{a.n}", flag=a.flag))
            rec(Record(step, name, "spectral_advantage", nr / a.st, estimator=f"{nr_est}/{a.estimator}", rows=a.rows, shape=gshape, flag=a.flag or gflag))
            if math.isfinite(nr / a.st):
                self._history.setdefault(name, deque(maxlen=self._history_len)).append((step, a.st, nr))
        rows = G.shape[0]
        rec(Record(step, name, "nuclear_rank", nr, estimator=nr_est, rows=rows, shape=gshape, flag=gflag))
        rec(Record(step, name, "grad_fro_norm", fro, estimator="exact", rows=rows, shape=gshape, flag=gflag))
        rec(Record(step, name, "grad_nuclear_norm", nuc, estimator=nr_est, rows=rows, shape=gshape, flag=gflag))
        if gflag:
            return
        if "topk" in self.extras:
            for i, sv in enumerate(L.singular_values(G.double())[: self.topk].tolist(), 1):
                rec(Record(step, name, f"grad_sigma_{i}", sv, estimator="exact", rows=rows, shape=gshape))
        if "entropy_rank" in self.extras:
            rec(Record(step, name, "entropy_rank", float(L.entropy_rank(G.double())), estimator="exact", rows=rows, shape=gshape))
        if "weight_stable_rank" in self.extras:
            a_, b_ = next(((a_, b_) for nm, a_, b_ in slot.slices if nm == name), (0, G.shape[0]))
            W = D.whole(slot.grad_matrix(slot.param.detach()))[a_:b_]
            rec(Record(step, name, "weight_stable_rank", float(L.stable_rank(W)), estimator="exact", rows=rows, shape=gshape))

    def _bad(self, message: str) -> None:
        if self.nonfinite == "raise":
            self._pending = None
            raise NonFiniteError(f"{message}; lower the learning rate or check the data, or use Monitor(nonfinite='warn') to record it and go on")
        warnings.warn(f"specscope probe: {message} (recorded with flag='nonfinite')", stacklevel=4)

    def _gradient_name(self) -> str:
        return self.gradient if isinstance(self.gradient, str) else getattr(self.gradient, "__name__", "callable")

    # -- verdicts -----------------------------------------------------------------------------------
    def advice(self, window: int = 20, margin: float = 0.25):
        """Per weight: median st(A), nr(G) and nr/st over the last `window` measurements, and a verdict.

        verdict "spectral" when median nr/st > 1 + margin, "euclidean" when < 1 / (1 + margin), else
        "undecided" (REFERENCE §1: nr/st > 1 means a spectral step has the larger guaranteed decrease).
        """
        return _advice.advice_table(self._history, self._describe(), window=window, margin=margin)

    def param_groups(self, model: nn.Module | None = None, *, window: int = 20, margin: float = 0.25, **kwargs) -> list[dict]:
        """Optimizer parameter groups from the verdicts plus structural rules (see probe.advice.param_groups)."""
        model = self.model if model is None else model
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        return _advice.param_groups(model, self.advice(window, margin), self.slots.values(), **kwargs)

    def _describe(self) -> dict[str, dict]:
        out = {}
        for s in self.slots.values():
            for nm, a, b in s.slices or [(s.name, 0, s.param.shape[0])]:
                rows, est = self._latest_inputs.get(nm, (0, s.stats.estimator))
                out[nm] = {"kind": s.kind, "shape": "x".join(map(str, (b - a, *s.param.shape[1:]))), "rows": rows, "estimator": est}
        return out

    # -- persistence ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Warm-start blocks, advice history and latest st(A) (resume gives the same next measurement)."""
        return {
            "version": 1,
            "stats": {s.name: s.stats.state() for s in self.slots.values()},
            "history": {k: list(v) for k, v in self._history.items()},
            "latest_st": dict(self._latest_st),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ConfigError(f"Monitor state version {state.get('version')!r} is not supported (expected 1)")
        by_name = {s.name: s for s in self.slots.values()}
        for name, st in state["stats"].items():
            if name in by_name:
                by_name[name].stats.load_state(st)
        self._history = {k: deque(map(tuple, v), maxlen=self._history_len) for k, v in state["history"].items()}
        self._latest_st = dict(state["latest_st"])

    def close(self) -> None:
        """Remove any hooks and drop pending state; the monitor measures nothing afterwards."""
        self._disarm()
        self._pending = None
        self._uses = []

    def __repr__(self) -> str:
        return f"Monitor({len(self.layers)} weights, every={self.every}, estimator={self.estimator!r}, unpaired={list(self.unpaired)})"
