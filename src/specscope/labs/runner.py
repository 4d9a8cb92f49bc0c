"""Run a lab: config -> build -> arms through the shared loop -> claims -> summary.json and report.html."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch

from specscope import labs, report, store
from specscope.errors import ConfigError, OutOfMemoryError, RunStoreError, allocation_failure
from specscope.labs.base import Arm, Measure, resolve_device
from specscope.labs.config import make_config
from specscope.records import Claim, Record
from specscope.store import integrity, sqlite
from specscope.train import Interrupt, Progress, Trainer, arm_seed, sigint_ignored

PROGRESS_FILE = store.run.PROGRESS
_PROGRESS_FIX = "restore it, or start a new run"


def read_progress(run, count=None) -> dict:
    """progress.json (checksummed): the finished parts ("done"), the records each had written ("records"),
    the latest checkpoint of each unfinished arm ("checkpoints": {arm: {step, records, position}}) and the seconds
    each part took ("seconds") and the fingerprints of the lab's `inputs` ("inputs"). A run killed before its first write has none: an empty one, when its
    database is empty too. `count(arm=None)` counts records (default: `run.record_count`)."""
    p = Path(run.path) / PROGRESS_FILE
    empty = {"done": [], "records": {}, "checkpoints": {}, "seconds": {}, "inputs": {}}
    if not p.exists() and (count or run.record_count)() == 0:
        return empty
    progress = integrity.read_json(p, checksum=True, fix=_PROGRESS_FIX)  # names only compared, never paths
    if progress.get("run_id", run.id) != run.id:  # (none in a run from before it was recorded)
        raise RunStoreError(f"{p} is run {progress['run_id']!r}'s, not this run's ({run.id!r}): it was copied over from "
                            f"another run; {_PROGRESS_FIX}.")
    return {**empty, **progress}


def _write_progress(run, progress: dict) -> None:
    integrity.write_json(Path(run.path) / PROGRESS_FILE, {**progress, "run_id": run.id}, checksum=True)


def verify_resume(run, items, trainer: Trainer) -> dict:
    """Before anything is written: the database is intact and holds every record that progress.json and the
    checkpoints say were written. Returns the progress; a mismatch is a RunStoreError naming the file."""
    with run.reader() as (con, _):  # read-only, integrity-checked, opened once
        def count(arm=None, upto=None):
            return sqlite.count_rows(con, run.metrics_path, arm=arm, upto=upto)

        progress = read_progress(run, count)
        owned = progress.get("arms") or {}  # a measurement's arm names, as counted when it finished (none before
        for name in progress["done"]:      # they were recorded: its own name, as it was counted then)
            arms = owned.get(name) if isinstance(owned.get(name), list) else [name]
            want, have = progress["records"].get(name), sum(count(a) for a in arms if isinstance(a, str))
            if have != want:
                raise RunStoreError(
                    f"{run.metrics_path} holds {have} records of '{name}', but {Path(run.path) / PROGRESS_FILE} "
                    f"says {want} were written when it finished: the database lost records (or belongs to another "
                    f"run); {_PROGRESS_FIX}.")
        for item in items:
            if item.name in progress["done"] or not isinstance(item, Arm):
                continue
            if trainer.checkpoint_path(item.name).exists():
                step = trainer.verify_checkpoint(item.name, count, item)
                _check_checkpoint_step(run, trainer, item.name, step, progress["checkpoints"].get(item.name))
            elif item.name in progress["checkpoints"]:  # deleted (the fix a damaged checkpoint's error names)
                progress.setdefault("restart", []).append(item.name)
    return progress


def restart_arms(run, progress: dict) -> None:
    """The arms whose checkpoint progress.json names is gone start again from step 0 (their records are recomputed,
    as for an arm stopped before its first checkpoint): said in one warning each, and progress.json no longer
    counts their checkpoints' records, so no reader takes the records the restart drops for a loss."""
    import warnings

    for arm in progress.pop("restart", []):
        ck = progress["checkpoints"].pop(arm)
        warnings.warn(f"{Path(run.path) / 'checkpoints'} has no checkpoint of arm '{arm}' (progress.json recorded one at "
                      f"step {ck.get('step')}): arm '{arm}' starts again from step 0", stacklevel=2)
    _write_progress(run, progress)


def _check_checkpoint_step(run, trainer: Trainer, arm: str, step: int, recorded: dict | None) -> None:
    """The checkpoint's next_step is the one progress.json records for the arm, or the one checkpoint taken
    after it (a kill between the checkpoint's rename and progress.json's write): later by at most
    `checkpoint_every` steps (any number when only Ctrl-C checkpoints). Anything else is an altered checkpoint."""
    last = recorded.get("step", 0) if isinstance(recorded, dict) else 0
    every = trainer.checkpoint_every
    if step == last or (last < step and (not every or step - last <= every)):
        return
    said = f"says arm '{arm}' was checkpointed at step {last}" if recorded else f"records no checkpoint of arm '{arm}'"
    raise RunStoreError(
        f"{trainer.checkpoint_path(arm)} resumes arm '{arm}' at step {step}, but {Path(run.path) / PROGRESS_FILE} "
        f"{said} (checkpoint_every={every}): the checkpoint was altered or belongs to another run; delete it to "
        "restart that arm from scratch, or start a new run.")


def check_inputs(run, recorded: dict[str, str], now: dict[str, str]) -> None:
    """A resumed run reads what it read when it began: every recorded fingerprint still matches."""
    for name, digest in recorded.items():
        if now.get(name) != digest:
            raise ConfigError(
                f"the {name} of run {run.path} changed since it began (sha256 {digest[:12]}… then, "
                f"{(now.get(name) or 'none')[:12]}… now): resuming would train on other data; restore it, "
                "or start a new run.")


def _check_names(items: list[Arm | Measure], lab: str) -> None:
    seen = [n for i in items for n in (i.owned if isinstance(i, Measure) else (i.name,))]  # a resume deletes by these
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
        with run.reader(check=False):  # config.json and the database of one run (verify_resume checks the rest)
            pass
        if run.status == "complete":
            raise ConfigError(f"run {run.path} is already complete; nothing to resume")
        if run.lab == "diagnose":  # made by `specscope diagnose`, which has no checkpoints to resume from
            raise ConfigError(f"run {run.path} was made by `specscope diagnose`, which `run --resume` does not continue; "
                              "run `specscope diagnose` again (a few steps: it starts from scratch)")
        lab = labs.get(run.lab)
        cfg = make_config(lab.Config, run.config, run.lab)
    else:
        lab = labs.get(name)
        cfg = make_config(lab.Config, overrides, name)
    device = resolve_device(cfg.device)
    with _sizes_named(lab, cfg, overrides if resume is None else None):
        items = build_items(lab, cfg, device)  # a bad setting fails here, before a run directory is made
    inputs = dict(lab.inputs(cfg)) if hasattr(lab, "inputs") else {}
    run = store.Run.create(out, lab.NAME, cfg.model_dump(mode="json"), run_id=run_id, progress=True) if resume is None else run
    run_dir, started = Path(run.path), resume is None  # started: the run's status is ours to set
    try:  # Ctrl-C from here on, even before the first part, prints the resume command
        if resume is None:
            state = {**read_progress(run), "inputs": inputs, "parts": [item.name for item in items]}
            _write_progress(run, state)
        else:
            state = verify_resume(run, items, Trainer(run, device, cfg.seed, cfg.checkpoint_every))  # nothing is written before this
            check_inputs(run, state["inputs"], inputs)
            state["parts"] = [item.name for item in items]
            started = True  # a refusal above leaves the run as it was
            run.set_status("running")
            if state.get("restart"):
                restart_arms(run, state)
        with Interrupt() as interrupt, Progress(enabled=progress) as bar, _sizes_named(lab, cfg, overrides):
            interrupted = _run_items(items, cfg, run, device, interrupt, bar, resume is not None, state)
        if interrupted:
            raise KeyboardInterrupt
        finish(run, lab, cfg)
        run.set_status("complete")
    except KeyboardInterrupt:
        if started:
            with sigint_ignored():  # an impatient second Ctrl-C must not cut the status write short
                run.flush()
                run.set_status("interrupted")
        raise KeyboardInterrupt(f"run interrupted; resume with: specscope run --resume {run_dir}") from None
    except BaseException:
        if started:
            run.flush()
            run.set_status("failed")
        raise
    finally:
        run.close()
    return run_dir


@contextlib.contextmanager
def _sizes_named(lab, cfg, overrides: dict | None):
    """An allocation failure becomes one OutOfMemoryError naming the sizes that asked for it and the fix."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        failed = allocation_failure(e)
        if failed is None:
            raise
        fields = type(cfg).model_fields
        size = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        given = [k for k in (overrides or {}) if k in fields and size(getattr(cfg, k))]
        sizes = ", ".join(f"{k}={getattr(cfg, k)} (default {fields[k].default})" for k in given) or ", ".join(
            f"{k}={v}" for k, v in cfg.model_dump().items() if size(v))
        raise OutOfMemoryError(f"{lab.NAME}: out of memory: could not allocate {failed} with {sizes}; lower "
                               "these sizes (--set key=value) or run on a machine with more memory") from None


def build_items(lab, cfg, device) -> list:
    """The lab's arms and measures, built from the seeded global RNG (the same on every attempt)."""
    torch.manual_seed(cfg.seed)
    items = lab.build(cfg, device)
    _check_names(items, lab.NAME)
    return items


def _run_items(items, cfg, run, device, interrupt, bar, resuming: bool, state: dict) -> bool:
    """Run the lab's parts in order, skipping the ones a previous attempt finished; progress.json records
    each part's records and seconds when it finishes and each checkpoint's step and records."""

    def checkpointed(arm: str, step: int, records: int, position: int) -> None:
        state["checkpoints"][arm] = {"step": step, "records": records, "position": position}  # readers check the count
        _write_progress(run, state)

    trainer = Trainer(run, device, cfg.seed, cfg.checkpoint_every, bar, on_checkpoint=checkpointed)
    for item in items:
        if item.name in state["done"]:
            trainer.checkpoint_path(item.name).unlink(missing_ok=True)  # left by a kill just after "done"
            continue
        t0 = time.perf_counter()
        if isinstance(item, Measure):
            for arm in item.owned:  # a half-finished measurement is redone whole
                run.delete_after(-1, arm)
            torch.manual_seed(arm_seed(cfg.seed, item.name))
            with interrupt.immediate():  # no checkpoint inside a measurement: Ctrl-C stops it now, resume redoes it
                item.fn(_logger(run, item.name), device)
            seconds = time.perf_counter() - t0
        else:
            result = trainer.fit(item, interrupt, resume=resuming)
            if result.interrupted:
                return True
            seconds = result.seconds  # includes the time before a resume
        state["done"].append(item.name)
        owned = item.owned if isinstance(item, Measure) else (item.name,)
        state["records"][item.name] = sum(run.record_count(a) for a in owned)
        if len(owned) > 1:  # readers count a measurement's records under every arm name it wrote
            state.setdefault("arms", {})[item.name] = list(owned)
        state["seconds"][item.name] = seconds
        state["checkpoints"].pop(item.name, None)
        _write_progress(run, state)
        trainer.checkpoint_path(item.name).unlink(missing_ok=True) if isinstance(item, Arm) else None
        if interrupt.requested:
            return True
    if run.record_count("", metric="lab_seconds") == 0:  # one timing record, however often it was resumed
        run.append([Record(0, "", "lab_seconds", sum(state["seconds"].values()), "")])
    return False


def _logger(run, arm: str):
    def log(records):
        run.append([r if r.arm else Record(**{**r.as_dict(), "arm": arm}) for r in records])

    return log


def finish(run, lab, cfg, *, salvage: bool = False, partial: str = "") -> list[Claim]:
    """Claims from the recorded metrics, then summary.json and report.html (also used by `specscope report`).

    A damaged database is an error unless `salvage`; then both files say, in them, that they were computed
    from the records that were still readable. In a lab run made by `demo --quick` every verdict is
    UNDECIDABLE (see `undecidable`). `partial`: the status of a run that did not finish, named in the title."""
    df = store.load(run, salvage=salvage)
    damage = df.attrs.get("damage")
    claims = finite_values(_from_what_is_left(lambda: lab.claims(df, cfg), "its claims", run, damage))
    quick = made_by_quick_demo(Path(run.path))
    claims = undecidable(claims) if quick else claims
    summary = {"lab": lab.NAME, "claims": [c.as_dict() for c in claims], "final": _final_metrics(df)}
    run.write_summary({**summary, "salvaged": damage} if damage else summary)
    figures = _from_what_is_left(lambda: lab.figures(df, cfg), "its figures", run, damage) if hasattr(lab, "figures") else {}
    measured = _from_what_is_left(lambda: lab.summarize(df, cfg), "its summary", run, damage) if hasattr(lab, "summarize") else ()
    title = f"{lab.NAME} — {Path(run.path).name}" + (" (quick size)" if quick else "")
    if partial:  # `specscope report` on a run that did not finish: its page says so first
        title = f"{partial.upper()} RUN, RECORDS SO FAR — {title}"
    report.write_report(
        Path(run.path), df, config=cfg.model_dump(mode="json"), claims=claims, extra_figures=figures, measured=measured,
        title=title, salvaged=damage or "",
    )
    return claims


def _from_what_is_left(compute, what: str, run, damage: str | None):
    """`compute()`; on the records salvaged from a damaged database, a failure of the lab's code on what is missing
    (a series it reads is gone) is one RunStoreError naming the database rather than the lab's traceback."""
    try:
        return compute()
    except Exception as e:
        if not damage:
            raise
        raise RunStoreError(f"{run.metrics_path}: the records salvaged from the damaged database are too few to compute "
                            f"{what} ({type(e).__name__}: {e}); restore the database from a copy of the run") from None


def made_by_quick_demo(path: Path) -> bool:
    """Whether the lab run at `path` sits inside a `demo --quick` run: OUT/demo/<id>/<lab>/<run_id>, the
    demo's config.json saying quick."""
    holder = path.parent.parent
    if not (holder / store.run.CONFIG).is_file():
        return False
    try:
        meta = store.run.read_config(holder)
    except RunStoreError:
        return False
    return meta["lab"] == "demo" and bool(meta["config"].get("quick"))


def finite_values(claims) -> list[Claim]:
    """The claims with a NaN or ±inf `value` (a figure that does not exist, e.g. a step never reached) as None:
    summary.json stays strict JSON (null), and the measured text says what happened."""
    from dataclasses import replace

    return [replace(c, value=None) if c.value is not None and not math.isfinite(c.value) else c for c in claims]


def undecidable(claims: list[Claim]) -> list[Claim]:
    """The claims with verdict UNDECIDABLE ("not decidable at quick size"): `demo --quick` sizes are far below
    the sizes the claims are stated for, so their PASS/FAIL would say nothing. The measured figures stay."""
    from dataclasses import replace

    return [replace(c, verdict="UNDECIDABLE") for c in claims]


def _final_metrics(df) -> dict[str, dict[str, float]]:
    """The last recorded whole-model value of each metric per arm."""
    whole = df[df["layer"] == ""].sort_values("step")
    out: dict[str, dict[str, float]] = {}
    for (arm, metric), g in whole.groupby(["arm", "metric"]):
        out.setdefault(arm or "_", {})[metric] = float(g["value"].iloc[-1])
    return out
