"""Plain data that crosses layers: one measured value (`Record`) and one claim verdict (`Claim`).

Nothing here imports the rest of specscope, so every layer may use it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Literal, Sequence


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
    flag: str = ""  # "" for a normal record; e.g. "nonfinite" when the probe recorded bad input; SWEEP (below)

    def as_dict(self) -> dict:
        return asdict(self)


SWEEP = "sweep"  # the flag of a record whose `step` holds a swept value (a width, a dimension, a batch size, an
# index), not a training step: a lab's sweep figures read it; a report's step axis, step range and per-weight
# summaries leave it out


def not_measured_in(records: Sequence[Record], extra: Sequence[Record]) -> list[Record]:
    """The records of `extra` whose quantity (arm, layer, metric, step) is not already in `records`: an
    AutoGeometry's nr(G) and nr/st beside a Monitor's of the same step are stored once, as the Monitor's."""
    seen = {(r.arm, r.layer, r.metric, r.step) for r in records}
    return [r for r in extra if (r.arm, r.layer, r.metric, r.step) not in seen]


Verdict = Literal["PASS", "FAIL", "INCONCLUSIVE", "UNDECIDABLE"]  # UNDECIDABLE: "not decidable at quick size"


@dataclass(frozen=True)
class Claim:
    """A published claim with the figure measured here and a verdict computed from recorded metrics."""

    id: str  # "RF-1"
    text: str  # the claim, one sentence
    published: str  # the published figure, as text
    measured: str  # the figure measured in this run, as text
    verdict: Verdict
    seeds: int = 1  # how many seeds the verdict is over
    spread: str = ""  # the measured figure's mean and [min–max] over seeds, as text ("" for one seed)
    setting: str = ""  # the regime and the settings the paper leaves open that this verdict was measured at
    value: float | None = None  # the figure the verdict rule tests (for the mean and range over seeds)

    def as_dict(self) -> dict:
        return asdict(self)


def over_seeds(claims: Sequence[Claim], seeds: Sequence[int] | None = None) -> Claim:
    """One claim measured at several seeds -> one claim: the verdict most seeds reached (INCONCLUSIVE on a
    tie), `seeds`, and `spread` = the mean [min–max] of `value` over the seeds that have one (how many, where
    some have none) and the per-seed verdicts."""
    if not claims:
        raise ValueError("over_seeds needs at least one claim")
    if len({c.id for c in claims}) > 1:
        raise ValueError(f"over_seeds got different claims {sorted({c.id for c in claims})}; pass one id at a time")
    counts = Counter(c.verdict for c in claims).most_common()
    verdict = counts[0][0] if len(counts) == 1 or counts[0][1] > counts[1][1] else "INCONCLUSIVE"
    values = [c.value for c in claims if c.value is not None and math.isfinite(c.value)]
    spread = f"{sum(values) / len(values):.3g} [{min(values):.3g}–{max(values):.3g}]" if values else ""
    if values and len(values) < len(claims):  # a seed whose figure the rule does not apply to has no value
        spread += f" over {len(values)} of {len(claims)} seeds"
    spread += "; " if values else ""
    spread += "verdicts " + ", ".join(c.verdict for c in claims)
    seeds = list(seeds) if seeds is not None else list(range(len(claims)))
    measured = " | ".join(f"seed {s}: {c.measured}" for s, c in zip(seeds, claims))
    mean = sum(values) / len(values) if values else None
    setting = re.sub(r"\bseed -?\d+\b", "seeds " + ", ".join(map(str, seeds)), claims[0].setting)  # the first seed's text
    # a lab that runs seeds seed..seed+k-1 in one run (sed's `seeds`) says "seeds a..b": each run's range from its seed
    setting = re.sub(r"\bseeds (-?\d+)\.\.(-?\d+)\b", lambda m: "seeds " + ", ".join(
        str(s) if m[1] == m[2] else f"{s}..{s + int(m[2]) - int(m[1])}" for s in seeds), setting)
    return replace(claims[0], measured=measured, verdict=verdict, seeds=len(claims), spread=spread, value=mean,
                   setting=setting)
