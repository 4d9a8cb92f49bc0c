"""`diagnose`: train any model for a few AdamW steps with a Monitor and return its per-weight verdicts."""

from __future__ import annotations

import math

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from specscope.errors import ConfigError, NonFiniteError
from specscope.probe.monitor import Monitor
from specscope.records import Record

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class DiagnoseResult:
    advice: pd.DataFrame  # Monitor.advice() over all measured steps
    losses: list[float]
    monitor: Monitor
    records: list[Record] = field(default_factory=list)


def diagnose(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    steps: int,
    *,
    every: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    margin: float = 0.25,
    sink: Callable[[list[Record]], None] | None = None,
    **monitor_kwargs,
) -> DiagnoseResult:
    """Train `model` with AdamW for `steps` steps on `batches` (one batch per step), measuring every
    `every`-th step; `loss_fn(model, batch)` returns the scalar loss. Records (plus the loss) go to
    `sink` after each step, e.g. a store's `run.append`. The verdicts use every measured step."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if not isinstance(steps, int) or steps < 1 or (every is not None and (not isinstance(every, int) or every < 1)):
        raise ConfigError(f"diagnose needs steps >= 1 and every >= 1 (or every=None with log_spaced=True); got steps={steps}, every={every}")
    if not number(margin) or margin < 0:  # checked before training, not after the last step
        raise ConfigError(f"diagnose(margin={margin!r}) must be a finite number >= 0")
    monitor = Monitor(model, every=every, **monitor_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    it, losses, records = iter(batches), [], []
    model.train()
    for step in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            raise ConfigError(f"the batch iterator ended after {step} batches; diagnose needs one per step (steps={steps})") from None
        opt.zero_grad(set_to_none=True)
        try:
            with monitor.step(step):
                loss = loss_fn(model, batch)
                _check_loss(loss, step, monitor.nonfinite)
                loss.backward()
        except NonFiniteError as e:
            e.before_update = step == 0  # no update yet: the learning rate cannot be the cause (the CLI's wording)
            raise
        opt.step()
        monitor.after_optimizer_step()
        losses.append(float(loss.detach()))
        recs = monitor.pop_records() + [Record(step, "", "loss", losses[-1])]
        records.extend(recs)
        if sink is not None:
            sink(recs)
    table = monitor.advice(window=steps, margin=margin)
    monitor.close()
    return DiagnoseResult(table, losses, monitor, records)


def _check_loss(loss: torch.Tensor, step: int, nonfinite: str) -> None:
    """A NaN/Inf loss is named as the loss (every gradient would be non-finite after it), before backward."""
    if nonfinite == "raise" and not bool(torch.isfinite(loss.detach()).all()):
        problem = f"non-finite loss ({float(loss.detach().float().sum())}) at step {step}"
        err = NonFiniteError(f"{problem}; " + ("check the model's initialization and the data (no update has been made "
                                               "yet)" if step == 0 else "lower the learning rate or check the data"))
        err.problem = problem  # the CLI words the fix its own way
        raise err
