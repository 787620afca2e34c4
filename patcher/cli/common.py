"""What every verb shares: one-line errors and exit codes, signals, path checks, option
types and JSON output; and the ``main`` click group the verbs register on."""
from __future__ import annotations

import errno
import functools
import io
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path

import click

from patcher.errors import RectifyError

def fail(message: str, code: int) -> None:
    click.echo(f"onnx-rectify: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


class _WarningLine(logging.Handler):
    """Warnings of the library (logger ``onnx_rectify``) as one line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"onnx-rectify: warning: {' '.join(record.getMessage().split())}", err=True)


_LOGGER = logging.getLogger("onnx_rectify")
if not any(isinstance(h, _WarningLine) for h in _LOGGER.handlers):
    _LOGGER.addHandler(_WarningLine(logging.WARNING))
    _LOGGER.propagate = False


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is (like Ctrl-C), so that every
    ``finally`` runs and partial outputs are removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # once is enough: we are on our way out
    raise _Terminated(signum)


def _catch_signals() -> dict[int, object]:
    """SIGTERM and SIGHUP end the command like Ctrl-C; returns the handlers to restore."""
    old = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        try:
            old[signum] = signal.signal(signum, _terminate)
        except (ValueError, OSError):  # not the main thread
            pass
    return old


def _stdout_failed(exc: OSError) -> bool:
    """Whether ``exc`` is standard output failing (a closed pipe, a full disk) in one of
    the verbs' ``click.echo`` calls; if so, standard output is pointed at the null device,
    so that the interpreter's last flush at exit cannot print a second message."""
    if exc.errno not in (errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
        return False
    tb, echoed = exc.__traceback__, False
    while tb is not None:
        code = tb.tb_frame.f_code
        echoed = echoed or (code.co_name == "echo" and
                            tb.tb_frame.f_globals.get("__name__") == "click.utils")
        tb = tb.tb_next
    if not echoed:
        return False
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # not a real file (a test runner's buffer): nothing is flushed at exit
    return True


def reports_errors(fn):
    """Turn RectifyError (and Ctrl-C, SIGTERM, SIGHUP) into a one-line message and an exit
    code."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        old = _catch_signals()
        try:
            return fn(*args, **kwargs)
        except RectifyError as exc:
            fail(str(exc), exc.exit_code)
        except _Terminated as exc:
            fail(f"terminated ({signal.Signals(exc.signum).name}); no partial output was left "
                  "behind", 2)
        except KeyboardInterrupt:  # exit 2 like every refusal; partial files were removed
            fail("interrupted (Ctrl-C); no partial output was left behind", 2)
        except OSError as exc:
            if not _stdout_failed(exc):  # an OSError anywhere else is a bug: said below
                if os.environ.get("ONNX_RECTIFY_DEBUG"):
                    raise
                fail(f"internal error: {type(exc).__name__}: {exc} (set ONNX_RECTIFY_DEBUG=1 "
                      "for the traceback, and please report it)", 3)
            fail(f"cannot write to standard output ({exc.strerror or exc}); its output is "
                  "incomplete", 2)
        except Exception as exc:  # a bug, not bad input: say so in one line
            if os.environ.get("ONNX_RECTIFY_DEBUG"):
                raise
            fail(f"internal error: {type(exc).__name__}: {exc} (set ONNX_RECTIFY_DEBUG=1 for "
                  "the traceback, and please report it)", 3)
        finally:
            for signum, handler in old.items():
                signal.signal(signum, handler)
    return run


def check_paths(reads: dict[str, Path | None], writes: dict[str, Path | str | None],
                 force: dict[str, bool] | None = None) -> None:
    """Before any work: no output is an input or another output (by device and inode), and
    each can be written (folder exists and is writable, target not a folder or special
    file; an existing target needs --force where the flag in ``force`` has one)."""
    from patcher.model.paths import check_output_file, check_outputs

    writes = {k: Path(v) for k, v in writes.items() if v is not None}
    check_outputs(reads, writes)
    for flag, path in writes.items():
        check_output_file(flag, path, (force or {}).get(flag))


def data_reads(flag: str, loaded) -> dict[str, Path]:
    """The external data files a loaded model was read from, by a label naming ``flag``."""
    if loaded.path is None:
        return {}
    return {f"{flag}'s data file {ref.location}": loaded.path.parent / ref.location
            for ref in loaded.external.values()}


class Range(click.FloatRange):
    """A float range that also refuses NaN (click's comparisons let NaN through)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if math.isnan(rv):
            self.fail(f"{value!r} is not a number in the range {self._describe_range()}.",
                      param, ctx)
        return rv


#: The documented ranges of the numeric options (shown by --help).
SEED = click.IntRange(0, 2**32 - 1)
STEPS = click.IntRange(1, 1024)
FRACTION = Range(0.0, 1.0)
MAX_DIM = 1 << 16  # each dimension of --input-shape
MAX_ELEMENTS = 1 << 27  # elements of one --input-shape input (512 MiB of float32)


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as JSON, after ``tool``, ``version`` and ``schema_version``."""
    from patcher.model.modelio import write_text_atomic

    write_text_atomic(Path(path), json_text(payload))


def commit_texts(texts: dict[Path, str]) -> None:
    """Write the files (each staged beside its target and fsynced), then rename them all
    into place in one step; on failure none of the targets changes."""
    from patcher.model.paths import Outputs

    with Outputs() as outputs:
        for path, text in texts.items():
            outputs.add_text(path, text)
        outputs.commit()


def json_text(payload: dict) -> str:
    """``payload`` as the JSON text :func:`write_json` writes."""
    from patcher.version import json_header

    stamped = {**json_header(), **payload}
    return json.dumps(stamped, indent=2, default=str) + "\n"


def parse_shapes(items: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) < 1:
            raise RectifyError(f"--input-shape '{item}': expected NAME=D0,D1,... with positive "
                               "integers, e.g. x=1,3,48,192")
        check_shape("--input-shape", item, shape)
        shapes[name] = shape
    return shapes


def check_shape(flag: str, item: str, shape: tuple[int, ...]) -> None:
    """Refuse dimensions above MAX_DIM or more than MAX_ELEMENTS elements in all."""
    if max(shape) > MAX_DIM or math.prod(shape) > MAX_ELEMENTS:
        raise RectifyError(f"{flag} '{item}': too large (each dimension at most {MAX_DIM}, at "
                           f"most {MAX_ELEMENTS} elements in all)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx-rectify")
def main() -> None:
    """Patch unreliable behaviour out of ONNX classifiers with rank-one weight edits."""
