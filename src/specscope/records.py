"""Plain data that crosses layers: one measured value (`Record`) and one claim verdict (`Claim`).

Nothing here imports the rest of specscope, so every layer may use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True)
class Record:
    """One long-format measurement: `metric` of `layer` at `step` in `arm` is `value`.

    `estimator` says how it was measured (`exact`, `gram`, `power`, `closed_form`, ...), `rows` is the
    number of rows (samples or tokens) of the matrix it was measured on and `shape` its shape as
    text ("2048x256"), because st(A) depends on how many rows A had. `layer` is "" for whole-model
    values (loss, accuracy); `arm` is "" for labs with a single arm.
    """

    step: int
    layer: str
    metric: str
    value: float
    arm: str = ""
    estimator: str = ""
    rows: int = 0
    shape: str = ""
    flag: str = ""  # "" for a normal record; e.g. "nonfinite" when the probe recorded bad input

    def as_dict(self) -> dict:
        return asdict(self)


Verdict = Literal["PASS", "FAIL", "INCONCLUSIVE", "UNDECIDABLE"]  # UNDECIDABLE: "not decidable at quick size"


@dataclass(frozen=True)
class Claim:
    """A published claim with the figure measured here and a verdict computed from recorded metrics."""

    id: str  # "RF-1"
    text: str  # the claim, one sentence
    published: str  # the published figure, as text
    measured: str  # the figure measured in this run, as text
    verdict: Verdict

    def as_dict(self) -> dict:
        return asdict(self)
