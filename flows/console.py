"""What the user reads while a run goes: one line per stage event, on the console and in Prefect's logs.

`say` prints `stage  message` (rich markup allowed) and, inside a Prefect flow run, sends the same line
without markup through Prefect's run logger, so the Prefect UI shows the run's story too.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
_MARKUP = re.compile(r"\[/?[a-z ]*\]")


def _prefect_logger() -> logging.Logger | logging.LoggerAdapter | None:
    if "prefect" not in sys.modules:  # no flow run without Prefect (the bare pipeline): not worth 0.9 s
        return None
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger
    except ImportError:
        return None
    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return None
    # The run's stage lines are INFO: make sure the run logger passes them to Prefect's API (its level
    # follows PREFECT_LOGGING_LEVEL, which may be WARNING to keep Prefect's own chatter quiet).
    runs = logging.getLogger("prefect.flow_runs")
    if runs.getEffectiveLevel() > logging.INFO:
        runs.setLevel(logging.INFO)
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - no run context after all: the console line is enough
        return None


def say(stage: str, message: str, level: int = logging.INFO) -> None:
    console.print(f"[bold cyan]{stage:>12}[/] {message}")
    logger = _prefect_logger()
    if logger is not None:
        logger.log(level, f"{stage}: {_MARKUP.sub('', message)}")


def warn(stage: str, message: str) -> None:
    say(stage, f"[yellow]{message}[/]", logging.WARNING)


def fail(stage: str, message: str) -> None:
    say(stage, f"[red]{message}[/]", logging.ERROR)


@contextmanager
def progress(stage: str, label: str) -> Iterator[Callable[..., None]]:
    """A progress bar for one long step; yields `update(completed, total, **fields)`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn(f"[bold cyan]{stage:>12}[/] {label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task_id = None

    def update(completed: int, total: int, detail: str = "", **_: Any) -> None:
        nonlocal task_id
        if task_id is None:
            task_id = bar.add_task(label, total=total, detail=detail)
        bar.update(task_id, completed=completed, total=total, detail=detail)

    with bar:
        yield update


@contextmanager
def waiting(stage: str, label: str) -> Iterator[None]:
    """A spinner while a long step runs (on a terminal only; it leaves no line behind)."""
    with console.status(f"[bold cyan]{stage:>12}[/] {label}", spinner="dots"):
        yield
