"""Progress of conversions on stderr: one line per phase, and a bar over long loops on a terminal."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")
_console = Console(stderr=True, highlight=False)


def status(message: str) -> None:
    _console.print(f"convert: {message}", soft_wrap=True)


def track(items: Iterable[T], label: str) -> Iterator[T]:
    """Yield `items` while showing `label` with a progress bar (only on a terminal)."""
    items = list(items)
    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=_console, disable=not _console.is_terminal, transient=True)
    with progress:
        yield from progress.track(items, total=len(items))
