"""`specscope demo`: the main job. Both labs at demo size, `diagnose` on the built-in transformer, one report.

1. `random-features` (RF-1..3) through the shared loop; its GD and SpecGD arms give the quadratic-check tables
   (st(A), nr(G) at steps 0 and 1, the geometry nr/st predicts vs the winner, f/f(0) at a few steps).
2. `sparse-mlp` (MLP-1): GD vs SpecGD on layers 2–3 of a 3-hidden-layer MLP, ReLU vs SwiGLU, a batch sweep.
3. `diagnose` on the built-in transformer: st(A), nr(G) and a verdict per weight.
Everything lands in one run directory runs/demo/<id>/ whose report.html holds the diagnose figures, every
claim and the labs' figures; the two lab runs (with their own reports) sit inside it.

Torch and the specscope layers are imported inside the command: every command module is imported on every
CLI start, so this module stays light.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from specscope.cli import app
from specscope.errors import ConfigError

RF_DEMO: dict[str, Any] = dict(activations=["relu", "swiglu"], methods=["gd", "specgd"], dim=128, width=1024,
                               samples=1024, outputs=64, steps=30, sweep_widths=[128, 512, 2048],
                               sweep_samples=2048, sweep_dims=[32, 64, 128])
MLP_DEMO: dict[str, Any] = dict(width=128, samples=256, steps=60, early=20, batch_sweep=[32, 1024],
                                st_batches=[16, 64, 256, 1024], test_samples=512, eval_every=20)
DIAGNOSE_STEPS = 30
RF_QUICK: dict[str, Any] = dict(activations=["relu", "swiglu"], methods=["gd", "specgd"], dim=16, width=64,
                                samples=64, outputs=8, steps=4, sweep_widths=[32, 64], sweep_samples=64,
                                sweep_dims=[8, 16])
MLP_QUICK: dict[str, Any] = dict(dim=8, width=16, samples=32, steps=6, early=3, batch_sweep=[16, 64],
                                 st_batches=[16, 32], test_samples=32, eval_every=3, lr=0.002)
QUICK_DIAGNOSE_STEPS = 3


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


def objective_curve(df, arm: str, steps: int) -> list[float]:
    """f(W_t)/f(0) for t = 0..steps from a random-features run: the loop's loss at t < steps, the final eval at steps."""
    from specscope.labs.random_features import _series

    loss, final = _series(df, arm, "loss", ""), _series(df, arm, "objective")
    values = [float(loss.get(t, math.nan)) for t in range(steps)] + [float(final.get(steps, math.nan))]
    return [v / values[0] for v in values]


def rf_rows(df, activations: list[str], steps: int) -> list[RFRow]:
    """The quadratic-check rows, read from a random-features run's records (GD arm: st(A), nr(G) at steps 0, 1)."""
    from specscope.labs.random_features import _series

    rows = []
    for act in activations:
        nr = _series(df, f"{act}/gd", "nuclear_rank", "W")
        st = _series(df, f"{act}/gd", "stable_rank", "W")
        if len(nr) < 2 or st.empty:
            continue
        rows.append(RFRow(act, float(st.iloc[0]), float(nr.get(0, math.nan)), float(nr.get(1, math.nan)),
                          objective_curve(df, f"{act}/gd", steps), objective_curve(df, f"{act}/specgd", steps)))
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


def mlp_table(df, cfg) -> Table:
    """sparse-mlp: per (activation, batch) st(A) of the post-activations at step 0 and the training loss of GD and SpecGD early and last."""
    from specscope.labs import sparse_mlp as sm

    t = Table(title=f"Sparse-function MLP: GD vs SpecGD on layers 2–3 (loss at steps {cfg.early} and {cfg.steps - 1})")
    for name in ("activation", "batch", "st(A) step 0", f"GD @{cfg.early}", f"SpecGD @{cfg.early}", "SpecGD/GD",
                 f"GD @{cfg.steps - 1}", f"SpecGD @{cfg.steps - 1}"):
        t.add_column(name, justify="left" if name == "activation" else "right")
    for act, n in sorted(sm.arm_specs(cfg)):
        st = sm.hidden_stable_ranks(df, sm.arm_name(act, n, "gd"))
        st0 = float(st.iloc[0].mean()) if len(st) else math.nan
        gd, spec = (sm.arm_name(act, n, m) for m in ("gd", "specgd"))
        early = [sm.loss_at(df, a, cfg.early) for a in (gd, spec)]
        last = [sm.loss_at(df, a, cfg.steps - 1) for a in (gd, spec)]
        t.add_row(act, str(n), f"{st0:.2f}", *[f"{v:.3g}" for v in early], f"{early[1] / early[0]:.3f}",
                  *[f"{v:.3g}" for v in last])
    return t


def run_labs(out: Path, quick: bool, seed: int, console: Console) -> dict[str, Path]:
    """Run both labs at demo (or quick) size under `out`, with progress bars; returns lab -> run directory."""
    from specscope.labs import run_lab

    sizes = {"random-features": RF_QUICK if quick else RF_DEMO, "sparse-mlp": MLP_QUICK if quick else MLP_DEMO}
    dirs = {}
    for lab, overrides in sizes.items():
        console.print(f"[bold]{lab}[/] ({'quick' if quick else 'demo'} size)")
        dirs[lab] = run_lab(lab, {**overrides, "seed": seed}, out=out, progress=True)
    return dirs


def write_demo_report(run, diag_df, labs_: dict[str, Path], quick: bool = False) -> tuple[Path, list]:
    """One self-contained page: diagnose's figures and per-weight table, every lab claim, the labs' figures.
    At quick size every claim (here and in the labs' own reports) reads "not decidable at quick size"."""
    from specscope import labs, report, store
    from specscope.labs.config import make_config
    from specscope.labs.runner import undecidable

    claims, figures, summary = [], {}, {}
    for name, path in labs_.items():
        lab = labs.get(name)
        cfg = make_config(lab.Config, store.Run.open(path).config, name)
        df = store.load(path)
        lab_claims, lab_figures = list(lab.claims(df, cfg)), lab.figures(df, cfg)
        lab_claims = undecidable(lab_claims) if quick else lab_claims  # as the lab run's own summary and page
        claims += lab_claims
        figures.update({f"{name}: {k}": f for k, f in lab_figures.items()})
        summary[f"{name} run (its own full report)"] = str(Path(path).relative_to(run.path) / "report.html")
    if quick:
        summary["claims"] = ("not decidable at quick size: these sizes only exercise the code; "
                             "run `specscope demo` (demo size) for verdicts")
    summary["diagnose"] = "the figures and the per-weight table below are the built-in transformer's"
    page = report.write_report(run.path, diag_df, config=run.config, claims=claims, extra_figures=figures,
                               title="specscope demo", summary=summary)
    return page, claims


def rewrite_demo_report(run, salvage: bool = False) -> Path:
    """`specscope report` on a demo run: its report.html again from the records of the run and of the lab
    runs inside it (found on disk under the demo's own directory, the newest complete one per lab)."""
    from specscope import store

    nested = store.list_runs(run.path)
    labs_ = {}
    for name in ("random-features", "sparse-mlp"):
        done = nested[(nested.lab == name) & (nested.status == "complete")]
        if done.empty:
            raise ConfigError(f"demo run {run.id}: no complete {name} run inside {run.path}; "
                              "rerun `specscope demo` (the demo's report needs both lab runs)")
        labs_[name] = Path(done.iloc[0].path)
    df = store.load(run, salvage=salvage)
    page, _ = write_demo_report(run, df, labs_, bool(run.config.get("quick")))
    return page


@app.command()
def demo(
    out: Path = typer.Option(Path("runs"), "--out", help="Root folder; the demo writes OUT/demo/<run_id>/."),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes (for tests; verdicts UNDECIDABLE), not the demo sizes."),
    seed: int = typer.Option(0, "--seed", help="Seed of both labs and the diagnosed transformer."),
) -> None:
    """The main job: random-features and sparse-mlp labs, diagnose on a transformer, one report."""
    from specscope import report, store
    from specscope.cli.commands.diagnose import builtin, check_seed, verdict_table
    from specscope.labs import sparse_mlp as sm
    from specscope.labs.config import make_config
    from specscope.probe import diagnose as run_diagnose

    check_seed(seed)  # before the run directory: a lab's config would refuse it only after
    console = Console()
    t0 = time.perf_counter()
    steps = QUICK_DIAGNOSE_STEPS if quick else DIAGNOSE_STEPS
    with store.Run.create(out, "demo", {"quick": quick, "seed": seed, "diagnose_steps": steps}) as run:
        labs_ = run_labs(Path(run.path), quick, seed, console)
        console.print(f"[bold]diagnose[/] built-in transformer, {steps} AdamW steps")
        net, batches, loss_fn = builtin("transformer", seed)
        result = run_diagnose(net, batches, loss_fn, steps, sink=run.append)
        run.flush()
        page, claims = write_demo_report(run, store.load(run), labs_, quick)
        run.write_summary({"labs": {k: str(v) for k, v in labs_.items()},
                           "claims": [c.as_dict() for c in claims], "final_loss": result.losses[-1]})
        run.set_status("complete")

    rf_cfg = RF_QUICK if quick else RF_DEMO
    for table in rf_tables(rf_rows(store.load(labs_["random-features"]), rf_cfg["activations"], rf_cfg["steps"]),
                           rf_cfg["steps"]):
        console.print(table)
    console.print("GD: ΔW = −G/‖A‖₂²;  SpecGD: ΔW = −(‖G‖_*/‖A‖_F²)·polar(G);  predicted: spectral when "
                  "nr(G)/st(A) > 1 after one GD step (paper 001 (1.5)).")
    mlp_cfg = make_config(sm.Config, store.Run.open(labs_["sparse-mlp"]).config, sm.NAME)
    console.print(mlp_table(store.load(labs_["sparse-mlp"]), mlp_cfg))
    console.print(verdict_table(result.advice, f"transformer: {steps} steps, loss {result.losses[0]:.3f} -> "
                                               f"{result.losses[-1]:.3f}"))
    title = "Claims (quick size: measured, not decided)" if quick else "Claims (measured verdicts)"
    console.print(report.claims_table(claims, title=title))
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s; report: {page}", soft_wrap=True)
