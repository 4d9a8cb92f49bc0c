"""Toy regression lab used by the loop tests: two SGD arms and one measurement."""

from __future__ import annotations

import os
import signal

import torch

from specscope.labs.base import Arm, LabConfig, Measure
from specscope.records import Claim, Record

NAME = "toy"
INTERRUPT_AT: dict[str, int] = {}  # arm -> step at which a test sends SIGINT to this process


class Config(LabConfig):
    steps: int = 30
    lr: float = 0.05
    width: int = 8
    arms: list[str] = ["a", "b"]
    eval_every: int = 5


class Interrupter:
    every = 1

    def __init__(self, arm: str):
        self.arm = arm

    def after_step(self, step, model, optimizer):
        if INTERRUPT_AT.get(self.arm) == step:
            INTERRUPT_AT.pop(self.arm)
            os.kill(os.getpid(), signal.SIGINT)
        return [Record(step, "w", "weight_norm", model.weight.norm().item())]


def build(cfg: Config, device):
    g = torch.Generator().manual_seed(cfg.seed)
    w_true = torch.randn(1, cfg.width, generator=g)
    x_val = torch.randn(64, cfg.width, generator=g)

    def batch(step: int):
        gs = torch.Generator().manual_seed(cfg.seed * 100003 + step)
        x = torch.randn(16, cfg.width, generator=gs)
        return x, x @ w_true.T + 0.1 * torch.randn(16, 1, generator=gs)

    def loss(model, b):
        x, y = b
        return torch.nn.functional.mse_loss(model(x), y)

    def evaluate(model):
        xv = x_val.to(device)
        return {"val_loss": torch.nn.functional.mse_loss(model(xv), xv @ w_true.T.to(device)).item()}

    items = []
    for name in cfg.arms:
        model = torch.nn.Linear(cfg.width, 1, bias=False)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
        items.append(Arm(name, model, opt, batch, loss, cfg.steps, evaluate, cfg.eval_every, callbacks=[Interrupter(name)]))

    def measure(log, device):
        log([Record(0, "", "w_true_norm", w_true.norm().item())])

    items.append(Measure("truth", measure))
    return items


def claims(df, cfg):
    last = df[(df.metric == "val_loss")].sort_values("step").groupby("arm")["value"].last()
    first = df[(df.metric == "val_loss") & (df.step == 0)].groupby("arm")["value"].first()
    ok = bool((last < first).all())
    return [Claim("TOY-1", "SGD lowers the validation loss", "lower", f"{first.min():.3g} -> {last.max():.3g}",
                  "PASS" if ok else "FAIL")]
