"""Which matrix each weight multiplies (REFERENCE §2) and the hooks that see it.

A weight W used as y = W a pairs with the matrix A whose rows are the inputs a:
nn.Linear -> its input flattened to [tokens, in_features]; nn.Conv1d/2d -> unfolded patches
[positions, C·k]; nn.Embedding -> the one-hot token matrix (counted, never built); a weight shared by
several modules is one `Slot` fed by all of them. Everything else with a matrix parameter is listed in
`unpaired` with the reason.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from specscope.errors import ConfigError

PAIRABLE = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)


@dataclass
class Slot:
    """One measured weight: its parameter, the modules that use it and its row slices (fused weights)."""

    name: str
    param: nn.Parameter
    kind: str  # "linear" | "conv" | "embedding" | "observed"
    n_features: int
    modules: list[str] = field(default_factory=list)
    slices: list[tuple[str, int, int]] = field(default_factory=list)  # (name, start, stop) of output rows
    stats: object = None

    def grad_matrix(self, g: torch.Tensor) -> torch.Tensor:
        """The gradient as the matrix acting on A's rows: [out, in] (conv kernels flattened)."""
        return g.to_dense().reshape(g.shape[0], -1)

    def names(self) -> list[str]:
        return [s[0] for s in self.slices] or [self.name]


def conv_padding(m: nn.Conv1d | nn.Conv2d) -> tuple[int, ...] | None:
    """Integer padding per spatial dim, or None when the conv cannot be written as unfold @ Wᵀ."""
    if m.padding_mode != "zeros" or m.groups != 1:
        return None
    if m.padding == "valid":
        return (0,) * len(m.kernel_size)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return tuple(m.padding)


def input_matrix(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The matrix A (rows = samples/tokens/positions) whose rows the module's weight multiplies."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, m.in_features)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        two_d = isinstance(m, nn.Conv2d)
        if x.dim() == (3 if two_d else 2):  # unbatched input
            x = x.unsqueeze(0)
        pad = conv_padding(m)
        k, s, d = m.kernel_size, m.stride, m.dilation
        if not two_d:  # a 1-D conv is a 2-D conv over a height-1 image
            x, k, s, d, pad = x.unsqueeze(-2), (1, *k), (1, *s), (1, *d), (0, *pad)
        cols = F.unfold(x, k, dilation=d, padding=pad, stride=s)  # [B, C·k, positions]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise TypeError(f"no input matrix for {type(m).__name__}")


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _split_for(name: str, split: dict, out_rows: int) -> list[tuple[str, int, int]]:
    """Row slices of a fused weight from split={pattern: [names] (equal parts) or {name: rows}}."""
    for pattern, parts in split.items():
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        sizes = dict(parts) if isinstance(parts, dict) else None
        names = list(sizes) if sizes else list(parts)
        if sizes is None:
            if out_rows % len(names):
                raise ConfigError(f"split of '{name}': {out_rows} output rows do not divide into {len(names)} equal parts; give sizes as {{name: rows}}")
            sizes = {p: out_rows // len(names) for p in names}
        if sum(sizes.values()) != out_rows:
            raise ConfigError(f"split of '{name}': sizes {sizes} add to {sum(sizes.values())}, the weight has {out_rows} output rows")
        out, start = [], 0
        for p in names:
            out.append((f"{name}.{p}", start, start + sizes[p]))
            start += sizes[p]
        return out
    return []


def find_slots(model: nn.Module, *, include=None, exclude=(), split=None) -> tuple[dict[int, Slot], dict[str, str], list[tuple[str, nn.Module, Slot]]]:
    """Pair the model's weights with their inputs.

    Returns (slots keyed by id(param), unpaired {name: reason}, uses [(module name, module, slot)]).
    A parameter shared by several modules becomes one slot named after its first module; an embedding
    tied to a linear layer is measured on the dense (linear) side.
    """
    split = split or {}
    slots: dict[int, Slot] = {}
    uses: list[tuple[str, nn.Module, Slot]] = []
    unpaired: dict[str, str] = {}
    paired_params: set[int] = set()

    def selected(name: str) -> bool:
        return (include is None or _matches(name, include)) and not _matches(name, exclude)

    for name, m in model.named_modules():
        if not isinstance(m, PAIRABLE) or not selected(name):
            continue
        w = m.weight
        if not w.requires_grad:
            continue
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and conv_padding(m) is None:
            unpaired[f"{name}.weight"] = f"{type(m).__name__} with groups={m.groups}, padding={m.padding!r}, padding_mode={m.padding_mode!r} is not unfold @ Wᵀ"
            continue
        kind = "embedding" if isinstance(m, nn.Embedding) else "conv" if isinstance(m, (nn.Conv1d, nn.Conv2d)) else "linear"
        n = m.num_embeddings if kind == "embedding" else w[0].numel()
        slot = slots.get(id(w))
        if slot is None:
            slot = slots[id(w)] = Slot(name, w, kind, n, slices=_split_for(name, split, w.shape[0]))
        elif slot.kind == "embedding" and kind != "embedding":  # tied embedding/head: measure the dense side
            slot.kind, slot.n_features = kind, n
            for i, (_, mod, s) in enumerate(uses):
                if s is slot:
                    uses[i] = (None, None, None)  # type: ignore[assignment]
        elif kind == "embedding" and slot.kind != "embedding":
            slot.modules.append(name)
            continue
        elif slot.n_features != n:
            unpaired[f"{name}.weight"] = f"shared with '{slot.name}' but used on inputs of another width"
            continue
        slot.modules.append(name)
        uses.append((name, m, slot))
        paired_params.add(id(w))
    uses = [u for u in uses if u[0] is not None]
    unknown = [p for p in split if not any(fnmatch.fnmatchcase(s.name, p) for s in slots.values())]
    if unknown:
        raise ConfigError(f"split patterns {unknown} match no Linear/Conv weight of the model; names look like {[s.name for s in slots.values()][:4]}")
    for pname, p in model.named_parameters():
        if p.dim() >= 2 and p.requires_grad and id(p) not in paired_params and pname not in unpaired and selected(pname.rsplit(".", 1)[0]):
            owner = model.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else model
            unpaired[pname] = f"{type(owner).__name__} parameter of shape {tuple(p.shape)} is not used through nn.Linear/Embedding/Conv1d/Conv2d; pass its inputs with monitor.observe('{pname}', weight, inputs)"
    return slots, unpaired, uses
