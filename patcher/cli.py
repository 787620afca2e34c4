"""The ``onnx-rectify`` command line. Each verb is a small function whose docstring is its help.

Exit codes: 0 success, 1 a check or gate failed, 2 bad input or usage. A
``RectifyError`` becomes one line on stderr and its exit code, never a traceback.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .errors import RectifyError


def _fail(message: str, code: int) -> None:
    click.echo(f"onnx-rectify: error: {message}", err=True)
    sys.exit(code)


def reports_errors(fn):
    """Turn RectifyError (and Ctrl-C) into a one-line message and an exit code."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RectifyError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
    return run


def _write_json(path: str, payload) -> None:
    from .modelio import write_text_atomic

    write_text_atomic(Path(path), json.dumps(payload, indent=2, default=str) + "\n")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx-rectify")
def main() -> None:
    """Patch unreliable behaviour out of ONNX classifiers with rank-one weight edits."""


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as JSON to this file.")
@click.option("--no-parity", is_flag=True, help="Skip the shadow-vs-onnxruntime check.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random parity input.")
@click.option("--batch", default=2, show_default=True, help="Batch size of the parity input.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="onnxruntime execution provider for the parity check.")
@reports_errors
def inspect(model: Path, json_path: str | None, no_parity: bool, seed: int, batch: int,
            provider: str) -> None:
    """Describe MODEL: IR and opsets, inputs and outputs, ops, editable layers, and whether
    the torch shadow graph matches onnxruntime on seeded random input.

    Exits 1 when parity fails, 2 when the file is unusable or has unsupported ops."""
    from .modelio import load_model
    from .summary import format_summary, summarize

    summary = summarize(load_model(model), parity=not no_parity, seed=seed, batch=batch,
                        provider=provider)
    click.echo(format_summary(summary))
    if json_path:
        _write_json(json_path, summary.as_dict())
    if summary.unsupported:
        _fail(f"{len(summary.unsupported)} unsupported node(s); see the list above", 2)
    if summary.parity_error or (summary.parity is not None and not summary.parity.passed):
        sys.exit(1)
