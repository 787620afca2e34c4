"""Progress bars on stderr for long work (silent when stderr is not a terminal)."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import click


@contextmanager
def progress(length: int, label: str, enabled: bool | None = None) -> Iterator:
    """``with progress(n, "evaluating") as bar: bar.update(k)``; a no-op when disabled."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled or length <= 0:
        yield _Silent()
        return
    with click.progressbar(length=length, label=label, file=sys.stderr,
                           show_eta=True, show_percent=True) as bar:
        yield bar


class _Silent:
    def update(self, n: int) -> None:
        pass
