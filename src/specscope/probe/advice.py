"""Verdicts per weight from the measured nr(G)/st(A), and optimizer parameter groups from them."""

from __future__ import annotations

import fnmatch
import statistics
from collections.abc import Iterable

import pandas as pd
from torch import nn

from specscope.errors import ConfigError

COLUMNS = ["layer", "kind", "shape", "rows", "stable_rank", "nuclear_rank", "spectral_advantage", "measurements", "verdict", "estimator"]
HEAD_PATTERNS = ("head", "*.head", "lm_head", "*.lm_head", "output", "*.output")
MARGIN = 0.25  # nr/st must clear 1 by this factor to decide a verdict


def verdict(ratio: float, margin: float = MARGIN) -> str:
    """spectral if ratio > 1 + margin, euclidean if ratio < 1 / (1 + margin), else undecided."""
    if ratio != ratio:  # NaN
        return "undecided"
    return "spectral" if ratio > 1 + margin else "euclidean" if ratio < 1 / (1 + margin) else "undecided"


def advice_table(history: dict, described: dict[str, dict], *, window: int, margin: float) -> pd.DataFrame:
    """One row per weight: medians over the last `window` measurements (step, st, nr) and the verdict."""
    if window < 1 or margin < 0:
        raise ConfigError(f"advice(window={window}, margin={margin}): window must be >= 1 and margin >= 0")
    rows = []
    for name, d in described.items():
        recent = list(history.get(name, ()))[-window:]
        st = statistics.median(r[1] for r in recent) if recent else float("nan")
        nr = statistics.median(r[2] for r in recent) if recent else float("nan")
        ratio = statistics.median(r[2] / r[1] for r in recent) if recent else float("nan")
        rows.append([name, d["kind"], d["shape"], d.get("rows", 0), st, nr, ratio, len(recent), verdict(ratio, margin), d.get("estimator", "")])
    return pd.DataFrame(rows, columns=COLUMNS)


def _is_head(name: str, module: nn.Module, vocab_sizes: set[int], embed_params: set[int], patterns) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    if id(module.weight) in embed_params or any(fnmatch.fnmatchcase(name, p) for p in patterns):
        return True
    return module.out_features in vocab_sizes


def param_groups(
    model: nn.Module,
    table: pd.DataFrame,
    slots: Iterable,
    *,
    head_patterns: Iterable[str] = HEAD_PATTERNS,
    spectral: str = "muon",
    euclidean: str = "adamw",
    spectral_options: dict | None = None,
    euclidean_options: dict | None = None,
) -> list[dict]:
    """Two groups {"algorithm", "params", "param_names", **options} covering every trainable parameter once.

    Structural rules first (as in the Muon recipe): embeddings, LM heads (tied to an embedding, named
    like `head_patterns`, or with as many outputs as an embedding has tokens) and parameters that are not
    2-D go to `euclidean`. A 2-D weight goes to `spectral` when its verdict is "spectral" (for a fused
    weight: every slice's verdict). Everything else, unmeasured weights included, goes to `euclidean`.
    """
    verdicts = dict(zip(table["layer"], table["verdict"]))
    slot_names = {id(s.param): s.names() for s in slots}
    embeds = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    embed_params = {id(m.weight) for m in embeds}
    vocab = {m.num_embeddings for m in embeds}
    heads = {id(m.weight) for n, m in model.named_modules() if _is_head(n, m, vocab, embed_params, tuple(head_patterns))}
    groups = {spectral: ([], []), euclidean: ([], [])}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        names = slot_names.get(id(p), [])
        structural = p.dim() != 2 or id(p) in embed_params or id(p) in heads
        is_spectral = not structural and bool(names) and all(verdicts.get(n) == "spectral" for n in names)
        params, pnames = groups[spectral if is_spectral else euclidean]
        params.append(p)
        pnames.append(pname)
    opts = {spectral: spectral_options or {}, euclidean: euclidean_options or {}}
    return [{"algorithm": alg, "params": ps, "param_names": ns, **opts[alg]} for alg, (ps, ns) in groups.items() if ps]
