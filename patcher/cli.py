"""The ``onnx-rectify`` command line. Each verb is a small function whose docstring is its help.

Exit codes: 0 success, 1 a check or gate failed, 2 bad input or usage, 3 an
internal error (a bug). A ``RectifyError`` becomes one line on stderr and its
exit code, never a traceback.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from .errors import RectifyError


def _fail(message: str, code: int) -> None:
    click.echo(f"onnx-rectify: error: {' '.join(message.split())}", err=True)
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
        except Exception as exc:  # a bug, not bad input: say so in one line
            if os.environ.get("ONNX_RECTIFY_DEBUG"):
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (set ONNX_RECTIFY_DEBUG=1 for "
                  "the traceback, and please report it)", 3)
    return run


def _write_json(path: str, payload) -> None:
    from .modelio import write_text_atomic

    write_text_atomic(Path(path), json.dumps(payload, indent=2, default=str) + "\n")


def _parse_shapes(items: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
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
        shapes[name] = shape
    return shapes


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
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D0,D1,...",
              help="Concrete shape of an input with symbolic dimensions (default: the batch "
                   "size on axis 0, 64 on the others). Repeatable.")
@reports_errors
def inspect(model: Path, json_path: str | None, no_parity: bool, seed: int, batch: int,
            provider: str, input_shapes: tuple[str, ...]) -> None:
    """Describe MODEL: IR and opsets, inputs and outputs, ops, editable layers, and whether
    the torch shadow graph matches onnxruntime on seeded random input.

    Exits 1 when parity fails, 2 when the file is unusable or has unsupported ops."""
    from .modelio import load_model
    from .summary import format_summary, summarize

    summary = summarize(load_model(model), parity=not no_parity, seed=seed, batch=batch,
                        provider=provider, shapes=_parse_shapes(input_shapes))
    click.echo(format_summary(summary))
    if json_path:
        _write_json(json_path, summary.as_dict())
    if summary.unsupported:
        _fail(f"{len(summary.unsupported)} unsupported node(s); see the list above", 2)
    if summary.parity_error or (summary.parity is not None and not summary.parity.passed):
        sys.exit(1)


def _load_factory(spec: str):
    """'package.module:factory' -> the callable (run in this process: trusted code only)."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RectifyError(f"'{spec}': expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RectifyError(f"'{spec}': cannot import {module_name} ({exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RectifyError(f"'{spec}': {module_name} has no attribute '{attr}'") from None


@main.command()
@click.argument("factory")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="A state_dict saved with torch.save (loaded with weights_only).")
@click.option("--input-shape", required=True, metavar="D0,D1,...",
              help="Example input shape, batch first, e.g. 1,3,32,32 (the batch axis is dynamic).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the .onnx file.")
@click.option("--keep-bn", is_flag=True, help="Keep BatchNormalization nodes (default: fold "
              "them into the Conv weights, as edge models ship).")
@click.option("--external-data", is_flag=True, help="Write weights to OUTPUT.data beside it.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript",
              show_default=True)
@click.option("--opset", type=int, default=None, help="Default: 17 (torchscript), 18 (dynamo).")
@click.option("--class-names", default=None, help="Comma-separated class names for metadata.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@reports_errors
def export(factory: str, weights: Path | None, input_shape: str, output: Path, keep_bn: bool,
           external_data: bool, exporter: str, opset: int | None, class_names: str | None,
           force: bool) -> None:
    """Export a PyTorch model to ONNX for patching. FACTORY is package.module:callable returning
    the nn.Module; --weights loads a state_dict into it. The export is checked against the
    torch module under onnxruntime before the command succeeds."""
    import torch

    from exporters import export_pytorch

    if output.exists() and not force:
        raise RectifyError(f"{output} exists; pass --force to overwrite it")
    try:
        shape = tuple(int(d) for d in input_shape.split(","))
    except ValueError:
        raise RectifyError(f"--input-shape '{input_shape}': expected integers like 1,3,32,32") \
            from None
    module = _load_factory(factory)()
    if not isinstance(module, torch.nn.Module):
        raise RectifyError(f"'{factory}' returned {type(module).__name__}, not a torch nn.Module")
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            module.load_state_dict(state)
        except Exception as exc:  # torch raises many kinds for bad files
            raise RectifyError(f"{weights}: cannot load as a state_dict for this model "
                               f"({' '.join(str(exc).split())[:300]})") from None
    result = export_pytorch(module, torch.zeros(shape), output, fold_bn=not keep_bn,
                            external_data=external_data, exporter=exporter, opset=opset,
                            class_names=class_names.split(",") if class_names else None)
    click.echo(f"wrote {result.path}" + (f" and {result.data_path}" if result.data_path else ""))
    click.echo(f"exporter {result.exporter}, opset {result.opset}, BatchNorm "
               f"{'folded' if result.batchnorm_folded else 'kept'}; onnxruntime "
               f"({result.provider}) vs torch: max abs diff {result.max_abs_diff:.3g}, "
               f"top-1 agreement {result.top1_agreement:.0%}")


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work folder (default: a new temporary folder).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="onnxruntime execution provider.")
@reports_errors
def demo(out_dir: Path | None, provider: str) -> None:
    """Run the main job on the bundled trojaned MNIST sample and print OA and ASR before and
    after. Works in a temporary (or the given) folder, never in the installed package."""
    import tempfile

    from .demo import format_demo, run_demo

    work = out_dir if out_dir is not None else Path(tempfile.mkdtemp(prefix="onnx-rectify-demo-"))
    click.echo(format_demo(run_demo(work, provider)))
