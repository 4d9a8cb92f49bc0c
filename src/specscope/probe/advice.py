"""Verdicts per weight from the measured nr(G)/st(A), and optimizer parameter groups from them."""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from torch import nn

from specscope.errors import ConfigError
from specscope.names import parameter_name
from specscope.probe import roles as R

if TYPE_CHECKING:  # pandas is imported where a table is made: `import specscope.probe` stays 0.8 s lighter
    import pandas as pd

COLUMNS = ["layer", "kind", "shape", "rows", "stable_rank", "nuclear_rank", "spectral_advantage", "measurements", "verdict", "estimator"]
MARGIN = 0.25  # the one verdict rule: spectral above 1 + MARGIN, euclidean below 1 / (1 + MARGIN)
VERDICTS = ("spectral", "euclidean", "undecided", "unmeasured")


def verdict(ratio: float, margin: float = MARGIN) -> str:
    """spectral if ratio > 1 + margin, euclidean if ratio < 1 / (1 + margin), else undecided (also NaN).

    REFERENCE §1: nr/st > 1 means a spectral step has the larger guaranteed decrease; the margin keeps
    a ratio that measurement noise could flip from deciding. A weight the probe could not pair, or has not
    measured yet, has the fourth verdict, "unmeasured" (given by the Monitor, never by a ratio).
    """
    _check_margin(margin, "verdict")
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ConfigError(f"verdict({ratio!r}): pass the ratio nr(G)/st(A), a number")
    if ratio != ratio:  # NaN
        return "undecided"
    if ratio < 0:
        raise ConfigError(f"verdict({ratio!r}): nr(G)/st(A) is >= 0 (both ranks are >= 1); pass that ratio")
    return "spectral" if ratio > 1 + margin else "euclidean" if ratio < 1 / (1 + margin) else "undecided"


def _check_margin(margin, where: str) -> None:
    """A ConfigError unless `margin` is a finite number >= 0: a negative one called a ratio of 1 "spectral", and -1
    divided by zero."""
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not math.isfinite(margin) or margin < 0:
        raise ConfigError(f"{where}(margin={margin!r}) must be a finite number >= 0 (default {MARGIN}): spectral above "
                          "1 + margin, euclidean below 1 / (1 + margin)")


def advice_table(history: dict, described: dict[str, dict], *, window: int, margin: float = MARGIN) -> pd.DataFrame:
    """One row per weight: medians over the last `window` measurements (step, st, nr) and the verdict."""
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ConfigError(f"advice(window={window!r}) must be an int >= 1: the latest measurements the medians are over")
    _check_margin(margin, "advice")
    window = int(window)
    rows = []
    for name, d in described.items():
        recent = list(history.get(name, ()))[-window:]
        st = statistics.median(r[1] for r in recent) if recent else float("nan")
        nr = statistics.median(r[2] for r in recent) if recent else float("nan")
        ratio = statistics.median(r[2] / r[1] for r in recent) if recent else float("nan")
        # a weight that only sat out the latest step (an MoE expert) keeps the verdict of its measured window; one with
        # no measurement yet (before its first measured step that did not raise) has no ratio to decide by
        v = ("unmeasured" if not recent or (d.get("unmeasured") and not d.get("unused"))
             else verdict(ratio, margin))
        rows.append([name, d["kind"], d["shape"], d.get("rows", 0), st, nr, ratio, len(recent), v, d.get("estimator", "")])
    import pandas as pd

    return pd.DataFrame(rows, columns=COLUMNS)


def param_groups(
    model: nn.Module,
    table: pd.DataFrame,
    slots: Iterable,
    *,
    spectral: str = "muon",
    euclidean: str = "adamw",
    spectral_options: dict | None = None,
    euclidean_options: dict | None = None,
) -> list[dict]:
    """Two groups {"algorithm", "params", "param_names", **options} covering every trainable parameter once.

    Roles first (probe.roles, as in the Muon recipe): embeddings, output heads and parameters that are
    not 2-D go to `euclidean`. A hidden 2-D weight goes to `spectral` when its verdict is "spectral" (for
    a fused weight: every slice's). A mixture-of-experts stack measured per expert goes, when every expert's
    verdict is "spectral" and `spectral` is "muon", to a third group with stacked=True (each expert
    orthogonalized on its own). Everything else — "euclidean", "undecided", "unmeasured" — goes to `euclidean`.
    """
    for what, opts in (("spectral_options", spectral_options), ("euclidean_options", euclidean_options)):
        if opts is not None and not isinstance(opts, Mapping):
            raise ConfigError(f"param_groups({what}={opts!r}): pass a dict of the optimizer's options for that group, "
                              "e.g. {'lr': 0.02}")
    verdicts = dict(zip(table["layer"], table["verdict"]))
    slots = list(slots)
    slot_names = {id(s.param): s.names() for s in slots}
    stacks = {id(s.param) for s in slots if s.kind == "experts"}
    roles = R.static_roles(model)
    roles.update({id(s.param): s.role for s in slots})
    stacked = (spectral, True)
    groups = {spectral: ([], []), stacked: ([], []), euclidean: ([], [])}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        names = slot_names.get(id(p), [])
        stack = id(p) in stacks and spectral == "muon"
        structural = (p.dim() != 2 and not stack) or roles.get(id(p), "hidden") != "hidden"
        is_spectral = not structural and bool(names) and all(verdicts.get(n) == "spectral" for n in names)
        params, pnames = groups[(stacked if stack else spectral) if is_spectral else euclidean]
        params.append(p)
        pnames.append(parameter_name(pname))
    opts = {spectral: spectral_options or {}, stacked: {**(spectral_options or {}), "stacked": True},
            euclidean: euclidean_options or {}}
    return [{"algorithm": alg if isinstance(alg, str) else alg[0], "params": ps, "param_names": ns, **opts[alg]}
            for alg, (ps, ns) in groups.items() if ps]
