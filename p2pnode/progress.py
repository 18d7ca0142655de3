"""How long operations report progress: a tiny protocol, a silent default, and rich bars.

Operations take a ``Progress`` and never know whether a person, a script (``--json``) or a test
is watching; the CLI passes :class:`RichProgress` when stderr is a terminal.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["NullProgress", "Progress", "RichProgress"]


class Progress(Protocol):
    def start(self, total: int, description: str) -> None: ...
    def advance(self, n: int) -> None: ...
    def finish(self) -> None: ...


class NullProgress:
    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


class RichProgress:
    """A rich progress bar on stderr: bytes, rate, ETA. Safe to advance from worker threads."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as _Bars

        self._bars = _Bars(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task: Any = None

    def start(self, total: int, description: str) -> None:
        self.finish()
        self._bars.start()
        self._task = self._bars.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._bars.advance(self._task, n)

    def finish(self) -> None:
        if self._task is not None:
            self._bars.stop()
            self._bars.remove_task(self._task)
            self._task = None
