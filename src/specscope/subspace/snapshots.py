"""Gradient and update snapshots of a parameter set pushed into rolling SVDs (paper 003, REFERENCE §5).

`SEDTracker` is a training-loop callback. Every `every` steps it
- computes the gradient of each named loss closure (a fixed batch, or one task's loss on it) with
  `torch.autograd.grad`, so the training gradients in `.grad` are left untouched, and pushes it into
  that loss's RollingSVD ("gradient SED", "task-<name> SED");
- with `update=True`, pushes the parameter update into the "update-sed" window: by default
  (`update_delta="snapshots"`) Δθ = θ(this snapshot) − θ(previous snapshot), the update accumulated over
  the `every` steps between snapshots; with `update_delta="step"` the single optimizer step
  θ_t − θ_{t−1} at the snapshot (and with `exclude_decay=True` that step without decoupled weight decay,
  Δθ_t + lr·wd·θ_{t−1}, which for AdamW is −lr times the Adam direction).
`every` is specscope's loop's schedule (it calls the callback every `every` steps); a hand-written loop that
calls `after_backward` / `after_step` itself snapshots at every call, so it calls them every `every` steps.
`GatedProjection` applies a GradientProjection only once a window is full, so the random-subspace arms
start projecting at the same step as the SED arms.
"""

from __future__ import annotations

from typing import Callable, Iterable, Literal, Mapping

import torch
from torch import Tensor

from specscope.errors import NonFiniteError
from specscope.records import Record
from specscope.subspace._params import checked_params
from specscope.subspace.project import GradientProjection, flatten
from specscope.subspace.rolling import RollingSVD

UPDATE = "update-sed"


class SEDTracker:
    """Rolling SVDs of gradient snapshots (one per named loss) and of update snapshots of `params`.

    >>> tracker = SEDTracker(attn_params, {"gradient-sed": lambda: loss_fn(model, fixed_batch)})
    >>> # in a loop: tracker.after_backward(step, model, opt); opt.step(); tracker.after_step(step, model, opt)
    >>> tracker.seds["gradient-sed"].directions()   # [k, P] SED-k directions
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        losses: dict[str, Callable[[], Tensor]],
        *,
        window: int = 20,
        k: int = 3,
        every: int = 25,
        update: bool = True,
        update_delta: Literal["snapshots", "step"] = "snapshots",
        exclude_decay: bool = False,
    ):
        if update_delta not in ("snapshots", "step"):
            raise ValueError(f"update_delta={update_delta!r}: use 'snapshots' or 'step'")
        if exclude_decay and update_delta != "step":
            raise ValueError("exclude_decay removes one step's weight decay; it needs update_delta='step'")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"SEDTracker: every must be an int ≥ 1 (snapshot every that many steps), got {every!r}")
        if not isinstance(losses, Mapping):
            raise ValueError(f"SEDTracker: losses must be a dict {{name: loss closure}}, got {type(losses).__name__}; "
                             "e.g. {'gradient-sed': lambda: loss_fn(model, fixed_batch)}")
        for name, loss in losses.items():
            if not isinstance(name, str) or not callable(loss):
                raise ValueError(f"SEDTracker: losses[{name!r}] must map a str name to a callable returning a scalar "
                                 f"loss, got {type(loss).__name__}")
        if update and UPDATE in losses:
            raise ValueError(f"SEDTracker: the loss name {UPDATE!r} is reserved for the parameter updates' window; "
                             "rename the loss")
        self.params = checked_params(params, "SEDTracker")
        self.losses, self.every = dict(losses), every
        self.update_delta, self.exclude_decay = update_delta, exclude_decay
        names = list(losses) + ([UPDATE] if update else [])
        self.seds = {name: RollingSVD(window, k) for name in names}
        self._before: Tensor | None = None  # θ before the optimizer step ("step"), or at the last snapshot

    def theta(self) -> Tensor:
        return flatten([p.detach() for p in self.params], self.params)

    def after_backward(self, step: int, model, optimizer) -> list[Record]:
        out = []
        for name, loss in self.losses.items():
            with torch.enable_grad():
                value = loss()
                if not isinstance(value, Tensor) or value.numel() != 1 or not value.requires_grad:
                    what = (type(value).__name__ if not isinstance(value, Tensor) else
                            f"a tensor of shape {tuple(value.shape)}" if value.numel() != 1 else
                            "a tensor that does not require grad")
                    raise ValueError(f"SEDTracker: loss {name!r} returned {what}; it must return a scalar tensor "
                                     "computed from the tracked parameters with grad enabled (not under no_grad, "
                                     "not .item() or .detach())")
                grads = torch.autograd.grad(value, self.params, allow_unused=True)
            if all(g is None for g in grads):
                raise ValueError(f"SEDTracker: loss {name!r} does not depend on any tracked parameter, so its "
                                 "gradient snapshot would be all zeros; compute it from the model whose parameters "
                                 "the tracker was given")
            g = flatten(grads, self.params)
            if not bool(torch.isfinite(g).all()):  # named here: RollingSVD.push knows neither the loss nor the step
                raise NonFiniteError(f"SEDTracker: the gradient of loss {name!r} at step {step} has NaN or Inf entries "
                                     f"(the loss read {float(value.detach())}); lower the learning rate or check the data")
            self.seds[name].push(g)
            out += self._describe(step, name, float(g.norm()))
        if UPDATE in self.seds and self.update_delta == "step":
            self._before = self.theta().clone()
        return out

    def after_step(self, step: int, model, optimizer) -> list[Record]:
        if UPDATE not in self.seds:
            return []
        theta = self.theta()
        before, self._before = self._before, (theta if self.update_delta == "snapshots" else None)
        if before is None:  # the first snapshot: nothing to subtract yet
            return []
        if self.exclude_decay:
            before = before * self._decay(optimizer, before)
        delta = theta - before
        self.seds[UPDATE].push(delta)
        return self._describe(step, UPDATE, float(delta.norm()))

    def _decay(self, optimizer, like: Tensor) -> Tensor:
        """Per coordinate, the factor 1 − lr·wd that decoupled weight decay (AdamW) applied to θ_{t−1}."""
        group = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        missing = [i for i, p in enumerate(self.params) if id(p) not in group]
        if missing:
            raise ValueError(f"exclude_decay: tracked parameters {missing} are not in the optimizer's param groups")
        coupled = sorted({type(optimizer).__name__ for p in self.params
                          if group[id(p)].get("weight_decay", 0.0) and not _decoupled(optimizer, group[id(p)])})
        if coupled:
            raise ValueError(f"exclude_decay removes decoupled weight decay (AdamW's, Muon's: θ ← θ·(1 − lr·wd)); "
                             f"{coupled[0]} adds its weight_decay to the gradient (coupled), where it is part of the step: "
                             "use exclude_decay=False with it, or AdamW")
        factors = [1 - group[id(p)]["lr"] * group[id(p)].get("weight_decay", 0.0) for p in self.params]
        return torch.cat([torch.full((p.numel(),), f, dtype=like.dtype, device=like.device)
                          for p, f in zip(self.params, factors)])

    def _describe(self, step: int, name: str, norm: float) -> list[Record]:
        sed = self.seds[name]
        out = [Record(step, name, "snapshot_norm", norm)]
        if sed.full:
            s = sed.singular_values()
            rotation = sed.rotation()  # NaN at the first full window: nothing to compare with yet
            out.append(Record(step, name, "sed_gap", sed.gap()))
            out += [Record(step, name, "sed_rotation", rotation)] if rotation == rotation else []
            out += [Record(step, name, f"sed_sigma{i + 1}", float(s[i])) for i in range(min(sed.k, len(s)))]
        return out

    def state_dict(self) -> dict:
        return {"seds": {n: s.state_dict() for n, s in self.seds.items()}, "before": self._before}

    def load_state_dict(self, state: dict) -> None:
        seds = state.get("seds") if isinstance(state, dict) else None
        if not isinstance(seds, dict) or "before" not in state or set(seds) != set(self.seds):
            saved = sorted(seds) if isinstance(seds, dict) else None
            raise ValueError(f"SEDTracker.load_state_dict: the state holds windows {saved}, this tracker has "
                             f"{sorted(self.seds)}; give the dict SEDTracker.state_dict() returned for the same losses "
                             "and update setting")
        before, size = state["before"], sum(p.numel() for p in self.params)
        if before is not None and not (isinstance(before, Tensor) and before.shape == (size,) and before.is_floating_point()
                                       and bool(torch.isfinite(before).all())):
            got = tuple(before.shape) if isinstance(before, Tensor) else type(before).__name__
            raise ValueError(f"SEDTracker.load_state_dict: 'before' is {got}, not None or the {size} finite parameters "
                             "of this tracker; give the dict SEDTracker.state_dict() returned for the same parameters")
        for n, s in self.seds.items():
            s.load_state_dict(state["seds"][n])
        self._before = None if before is None else before.to(self.params[0].device, copy=True)


class GatedProjection:
    """A GradientProjection that acts only once `ready()` is true (e.g. once the SED window is full)."""

    def __init__(self, projection: GradientProjection, ready: Callable[[], bool]):
        self.projection, self.ready, self.every = projection, ready, 1

    def after_backward(self, step: int, model, optimizer) -> list[Record]:
        return self.projection.after_backward(step, model, optimizer) if self.ready() else []

    def state_dict(self) -> dict:
        return self.projection.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.projection.load_state_dict(state)


def _decoupled(optimizer, group: dict) -> bool:
    """Whether `group`'s weight decay is decoupled (θ·(1 − lr·wd) beside the step): torch's AdamW (and Adam with
    decoupled_weight_decay=True), an optimizer that says so (specscope's: `decoupled_weight_decay = True`); torch's
    Adam, SGD, RMSprop… add it to the gradient."""
    return (isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
            or getattr(type(optimizer), "decoupled_weight_decay", False) is True)
