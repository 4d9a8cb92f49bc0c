"""A `specscope diagnose` factory whose layer names are rich markup and matplotlib mathtext."""

import torch

MARKUP, MATHTEXT = "[/nope]", r"a$\undefinedcommand{$"


def make(seed: int = 0, second: str = MATHTEXT):
    """Both hostile names (the report must escape mathtext in figure labels)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential()
    model.add_module(MARKUP, torch.nn.Linear(8, 16))
    model.add_module("act", torch.nn.ReLU())
    model.add_module(second, torch.nn.Linear(16, 1))

    def batches():
        while True:
            x = torch.randn(32, 8, generator=g)
            yield x, x[:, :1] * 2

    return model, batches(), lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])


def markup_only(seed: int = 0):
    """Rich markup in layer names, for the terminal tables."""
    return make(seed, second="[bold]head")
