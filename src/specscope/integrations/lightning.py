"""Lightning: measure st(A), nr(G) per weight while `Trainer.fit` runs, and train with Muon + AdamW.

    class LitModel(L.LightningModule):
        def configure_optimizers(self):
            return spectral_optimizer(self)          # hidden matrices -> Muon, the rest -> AdamW

    callback = SpecscopeCallback(every=10)           # builds Monitor(pl_module, every=10) at setup
    L.Trainer(callbacks=[callback], accumulate_grad_batches=4).fit(LitModel(), loader)
    print(callback.monitor.advice())

Events -> Monitor: on_train_batch_start opens monitor.step(trainer.global_step) at the first micro-batch of
an optimizer step and keeps it open over all `accumulate_grad_batches` of them; on_before_optimizer_step
reads the accumulated gradient (before Lightning's gradient clipping); on_train_batch_end after the
optimizer step finishes gradient="update"/callable measurements and sends the values to every logger.
The Monitor's state rides in Lightning checkpoints (`state_dict`/`load_state_dict` of this callback).
"""

from __future__ import annotations

import warnings
from typing import Any

from specscope.errors import ConfigError, RunStoreError
from specscope.integrations.common import (LOGGED, StepMeasure, check_measures, check_metrics, check_monitor, check_run,
                                           check_run_starts_fresh, check_starts_after, resume_run, log_values, spectral_optimizer,
                                           user_level, uses_loss_scaling)
from specscope.probe import Monitor
from specscope.store.deps import require

L = require("lightning", "lightning", "specscope.integrations.lightning")

__all__ = ["SpecscopeCallback", "spectral_optimizer"]


class SpecscopeCallback(L.Callback):
    """A Lightning Callback driving a `Monitor` (given, or built at setup as Monitor(pl_module, **monitor_kwargs)).

    Measured values go to every logger of the Trainer as "specscope/<layer>/<metric>" at the optimizer
    step's index (trainer.global_step before the step); `run` (a specscope.store.Run) receives every record.
    One optimizer per LightningModule (with more, fit stops at its start with a ConfigError).
    """

    def __init__(self, monitor: Monitor | None = None, *, run: Any = None, metrics: tuple[str, ...] = LOGGED,
                 **monitor_kwargs: Any):
        if monitor is not None and monitor_kwargs:
            raise ConfigError(f"SpecscopeCallback: pass a Monitor or Monitor keyword arguments, not both ({sorted(monitor_kwargs)})")
        check_monitor(monitor, "SpecscopeCallback")
        check_run(run, "SpecscopeCallback")
        Monitor.check_options(**monitor_kwargs)  # a typo fails here, not inside trainer.fit()
        self.monitor, self.run, self.metrics = monitor, run, check_metrics(metrics, monitor, monitor_kwargs)
        self._monitor_kwargs = monitor_kwargs
        self._measure: StepMeasure | None = None
        self._saved: dict | None = None  # Monitor state loaded before the Monitor exists
        self._stepping = False
        self._trainer: Any = None  # the Trainer of the running fit (its ckpt_path names a checkpoint that fails to load)
        self._restored = False  # whether this fit restored a Monitor state from its checkpoint

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer
        if self.monitor is None:
            self.monitor = Monitor(pl_module, **self._monitor_kwargs)
        check_measures(self.monitor, pl_module, "SpecscopeCallback")
        uses_loss_scaling(self.monitor, getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None)
        self._measure = StepMeasure(self.monitor, self.run)
        if self._saved is not None:
            saved, self._saved = self._saved, None
            self._load(saved)

    def on_train_start(self, trainer, pl_module) -> None:
        check_run(self.run, "SpecscopeCallback")  # closed since the callback was made (the end of its with block)
        if trainer.global_step > 0 and not self._restored and self.monitor.last_step is None:
            warnings.warn(f"specscope: resuming at step {trainer.global_step} without Monitor state (the checkpoint "
                          f"{getattr(trainer, 'ckpt_path', None) or ''} was saved without a SpecscopeCallback), so the "
                          "Monitor's advice window starts empty", stacklevel=user_level())
        self._restored = False
        check_run_starts_fresh(self.run, trainer.global_step, "SpecscopeCallback")
        check_starts_after(self.monitor, trainer.global_step, "SpecscopeCallback",
                           "Give this fit() a new SpecscopeCallback (a new Monitor, and a new Run where this one had "
                           "run=) to train again from step 0, or trainer.fit(model, ckpt_path=...) to go on from a "
                           "checkpoint this callback saved")
        resume_run(self.run, trainer.global_step, "SpecscopeCallback")
        if len(trainer.optimizers) > 1:  # the first optimizer's step would read every weight's gradient
            raise ConfigError(
                f"SpecscopeCallback measures one optimizer step per batch, and {type(pl_module).__name__} has "
                f"{len(trainer.optimizers)} optimizers: the first one's step would read the gradients of the weights the "
                "others step after later backward passes. Return one optimizer from configure_optimizers "
                "(spectral_optimizer(self) puts Muon and AdamW in one), or measure by hand: with monitor.step(step) around "
                "the backward passes of one optimizer step in training_step")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._measure.begin(trainer.global_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not any(p.grad is not None for p in pl_module.parameters()):  # training_step returned None: Lightning skipped
            self._measure.abandon()  # the backward (and steps nothing); no weight is "unmeasured" for a step not taken
            return
        self._measure.gradients_ready()
        self._stepping = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._stepping:  # a micro-batch inside an accumulation window
            return
        self._stepping = False
        step = self._measure.step
        values = log_values(self._measure.optimizer_stepped(trainer.optimizers[0] if trainer.optimizers else None), self.metrics)
        if values:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._measure.abandon()
        if self.run is not None:
            self.run.flush()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._measure is not None:
            self._measure.abandon()

    # -- checkpoints: Lightning stores this under checkpoint["callbacks"]["SpecscopeCallback"] --------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Before Lightning writes the checkpoint: the run's records flushed, so a kill after it loses none of the
        steps it covers (a resume from it starts after them)."""
        if self.run is not None:
            self.run.flush()

    def state_dict(self) -> dict:
        return {"monitor": self.monitor.state_dict()} if self.monitor is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "monitor" not in state_dict:
            return
        if self.monitor is None:
            self._saved = state_dict["monitor"]
        else:
            self._load(state_dict["monitor"])

    def _load(self, state: Any) -> None:
        """Monitor.load_state_dict(state); a state it refuses (altered, or saved with other Monitor options or another
        model) is the checkpoint's fault, named with the way on."""
        try:
            self.monitor.load_state_dict(state)
        except (ConfigError, TypeError, ValueError, AttributeError, KeyError, IndexError, RuntimeError) as e:
            detail = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
            ckpt = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
            raise RunStoreError(f"{ckpt} holds a SpecscopeCallback state this Monitor cannot load ({detail}); resume with "
                                "the callback's options of the run that saved it, or from another checkpoint, or delete "
                                "checkpoint['callbacks']['SpecscopeCallback'] to resume without the Monitor's state") from None
        self._restored = True
