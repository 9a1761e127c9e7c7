"""Where medclf's messages and progress bars go: one small interface, silent unless a caller installs a
reporter.

Modules do not print, nor take a console: they ask :func:`current` for the active :class:`Reporter` and call
its :meth:`~Reporter.print`, :meth:`~Reporter.warn` and :meth:`~Reporter.progress`. The default reporter
shows nothing, so the Python API is silent; the ``medclf`` command installs a :class:`ConsoleReporter` on
stderr for each command. To watch a run from Python::

    import medclf
    from medclf import reporting

    with reporting.use(reporting.ConsoleReporter()):  # rich output on stderr, as the CLI shows it
        medclf.train("data/", "runs/model")

The active reporter lives in a :class:`~contextvars.ContextVar`: :func:`use` puts the previous one back on
exit (exception or not), and a new thread starts with the silent one (run it in
:func:`contextvars.copy_context` to hand the reporter over).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # rich is imported when a console is made: `import medclf` stays fast
    from rich.console import Console

__all__ = ["ConsoleReporter", "ProgressBar", "Reporter", "SilentReporter", "current", "progress", "use"]


class ProgressBar:
    """A progress bar being shown (:meth:`Reporter.progress`). This one draws nothing."""

    def advance(self, steps: int = 1, *, info: str | None = None) -> None:
        """``steps`` more done; ``info`` replaces the text after the count (a bar made with ``info=True``)."""

    def update(
        self, *, completed: int | None = None, total: int | None = None, info: str | None = None
    ) -> None:
        """Set how many are done, the total, and/or the text after the count."""


class Reporter:
    """Where messages and progress go. This base shows nothing; subclass it and override what should be
    shown (:class:`ConsoleReporter` shows everything on a rich console)."""

    @property
    def live(self) -> bool:
        """Whether :meth:`progress` draws a live bar (a terminal). Where it does not, a long job that wants
        its steps in logs prints a line per step instead."""
        return False

    def print(self, *objects: Any, highlight: bool | None = None, markup: bool | None = None) -> None:
        """Show a line: strings with rich markup (``"[bold]Plan[/] ..."``) or rich renderables (a table, a
        rule). ``markup=False`` shows brackets as they are; ``highlight=False`` leaves numbers and paths
        uncoloured."""

    def warn(self, message: str) -> None:
        """Show a warning: ``message`` is plain text (brackets are not markup)."""

    @contextlib.contextmanager
    def progress(
        self,
        label: str,
        total: int,
        *,
        completed: int = 0,
        info: bool = False,
        transient: bool = True,
        clock: Literal["remaining", "elapsed"] = "remaining",
    ) -> Iterator[ProgressBar]:
        """A progress bar over ``total`` steps, ``completed`` of them done, while the block runs: ``label``
        (rich markup), done/total, the bar, the text of ``info=True`` bars, and the time ``remaining`` or
        ``elapsed``. A ``transient`` bar disappears when the block ends."""
        yield ProgressBar()


class SilentReporter(Reporter):
    """Shows nothing: the reporter of the Python API unless a caller installs another one."""


class ConsoleReporter(Reporter):
    """Everything on a rich console: by default stderr, lines soft-wrapped (as the ``medclf`` command
    prints). Progress bars are drawn live on a terminal only."""

    def __init__(self, console: Console | None = None) -> None:
        if console is None:
            from rich.console import Console

            console = Console(stderr=True, soft_wrap=True)
        self._console = console

    @property
    def live(self) -> bool:
        return self._console.is_terminal

    def print(self, *objects: Any, highlight: bool | None = None, markup: bool | None = None) -> None:
        self._console.print(*objects, highlight=highlight, markup=markup)

    def warn(self, message: str) -> None:
        from rich.markup import escape

        self._console.print(f"[yellow]warning:[/] {escape(message)}")

    @contextlib.contextmanager
    def progress(
        self,
        label: str,
        total: int,
        *,
        completed: int = 0,
        info: bool = False,
        transient: bool = True,
        clock: Literal["remaining", "elapsed"] = "remaining",
    ) -> Iterator[ProgressBar]:
        if not self.live or total <= 0:
            yield ProgressBar()
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns: list[ProgressColumn] = [TextColumn(label), MofNCompleteColumn(), BarColumn()]
        if info:
            columns.append(TextColumn("{task.fields[info]}"))
        columns.append(TimeRemainingColumn() if clock == "remaining" else TimeElapsedColumn())
        with Progress(*columns, console=self._console, transient=transient) as bars:
            yield _RichBar(bars, bars.add_task(label, total=total, completed=completed, info=""))


class _RichBar(ProgressBar):
    def __init__(self, bars: Any, task: Any) -> None:
        self.bars, self.task = bars, task

    def advance(self, steps: int = 1, *, info: str | None = None) -> None:
        fields = {} if info is None else {"info": info}
        self.bars.update(self.task, advance=steps, **fields)

    def update(
        self, *, completed: int | None = None, total: int | None = None, info: str | None = None
    ) -> None:
        fields = {} if info is None else {"info": info}
        self.bars.update(self.task, completed=completed, total=total, **fields)


_SILENT = SilentReporter()
_ACTIVE: ContextVar[Reporter] = ContextVar("medclf_reporter", default=_SILENT)


def current() -> Reporter:
    """The active reporter (:func:`use`); the silent one unless a caller installed another."""
    return _ACTIVE.get()


@contextlib.contextmanager
def use(reporter: Reporter) -> Iterator[Reporter]:
    """Report to ``reporter`` inside the block; the previous reporter is back afterwards."""
    token = _ACTIVE.set(reporter)
    try:
        yield reporter
    finally:
        _ACTIVE.reset(token)


def progress(
    label: str,
    total: int,
    *,
    enabled: bool = True,
    completed: int = 0,
    info: bool = False,
    transient: bool = True,
    clock: Literal["remaining", "elapsed"] = "remaining",
) -> contextlib.AbstractContextManager[ProgressBar]:
    """The active reporter's :meth:`~Reporter.progress` bar, or (``enabled=False``: a caller's
    ``progress=False``) one that draws nothing."""
    if not enabled:
        return contextlib.nullcontext(ProgressBar())
    return current().progress(label, total, completed=completed, info=info, transient=transient, clock=clock)
