"""What a lab is made of: a Config, Arms that train with the shared loop, Measures that only compute.

A lab module `specscope/labs/<name>.py` defines `NAME`, `Config(LabConfig)`, `build(cfg, device) -> list[Arm | Measure]`
(everything created on `device`, a torch.device the loop resolved from `cfg.device`),
`claims(df, cfg) -> list[Claim]`, optionally `figures(df, cfg) -> dict[str, Figure]` and `inputs(cfg) -> dict[str, str]`
(a fingerprint of each thing the run reads from outside its config, such as a corpus file: `--resume` refuses
a run whose inputs changed). Its docstring's first line is what `specscope list` shows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Iterable, Literal, Protocol

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from specscope.errors import ConfigError
from specscope.records import Record


# Every config value has a range, checked by pydantic before a run directory exists (never NaN or ±inf).
AtLeast1 = Annotated[int, Field(ge=1)]  # counts, sizes, intervals: 0 would be meaningless or divide by it
AtLeast2 = Annotated[int, Field(ge=2)]
AtLeast0 = Annotated[int, Field(ge=0)]  # counts where 0 means "off" / "all" (the field's comment says which)
FLOAT32_MAX = 3.4028234663852886e38  # a larger learning rate or decay cannot become the float32 scalar torch steps with
Positive = Annotated[float, Field(gt=0, le=FLOAT32_MAX, allow_inf_nan=False)]  # learning rates, scales, thresholds
NonNegative = Annotated[float, Field(ge=0, le=FLOAT32_MAX, allow_inf_nan=False)]  # decays, penalties, clip norms (0: off)
Finite = Annotated[float, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX, allow_inf_nan=False)]
Unit = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]  # accuracies, ratios in [0, 1]
Share = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]  # a part of a whole, all of it allowed: (0, 1]
Fraction = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]  # a proper part of a whole: (0, 1)
Margin = Annotated[float, Field(ge=1, le=FLOAT32_MAX, allow_inf_nan=False)]  # a factor x with a band [1/x, x] around 1
Beta = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]  # momentum / EMA coefficient in [0, 1)
Betas = tuple[Beta, Beta]
Seed = Annotated[int, Field(ge=0, lt=2**63)]  # what torch.manual_seed accepts


def step_seed(seed: int, step: int) -> int:
    """A generator seed for `step` of the run of `seed`, in [0, 2⁶³) for every Seed (seed·1_000_003 + step, as labs
    have always drawn, reduced mod 2⁶³: the same seeds as before below ≈ 9.2e12, where the sum once overflowed
    torch.manual_seed's range and failed the run)."""
    return (seed * 1_000_003 + step) % 2**63


def _absolute(path: str, names: tuple[str, ...] = ("stdlib",)) -> str:
    if not path.strip():
        raise ValueError(f"an empty path; give one of {', '.join(names)} or a path")
    return path if path in names else os.path.abspath(os.path.expanduser(path))


Corpus = Annotated[str, AfterValidator(_absolute)]  # "stdlib", or a text file / folder (stored absolute: a resume reads the same files)
# "synthetic", "digits", or a .npy / .npz file (stored absolute, as a corpus)
DataFile = Annotated[str, AfterValidator(lambda path: _absolute(path, ("synthetic", "digits")))]


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes (a lab's `inputs` fingerprint of data it reads from outside its config)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class LabConfig(BaseModel):
    """Fields every lab has. Subclasses add their own; unknown keys are an error, never ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: AtLeast0 = 0  # 0: checkpoint only at the end of each arm and on interrupt


def check_seed_list(cfg: LabConfig) -> None:
    """A lab that draws its seeds from a `seeds` list: `seed` would be accepted and change nothing, and `claims`
    would count two such runs as two seeds of one setting."""
    if cfg.seed != 0:
        raise ConfigError(f"this lab draws its seeds from `seeds` (now {cfg.seeds}); `seed` has no effect here: "
                          f"use --set seeds=[{cfg.seed}] (or a list of several)")


Log = Callable[[Iterable[Record]], None]


class Callback(Protocol):
    """Lab-specific work inside the shared loop. Both hooks are optional; each returns records to store.

    `after_backward` sees the gradients before the optimizer step (measure them, or project them in place);
    `after_step` sees the parameters after it. `every` says on which steps they run.
    """

    every: int

    def after_backward(self, step: int, model: torch.nn.Module, optimizer: Any) -> Iterable[Record]: ...

    def after_step(self, step: int, model: torch.nn.Module, optimizer: Any) -> Iterable[Record]: ...


@dataclass
class Arm:
    """One model trained by the shared loop.

    `batch(step)` must be a deterministic function of the step (so a resumed run sees the same data);
    `loss(model, batch)` returns the scalar loss to minimise. `evaluate(model)` returns whole-model metrics
    (val_loss, test_acc, ...) every `eval_every` steps and at the end. `optimizer` is a torch.optim.Optimizer,
    or any object with step()/zero_grad()/state_dict()/load_state_dict(); `extra_steppers` (e.g. LowRankDecay)
    are stepped after it. `stop(metrics)` may end the arm early (e.g. once grokked and stable).
    """

    name: str
    model: torch.nn.Module
    optimizer: Any
    batch: Callable[[int], Any]
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    steps: int
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None
    eval_every: int = 0
    monitor: Any = None  # specscope.probe.Monitor or None
    callbacks: list[Any] = field(default_factory=list)
    extra_steppers: list[Any] = field(default_factory=list)
    grad_clip: float | None = None
    micro_batches: int = 1  # batch(step) returns a list of this many micro-batches when > 1
    stop: Callable[[dict[str, float]], bool] | None = None
    log_every: int = 1


@dataclass
class Measure:
    """An analysis-only part of a lab: `fn(log, device)` computes and logs records (no training loop). Records
    without an arm get `name`; `arms` names the others its records carry (shardwise's "global-2"), which a
    resume deletes and counts with the part's own."""

    name: str
    fn: Callable[[Log, torch.device], None]
    arms: tuple[str, ...] = ()

    @property
    def owned(self) -> tuple[str, ...]:
        return (self.name, *self.arms)


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu. Asking for cuda without one is a ConfigError."""
    from specscope.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for but torch sees no CUDA device; use --set device=cpu or auto")
    return torch.device(name)
