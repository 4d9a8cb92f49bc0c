"""Run a lab: config -> build -> arms through the shared loop -> claims -> summary.json and report.html."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from specscope import labs, report, store
from specscope.errors import ConfigError
from specscope.labs.base import Arm, Measure, resolve_device
from specscope.labs.config import make_config
from specscope.records import Claim, Record
from specscope.train import Interrupt, Progress, Trainer, arm_seed

PROGRESS_FILE = "progress.json"


def _done_items(run_dir: Path) -> list[str]:
    p = run_dir / PROGRESS_FILE
    return json.loads(p.read_text())["done"] if p.is_file() else []


def _mark_done(run_dir: Path, done: list[str]) -> None:
    tmp = run_dir / (PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps({"done": done}))
    os.replace(tmp, run_dir / PROGRESS_FILE)


def _check_names(items: list[Arm | Measure], lab: str) -> None:
    seen = [i.name for i in items]
    dup = {n for n in seen if seen.count(n) > 1}
    if dup:
        raise ConfigError(f"lab '{lab}' built two parts with the same name {sorted(dup)}; names must be unique")


def run_lab(
    name: str,
    overrides: dict[str, Any] | None = None,
    *,
    out: str | Path = "runs",
    resume: str | Path | None = None,
    progress: bool = False,
    run_id: str | None = None,
) -> Path:
    """Run lab `name` (or resume the run at `resume`) and return its directory.

    The run is marked `complete` at the end, `interrupted` on Ctrl-C (after a checkpoint), `failed` on an
    error; `specscope run --resume DIR` continues an interrupted or killed run exactly.
    """
    if resume is not None:
        run = store.Run.open(resume)
        if run.status == "complete":
            raise ConfigError(f"run {run.path} is already complete; nothing to resume")
        lab = labs.get(run.lab)
        cfg = make_config(lab.Config, run.config, run.lab)
    else:
        lab = labs.get(name)
        cfg = make_config(lab.Config, overrides, name)
    device = resolve_device(cfg.device)
    items = build_items(lab, cfg, device)  # a bad setting fails here, before a run directory is made
    if resume is None:
        run = store.Run.create(out, lab.NAME, cfg.model_dump(mode="json"), run_id=run_id)
    else:
        run.set_status("running")
    run_dir = Path(run.path)
    try:
        with Interrupt() as interrupt, Progress(enabled=progress) as bar:
            interrupted = _run_items(items, cfg, run, device, interrupt, bar, resume is not None)
        if interrupted:
            run.set_status("interrupted")
            raise KeyboardInterrupt(f"run interrupted; resume with: specscope run --resume {run_dir}")
        finish(run, lab, cfg)
        run.set_status("complete")
    except KeyboardInterrupt:
        run.flush()
        run.set_status("interrupted")
        raise
    except BaseException:
        run.flush()
        run.set_status("failed")
        raise
    finally:
        run.close()
    return run_dir


def build_items(lab, cfg, device) -> list:
    """The lab's arms and measures, built from the seeded global RNG (the same on every attempt)."""
    torch.manual_seed(cfg.seed)
    items = lab.build(cfg, device)
    _check_names(items, lab.NAME)
    return items


def _run_items(items, cfg, run, device, interrupt, bar, resuming: bool) -> bool:
    """Run the lab's parts in order, skipping the ones a previous attempt finished."""
    run_dir = Path(run.path)
    done = _done_items(run_dir)
    trainer = Trainer(run, device, cfg.seed, cfg.checkpoint_every, bar)
    t_start = time.perf_counter()
    for item in items:
        if item.name in done:
            continue
        if isinstance(item, Measure):
            run.delete_after(-1, item.name)  # a half-finished measurement is redone whole
            torch.manual_seed(arm_seed(cfg.seed, item.name))
            item.fn(_logger(run, item.name), device)
            run.flush()
        else:
            result = trainer.fit(item, interrupt, resume=resuming)
            if result.interrupted:
                return True
            trainer.checkpoint_path(item.name).unlink(missing_ok=True)
        done.append(item.name)
        _mark_done(run_dir, done)
        if interrupt.requested:
            return True
    run.append([Record(0, "", "lab_seconds", time.perf_counter() - t_start, "")])
    return False


def _logger(run, arm: str):
    def log(records):
        run.append([r if r.arm else Record(**{**r.as_dict(), "arm": arm}) for r in records])

    return log


def finish(run, lab, cfg) -> list[Claim]:
    """Claims from the recorded metrics, then summary.json and report.html (also used by `specscope report`)."""
    run.flush()
    df = store.load(run)
    claims = list(lab.claims(df, cfg))
    run.write_summary(
        {
            "lab": lab.NAME,
            "claims": [c.as_dict() for c in claims],
            "final": _final_metrics(df),
        }
    )
    figures = lab.figures(df, cfg) if hasattr(lab, "figures") else {}  # after the summary: claims survive a figure bug
    report.write_report(
        Path(run.path), df, config=cfg.model_dump(mode="json"), claims=claims, extra_figures=figures,
        title=f"{lab.NAME} — {Path(run.path).name}",
    )
    return claims


def _final_metrics(df) -> dict[str, dict[str, float]]:
    """The last recorded whole-model value of each metric per arm."""
    whole = df[df["layer"] == ""].sort_values("step")
    out: dict[str, dict[str, float]] = {}
    for (arm, metric), g in whole.groupby(["arm", "metric"]):
        out.setdefault(arm or "_", {})[metric] = float(g["value"].iloc[-1])
    return out
