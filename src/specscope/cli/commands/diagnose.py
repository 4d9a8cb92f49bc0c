"""`specscope diagnose`: a few training steps with the probe, then st(A), nr(G) and a verdict per weight.

torch and the layers below are imported inside the functions: every command module is imported on every
CLI start, and `specscope --help` should not pay for torch.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from specscope.cli import app
from specscope.errors import ConfigError, NonFiniteError
from specscope.names import visible

COLOURS = {"spectral": "green", "euclidean": "cyan", "undecided": "yellow", "unmeasured": "red"}
COLUMNS = ("st(A)", "nr(G)", "nr/st", "verdict", "estimator", "rows")


def check_seed(seed: int) -> None:
    """--seed in [0, 2^63) (torch's generators take no other), checked before a run directory exists."""
    if not 0 <= seed < 2**63:
        raise ConfigError(f"--seed {seed}: use an integer in [0, 2^63)")


def builtin(name: str, seed: int):
    """(model, batches, loss_fn) of a built-in model: 'mlp', 'transformer' or 'hf:...' (see specscope.models.builtin)."""
    from specscope.models.builtin import builtin as make

    return make(name, seed)


def load_factory(spec: str, seed: int):
    """A built-in name, or import `module:function` (the current directory is importable) and call it (with
    seed= if it takes one) -> (model, batches, loss_fn)."""
    if spec in ("mlp", "transformer") or spec.startswith("hf:"):
        return builtin(spec, seed)
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ConfigError(f"--model {spec!r}: use 'mlp', 'transformer', 'hf:<folder or gpt2|llama|bert|mixtral>' or a factory 'package.module:function'")
    if os.getcwd() not in sys.path:  # like `python -m`: the user's own package, run from its folder
        sys.path.insert(0, os.getcwd())
    if mod_name.startswith("."):
        raise ConfigError(f"--model {spec!r}: {mod_name!r} is a relative module name; give the module's full dotted "
                          "name (package.module), run from the folder that holds the package")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"--model {spec!r}: cannot import module {mod_name!r} ({e}); run from its folder or put it on PYTHONPATH") from None
    except (Exception, SystemExit) as e:  # the user's module failed while it was imported: one line, as a factory's error
        raise ConfigError(f"--model {spec!r}: importing {mod_name!r} raised {type(e).__name__}: {e}") from e
    factory = getattr(module, fn_name, None)
    if factory is None:
        raise ConfigError(f"--model {spec!r}: module {mod_name!r} has no function {fn_name!r}")
    if not callable(factory):
        raise ConfigError(f"--model {spec!r}: {mod_name}.{fn_name} is a {type(factory).__name__}, not a function")
    import torch

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        raise ConfigError(f"--model {spec!r}: {mod_name}.{fn_name} has no inspectable signature (a builtin?); a factory is "
                          "a Python function taking no argument or only `seed`") from None
    required = [n for n, p in params.items() if n != "seed" and p.default is p.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise ConfigError(f"--model {spec!r}: {fn_name}{inspect.signature(factory)} needs {required}; a factory takes "
                          "no argument or only `seed` and returns (model, batches, loss_fn)")
    try:
        out = factory(seed=seed) if "seed" in params else factory()
    except Exception as e:  # the user's code: one line (SPECSCOPE_DEBUG=1 shows the traceback)
        raise ConfigError(f"--model {spec!r}: the factory raised {type(e).__name__}: {e}") from e
    except SystemExit as e:  # sys.exit(0) in it was a silent exit 0 for a diagnosis that never ran
        raise ConfigError(f"--model {spec!r}: the factory called sys.exit({e.code!r}); a factory returns "
                          "(model, batches, loss_fn)") from None
    if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[0], torch.nn.Module) and callable(out[2])):
        raise ConfigError(f"--model {spec!r}: the factory must return (model: nn.Module, batch_iterator, loss_fn(model, batch)); got {type(out).__name__}")
    model, batches, loss_fn = out
    try:
        batches = iter(batches)
    except TypeError:
        raise ConfigError(f"--model {spec!r}: the factory's batches ({type(batches).__name__}) cannot be iterated; return "
                          "an iterator or iterable of batches (a generator: `batches()`, not `batches`)") from None
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not any(p.ndim >= 2 for p in trainable):
        what = "no parameters" if not list(model.parameters()) else "no trainable weight with ≥ 2 dims"
        raise ConfigError(f"--model {spec!r}: the model has {what}, so there is nothing to train and measure; "
                          "return a model with nn.Linear / convolution / embedding weights that require grad")

    contract = "the factory's loss_fn is called with the model and one batch and must return the scalar loss"

    def checked_loss(m, batch):
        try:
            loss = loss_fn(m, batch)
        except Exception as e:  # the user's code: one line naming the contract, not a traceback
            raise ConfigError(f"--model {spec!r}: loss_fn(model, batch) raised {type(e).__name__}: {e}; {contract}") from e
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
            got = (f"a tensor of shape {tuple(loss.shape)}{'' if loss.requires_grad else ' that does not require grad'}"
                   if isinstance(loss, torch.Tensor) else type(loss).__name__)
            raise ConfigError(f"--model {spec!r}: loss_fn returned {got}; {contract}, computed from the model's "
                              "parameters (not under torch.no_grad)")
        return loss

    def checked_batches(it):
        """The factory's batches; its iterator raising (a broken file, a worker that died) is one line, as loss_fn's."""
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except Exception as e:  # the user's code
                raise ConfigError(f"--model {spec!r}: the factory's batch iterator raised {type(e).__name__}: {e}; "
                                  "fix the data it reads, or the iterator") from e
            yield batch
    return model, checked_batches(batches), checked_loss


def parse_split(items: list[str]) -> dict:
    """--split PATTERN=q,k,v (equal output blocks) or PATTERN=q:64,k:64,v:64 (outputs each) -> Monitor(split=...)."""
    out: dict = {}
    for item in items:
        pattern, sep, rest = item.partition("=")
        parts = [p.strip() for p in rest.split(",") if p.strip()]
        sized = [p for p in parts if ":" in p]
        if not sep or not pattern or len(parts) < 2 or 0 < len(sized) < len(parts):
            raise ConfigError(f"--split {item!r}: use PATTERN=q,k,v (equal output blocks) or PATTERN=q:64,k:64,v:64 (outputs of each)")
        if not sized:
            out[pattern] = parts
            continue
        try:
            pairs = [(name.strip(), int(rows)) for name, rows in (p.split(":", 1) for p in parts)]
        except ValueError:
            raise ConfigError(f"--split {item!r}: the rows after ':' must be integers") from None
        if len({name for name, _ in pairs}) < len(pairs):
            raise ConfigError(f"--split {item!r}: a part is named twice; give each part its own name")
        out[pattern] = dict(pairs)
    return out


def _fmt(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.3g}"


def _fmt_ratio(x: float) -> str:
    """nr/st with 3 significant digits, or as many more as it takes for the printed value to fall on the
    same side of the verdict's bounds as the value itself (1.2504 prints 1.2504, not 1.25, beside "spectral")."""
    from specscope.probe.advice import verdict

    if not math.isfinite(x):
        return "-"
    digits = 3
    while verdict(float(f"{x:.{digits}g}")) != verdict(x) and digits < 12:
        digits += 1
    return f"{x:.{digits}g}"


def verdict_table(df, title: str) -> Table:
    """One row per weight. Names are printed literally and in full: the weight column folds a name that does
    not fit, it never cuts one."""
    from specscope.probe.advice import MARGIN

    t = Table(title=Text(visible(title)), caption=Text(
        f"medians over the measured steps (nr/st: of the per-step ratios, not nr/st of the medians; rows: the latest "
        f"measured step's); "
        f"verdict: nr/st > {1 + MARGIN:g} spectral, < {1 / (1 + MARGIN):g} euclidean, else undecided"))
    t.add_column("weight", overflow="fold", ratio=1)  # the only column that gives way when the console is narrow
    for col in COLUMNS:
        t.add_column(col, justify="left" if col in ("verdict", "estimator") else "right", no_wrap=True)
    for r in df.itertuples():
        verdict = Text(r.verdict, style=COLOURS.get(r.verdict, "magenta"))
        t.add_row(Text(visible(r.layer)), _fmt(r.stable_rank), _fmt(r.nuclear_rank), _fmt_ratio(r.spectral_advantage), verdict,
                  Text(r.estimator), str(r.rows))
    return t


def table_width(df) -> int:
    """Columns a table needs to show every name on one line (used when the output is not a terminal)."""
    longest = max((len(visible(n)) for n in df["layer"]), default=6)
    return longest + 72


def write_diagnose_report(run, df, partial: str = "") -> Path:
    """A diagnose run's report.html from its records (also what `specscope report` rewrites, and its page for a run a
    training loop of the user's own recorded through the Python API: a callback's `run=`); `partial`: the status of
    a run that did not finish, named first in the title."""
    from specscope import report

    name = f"diagnose {run.config.get('model')}" if run.lab == "diagnose" else run.lab
    title = f"{name} — {run.id}"
    if partial:
        title = f"{partial.upper()} RUN, RECORDS SO FAR — {title}"
    return report.write_report(run.path, df, config=run.config, title=title, salvaged=df.attrs.get("damage", ""))


def _missing_folders(path: Path) -> list[Path]:
    """The folders of `path` that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


@app.command()
def diagnose(
    model: str = typer.Option("transformer", "--model", help="mlp, transformer, hf:<folder saved with save_pretrained, or gpt2|llama|bert|mixtral: a tiny random-init config>, or a factory module:function returning (model, batches, loss_fn)."),
    steps: int = typer.Option(30, "--steps", min=1, help="Training steps (AdamW)."),
    every: int = typer.Option(1, "--every", min=1, help="Measure every K-th step."),
    out: str = typer.Option("runs", "--out", help="Root folder of run directories."),
    seed: int = typer.Option(0, "--seed", help="Seed of the model and the data."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
    estimator: str = typer.Option("gram", "--estimator", help="st(A) estimator: gram (default, certified within 1e-4), power or exact."),
    split: list[str] = typer.Option([], "--split", help="Measure a fused weight's output blocks apart (its rows; a Conv1D's columns): PATTERN=q,k,v or PATTERN=q:64,k:64,v:64 (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Layer-name pattern not to measure (fnmatch, or an exact name; repeatable)."),
) -> None:
    """Train a model for a few steps with the probe; print st(A), nr(G), nr/st and a verdict per weight."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from specscope import store
    from specscope.probe import diagnose as run_diagnose
    from specscope.store import Run

    from specscope.labs.base import FLOAT32_MAX
    from specscope.probe.monitor import ESTIMATORS
    from specscope.probe.pairing import tracked_slots

    if estimator not in ESTIMATORS:  # before a run directory or a progress bar exists
        raise ConfigError(f"--estimator {estimator!r}: choose one of {', '.join(ESTIMATORS)}")
    if not (math.isfinite(lr) and 0 < lr <= FLOAT32_MAX):
        raise ConfigError(f"--lr {lr}: the AdamW learning rate must be a number > 0 that float32 holds (at most "
                          f"{FLOAT32_MAX:.4g}), e.g. --lr 1e-3")
    for name, n in (("--steps", steps), ("--every", every)):
        if n >= 2**63:
            raise ConfigError(f"{name} {n} is too large: steps are stored as 64-bit integers, so it must "
                              "be below 2**63")
    check_seed(seed)
    if not out.strip():
        raise ConfigError("--out '': give the folder for run directories, e.g. --out runs")
    monitor_kwargs = {"estimator": estimator, "split": parse_split(split) or None, "exclude": tuple(exclude)}
    net, batches, loss_fn = load_factory(model, seed)
    with warnings.catch_warnings():  # bad patterns fail before a run directory exists; the Monitor gives the warnings
        warnings.simplefilter("ignore")
        tracked_slots(getattr(net, "_orig_mod", net), exclude=tuple(exclude), split=monitor_kwargs["split"])
    config = {"model": model, "steps": steps, "every": every, "seed": seed, "lr": lr, "optimizer": "adamw",
              "estimator": estimator, "split": list(split), "exclude": list(exclude)}
    err = Console(stderr=True)
    bar = Progress(TextColumn("diagnose"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                   TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal)  # logs stay clean
    run, recorded = None, []  # a contract error of the user's code, or a NaN loss, before anything was recorded leaves no run
    made = _missing_folders(Path(out))  # ... nor the --out folders that Run.create makes for it
    try:
        with Run.create(out, "diagnose", config) as run, bar:
            task = bar.add_task("", total=steps)

            def sink(records) -> None:
                run.append(records)
                recorded.append(len(records))
                loss = next((r.value for r in records if r.metric == "loss"), float("nan"))
                bar.update(task, advance=1, description=f"loss {loss:.3f}")

            try:
                result = run_diagnose(net, batches, loss_fn, steps, every=every, lr=lr, sink=sink, **monitor_kwargs)
            except NonFiniteError as e:
                fix = ("check the model's initialization and its data (no update had been made yet, so --lr is not the cause)"
                       if getattr(e, "before_update", False) else f"lower --lr (now {lr:g}) or check the model's data")
                raise NonFiniteError(f"{getattr(e, 'problem', e)}; {fix}") from e
            run.flush()
            summary = {"final_loss": result.losses[-1], "unpaired": result.monitor.unpaired,
                       "verdicts": dict(zip(result.advice["layer"], result.advice["verdict"]))}
            run.write_summary(summary)
            write_diagnose_report(run, store.load(run))
            run.set_status("complete")
    except (ConfigError, NonFiniteError):
        if run is not None and not recorded:
            shutil.rmtree(run.path, ignore_errors=True)
            for folder in [run.path.parent, *made]:  # the lab folder and --out, made for it, if they hold nothing else
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise
    console = Console()
    if not console.is_terminal:  # piped or captured: no terminal width to respect, keep every name on one line
        console = Console(width=max(console.width, table_width(result.advice)))
    console.print(verdict_table(result.advice, f"{model}: {steps} steps, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}"))
    for name, why in result.monitor.unpaired.items():
        console.print(Text.assemble(("unpaired", "yellow"), f" {name}: {why}"))  # literal: no markup, no emoji codes
    console.print(Text(f"run: {visible(run.path)}\nreport: {visible(run.path / 'report.html')}"), soft_wrap=True)
