"""`specscope diagnose`: a few training steps with the probe, then st(A), nr(G) and a verdict per weight."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.table import Table

from specscope.cli import app
from specscope.errors import ConfigError

TRANSFORMER = dict(vocab_size=64, seq_len=32, n_layer=2, n_head=4, d_model=64)
BATCH = 16


def language_batches(seed: int, vocab: int = 64, seq_len: int = 32, batch: int = BATCH) -> Iterator[torch.Tensor]:
    """A synthetic language: a fixed random bigram chain whose rows are Zipf(1.2) over shuffled tokens.

    The unigram distribution is skewed (so the embedding's N/c_max is far below the vocabulary size) and
    the next token is predictable from the previous one (so the loss falls). Yields [batch, seq_len+1].
    """
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.2
    trans = torch.stack([zipf[torch.randperm(vocab, generator=g)] for _ in range(vocab)])
    trans = trans / trans.sum(1, keepdim=True)
    while True:
        tok = torch.multinomial(zipf / zipf.sum(), batch, replacement=True, generator=g)
        seq = [tok]
        for _ in range(seq_len):
            tok = torch.multinomial(trans[tok], 1, generator=g).squeeze(1)
            seq.append(tok)
        yield torch.stack(seq, 1)


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def teacher_batches(seed: int, d_in: int = 32, classes: int = 10, batch: int = 128) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Gaussian inputs labelled by a fixed random two-layer teacher."""
    g = torch.Generator().manual_seed(seed)
    W1, W2 = torch.randn(d_in, 64, generator=g), torch.randn(64, classes, generator=g)
    while True:
        x = torch.randn(batch, d_in, generator=g)
        yield x, (torch.relu(x @ W1) @ W2).argmax(1)


def mlp_loss(model, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def builtin(name: str, seed: int):
    """(model, batches, loss_fn) of a built-in model: 'mlp' or 'transformer'."""
    from specscope.models import GPT, MLP, GPTConfig

    torch.manual_seed(seed)
    if name == "mlp":
        return MLP([32, 128, 128, 10], activation="relu"), teacher_batches(seed), mlp_loss
    cfg = GPTConfig(**TRANSFORMER)
    return GPT(cfg), language_batches(seed, cfg.vocab_size, cfg.seq_len), lm_loss


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
        t.add_row(r.layer, _fmt(r.stable_rank), _fmt(r.nuclear_rank), _fmt(r.spectral_advantage), v, r.estimator, str(r.rows))
    return t


@app.command()
def diagnose(
    model: str = typer.Option("transformer", "--model", help="mlp, transformer, or a factory module:function returning (model, batches, loss_fn)."),
    steps: int = typer.Option(30, "--steps", help="Training steps (AdamW)."),
    every: int = typer.Option(1, "--every", help="Measure every K-th step."),
    out: str = typer.Option("runs", "--out", help="Root folder of run directories."),
    seed: int = typer.Option(0, "--seed", help="Seed of the model and the data."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
) -> None:
    """Train a model for a few steps with the probe; print st(A), nr(G), nr/st and a verdict per weight."""
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
        run.set_status("complete")
    console = Console()
    console.print(verdict_table(result.advice, f"{model}: {steps} steps, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}"))
    for name, why in result.monitor.unpaired.items():
        console.print(f"[yellow]unpaired[/] {name}: {why}")
    console.print(f"run: {run.path}")
