"""`specscope diagnose`: a few training steps with the probe, then st(A), nr(G) and a verdict per weight.

torch and the layers below are imported inside the functions: every command module is imported on every
CLI start, and `specscope --help` should not pay for torch.
"""

from __future__ import annotations

import importlib
import inspect
import math

import typer
from rich.console import Console
from rich.table import Table

from specscope.cli import app
from specscope.errors import ConfigError
from specscope.names import markup


def builtin(name: str, seed: int):
    """(model, batches, loss_fn) of a built-in model: 'mlp' or 'transformer' (see specscope.models.builtin)."""
    from specscope.models.builtin import builtin as make

    return make(name, seed)


def load_factory(spec: str, seed: int):
    """Import `module:function` and call it (with seed= if it takes one) -> (model, batches, loss_fn)."""
    if spec in ("mlp", "transformer"):
        return builtin(spec, seed)
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ConfigError(f"--model {spec!r}: use 'mlp', 'transformer' or a factory 'package.module:function'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"--model {spec!r}: cannot import module {mod_name!r} ({e}); is it on PYTHONPATH?") from None
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        raise ConfigError(f"--model {spec!r}: module {mod_name!r} has no function {fn_name!r}")
    import torch

    takes_seed = "seed" in inspect.signature(factory).parameters
    out = factory(seed=seed) if takes_seed else factory()
    if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[0], torch.nn.Module) and callable(out[2])):
        raise ConfigError(f"--model {spec!r}: the factory must return (model: nn.Module, batch_iterator, loss_fn(model, batch)); got {type(out).__name__}")
    return out


def _fmt(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.3g}"


def verdict_table(df, title: str) -> Table:
    colour = {"spectral": "green", "euclidean": "cyan", "undecided": "yellow"}
    t = Table(title=title)
    for col in ("weight", "st(A)", "nr(G)", "nr/st", "verdict", "estimator", "rows"):
        t.add_column(col, justify="left" if col in ("weight", "verdict", "estimator") else "right")
    for r in df.itertuples():
        v = f"[{colour[r.verdict]}]{r.verdict}[/]"
        t.add_row(markup(r.layer), _fmt(r.stable_rank), _fmt(r.nuclear_rank), _fmt(r.spectral_advantage), v, r.estimator, str(r.rows))
    return t


@app.command()
def diagnose(
    model: str = typer.Option("transformer", "--model", help="mlp, transformer, or a factory module:function returning (model, batches, loss_fn)."),
    steps: int = typer.Option(30, "--steps", min=1, help="Training steps (AdamW)."),
    every: int = typer.Option(1, "--every", min=1, help="Measure every K-th step."),
    out: str = typer.Option("runs", "--out", help="Root folder of run directories."),
    seed: int = typer.Option(0, "--seed", help="Seed of the model and the data."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
) -> None:
    """Train a model for a few steps with the probe; print st(A), nr(G), nr/st and a verdict per weight."""
    from specscope import report, store
    from specscope.probe import diagnose as run_diagnose
    from specscope.store import Run

    net, batches, loss_fn = load_factory(model, seed)
    config = {"model": model, "steps": steps, "every": every, "seed": seed, "lr": lr, "optimizer": "adamw"}
    with Run.create(out, "diagnose", config) as run:
        result = run_diagnose(net, batches, loss_fn, steps, every=every, lr=lr, sink=run.append)
        run.flush()
        summary = {"final_loss": result.losses[-1], "unpaired": result.monitor.unpaired,
                   "verdicts": dict(zip(result.advice["layer"], result.advice["verdict"]))}
        run.write_summary(summary)
        report.write_report(run.path, store.load(run), config=config, title=f"diagnose {model} — {run.id}")
        run.set_status("complete")
    console = Console()
    console.print(verdict_table(result.advice, f"{model}: {steps} steps, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}"))
    for name, why in result.monitor.unpaired.items():
        console.print(f"[yellow]unpaired[/] {markup(name)}: {markup(why)}")
    console.print(f"run: {run.path}\nreport: {run.path / 'report.html'}")
