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
    from patcher import progress

    progress.clear()
    click.echo(f"onnx-rectify: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


#: Library keywords (RectifyConfig fields, function arguments) whose click parameter has
#: another name; any other keyword is its parameter's name.
_PARAMETER_OF = {"attribution_form": "attribution", "calib": "calib_path",
                 "eval": "eval_path", "pairs": "pairs_path"}


def verb_flags(keywords) -> dict[str, str]:
    """The running verb's flag for each library keyword it has an option for."""
    ctx = click.get_current_context(silent=True)
    params = {p.name: p for p in (ctx.command.params if ctx is not None else [])}
    flags = {}
    for keyword in keywords:
        param = params.get(_PARAMETER_OF.get(keyword, keyword))
        long = [o for o in getattr(param, "opts", []) if o.startswith("--")]
        if long:
            flags[keyword] = max(long, key=len)
    return flags


def warning_text(record: logging.LogRecord) -> tuple[str, str] | None:
    """How the CLI says a library record: (kind, text) with kind "warning" or "note", or
    None when it is not shown. A warning's remedies are named by this verb's flags; one
    whose remedies name no option this verb has is a note (shown with --verbose), as is
    an INFO record."""
    from patcher import progress

    text = " ".join(record.getMessage().split())
    remedies = getattr(record, "remedies", None)
    if remedies:
        flags = verb_flags(r.keyword for r in remedies)
        advice = " ".join(str(getattr(record, "advice", text)).split())
        if flags:
            return "warning", f"{advice}; {progress.remedies_text(remedies, flags)}"
        return ("note", advice) if progress.is_verbose() else None
    if record.levelno >= logging.WARNING:
        return "warning", text
    return ("note", text) if progress.is_verbose() else None


class _WarningLine(logging.Handler):
    """Library warnings (logger ``onnx_rectify``) as one line each on stderr, prefixed
    ``onnx-rectify: warning:`` (notes: ``onnx-rectify: note:``), each said once per run."""

    said: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        from patcher import progress

        shown = warning_text(record)
        if shown is None:
            return
        kind, text = shown
        if (kind, text) in _WarningLine.said:
            return
        _WarningLine.said.add((kind, text))
        progress.line(f"onnx-rectify: {kind}: {text}")


_LOGGER = logging.getLogger("onnx_rectify")
if not any(isinstance(h, _WarningLine) for h in _LOGGER.handlers):
    _LOGGER.addHandler(_WarningLine(logging.INFO))
    _LOGGER.setLevel(logging.INFO)
    _LOGGER.propagate = False


def _start_output(ctx: click.Context, quiet: bool, verbose: bool) -> None:
    """Start the verb's output session (progress, heartbeat), ended with the command."""
    from patcher import progress

    _WarningLine.said = set()
    run = progress.session(quiet=quiet, verbose=verbose and not quiet)
    run.__enter__()
    ctx.call_on_close(lambda: run.__exit__(None, None, None))


def output_options() -> list[click.Option]:
    """``--quiet`` and ``--verbose``, which every verb gets (see :func:`_register`): quiet
    prints only the result and errors (no progress, status, warnings or heartbeat);
    verbose adds the notes (warnings that name no option of the verb, facts that need no
    action). Their callbacks start the verb's output session."""

    def set_quiet(ctx: click.Context, param, value: bool) -> bool:
        ctx.meta["onnx_rectify.quiet"] = value
        return value

    def set_verbose(ctx: click.Context, param, value: bool) -> bool:
        _start_output(ctx, bool(ctx.meta.get("onnx_rectify.quiet")), value)
        return value

    return [click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, is_eager=True,
                         callback=set_quiet, help="Print only the result and errors (no "
                         "progress, heartbeat, status lines or warnings)."),
            click.Option(["-v", "--verbose"], is_flag=True, expose_value=False,
                         callback=set_verbose, help="Also print notes: warnings this "
                         "command has no option for, facts that need no action.")]


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
        from patcher.model.paths import committed, forget_committed

        def stopped(how: str) -> str:
            """What an interrupted run left: nothing, or (a signal held back during the
            commit arrives just after it) its outputs, whole."""
            done = committed()
            if done:
                return (f"{how} after its outputs were written in full "
                        f"({', '.join(str(p) for p in done)}); the rest of the run did not finish")
            return f"{how}; no partial output was left behind"

        forget_committed()
        old = _catch_signals()
        try:
            return fn(*args, **kwargs)
        except RectifyError as exc:
            fail(str(exc), exc.exit_code)
        except _Terminated as exc:
            fail(stopped(f"terminated ({signal.Signals(exc.signum).name})"), 2)
        except KeyboardInterrupt:  # exit 2 like every refusal; partial files were removed
            fail(stopped("interrupted (Ctrl-C)"), 2)
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
CARE_MULTIPLIER = Range(-1000.0, 1000.0)  # patch --care-min/max-multiplier
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


class _UsageLine(click.ClickException):
    """A usage error (unknown option, bad value, missing argument) as one line on stderr,
    like every other refusal, with where to find help; exit 2."""

    exit_code = 2

    def __init__(self, error: click.UsageError) -> None:
        super().__init__(error.format_message())
        names, ctx = [], error.ctx
        while ctx is not None and ctx.parent is not None:  # the verb's names, not argv[0]
            names.insert(0, ctx.info_name)
            ctx = ctx.parent
        self.command_path = " ".join(["onnx-rectify", *names])

    def show(self, file=None) -> None:  # noqa: ARG002 - always stderr
        click.echo(f"onnx-rectify: error: {' '.join(self.message.split())} "
                   f"(see '{self.command_path} --help')", err=True)


class _OneLineUsageGroup(click.Group):
    """The ``main`` group: click's usage errors (raised while parsing the group's or a
    verb's arguments) become :class:`_UsageLine`."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as error:
            raise _UsageLine(error) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            raise _UsageLine(error) from None


@click.group(cls=_OneLineUsageGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx-rectify")
def main() -> None:
    """Patch unreliable behaviour out of ONNX classifiers with rank-one weight edits."""
    from patcher.allocator import reuse_freed_memory

    reuse_freed_memory()


_add_command = main.add_command


def _register(cmd: click.Command, name: str | None = None) -> None:
    """Every verb registered on ``main`` gets :func:`output_options`."""
    if not any(p.name == "quiet" for p in cmd.params):
        cmd.params.extend(output_options())
    _add_command(cmd, name)


main.add_command = _register  # type: ignore[method-assign]
