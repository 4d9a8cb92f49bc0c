"""The one training loop every lab shares.

For each step s of an arm: micro-batches -> forward -> backward (the Monitor's hooks see inputs and
gradients on measured steps) -> callbacks.after_backward -> clip -> optimizer.step -> extra steppers
(e.g. LowRankDecay) -> callbacks.after_step -> records to the store. Evaluations happen after 0,
eval_every, 2*eval_every, ... updates and at the end; they are recorded at that update count.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import quote

import torch

from specscope.errors import NonFiniteError, RunStoreError
from specscope.records import Record, not_measured_in
from specscope.train.checkpoint import load_checkpoint, save_checkpoint


def arm_seed(seed: int, name: str) -> int:
    """A seed per (run seed, arm name), so an arm's randomness does not depend on the arms before it."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored inside the block, in the main thread (elsewhere signals are not ours to change): for work a
    Ctrl-C must not cut short, and for child processes started inside, which inherit the disposition."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Interrupt:
    """Turns SIGINT into a flag the loop checks between steps, so a checkpoint is saved before stopping."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._installed = False

    def __enter__(self) -> "Interrupt":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    @contextlib.contextmanager
    def immediate(self) -> Iterator[None]:
        """Ctrl-C raises KeyboardInterrupt at once inside this block: for a part with no step to checkpoint at (a
        lab's measurement, redone whole on resume), where the flag would be read only once the part had finished."""
        if not self._installed:
            yield
            return
        if self.requested:
            raise KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, exc_type, exc, tb) -> None:
        """Restore the previous handler; a Ctrl-C that set the flag after the loop last read it (while the last
        part's records were written) is raised here, so it is not lost to the code after the block."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self.requested and exc_type is None:
            raise KeyboardInterrupt


@dataclass
class ArmResult:
    name: str
    steps_done: int
    interrupted: bool = False
    final: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _state(obj: Any) -> Any:
    return obj.state_dict() if obj is not None and hasattr(obj, "state_dict") else None


def _stateful(objs: list) -> list:
    """The callbacks (or steppers) that keep state, in order: a stateless one (a progress printer, a test's
    interrupter) may come or go between a run and its resume."""
    return [o for o in objs if o is not None and hasattr(o, "state_dict") and hasattr(o, "load_state_dict")]


def _saved(states: list) -> list:
    """The states a checkpoint holds for its stateful callbacks, in order (None marks a stateless one)."""
    return [st for st in states if st is not None]


def _load_state(obj: Any, state: Any) -> None:
    if obj is not None and state is not None and hasattr(obj, "load_state_dict"):
        obj.load_state_dict(state)


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _runs_hook(cb: Any, hook: str, step: int) -> bool:
    return hasattr(cb, hook) and step % max(int(getattr(cb, "every", 1)), 1) == 0


def _tagged(records: Iterable[Record], arm: str, step: int | None = None) -> list[Record]:
    out = []
    for r in records:
        changes = {}
        if not r.arm:
            changes["arm"] = arm
        if step is not None and r.step < 0:
            changes["step"] = step
        out.append(r if not changes else Record(**{**r.as_dict(), **changes}))
    return out


class Trainer:
    """Runs one Arm against a run store, with checkpoints, resume and SIGINT handling."""

    def __init__(self, run: Any, device: torch.device, seed: int, checkpoint_every: int = 0, progress: Any = None,
                 on_checkpoint: Any = None):
        self.run = run
        self.device = device
        self.seed = seed
        self.checkpoint_every = checkpoint_every
        self.progress = progress  # a specscope.train.progress.Progress or None
        self.on_checkpoint = on_checkpoint  # called (arm, next_step, records) after each checkpoint is in place

    def checkpoint_path(self, arm_name: str) -> Path:
        """checkpoints/<arm>.pt, the arm's name percent-encoded: "relu/gd" -> relu%2Fgd.pt, never a subpath."""
        return Path(self.run.checkpoints_dir) / f"{quote(arm_name, safe='-_.')}.pt"

    def verify_checkpoint(self, arm_name: str, count: Any = None, arm: Any = None) -> int:
        """The step the checkpoint of `arm_name` resumes from, after checking its hash and that the database
        still holds every record the arm had written when it was taken (RunStoreError naming what is missing).
        `count(arm, upto)` counts records (default: the run's `record_count`). Given the built `arm`, also that
        the checkpoint fits it: a step within its steps, the same parameters of the same shapes."""
        path = self.checkpoint_path(arm_name)
        ckpt = load_checkpoint(path)
        if ckpt.get("run_id", self.run.id) != self.run.id:  # (none in a checkpoint from before it was recorded)
            raise RunStoreError(f"checkpoint {path} is run {ckpt['run_id']!r}'s, not this run's ({self.run.id!r}): it was "
                                "copied over from another run; delete it to restart that arm from scratch")
        _check_fields(path, ckpt)
        if arm is not None:
            _check_fits(path, ckpt, arm)
        step, want = int(ckpt["next_step"]), int(ckpt["records"])
        count = count or (lambda arm, upto: self.run.record_count(arm, upto=upto))
        have = count(arm_name, upto=int(ckpt["position"]))
        if have != want:
            raise RunStoreError(
                f"{self.run.metrics_path} holds {have} records of arm '{arm_name}' up to step {step}, but {want} "
                f"were written when {path} was taken: the database lost records (or belongs to another run); "
                "restore it, or start a new run.")
        return step

    # -- one arm -----------------------------------------------------------------------------------
    def fit(self, arm: Any, interrupt: Interrupt, resume: bool = False) -> ArmResult:
        arm.model.to(self.device)
        start, elapsed, position = 0, 0.0, 0
        torch.manual_seed(arm_seed(self.seed, arm.name))
        if resume and self.checkpoint_path(arm.name).exists():
            start, elapsed, position = self._restore(arm)
        self.run.rewind(arm.name, position)  # records written after the checkpoint are recomputed exactly

        task = self.progress.add(arm.name, arm.steps, start) if self.progress else None
        result = ArmResult(arm.name, start)
        t0 = time.perf_counter() - elapsed
        step = start
        # A checkpoint is taken before the evaluation of its step, so resuming repeats that evaluation
        # exactly as the uninterrupted run did (same parameters, same RNG state).
        # That includes its early stop: a run interrupted just before the evaluation that stopped it stops here too.
        stopped = (step == 0 or self._due(step, arm.eval_every) or step == arm.steps) and self._evaluate_and_stop(arm, step, t0, result)
        if stopped and self.progress:
            self.progress.stopped(task, step)
        while not stopped and step < arm.steps:
            loss = self._step(arm, step)
            step += 1
            if interrupt.requested or (self._due(step, self.checkpoint_every) and step < arm.steps):
                self.run.flush()
                self._save(arm, step, time.perf_counter() - t0)
                if interrupt.requested:
                    result.interrupted = True
                    break
            stopped = (self._due(step, arm.eval_every) or step == arm.steps) and self._evaluate_and_stop(arm, step, t0, result)
            if self.progress:
                self.progress.update(task, step, loss)
                if stopped:
                    self.progress.stopped(task, step)
        result.steps_done = step
        result.seconds = time.perf_counter() - t0
        self.run.flush()
        return result

    def _evaluate_and_stop(self, arm: Any, step: int, t0: float, result: ArmResult) -> bool:
        """Evaluate at `step`; True when the arm's stop rule ends it there (recorded as stopped_early)."""
        metrics = self._evaluate(arm, step, t0)
        result.final.update(metrics)
        if arm.stop is not None and metrics and 0 < step < arm.steps and arm.stop(metrics):
            self._append([Record(step, "", "stopped_early", 1.0, arm.name)])
            return True
        return False

    @staticmethod
    def _due(step: int, every: int) -> bool:
        return bool(every) and step % every == 0

    def _step(self, arm: Any, step: int) -> float:
        model, opt = arm.model, arm.optimizer
        model.train()
        opt.zero_grad(set_to_none=True)
        batches = arm.batch(step)
        micro = batches if arm.micro_batches > 1 else [batches]
        monitor = arm.monitor
        total = 0.0
        with monitor.step(step) if monitor is not None else contextlib.nullcontext():
            for mb in micro:
                loss = arm.loss(model, to_device(mb, self.device))
                if not torch.isfinite(loss.detach()):
                    raise NonFiniteError(
                        f"loss is {loss.item()} at step {step} of arm '{arm.name}'; lower the learning rate "
                        "or check the data (the run keeps everything recorded so far)"
                    )
                (loss / len(micro)).backward()
                total += loss.item() / len(micro)
        records = [Record(step, "", "loss", total, arm.name)] if step % max(arm.log_every, 1) == 0 else []
        for cb in arm.callbacks:
            if _runs_hook(cb, "after_backward", step):
                records += _tagged(cb.after_backward(step, model, opt) or (), arm.name, step)
        if arm.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), arm.grad_clip)
        opt.step()
        for stepper in arm.extra_steppers:
            stepper.step()
        if monitor is not None:
            monitor.after_optimizer_step()
            records += _tagged(monitor.pop_records(), arm.name)
        for cb in arm.callbacks:
            if _runs_hook(cb, "after_step", step):
                records += _tagged(cb.after_step(step, model, opt) or (), arm.name, step)
        if hasattr(opt, "pop_records"):  # an AutoGeometry's nr(G) beside a Monitor's or a callback's: stored once
            records += not_measured_in(records, _tagged(opt.pop_records(), arm.name, step))
        self._append(records)
        return total

    def _evaluate(self, arm: Any, step: int, t0: float) -> dict[str, float]:
        if arm.evaluate is None:
            return {}
        arm.model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in arm.evaluate(arm.model).items()}
        records = [Record(step, "", k, v, arm.name) for k, v in metrics.items()]
        records.append(Record(step, "", "time", time.perf_counter() - t0, arm.name))
        self._append(records)
        return metrics

    def _append(self, records: list[Record]) -> None:
        if records:
            self.run.append(records)

    # -- checkpoints -------------------------------------------------------------------------------
    def _save(self, arm: Any, next_step: int, elapsed: float) -> None:
        position = self.run.position()  # flushed: a resume keeps exactly the records written up to here
        records = self.run.record_count(arm.name, upto=position)
        save_checkpoint(
            self.checkpoint_path(arm.name),
            {
                "run_id": self.run.id,
                "arm": arm.name,
                "next_step": next_step,
                "records": records,
                "position": position,
                "elapsed": elapsed,
                "model": arm.model.state_dict(),
                "optimizer": _state(arm.optimizer),
                "extra_steppers": [_state(s) for s in arm.extra_steppers],
                "monitor": _state(arm.monitor),
                "callbacks": [_state(cb) for cb in arm.callbacks],
                "rng": _rng_state(),
            },
        )
        if self.on_checkpoint is not None:
            self.on_checkpoint(arm.name, next_step, records, position)

    def _restore(self, arm: Any) -> tuple[int, float]:
        path = self.checkpoint_path(arm.name)
        ckpt = load_checkpoint(path)  # cpu; load_state_dict copies to the device
        _check_fields(path, ckpt)
        _check_fits(path, ckpt, arm)
        try:
            arm.model.load_state_dict(ckpt["model"])
            _load_state(arm.optimizer, ckpt["optimizer"])
            for s, st in zip(_stateful(arm.extra_steppers), _saved(ckpt["extra_steppers"])):
                _load_state(s, st)
            _load_state(arm.monitor, ckpt["monitor"])
            for cb, st in zip(_stateful(arm.callbacks), _saved(ckpt["callbacks"])):
                _load_state(cb, st)
            _set_rng_state(ckpt["rng"])
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
            raise RunStoreError(_another_configuration(path, arm.name, type(e).__name__)) from None
        return int(ckpt["next_step"]), float(ckpt["elapsed"]), int(ckpt["position"])


def _another_configuration(path: Path, arm: str, what: str) -> str:
    return (f"checkpoint {path} was written by another configuration of arm '{arm}' ({what}); delete it to "
            "restart that arm from scratch, or resume with the settings that wrote it")


_COUNTS = ("next_step", "records", "position")  # whole numbers a resume reads (next_step's range: _check_fits)
_STATES = ("model", "optimizer", "extra_steppers", "monitor", "callbacks", "rng")  # what it loads


def _check_fields(path: Path, ckpt: dict[str, Any]) -> None:
    """RunStoreError naming `path` unless every field a resume reads is there with a value of its kind (a sealed file's
    fields were read unchecked: a missing `records` or a text `elapsed` ended in a KeyError or ValueError traceback)."""
    if missing := [k for k in (*_COUNTS, "elapsed", *_STATES) if k not in ckpt]:
        raise RunStoreError(f"checkpoint {path} lacks {missing}: it was altered or written by another program; delete it "
                            "to restart that arm from scratch")
    bad = [k for k in _COUNTS if isinstance(ckpt[k], bool) or not isinstance(ckpt[k], int) or (ckpt[k] < 0 and k != "next_step")]
    elapsed = ckpt["elapsed"]
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not math.isfinite(elapsed) or elapsed < 0:
        bad.append("elapsed")
    bad += [k for k in ("extra_steppers", "callbacks") if not isinstance(ckpt[k], list)]
    if bad:
        raise RunStoreError(f"checkpoint {path} holds {', '.join(f'{k}={ckpt[k]!r}'[:80] for k in bad)}, not the values a "
                            "checkpoint records: it was altered; delete it to restart that arm from scratch")


def _check_fits(path: Path, ckpt: dict[str, Any], arm: Any) -> None:
    """RunStoreError naming `path` unless the checkpoint can resume `arm` as built now: its next_step within
    1..arm.steps and its model the same parameters and buffers, of the same shapes."""
    try:
        step = ckpt["next_step"]
        saved = ckpt["model"]
    except KeyError as e:
        raise RunStoreError(f"checkpoint {path} lacks {e}; delete it to restart that arm from scratch") from None
    if isinstance(step, bool) or not isinstance(step, int) or not 0 < step <= arm.steps:
        raise RunStoreError(
            f"checkpoint {path} says arm '{arm.name}' resumes at step {step!r}, outside 1..{arm.steps} (its steps): "
            "it was altered or written by another configuration; delete it to restart that arm from scratch")
    own = arm.model.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(own):
        theirs = set(saved) if isinstance(saved, dict) else set()
        diff = sorted(theirs ^ set(own))[:3]
        raise RunStoreError(_another_configuration(path, arm.name, f"other parameters: {', '.join(diff)}"))
    for k, v in own.items():
        if not isinstance(saved[k], torch.Tensor) or saved[k].shape != v.shape:
            shape = tuple(saved[k].shape) if isinstance(saved[k], torch.Tensor) else type(saved[k]).__name__
            raise RunStoreError(_another_configuration(path, arm.name, f"{k} is {shape}, this run's is {tuple(v.shape)}"))
    for what in ("callbacks", "extra_steppers"):  # zip() would drop the extra ones' state, or leave a new one empty
        theirs, mine = ckpt.get(what), _stateful(getattr(arm, what))
        if not isinstance(theirs, list) or len(_saved(theirs)) != len(mine):
            got = len(_saved(theirs)) if isinstance(theirs, list) else type(theirs).__name__
            raise RunStoreError(_another_configuration(path, arm.name, f"{got} {what} with state, this run has {len(mine)}"))
    if (why := _other_optimizer(ckpt.get("optimizer"), arm.optimizer)) is not None:
        raise RunStoreError(_another_configuration(path, arm.name, why))


def _other_optimizer(saved: Any, optimizer: Any) -> str | None:
    """Why a saved torch.optim state is another optimizer's (its groups' option names differ: AdamW's betas, SGD's
    momentum; torch's load_state_dict takes them and the next step fails), else None."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return None
    own = optimizer.state_dict()["param_groups"]
    theirs = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(theirs, list) or len(theirs) != len(own) or not all(isinstance(g, dict) for g in theirs):
        return f"another optimizer's state ({len(theirs) if isinstance(theirs, list) else 'no'} param groups, this run's has {len(own)})"
    for i, (a, b) in enumerate(zip(theirs, own)):
        if set(a) != set(b):
            return f"another optimizer's state (param group {i} has options {sorted(set(a) ^ set(b))[:4]} that differ)"
    return None


def finite_or_nan(x: float) -> float:
    return x if math.isfinite(x) else float("nan")
