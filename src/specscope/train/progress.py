"""A rich progress bar per arm with the loss and the step rate; silent when disabled."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn


class Progress:
    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console or Console(file=sys.stderr),
            disable=not enabled,
            transient=False,
        )

    def __enter__(self) -> "Progress":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def add(self, name: str, total: int, completed: int = 0):
        return self._bar.add_task(name, total=max(total, 1), completed=completed, loss="-", rate="")

    def update(self, task, step: int, loss: float) -> None:
        t = self._bar.tasks[task]
        rate = f"{t.speed:.1f} it/s" if t.speed else ""
        self._bar.update(task, completed=step, loss=f"{loss:.4g}", rate=rate)

    def stopped(self, task, step: int) -> None:
        """The arm's stop rule ended it at `step`: the bar ends there, its total shown as that step."""
        t = self._bar.tasks[task]
        self._bar.update(task, total=max(step, 1), completed=step, description=f"{t.description} (stopped early)")
