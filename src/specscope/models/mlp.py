"""A plain multilayer perceptron with configurable widths and activation (used by `specscope diagnose`)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from specscope.errors import ConfigError

ACTIVATIONS = {
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "silu": F.silu,
}


class MLP(nn.Module):
    """sizes = (in, hidden..., out): Linear layers `layers.{i}` with the activation between them."""

    def __init__(self, sizes: Sequence[int], activation: str = "relu", bias: bool = True):
        super().__init__()
        sizes = tuple(sizes)
        if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in sizes):
            raise ConfigError(f"MLP sizes must be at least (in, out) with positive whole-number widths; got {sizes}")
        sizes = tuple(int(s) for s in sizes)
        if activation not in ACTIVATIONS:
            raise ConfigError(f"MLP activation={activation!r} is not one of {tuple(ACTIVATIONS)}")
        self.act = ACTIVATIONS[activation]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(self.act(x))
        return x
