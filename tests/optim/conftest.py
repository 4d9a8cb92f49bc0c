"""Shared fixtures for optim tests: a tiny named model and deterministic gradients."""

import torch
from torch import nn


class TinyGPTish(nn.Module):
    """Embedding, two hidden linears (one conv), a norm gain, a head: enough to exercise routing."""

    def __init__(self, vocab: int = 11, d: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, 2 * d, bias=True)
        self.down = nn.Linear(2 * d, d, bias=False)
        self.conv = nn.Conv2d(2, 3, 3, bias=False)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)


def set_grads(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


import pytest


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return TinyGPTish()
