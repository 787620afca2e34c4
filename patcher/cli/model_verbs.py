"""Verbs about one model file: inspect, export, diff."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from patcher.errors import RectifyError
from patcher.cli.common import (SEED, check_paths, check_shape, data_reads, fail,
                                parse_shapes, write_json, main, reports_errors)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as JSON to this file.")
@click.option("--no-parity", is_flag=True, help="Skip the shadow-vs-onnxruntime check.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the random parity input.")
@click.option("--batch", type=click.IntRange(1, 1024), default=2, show_default=True,
              help="Batch size of the parity input.")
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
    from patcher.gate.summary import format_summary, summarize
    from patcher.graph.support import load_supported_model

    shapes = parse_shapes(input_shapes)
    check_paths({"MODEL": model}, {"--json": json_path})
    loaded = load_supported_model(model)
    check_paths({"MODEL": model, **data_reads("MODEL", loaded)}, {"--json": json_path})
    summary = summarize(loaded, parity=not no_parity, seed=seed, batch=batch,
                        provider=provider, shapes=shapes)
    click.echo(format_summary(summary))
    if json_path:
        write_json(json_path, summary.as_dict())
    if summary.unsupported:
        fail(f"{len(summary.unsupported)} unsupported node(s); see the list above", 2)
    if summary.parity_error or (summary.parity is not None and not summary.parity.passed):
        sys.exit(1)


def _load_factory(spec: str):
    """'package.module:factory' -> the callable (run in this process: trusted code only).
    The module is imported as ``python -m`` would: the current folder comes first on
    ``sys.path`` (``mymodel:build`` works from the folder that holds ``mymodel.py``)."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RectifyError(f"'{spec}': expected package.module:factory")
    cwd = os.getcwd()
    if not sys.path or sys.path[0] not in ("", cwd):
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()
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
@click.option("--opset", type=click.IntRange(7, 23), default=None,
              help="Default: 17 (torchscript), 18 (dynamo).")
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

    from onnx_rectify_exporters import export_pytorch

    try:
        shape = tuple(int(d) for d in input_shape.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise RectifyError(f"--input-shape '{input_shape}': expected positive integers like "
                           "1,3,32,32")
    check_shape("--input-shape", input_shape, shape)
    data = output.with_name(f"{output.name}.data") if external_data else None
    check_paths({"--weights": weights}, {"-o": output, "-o's data file": data},
                 {"-o": force, "-o's data file": force})
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
                            class_names=class_names.split(",") if class_names else None,
                            force=force)
    click.echo(f"wrote {result.path}" + (f" and {result.data_path}" if result.data_path else ""))
    click.echo(f"exporter {result.exporter}, opset {result.opset}, BatchNorm "
               f"{'folded' if result.batchnorm_folded else 'kept'}; onnxruntime "
               f"({result.provider}) vs torch: max abs diff {result.max_abs_diff:.3g}, "
               f"top-1 agreement {result.top1_agreement:.0%}")
    if result.fixed_batch is not None:
        click.echo(f"note: the module hard-codes its batch, so the file fixes it at "
                   f"{result.fixed_batch}; every verb runs it {result.fixed_batch} image(s) "
                   "at a time")


@main.command()
@click.argument("a", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("b", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
@reports_errors
def diff(a: Path, b: Path, json_path: str | None) -> None:
    """Every tensor that differs between A and B (shape, ||delta||_F, max |delta|, numerical
    rank, the nodes it feeds) and every structural difference. Exit 0 if identical, 1 if not."""
    from dataclasses import asdict

    from patcher.gate.verify import diff_models
    from patcher.graph.support import load_supported_model as load_model

    reads = {"A": a, "B": b}
    check_paths(reads, {"--json": json_path})
    first, second = load_model(a), load_model(b)
    check_paths({**reads, **data_reads("A", first), **data_reads("B", second)},
                 {"--json": json_path})
    result = diff_models(first.proto, second.proto)
    for t in result.tensors:
        if t.unit == "steps":  # an integer (quantized) tensor: its change in steps
            click.echo(f"tensor  {t.name}  [{'x'.join(map(str, t.shape))}]  {t.changed} value(s) "
                       f"changed, max {t.max_abs:.0f} step(s), ||delta||_F {t.frobenius:.4g} "
                       f"steps  feeds {', '.join(t.feeds)}")
            continue
        click.echo(f"tensor  {t.name}  [{'x'.join(map(str, t.shape))}]  ||delta||_F {t.frobenius:.4g}"
                   f"  max |delta| {t.max_abs:.4g}  rank {t.rank}  feeds {', '.join(t.feeds)}")
    for s in result.structural:
        click.echo(f"structure  {s}")
    click.echo("identical" if result.identical else
               f"{len(result.tensors)} tensor(s) and {len(result.structural)} structural "
               "difference(s)")
    if json_path:
        write_json(json_path, {"identical": result.identical,
                                "tensors": [asdict(t) for t in result.tensors],
                                "structural": result.structural})
    if not result.identical:
        sys.exit(1)


#: The parts of a patch report (and of verify --json) that the HTML page reads, and their
#: JSON types: a dict names the keys of an object, a one-item list the items of an array,
#: "number" is int, float or null; keys not listed are not read. Every key may be absent.
