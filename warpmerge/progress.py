"""Progress: the library says how far a task got; whoever called it decides how to show it.

Library code takes a `Progress` callback and never prints. `Bars` is the terminal's way
(tqdm bars on stderr), used by the command line and by API calls made with `quiet=False`; its
`echo` clears the bars before printing a line, so bars and lines never share a row.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol


class Progress(Protocol):
    def __call__(self, task: str, done: int, total: int, unit: str = "") -> None:
        """`done` of `total` units of `task` are finished ("B": bytes). A task with a total
        of 0 is a step without a count (loading a model): shown as a line."""


def silent(task: str, done: int, total: int, unit: str = "") -> None:
    """The progress of a quiet run: shown nowhere."""


class Counter:
    """Counts one task's units as they are done, and reports the running total."""

    def __init__(self, progress: Progress, task: str, total: int, unit: str = "") -> None:
        self.progress, self.task, self.total, self.unit = progress, task, total, unit
        self.done = 0
        if total:
            progress(task, 0, total, unit)

    def update(self, n: int) -> None:
        self.done += n
        self.progress(self.task, self.done, self.total, self.unit)


class Bars:
    """tqdm bars on stderr, one per task, stacked in the order tasks start."""

    def __init__(self) -> None:
        self._bars: dict[str, Any] = {}

    def __call__(self, task: str, done: int, total: int, unit: str = "") -> None:
        if total == 0:
            self.echo(task)
            return
        bar = self._bars.get(task)
        if bar is None:
            from tqdm import tqdm

            bytes_ = unit == "B"
            bar = self._bars[task] = tqdm(
                total=total, desc=task, unit=unit or "it", unit_scale=bytes_,
                unit_divisor=1024 if bytes_ else 1000, leave=False, dynamic_ncols=True,
                position=len(self._bars), file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self._bars[task]

    def echo(self, line: str) -> None:
        """Print a line on stderr with the bars cleared first (and redrawn below it)."""
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
