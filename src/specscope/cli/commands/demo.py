"""`specscope demo`: the main job. The quadratic check first, then both labs and `diagnose`, one report.

Part 1 (needs only `specscope.linalg`): random-feature regression f(W) = ½‖W σ(BX) − Y‖², exact GD
(L_E = ‖A‖_2²) vs exact SpecGD (L_S = ‖A‖_F²) for ReLU and SwiGLU features; per activation st(A), nr(G) at
W = 0 and after one GD step, the loss of both at a few steps, and the geometry nr/st predicts vs the winner.
"""

from __future__ import annotations

from dataclasses import dataclass

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from specscope.cli import app


@dataclass
class RFRow:
    """One activation's quadratic-check result."""

    activation: str
    st: float
    nr0: float
    nr1: float
    gd: list[float]  # objective / f(0) at each step 0..steps
    specgd: list[float]

    @property
    def predicted(self) -> str:
        from specscope.labs.random_features import predicted

        return predicted(self.nr1, self.st)

    @property
    def winner(self) -> str:
        return "spectral" if self.specgd[-1] < self.gd[-1] else "euclidean"


def quadratic_check(activations: list[str], dim: int, width: int, samples: int, outputs: int, steps: int,
                    seed: int, progress: Progress | None = None) -> list[RFRow]:
    """Run exact GD and SpecGD on random-feature regression for each activation (the demo's part 1)."""
    from specscope.data.synthetic import rf_regression
    from specscope.labs.random_features import constants, descend

    rows = []
    task = progress.add_task("quadratic check", total=2 * len(activations)) if progress else None
    for act in activations:
        problem = rf_regression(dim, width, samples, outputs, act, seed)
        c = constants(problem.A)
        gd = descend(problem, "gd", steps, c)
        if progress:
            progress.advance(task)
        spec = descend(problem, "specgd", steps, c)
        if progress:
            progress.advance(task)
        f0 = gd.objective[0]
        rows.append(RFRow(act, c.st, gd.nuclear_rank[0], gd.nuclear_rank[1],
                          [v / f0 for v in gd.objective], [v / f0 for v in spec.objective]))
    return rows


def report_steps(steps: int) -> list[int]:
    """A few steps to print: 0, 1, 2, 5, 10, 20, ... up to `steps`, always including the last."""
    marks = [s for s in (0, 1, 2, 5, 10, 20, 50, 100, 200, 500) if s < steps]
    return marks + [steps]


def rf_tables(rows: list[RFRow], steps: int) -> tuple[Table, Table]:
    """Two tables: per activation st(A), nr(G) at steps 0 and 1, predicted vs won; and f/f(0) at a few steps."""
    ranks = Table(title="Random-feature regression f(W) = ½‖W·σ(BX) − Y‖²: which geometry?")
    for name in ("activation", "st(A)", "nr(G) step 0", "nr(G) step 1", "nr/st", "predicted", "won"):
        ranks.add_column(name, justify="left" if name == "activation" else "right")
    for r in rows:
        won = Text(r.winner, style="green" if r.winner == r.predicted else "bold red")
        ranks.add_row(r.activation, f"{r.st:.2f}", f"{r.nr0:.2f}", f"{r.nr1:.2f}", f"{r.nr1 / r.st:.2f}",
                      r.predicted, won)
    marks = report_steps(steps)
    losses = Table(title="Loss f(W_t)/f(0), both methods from W = 0")
    for name in ("activation", "method", *[f"t={s}" for s in marks]):
        losses.add_column(name, justify="left" if name in ("activation", "method") else "right")
    for r in rows:
        losses.add_row(r.activation, "GD", *[f"{r.gd[s]:.3g}" for s in marks])
        losses.add_row("", "SpecGD", *[f"{r.specgd[s]:.3g}" for s in marks], end_section=True)
    return ranks, losses


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console, transient=True)


@app.command()
def demo(
    dim: int = typer.Option(128, help="Input dimension d of X (d × samples)."),
    width: int = typer.Option(1024, help="Number of random features (rows of A)."),
    samples: int = typer.Option(1024, help="Number of samples (columns of A)."),
    outputs: int = typer.Option(64, help="Output dimension (rows of W and Y)."),
    steps: int = typer.Option(30, help="Steps of GD and SpecGD for the quadratic check."),
    seed: int = typer.Option(0, help="Seed for X, B and the ground truth."),
) -> None:
    """The main job: random-feature regression, GD vs SpecGD with exact constants, for ReLU and SwiGLU."""
    console = Console()
    with progress_bar(console) as bar:
        rows = quadratic_check(["relu", "swiglu"], dim, width, samples, outputs, steps, seed, bar)
    for table in rf_tables(rows, steps):
        console.print(table)
    console.print("GD: ΔW = −G/‖A‖₂²;  SpecGD: ΔW = −(‖G‖_*/‖A‖_F²)·polar(G);  predicted: spectral when "
                  "nr(G)/st(A) > 1 after one GD step (paper 001 (1.5)).")
