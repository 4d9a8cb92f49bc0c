"""What the framework callbacks share: one Monitor step around all micro-batches of an optimizer step, the
records as flat log values, and the one-optimizer spectral/AdamW split."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import re
import sys
import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn

from specscope.errors import ConfigError, NonFiniteError
from specscope.names import layer_name
from specscope.optim import Hybrid, spectral_param_groups
from specscope.probe import Monitor
from specscope.probe.monitor import EXTRAS
from specscope.records import Record, not_measured_in

LOGGED = ("stable_rank", "nuclear_rank", "spectral_advantage", "geometry")  # geometry: AutoGeometry's choice
# what a Monitor records per weight (grad_sigma_<i> and the other extras only when asked for)
METRICS = (*LOGGED, "grad_fro_norm", "grad_nuclear_norm", "entropy_rank", "weight_stable_rank")


def check_metrics(metrics: Any, monitor: Monitor | None = None, options: dict | None = None) -> tuple[str, ...]:
    """`metrics` as a tuple of record names the Monitor makes (`monitor`, or one built with `options`); a ConfigError
    for a string, an unknown name, or the record of an extra it is not given (extras=, topk=): each would log
    nothing, silently."""
    if isinstance(metrics, str) or not isinstance(metrics, Iterable):
        example = metrics if isinstance(metrics, str) else "stable_rank"
        raise ConfigError(f"metrics={metrics!r}: give a tuple of record names, e.g. metrics=({example!r},)")
    metrics = tuple(metrics)
    for m in metrics:
        if m not in METRICS and not re.fullmatch(r"grad_sigma_[1-9][0-9]*", str(m)):
            close = difflib.get_close_matches(str(m), METRICS, n=1)
            raise ConfigError(f"metrics: {m!r} is not a record a Monitor makes; " + (f"did you mean {close[0]!r}? " if close else "")
                              + f"choose from {list(METRICS)} or grad_sigma_<i>")
    extras, topk = _extras(monitor, options or {})
    for m in metrics:
        need = "topk" if m.startswith("grad_sigma_") else m if m in EXTRAS else None
        if need is not None and need not in extras:
            raise ConfigError(f"metrics: {m!r} is recorded only with extras=({need!r},), which this Monitor is not given "
                              f"(its extras are {extras}); add {need!r} to the Monitor's extras=, or leave {m!r} out of metrics")
        if need == "topk" and (i := int(m.removeprefix("grad_sigma_"))) > topk:
            raise ConfigError(f"metrics: {m!r} is recorded only up to topk ({topk} here); pass topk={i} (or more) to the "
                              f"Monitor, or leave {m!r} out of metrics")
    return metrics


def _extras(monitor: Monitor | None, options: dict) -> tuple[tuple[str, ...], int]:
    """The extras and topk of `monitor`, or of a Monitor built with `options` (its defaults where they say nothing)."""
    if monitor is not None:
        return tuple(monitor.extras), monitor.topk
    defaults = inspect.signature(Monitor.__init__).parameters
    return tuple(options.get("extras", defaults["extras"].default)), options.get("topk", defaults["topk"].default)


def check_monitor(monitor: Any, where: str) -> None:
    """A ConfigError unless `monitor` is None or a specscope Monitor (a model passed in its place fails at once)."""
    if monitor is not None and not isinstance(monitor, Monitor):
        raise ConfigError(f"{where}: monitor={type(monitor).__name__} is not a specscope Monitor; pass "
                          "Monitor(model, ...) or the Monitor's keyword arguments (every=10, ...) instead")


def check_starts_after(monitor: Monitor, step: int, where: str, fix: str) -> None:
    """A ConfigError when a training loop starts at `step` and `monitor` has measured that step or a later one (a
    second `trainer.train()`, which restarts at 0; a new Trainer given a finished fit's callback): its steps would be
    recorded twice. Raised at the loop's start, before any training step; `fix` says what to do."""
    last = monitor.last_step
    if last is not None and step <= last:
        raise ConfigError(f"{where}: training starts at step {step}, and this Monitor has measured steps up to {last} "
                          f"already: those steps' records would be taken twice. {fix}")


def check_run_starts_fresh(run: Any, step: int, where: str) -> None:
    """A ConfigError when a training loop starts at step 0 and `run` already holds a Monitor's records (the Run of an
    earlier train()): its steps 0… would be recorded twice. (A resume, from a later step, is not checked here.)"""
    if run is None or step != 0 or not callable(getattr(run, "record_count", None)):
        return
    if (n := run.record_count(metric="nuclear_rank")) > 0:
        raise ConfigError(f"{where}: run= holds {n} nuclear_rank records already (the Run of an earlier training), and "
                          "this training starts at step 0: its steps would be recorded twice. Give it a new Run "
                          "(store.Run.create(root, lab, config)), or leave run out")


# packages whose frames lie between a training loop's caller and a callback event
_CALLERS = ("specscope", "transformers", "accelerate", "lightning", "pytorch_lightning", "lightning_fabric", "torch",
            "contextlib", "functools")


def user_level() -> int:
    """warnings.warn's stacklevel (for its caller) that points at the first frame outside specscope and the training
    frameworks that call the callbacks' events: the user's `trainer.train()` / `trainer.fit(...)` line."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _CALLERS:
        frame, level = frame.f_back, level + 1
    return level


def resume_run(run: Any, step: int, where: str) -> int:
    """A resume at `step` trains steps `step`, `step`+1, … again: `run`'s records of those steps (written after the
    checkpoint, before the training stopped) are dropped, as TensorBoard's `purge_step` does, so that each step is
    recorded once, by the timeline that goes on. Warns with how many; returns that number."""
    if run is None or step <= 0 or not callable(getattr(run, "delete_after", None)):
        return 0
    if (dropped := run.delete_after(step - 1)) > 0:
        warnings.warn(f"{where}: resuming at step {step}, the run {getattr(run, 'path', run)} held {dropped} records of "
                      f"steps >= {step}, written after that checkpoint; they were dropped, and those steps are recorded "
                      "again as training repeats them", stacklevel=user_level())
    return dropped


def check_run(run: Any, where: str) -> None:
    """A ConfigError unless `run` is None or an open Run that receives records like a specscope.store.Run (append,
    log, flush): a path or a framework's logger given in its place, or a Run closed (by its `with` block) before
    training, failed at the first measured step, inside training. Called when the callback is made and again when
    training starts."""
    if run is None:
        return
    if missing := [m for m in ("append", "log", "flush") if not callable(getattr(run, m, None))]:
        raise ConfigError(f"{where}: run={type(run).__name__} has no {'/'.join(missing)}; pass a specscope.store.Run "
                          "(store.Run.create(root, lab, config)) or leave run out")
    if getattr(run, "closed", False) is True:
        raise ConfigError(f"{where}: run= {getattr(run, 'path', run)} was closed (a `with store.Run.create(...) as run:` "
                          "block closes it at its end), and a closed Run writes nothing more; train inside the with "
                          "block, or resume the run with store.Run.open(path), or pass a new Run")


def check_measures(monitor: Monitor, model: nn.Module, where: str,
                   fix: str = "or pass the Monitor's options (every=10, ...) and let the callback build it") -> None:
    """A ConfigError when `monitor` tracks none of `model`'s weights: a Monitor of another model (a copy, the model
    before it was wrapped or reloaded) saw no use of its weights and recorded every one "unmeasured"."""
    if model is None or not isinstance(model, nn.Module):
        return
    own = {id(p) for p in model.parameters()}
    if not any(id(s.param) in own for s in monitor.slots.values()):
        raise ConfigError(f"{where}: the Monitor measures the weights of another model than the {type(model).__name__} it is "
                          f"given (none of its {len(monitor.slots)} weights, e.g. {monitor.layers[:2]}, is a parameter of "
                          f"it); build the Monitor on the model you train: Monitor(model, ...), {fix}")


def uses_loss_scaling(monitor: Monitor, scaled: bool) -> None:
    """Under fp16 loss scaling the scaler overflows on purpose and skips those steps: a Monitor that would raise on
    their non-finite gradients records them (flag "nonfinite") and training goes on, as it does without specscope."""
    if scaled and monitor.nonfinite == "raise":
        monitor.nonfinite = "skip"


class _Abandoned(Exception):
    """Thrown into an open Monitor step that training left without finishing."""


class StepMeasure:
    """`monitor.step(k)` held open across every micro-batch of optimizer step k.

    begin(k) at each micro-batch (only the first of a step opens it), gradients_ready() once every backward
    pass of the step is done (the accumulated gradient is read there), optimizer_stepped() after
    optimizer.step(): returns the step's records and appends them to `run` (a specscope.store.Run) if given.
    """

    def __init__(self, monitor: Monitor, run: Any = None):
        self.monitor, self.run = monitor, run
        self._open = None  # the entered monitor.step(k) context
        self.step: int | None = None

    def begin(self, step: int) -> None:
        if self._open is None:
            self._open, self.step = self.monitor.step(step), step
            self._open.__enter__()

    def gradients_ready(self) -> None:
        context, self._open = self._open, None
        if context is not None:
            with self._naming_the_cause():
                context.__exit__(None, None, None)

    def optimizer_stepped(self, optimizer: Any = None) -> list[Record]:
        """The Monitor's records of the step, and the geometry choices of a specscope `optimizer` (AutoGeometry);
        the run, if given, stores all of both."""
        self.gradients_ready()
        self.monitor.after_optimizer_step()
        records = self.monitor.pop_records()
        made = optimizer_records(optimizer)
        if (records or made) and self.run is not None:
            self.run.append(records + not_measured_in(records, made))
        return records + [r for r in made if r.metric == "geometry"]  # its nuclear_rank would shadow the Monitor's

    def abandon(self) -> None:
        """Disarm a step that training left early (exception, stop signal) without measuring it."""
        context, self._open = self._open, None
        if context is not None:
            context.__exit__(_Abandoned, _Abandoned(), None)

    @contextlib.contextmanager
    def _naming_the_cause(self):
        """A NonFiniteError of step 0's forward and backward came before any update: its fix names the model's
        initialization and the data, not the learning rate (as `specscope diagnose` does); `before_update` says which
        it is."""
        try:
            yield
        except NonFiniteError as e:
            e.before_update = self.step == 0
            if e.before_update and (problem := getattr(e, "problem", None)):
                e.args = (f"{problem}; check the model's initialization and the data (no update has been made yet, so the "
                          "learning rate is not the cause), or use Monitor(nonfinite='warn') to record it and go on",)
            raise


def optimizer_records(optimizer: Any) -> list[Record]:
    """What a specscope optimizer recorded since the last call (AutoGeometry: geometry, spectral_advantage,
    nuclear_rank per layer), found inside the frameworks' wrappers (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer); [] for any other optimizer."""
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if isinstance(optimizer, Hybrid):
            return optimizer.pop_records()
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
    return []


def log_values(records: Iterable[Record], metrics: Iterable[str] = LOGGED, prefix: str = "specscope") -> dict[str, float]:
    """{"<prefix>/<layer>/<metric>": value} of the finite records among `metrics`, for a framework logger."""
    metrics = set(metrics)
    return {f"{prefix}/{r.layer}/{r.metric}": r.value for r in records if r.metric in metrics and math.isfinite(r.value)}


def _check_same_names(monitor: Monitor, model: nn.Module) -> None:
    """A ConfigError when `monitor` tracks weights of `model` under other names (built on a submodule: Monitor(self.model)
    in a LightningModule): the optimizer asks it for st(A) by `model`'s names, which it would not know, at the first step."""
    here = {id(p): layer_name(n) for n, p in model.named_parameters()}
    shared = [(s.name, here[id(s.param)]) for s in monitor.slots.values() if id(s.param) in here]
    if shared and all(theirs != ours for theirs, ours in shared):
        theirs, ours = shared[0]
        raise ConfigError(f"spectral_optimizer: the Monitor names the weights of another module than the {type(model).__name__} "
                          f"given here ('{ours}' here is '{theirs}' to it), and the optimizer asks it for st(A) by this "
                          f"module's names; build the Monitor on the module given here: Monitor(model, ...) (in a "
                          "LightningModule, Monitor(self, ...), or SpecscopeCallback's, which is built on the module)")


def spectral_optimizer(model: nn.Module, lr_spectral: float = 0.02, lr_adamw: float = 3e-4, *, algorithm: str = "muon",
                       monitor: Monitor | None = None, **options: Any) -> Hybrid:
    """One optimizer: hidden matrices -> `algorithm` (Muon by default), embeddings, heads, gains and biases ->
    AdamW (specscope.optim.spectral_param_groups, whose keyword options pass through). `monitor` feeds the
    measured st(A) to algorithm="specgd" / "auto"."""
    if algorithm == "auto" and monitor is None:
        raise ConfigError("algorithm='auto' chooses each layer's geometry by its measured st(A): pass monitor= (a probe "
                          "Monitor of this model, e.g. the one the callback measures with), or use algorithm='muon'/'specgd'")
    if isinstance(monitor, Monitor) and isinstance(model, nn.Module):
        check_measures(monitor, model, "spectral_optimizer", "the one whose st(A) the optimizer reads")
        _check_same_names(monitor, model)
    if isinstance(model, nn.Module) and not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"spectral_optimizer: every parameter of {type(model).__name__} is frozen (requires_grad=False), so "
                          "there is nothing to optimize; unfreeze the ones to train (p.requires_grad_(True)) first")
    return Hybrid(spectral_param_groups(model, lr_spectral, lr_adamw, algorithm=algorithm, **options), stable_rank=monitor)
