"""What a run says while it works, on stderr: progress, status lines, a heartbeat, advice.

- **Progress bars** (``with progress(n, "attribution") as bar: bar.update(k)``): on a
  terminal one line, redrawn as the work moves and (by :func:`session`'s timer) every
  second with the elapsed time, so that a long batch still shows life; cleared when the
  phase ends. Off a terminal (a CI log) no bar is drawn.
- **Heartbeat**: off a terminal (and on one while no bar is drawn: a pause between
  phases), during a :func:`session`, one line at least every ``interval`` seconds
  (``ONNX_RECTIFY_HEARTBEAT``, default 14; 0 turns it off) with the elapsed time, the
  phase and how far it got. Checked at each bar update and by a timer
  thread (so a phase without updates still gets its lines); time comes from :data:`clock`,
  which tests replace.
- **Status lines** (:func:`status`): one line per step worth telling (a round, a base
  measure), printed unless quiet.
- **Advice** (:func:`warn`, :class:`Remedy`): a library warning names what to change by
  keyword argument or config field (``steps``, ``attribution_form``); the command line
  names its own flags instead, and shows a warning that names no option the verb has only
  with ``--verbose``.

Quiet mode (``--quiet``) prints none of these: only results and errors.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TextIO

from patcher.allocator import phase

#: The library's logger; warnings and notes go through it.
LOG = logging.getLogger("onnx_rectify")
#: The prefix of every line the tool prints on stderr besides progress.
PREFIX = "onnx-rectify"
#: Seconds between heartbeat lines off a terminal (``ONNX_RECTIFY_HEARTBEAT`` overrides):
#: 14, so that a line comes within 15 s even when the machine is busy (a loaded run of the
#: two-class patch showed 15.1 s between lines at 15).
HEARTBEAT_SECONDS = 14.0
#: Seconds between redraws of a bar on a terminal.
REDRAW_SECONDS = 0.1
#: The time source (seconds); tests replace it with a fake clock.
clock: Callable[[], float] = time.monotonic


@dataclass
class _State:
    quiet: bool = False
    verbose: bool = False
    #: None: ask the stream (isatty) each time
    terminal: bool | None = None
    interval: float = HEARTBEAT_SECONDS
    started: float = 0.0
    last_line: float = 0.0
    #: the open bars, innermost last
    bars: list["_Bar"] = None  # type: ignore[assignment]
    last_phase: str = ""
    drawn: bool = False  # a bar line is on the terminal and must be cleared before text
    active: bool = False  # inside a session: the heartbeat runs


_state = _State(bars=[])
_lock = threading.RLock()


def _stream() -> TextIO:
    return sys.stderr  # looked up each time: test runners swap it


def _on_terminal() -> bool:
    if _state.terminal is not None:
        return _state.terminal
    try:
        return _stream().isatty()
    except (AttributeError, ValueError):
        return False


def heartbeat_interval() -> float:
    """``ONNX_RECTIFY_HEARTBEAT`` seconds (0 or less: no heartbeat), else the default."""
    text = os.environ.get("ONNX_RECTIFY_HEARTBEAT", "").strip()
    try:
        return float(text) if text else HEARTBEAT_SECONDS
    except ValueError:
        return HEARTBEAT_SECONDS


def configure(quiet: bool = False, verbose: bool = False, interval: float | None = None,
              terminal: bool | None = None) -> None:
    """Set the output mode of this process (the CLI calls it once per verb)."""
    with _lock:
        _state.quiet, _state.verbose = quiet, verbose
        _state.interval = heartbeat_interval() if interval is None else interval
        _state.terminal = terminal
        _state.started = _state.last_line = clock()
        _state.bars, _state.last_phase, _state.drawn = [], "", False
        _state.active = False


def is_quiet() -> bool:
    return _state.quiet


def is_verbose() -> bool:
    return _state.verbose


def _write(text: str) -> None:
    """One line of text on stderr, after clearing a drawn bar (lock held)."""
    stream = _stream()
    try:
        if _state.drawn:
            stream.write("\r\033[K")
            _state.drawn = False
        stream.write(text + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass  # a closed stderr must not end the work
    _state.last_line = clock()
    if _state.bars and _on_terminal():
        _state.bars[-1].draw(force=True)


def line(text: str) -> None:
    """Print ``text`` as one line on stderr unless quiet (warnings, notes)."""
    if _state.quiet:
        return
    with _lock:
        _write(text)


def status(message: str) -> None:
    """A status line (a round, a base measure): printed unless quiet; it also counts as
    the heartbeat's sign of life."""
    line(" ".join(message.split()))


def _elapsed(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def _where() -> str:
    """The phase now running and how far it got (or the last one)."""
    if _state.bars:
        bar = _state.bars[-1]
        return f"{bar.label} {bar.done}/{bar.length}"
    return f"after {_state.last_phase}" if _state.last_phase else "working"


def tick() -> None:
    """Redraw the bar with the elapsed time (on a terminal), or else print a heartbeat line
    if one is due: a whole line, never a transient one, so that results printed on
    stdout later cannot land on it. Called at every bar update and by the session's
    timer."""
    if _state.quiet:
        return
    with _lock:
        if _on_terminal() and _state.bars:
            _state.bars[-1].draw()
            return
        now = clock()
        if _state.active and _state.interval > 0 and now - _state.last_line >= _state.interval:
            _write(f"{PREFIX}: {_elapsed(now - _state.started)} elapsed: {_where()}")


class _Bar:
    """One phase's counter; drawn on a terminal, read by the heartbeat off one."""

    def __init__(self, length: int, label: str) -> None:
        self.length, self.label, self.done = length, label, 0
        self.start = clock()
        self.drawn_at = -1e9

    def update(self, n: int) -> None:
        with _lock:
            self.done = min(self.length, self.done + int(n))
        tick()

    def draw(self, force: bool = False) -> None:
        """Redraw the bar line (lock held by the caller or taken here)."""
        now = clock()
        if not force and now - self.drawn_at < REDRAW_SECONDS:
            return
        self.drawn_at = now
        share = self.done / self.length if self.length else 0.0
        filled = int(share * 24)
        text = (f"{self.label} [{'#' * filled}{'-' * (24 - filled)}] {share:4.0%} "
                f"{self.done}/{self.length}  {_elapsed(now - self.start)}")
        try:
            _stream().write("\r\033[K" + text)
            _stream().flush()
        except (OSError, ValueError):
            return
        _state.drawn = True


class _Silent:
    def update(self, n: int) -> None:
        pass


@contextmanager
def progress(length: int, label: str, enabled: bool | None = None) -> Iterator:
    """``with progress(n, "evaluating") as bar: bar.update(k)``: a bar on a terminal
    (cleared at the end), the heartbeat's phase off one; a no-op when ``enabled`` is False,
    when quiet, or for an empty length. Its batches reuse each other's freed memory
    (:func:`patcher.allocator.phase`)."""
    with phase(), _progress(length, label, enabled) as bar:
        yield bar


@contextmanager
def _progress(length: int, label: str, enabled: bool | None) -> Iterator:
    if enabled is False or _state.quiet or length <= 0:
        yield _Silent()
        return
    bar = _Bar(length, label)
    with _lock:
        _state.bars.append(bar)
        if _on_terminal():
            bar.draw(force=True)
    try:
        yield bar
    finally:
        with _lock:
            if bar in _state.bars:
                _state.bars.remove(bar)
            _state.last_phase = label
            if _state.drawn and _on_terminal():
                clear()  # the finished bar goes; an outer one comes back
                if _state.bars:
                    _state.bars[-1].draw(force=True)


@contextmanager
def session(quiet: bool = False, verbose: bool = False,
            interval: float | None = None) -> Iterator[None]:
    """One verb's run: :func:`configure`, and a timer thread that calls :func:`tick` every
    quarter second (or every ``interval`` when shorter) until the run ends."""
    configure(quiet, verbose, interval)
    _state.active = True
    stop = threading.Event()
    # a quarter second: a due line comes within it (a bar's clock still moves per second)
    period = min(0.25, _state.interval) if _state.interval > 0 else 0.25
    timer = None
    if not quiet:
        def beat() -> None:
            while not stop.wait(period):
                tick()

        timer = threading.Thread(target=beat, name="onnx-rectify-heartbeat", daemon=True)
        timer.start()
    try:
        yield
    finally:
        stop.set()
        if timer is not None:
            timer.join(timeout=2.0)
        with _lock:
            _state.active = False
        clear()


# ------------------------------------------------------------------ advice
@dataclass(frozen=True)
class Remedy:
    """One change that answers a warning, named by the library's keyword (a RectifyConfig
    field or a function argument): with no ``value``, "``action`` KEYWORD" (raise steps);
    with one, "set KEYWORD=VALUE". The CLI renders it with the verb's own flag, or drops it
    when the verb has no such flag."""

    keyword: str
    value: str | None = None
    action: str = "raise"

    def text(self, name: str | None = None) -> str:
        """The remedy in words, with ``name`` (a flag) or the keyword."""
        if name is None:
            return (f"{self.action} {self.keyword}" if self.value is None
                    else f"set {self.keyword}={self.value!r}")
        return f"{self.action} {name}" if self.value is None else f"use {name} {self.value}"


def remedies_text(remedies: tuple[Remedy, ...], names: dict[str, str] | None = None) -> str:
    """"a or b or c" over the remedies; with ``names`` (keyword -> flag) only those whose
    keyword has a flag, rendered with it."""
    parts = [r.text(None if names is None else names[r.keyword]) for r in remedies
             if names is None or r.keyword in names]
    return " or ".join(parts)


def warn(message: str, *remedies: Remedy) -> None:
    """Log a warning on :data:`LOG`: ``message``, then "; " and the remedies by keyword.
    The record carries ``message`` and ``remedies`` apart (``advice``, ``remedies``) so
    that the CLI can name its flags instead."""
    text = message + (f"; {remedies_text(remedies)}" if remedies else "")
    LOG.warning(text, extra={"advice": message, "remedies": remedies})


def note(message: str) -> None:
    """Log something worth knowing that needs no action (INFO: the CLI shows it with
    ``--verbose``)."""
    LOG.info(message)


def clear() -> None:
    """Erase a bar drawn on the terminal (before an error or a result line)."""
    with _lock:
        if _state.drawn:
            try:
                _stream().write("\r\033[K")
                _stream().flush()
            except (OSError, ValueError):
                pass
            _state.drawn = False
