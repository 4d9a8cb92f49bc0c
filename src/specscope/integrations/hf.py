"""Hugging Face `Trainer`: measure st(A), nr(G) per weight while it trains, and train with Muon + AdamW.

    monitor = Monitor(model, every=10)
    trainer = Trainer(model, args, train_dataset=ds, optimizers=optimizers(model))
    attach(trainer, monitor)            # or Trainer(callbacks=[SpecscopeCallback(monitor)])
    trainer.train()
    print(monitor.advice())

Events -> Monitor: on_step_begin (first micro-batch of optimizer step k) opens monitor.step(k), which stays
open over all `gradient_accumulation_steps` micro-batches; on_pre_optimizer_step reads the accumulated
gradient (the Trainer has clipped it by then: nr(G) and st(A) are scale-free, ‖G‖ is the clipped norm);
on_optimizer_step finishes gradient="update"/callable measurements. Checkpoints carry the Monitor's state
in `specscope_monitor.pt`, restored when training resumes.
"""

from __future__ import annotations

import functools
import io
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from specscope.errors import ConfigError, RunStoreError
from specscope.integrations.common import (LOGGED, StepMeasure, check_measures, check_metrics, check_monitor, check_run,
                                           check_run_starts_fresh, check_starts_after, resume_run, log_values, spectral_optimizer,
                                           user_level, uses_loss_scaling)
from specscope.probe import Monitor
from specscope.store import integrity
from specscope.store.deps import require

transformers = require("transformers", "hf", "specscope.integrations.hf")
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

STATE_FILE = "specscope_monitor.pt"


class SpecscopeCallback(transformers.TrainerCallback):
    """A TrainerCallback driving a `Monitor` (given, or built on train begin as Monitor(model, **monitor_kwargs)).

    Measured values go to `state.log_history` (saved in trainer_state.json); with `trainer` given (see
    `attach`) also to its reporting callbacks (TensorBoard, W&B, ...) — not to the console printers.
    run: a specscope.store.Run that receives every record and the Trainer's logged loss / lr.
    metrics: which records are logged, as "specscope/<layer>/<metric>".
    """

    def __init__(self, monitor: Monitor | None = None, *, trainer: Any = None, run: Any = None,
                 metrics: tuple[str, ...] = LOGGED, **monitor_kwargs: Any):
        if monitor is not None and monitor_kwargs:
            raise ConfigError(f"SpecscopeCallback: pass a Monitor or Monitor keyword arguments, not both ({sorted(monitor_kwargs)})")
        check_monitor(monitor, "SpecscopeCallback")
        if trainer is not None:
            _check_trainer(trainer, "SpecscopeCallback(trainer=...)")
        check_run(run, "SpecscopeCallback")
        Monitor.check_options(**monitor_kwargs)  # a typo fails here, not inside trainer.train()
        self.monitor, self.trainer, self.run = monitor, trainer, run
        self.metrics = check_metrics(metrics, monitor, monitor_kwargs)
        self._monitor_kwargs = monitor_kwargs
        self._measure: StepMeasure | None = None
        self._values: dict[str, float] = {}
        self._saved: dict | None = None  # Monitor state loaded before the Monitor exists
        self._saved_from: Path | None = None  # the file it was read from
        self._epoch: tuple[int, float] | None = None  # the last (step, epoch) stored in the run
        self._reporting: Any = trainer  # the Trainer whose reporters get the values: `trainer`, else the one running
        if trainer is not None:
            _close_on_error(trainer, self)

    # -- training events -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        check_run(self.run, "SpecscopeCallback")  # closed since the callback was made (the end of its with block)
        running, loop = _calling_loop(self)
        if self.trainer is None:  # given to Trainer(callbacks=[...]): find the Trainer whose train() is running
            _close_running_on_error(running, self)
        self._reporting = self.trainer or running
        _check_one_callback(self._reporting)
        if self.monitor is None:
            self.monitor = Monitor(model, **self._monitor_kwargs)
        check_measures(self.monitor, model, "SpecscopeCallback", _MODEL_INIT_FIX if getattr(self._reporting, "model_init", None)
                       else "or pass the Monitor's options (every=10, ...) and let the callback build it")
        scaler = getattr(getattr(self._reporting, "accelerator", None), "scaler", None)  # the running Trainer's
        uses_loss_scaling(self.monitor, bool(args.fp16) or scaler is not None)
        self._measure = StepMeasure(self.monitor, self.run)
        if self._saved is not None:
            saved, self._saved = self._saved, None
            self._restore(saved, self._saved_from)
        elif state.global_step > 0:
            self._resume(args, state, loop.get("resume_from_checkpoint"))
        check_run_starts_fresh(self.run, state.global_step, "SpecscopeCallback")
        check_starts_after(self.monitor, state.global_step, "SpecscopeCallback",
                           "To train again from step 0, give this train() a new Monitor: trainer.remove_callback("
                           "SpecscopeCallback), then attach(trainer, Monitor(model, ...)), or trainer.add_callback("
                           "SpecscopeCallback(Monitor(model, ...), trainer=trainer, run=..., metrics=...)) with a new Run "
                           "where this one had run=; to go on from a checkpoint this callback saved, "
                           "trainer.train(resume_from_checkpoint=...)")
        resume_run(self.run, state.global_step, "SpecscopeCallback")

    def on_step_begin(self, args, state, control, **kwargs):
        self._measure.begin(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._measure.gradients_ready()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._values = log_values(self._measure.optimizer_stepped(kwargs.get("optimizer")), self.metrics)

    def on_step_end(self, args, state, control, **kwargs):  # logged at global_step k+1, like the Trainer's loss
        if control.should_save:  # the Trainer writes checkpoint-k right after this, then calls on_save
            self._stage(args, state)
        values, self._values = self._values, {}
        if not values:
            return
        state.log_history.append({**values, "step": state.global_step})
        if self._reporting is None:
            return
        for cb in self._reporting.callback_handler.callbacks:  # reporters, not the console printers (dozens of keys)
            if not isinstance(cb, (SpecscopeCallback, transformers.ProgressCallback, transformers.PrinterCallback)):
                cb.on_log(args, state, control, logs=dict(values), model=self._reporting.model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run is None or not logs:
            return
        # the Trainer logs after step k (global_step k+1); the run numbers steps like the Monitor. An evaluation
        # before the first step (trainer.evaluate() before train()) is the state at step 0.
        step = max(state.global_step - 1, 0)
        own = {k: float(v) for k, v in logs.items() if not k.startswith("specscope/") and isinstance(v, (int, float))}
        if "epoch" in own and (step, own["epoch"]) == self._epoch:  # the end-of-training log repeats the last epoch
            del own["epoch"]
        elif "epoch" in own:
            self._epoch = (step, own["epoch"])
        if own:
            self.run.log(step, own)
            if control.should_save or _saves_best(args):  # a checkpoint follows this log: the records go first
                self.run.flush()

    def on_epoch_end(self, args, state, control, **kwargs):  # save_strategy="epoch": should_save is set by now
        if control.should_save:
            self._stage(args, state)

    def on_evaluate(self, args, state, control, **kwargs):  # save_strategy="best" decides after this, then saves
        if _saves_best(args):
            self._stage(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        if self._measure is not None:
            self._measure.abandon()
        if self.run is not None:
            self.run.flush()
        if state.is_world_process_zero:  # states staged for checkpoints that were not written (a non-best evaluation)
            for old in Path(args.output_dir).glob(f".{STATE_FILE}-*"):
                if old.name.rsplit("-", 1)[-1].isdigit():
                    old.unlink(missing_ok=True)

    # -- checkpoints -------------------------------------------------------------------------------
    def _stage(self, args, state) -> None:
        """Before the Trainer writes checkpoint-k: the run's records flushed (a kill after the checkpoint then loses
        none of the steps it covers) and the Monitor's state written beside the checkpoints as `_staged(k)`, which a
        resume reads when a kill came between the Trainer's write and `on_save`."""
        if self.run is not None:
            self.run.flush()
        if state.is_world_process_zero and self.monitor is not None:
            _save_state(self.monitor.state_dict(), _staged(args.output_dir, state.global_step))

    def on_save(self, args, state, control, **kwargs):
        if self.run is not None:
            self.run.flush()
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            _save_state(self.monitor.state_dict(), folder / STATE_FILE)
            for old in Path(args.output_dir).glob(f".{STATE_FILE}-*"):  # staged states of this step and before
                step = old.name.rsplit("-", 1)[-1]
                if step.isdigit() and int(step) <= state.global_step:
                    old.unlink(missing_ok=True)

    def load(self, checkpoint: str | Path) -> None:
        """Restore the Monitor's state from a checkpoint folder this callback saved into (before trainer.train()
        too: a Monitor the callback builds at train begin starts from it)."""
        path = Path(checkpoint) / STATE_FILE
        if not Path(checkpoint).is_dir():
            raise ConfigError(f"{checkpoint} is not a folder; pass a checkpoint folder of the Trainer "
                              f"(<output_dir>/{PREFIX_CHECKPOINT_DIR}-<step>)")
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: that checkpoint was saved without a SpecscopeCallback")
        state = _read_state(path)
        if self.monitor is None:
            self._saved, self._saved_from = state, path
        else:
            self._restore(state, path)

    def _restore(self, state: dict, path: Path | None) -> None:
        """Monitor.load_state_dict(state); a state it refuses (tampered, or of another model) is that file's fault."""
        try:
            self.monitor.load_state_dict(state)
        except (ConfigError, TypeError, ValueError, AttributeError, KeyError, IndexError, RuntimeError) as e:
            detail = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
            raise RunStoreError(f"{path or 'the loaded state'} holds a Monitor state this Monitor cannot load ({detail}); "
                                "resume from another checkpoint folder, or delete the file to resume without the "
                                "Monitor's state") from None

    def _resume(self, args, state, passed: Any = None) -> None:
        """The Monitor state of the checkpoint the Trainer resumed from: `train(resume_from_checkpoint=...)`'s folder
        (read off the running loop: the Trainer keeps it nowhere else), else `args.resume_from_checkpoint`, else
        output_dir's checkpoint of this step."""
        given = next((str(g) for g in (passed, args.resume_from_checkpoint) if isinstance(g, (str, os.PathLike))), None)
        folder = Path(given or Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        staged = _staged(args.output_dir, state.global_step)
        if (folder / STATE_FILE).is_file():
            self.load(folder)
        elif folder.parent.resolve() == Path(args.output_dir).resolve() and staged.is_file():
            self._restore(_read_state(staged), staged)  # killed between the Trainer's checkpoint and on_save
        else:
            warnings.warn(f"specscope: resuming at step {state.global_step} without Monitor state ({folder / STATE_FILE} "
                          "not found: that checkpoint was saved without specscope), so the Monitor's advice window starts "
                          "empty; to restore it from another checkpoint folder, call callback.load(folder) before "
                          "trainer.train()", stacklevel=user_level())


def _staged(output_dir: str | os.PathLike, step: int) -> Path:
    """Where the Monitor's state of step `step` waits, beside the checkpoints, until on_save puts it in checkpoint-step."""
    return Path(output_dir) / f".{STATE_FILE}-{step}"


def _save_state(state: dict, path: Path) -> None:
    """torch.save through a temporary file and a rename: a kill leaves the old file or the new one, never half."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    integrity.write_atomic(path, buffer.getvalue())


def _read_state(path: Path) -> dict:
    """A Monitor state file, loaded with weights_only=True; one RunStoreError naming it when it is none."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and containers only: no code runs
    except Exception as e:  # truncated, not a torch file, or holding objects other than tensors
        raise RunStoreError(f"{path} is not a Monitor state this callback saved (torch.load with weights_only=True: "
                            f"{type(e).__name__}); it is truncated or was replaced, and is not loaded any other way: "
                            "resume from another checkpoint folder, or delete the file to resume without the "
                            "Monitor's state") from None
    if not isinstance(state, dict):
        raise RunStoreError(f"{path} holds a {type(state).__name__}, not a Monitor state (a dict); resume from another "
                            "checkpoint folder, or delete the file to resume without the Monitor's state")
    return state


def attach(trainer: Any, monitor: Monitor | None = None, *, run: Any = None, metrics: tuple[str, ...] = LOGGED,
           **monitor_kwargs: Any) -> Monitor:
    """Add a SpecscopeCallback to `trainer` (logging to its reporters too); returns its Monitor.

    With no `monitor`, one is built now on trainer.model with `monitor_kwargs` (e.g. every=10). `run` and
    `metrics` as SpecscopeCallback's."""
    _check_trainer(trainer, "attach(trainer, ...)", "(attach(trainer, monitor) or attach(trainer, every=10))")
    if monitor is not None and monitor_kwargs:
        raise ConfigError(f"attach: pass a Monitor or Monitor keyword arguments, not both ({sorted(monitor_kwargs)})")
    check_monitor(monitor, "attach")
    Monitor.check_options(**monitor_kwargs)  # a typo is a ConfigError naming the closest option, not a TypeError
    check_run(run, "attach")
    check_metrics(metrics, monitor, monitor_kwargs)
    _check_one_callback(trainer, "attach")
    if monitor is None and getattr(trainer, "model_init", None) is not None:
        raise ConfigError("attach: this Trainer has model_init=, which builds a new model when train() starts, so a Monitor "
                          "built now would measure the old one. " + _MODEL_INIT_FIX)
    callback = SpecscopeCallback(monitor or Monitor(trainer.model, **monitor_kwargs), trainer=trainer, run=run, metrics=metrics)
    trainer.add_callback(callback)
    return callback.monitor


_MODEL_INIT_FIX = ("With model_init=, give the callback the Monitor's options and let it build the Monitor on the model "
                   "train() builds: callback = SpecscopeCallback(every=10, trainer=trainer); trainer.add_callback(callback); "
                   "then read callback.monitor after train()")


def _check_one_callback(trainer: Any, where: str = "SpecscopeCallback") -> None:
    """A ConfigError when `trainer` holds a SpecscopeCallback already (`attach`) or more than one (train begin): each
    would measure every step, and log its values, once more."""
    if trainer is None:
        return
    held = [cb for cb in getattr(trainer.callback_handler, "callbacks", ()) if isinstance(cb, SpecscopeCallback)]
    if len(held) > (0 if where == "attach" else 1):
        same = len(held) > 1 and all(cb is held[0] for cb in held)
        raise ConfigError(f"{where}: this Trainer holds {'the same SpecscopeCallback twice' if same else 'a SpecscopeCallback already'}"
                          f"{'' if where == 'attach' or same else f' ({len(held)} of them)'}: each would measure every step "
                          "and log its values once more. Keep one: trainer.remove_callback(SpecscopeCallback) removes one "
                          "(use the Monitor of the one kept, callback.monitor)")


def _closing(method: Any, callback: SpecscopeCallback) -> Any:
    """`method`, closing the callback's open measured step when it raises (the Trainer has no exception event):
    the weights are plain parameters again, and no function mode stays on, at once rather than at the next train()."""
    @functools.wraps(method)
    def closing(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except BaseException:
            if callback._measure is not None:
                callback._measure.abandon()
            raise

    closing.specscope_closes = callback  # the mark `_closes` reads
    return closing


def _closes(owner: Any, name: str, callback: SpecscopeCallback) -> bool:
    """Whether `owner.<name>` is already this callback's wrapper."""
    return getattr(vars(owner).get(name), "specscope_closes", None) is callback


def _close_on_error(trainer: Any, callback: SpecscopeCallback) -> None:
    """Make `trainer.train` close the callback's open measured step when it raises. Wraps this trainer's `train`
    (an instance attribute over the class's method), once per callback and trainer."""
    if not _closes(trainer, "train", callback):
        trainer.train = _closing(trainer.train, callback)


# What a running train() calls while a measured step is open, each looked up on its instance at every call (so the
# running loop sees a wrapper set now): the epoch loop (transformers ≥ 5: all of a step, the optimizer's step
# included), each micro-batch's forward and backward, and the flop and token counting (and, below, the clipping).
# The optimizer's `step` is left alone: torch's LR schedulers patch it and expect a bound method.
_RUNNING_TRAINER_CALLS = ("_run_epoch", "training_step", "floating_point_ops", "_track_num_input_tokens")


def _close_running_on_error(trainer: Any, callback: SpecscopeCallback) -> None:
    """For a Trainer whose train() is already running: what this train() calls while a measured step is open
    (`_RUNNING_TRAINER_CALLS` and the accelerator's `clip_grad_norm_`) closes the step when it raises, and later
    train() calls are wrapped whole. The Trainer reads a step's micro-batches before it begins the step
    (transformers ≥ 4.46), so its data loader raises outside a step."""
    if trainer is None:
        return
    _close_on_error(trainer, callback)
    owners = [(trainer, name) for name in _RUNNING_TRAINER_CALLS]
    owners.append((getattr(trainer, "accelerator", None), "clip_grad_norm_"))
    for owner, name in owners:
        if callable(getattr(owner, name, None)) and not _closes(owner, name, callback):
            setattr(owner, name, _closing(getattr(owner, name), callback))


def _calling_loop(callback: SpecscopeCallback, depth: int = 12) -> tuple[Any, dict]:
    """The transformers Trainer whose training loop is calling `callback`'s event (its frame's `self`, holding this
    callback) and that frame's locals (`resume_from_checkpoint`: the folder `train()` resumes from), or (None, {}).
    Trainer calls events through its CallbackHandler, which passes the model, optimizer and data loaders but not the
    Trainer itself."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None, {}
        owner = frame.f_locals.get("self")
        if isinstance(owner, transformers.Trainer) and callback in getattr(owner.callback_handler, "callbacks", ()):
            return owner, frame.f_locals
        frame = frame.f_back
    return None, {}


def _check_trainer(trainer: Any, where: str, how: str = "(SpecscopeCallback(monitor, trainer=trainer))") -> None:
    """A ConfigError unless `trainer` looks like a transformers Trainer (its callbacks and model are used)."""
    if (not callable(getattr(trainer, "add_callback", None)) or not hasattr(trainer, "callback_handler")
            or not isinstance(getattr(trainer, "model", None), torch.nn.Module)):
        raise ConfigError(f"{where}: {type(trainer).__name__} is not a transformers Trainer; pass the Trainer {how}")


def optimizers(model: torch.nn.Module, lr_spectral: float = 0.02, lr_adamw: float = 3e-4, **options: Any) -> tuple:
    """`Trainer(optimizers=optimizers(model))`: (spectral_optimizer(model, ...), None) — the Trainer then builds
    its own scheduler (args.lr_scheduler_type, warmup) over both groups' learning rates."""
    return spectral_optimizer(model, lr_spectral, lr_adamw, **options), None


def _saves_best(args) -> bool:
    """Whether the Trainer saves a checkpoint when an evaluation is the best so far (save_strategy="best")."""
    return str(getattr(getattr(args, "save_strategy", None), "value", getattr(args, "save_strategy", ""))) == "best"
