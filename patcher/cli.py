"""The ``onnx-rectify`` command line. Each verb is a small function whose docstring is its help.

Exit codes: 0 success, 1 a check or gate failed, 2 bad input or usage, 3 an
internal error (a bug). A ``RectifyError`` becomes one line on stderr and its
exit code, never a traceback.
"""
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
from patcher.gate.defaults import MAX_ACCURACY_DROP, MAX_ASR, MAX_GAP, PATCH_GAP


def _fail(message: str, code: int) -> None:
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
            _fail(str(exc), exc.exit_code)
        except _Terminated as exc:
            _fail(f"terminated ({signal.Signals(exc.signum).name}); no partial output was left "
                  "behind", 2)
        except KeyboardInterrupt:  # exit 2 like every refusal; partial files were removed
            _fail("interrupted (Ctrl-C); no partial output was left behind", 2)
        except OSError as exc:
            if not _stdout_failed(exc):  # an OSError anywhere else is a bug: said below
                if os.environ.get("ONNX_RECTIFY_DEBUG"):
                    raise
                _fail(f"internal error: {type(exc).__name__}: {exc} (set ONNX_RECTIFY_DEBUG=1 "
                      "for the traceback, and please report it)", 3)
            _fail(f"cannot write to standard output ({exc.strerror or exc}); its output is "
                  "incomplete", 2)
        except Exception as exc:  # a bug, not bad input: say so in one line
            if os.environ.get("ONNX_RECTIFY_DEBUG"):
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (set ONNX_RECTIFY_DEBUG=1 for "
                  "the traceback, and please report it)", 3)
        finally:
            for signum, handler in old.items():
                signal.signal(signum, handler)
    return run


def _check_paths(reads: dict[str, Path | None], writes: dict[str, Path | str | None],
                 force: dict[str, bool] | None = None) -> None:
    """Before any work: no output is an input or another output (by device and inode), and
    each can be written (folder exists and is writable, target not a folder or special
    file; an existing target needs --force where the flag in ``force`` has one)."""
    from patcher.model.paths import check_output_file, check_outputs

    writes = {k: Path(v) for k, v in writes.items() if v is not None}
    check_outputs(reads, writes)
    for flag, path in writes.items():
        check_output_file(flag, path, (force or {}).get(flag))


def _data_reads(flag: str, loaded) -> dict[str, Path]:
    """The external data files a loaded model was read from, by a label naming ``flag``."""
    if loaded.path is None:
        return {}
    return {f"{flag}'s data file {ref.location}": loaded.path.parent / ref.location
            for ref in loaded.external.values()}


class _Range(click.FloatRange):
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
FRACTION = _Range(0.0, 1.0)
MAX_DIM = 1 << 16  # each dimension of --input-shape
MAX_ELEMENTS = 1 << 27  # elements of one --input-shape input (512 MiB of float32)


def _write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as JSON, after ``tool``, ``version`` and ``schema_version``."""
    from patcher.model.modelio import write_text_atomic

    write_text_atomic(Path(path), _json_text(payload))


def _commit_texts(texts: dict[Path, str]) -> None:
    """Write the files (each staged beside its target and fsynced), then rename them all
    into place in one step; on failure none of the targets changes."""
    from patcher.model.paths import Outputs

    with Outputs() as outputs:
        for path, text in texts.items():
            outputs.add_text(path, text)
        outputs.commit()


def _json_text(payload: dict) -> str:
    """``payload`` as the JSON text :func:`_write_json` writes."""
    from patcher.version import json_header

    stamped = {**json_header(), **payload}
    return json.dumps(stamped, indent=2, default=str) + "\n"


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
        _check_shape("--input-shape", item, shape)
        shapes[name] = shape
    return shapes


def _check_shape(flag: str, item: str, shape: tuple[int, ...]) -> None:
    """Refuse dimensions above MAX_DIM or more than MAX_ELEMENTS elements in all."""
    if max(shape) > MAX_DIM or math.prod(shape) > MAX_ELEMENTS:
        raise RectifyError(f"{flag} '{item}': too large (each dimension at most {MAX_DIM}, at "
                           f"most {MAX_ELEMENTS} elements in all)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx-rectify")
def main() -> None:
    """Patch unreliable behaviour out of ONNX classifiers with rank-one weight edits."""


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

    shapes = _parse_shapes(input_shapes)
    _check_paths({"MODEL": model}, {"--json": json_path})
    loaded = load_supported_model(model)
    _check_paths({"MODEL": model, **_data_reads("MODEL", loaded)}, {"--json": json_path})
    summary = summarize(loaded, parity=not no_parity, seed=seed, batch=batch,
                        provider=provider, shapes=shapes)
    click.echo(format_summary(summary))
    if json_path:
        _write_json(json_path, summary.as_dict())
    if summary.unsupported:
        _fail(f"{len(summary.unsupported)} unsupported node(s); see the list above", 2)
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

    from exporters import export_pytorch

    try:
        shape = tuple(int(d) for d in input_shape.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise RectifyError(f"--input-shape '{input_shape}': expected positive integers like "
                           "1,3,32,32")
    _check_shape("--input-shape", input_shape, shape)
    data = output.with_name(f"{output.name}.data") if external_data else None
    _check_paths({"--weights": weights}, {"-o": output, "-o's data file": data},
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


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work folder, kept (default: a new temporary folder, removed at the end).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="onnxruntime execution provider.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where the shadow graph runs.")
@click.option("--force", is_flag=True, help="Overwrite the demo's files in --out.")
@reports_errors
def demo(out_dir: Path | None, provider: str, device: str, force: bool) -> None:
    """Patch the bundled trojaned MNIST sample with one corrupted/clean pair and print OA and
    ASR before and after. Works in a temporary folder that is removed at the end (or in the
    --out folder, which is kept), never in the installed package."""
    import tempfile

    from patcher.demo import check_work_folder, format_demo, run_demo

    def log(message: str) -> None:
        click.echo(message, err=True)

    if out_dir is not None:
        check_work_folder(out_dir, force)
        click.echo(format_demo(run_demo(out_dir, provider, device, log=log, force=force)))
        return
    with tempfile.TemporaryDirectory(prefix="onnx-rectify-demo-") as work:
        text = format_demo(run_demo(Path(work), provider, device, log=log, force=force),
                           kept=False)
    click.echo(text)


#: Largest IG completeness error (in probability units) locate accepts without a warning.
COMPLETENESS_LIMIT = 0.1


def _rectify_options(fn):
    """Options shared by locate and patch."""
    opts = [
        click.option("--pairs", "pairs_path", required=True,
                     type=click.Path(dir_okay=False, path_type=Path),
                     help="npz with corrupted, clean, label."),
        click.option("--calib", "calib_path", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, help="npz with x (and y): calibration inputs for the key "
                     "statistics (default: the eval inputs)."),
        click.option("--steps", type=STEPS, default=16, show_default=True,
                     help="Integrated-Gradients steps."),
        click.option("--score", type=click.Choice(["whitened", "inverse"]), default="whitened",
                     show_default=True, help="Editability: keys whitened by C^-1/2, or the "
                     "paper's literal C^-1."),
        click.option("--transplant", type=click.Choice(["paste", "add", "none"]), default="paste",
                     show_default=True, help="Carry the pairs' corruption onto calibration "
                     "images (more keys from few pairs; a held-out gap for the loop)."),
        click.option("--transplant-count", type=click.IntRange(1, 10000), default=40,
                     show_default=True, help="Calibration images that receive the corruption "
                     "and join the fit."),
        click.option("--heldout-count", type=click.IntRange(1, 10000), default=200,
                     show_default=True, help="Further calibration images that receive it "
                     "only to measure the gaps the loop steers by (never fitted)."),
        click.option("--attribution", type=click.Choice(["ig", "path"]), default="ig",
                     show_default=True, help="Layer attribution: Integrated Gradients (paper "
                     "Eq. 3) or its path-derivative form (complete for internal layers)."),
        click.option("--allow-shared", is_flag=True, help="Also edit weights that several "
                     "nodes share (the edit then applies to all of them)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     show_default=True, help="Where the shadow graph runs."),
        click.option("--seed", type=SEED, default=0, show_default=True,
                     help="Seed of the transplant's choice of images (and of --stat-rows)."),
        click.option("--statistics", "statistics", type=click.Choice(["auto", "exact", "kronecker"]),
                     default="auto", show_default=True,
                     help="How the key statistics C are computed for ranking layers: exact, "
                     "Kronecker-factored (channel x kernel offset, eigenvalue-corrected) for "
                     "spatial convolutions, or auto: factored where the exact C would cost "
                     "more than the conv itself. Edits always use the exact C."),
        click.option("--stat-rows", type=click.IntRange(1, 1 << 24), default=None,
                     help="Cap the keys per layer used for the key statistics C (a seeded "
                     "uniform sample; default: all). Faster on wide conv layers, less exact."),
        click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                     help="Cache key statistics here (keyed by model, layer and data hashes)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@_rectify_options
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="npz with x, y (calibration when --calib is not given).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the ranking as JSON (\"ranking\": a list, best first).")
@click.option("--method", type=click.Choice(["attribution", "causal"]), default="attribution",
              show_default=True, help="Editability from Integrated Gradients (the paper), or "
              "causal effect by intervention (CARE): swap the layer's top neurons' clean "
              "outputs into the corrupted run and measure the restored share of the gap.")
@click.option("--top-fraction", type=_Range(0.0, 1.0, min_open=True), default=0.1,
              show_default=True,
              help="--method causal: share of a layer's neurons that are swapped.")
@reports_errors
def locate(model: Path, pairs_path: Path, calib_path: Path | None, steps: int, score: str,
           transplant: str, transplant_count: int, heldout_count: int, attribution: str,
           allow_shared: bool, device: str, seed: int,
           statistics: str, stat_rows: int | None, cache_dir: str | None,
           eval_path: Path | None, json_path: str | None,
           method: str, top_fraction: float) -> None:
    """Rank MODEL's editable layers by editability (or causal effect) for the given
    corrupted/clean pairs."""
    from patcher.patch import load_inputs, locate as run_locate, locate_causal
    from patcher.rectify import RectifyConfig

    reads = {"MODEL": model, "--pairs": pairs_path, "--eval": eval_path, "--calib": calib_path}
    _check_paths(reads, {"--json": json_path})
    if cache_dir is not None:
        from patcher.model.paths import check_output_folder

        check_output_folder("--cache-dir", Path(cache_dir))
    inputs = load_inputs(model, pairs_path, eval_path, calib_path)
    _check_paths(inputs.reads, {"--json": json_path})
    config = RectifyConfig(steps=steps, score=score, transplant=transplant, seed=seed,
                           transplant_count=transplant_count, heldout_count=heldout_count,
                           attribution_form=attribution, allow_shared=allow_shared,
                           cache_dir=cache_dir, causal_top_fraction=top_fraction,
                           stat_rows=stat_rows, statistics=statistics)
    if method == "causal":
        _locate_causal(*locate_causal(inputs, config, device), json_path)
        return
    ranking = run_locate(inputs, config, device)
    width = max(len(s.layer) for s in ranking)
    click.echo(f"{'rank':>4}  {'layer':<{width}}  {'score':>12}  {'IG completeness error':>21}"
               f"  key statistics")
    for i, s in enumerate(ranking, 1):
        click.echo(f"{i:>4}  {s.layer:<{width}}  {s.score:>12.5g}  {s.completeness_error:>21.3g}"
                   f"  {s.statistics}")
    worst = max(ranking, key=lambda s: s.completeness_error)
    if worst.completeness_error > COMPLETENESS_LIMIT:
        click.echo(f"warning: Integrated-Gradients completeness error {worst.completeness_error:.3g} "
                   f"at {worst.layer} exceeds {COMPLETENESS_LIMIT}; raise --steps or use "
                   "--attribution path for more faithful scores", err=True)
    if json_path:
        _write_json(json_path, {"method": "attribution", "ranking": [
            {"rank": i, "layer": s.layer, "score": s.score,
             "completeness_error": s.completeness_error, "statistics": s.statistics}
            for i, s in enumerate(ranking, 1)]})


def _locate_causal(effects, attribution_ranking, json_path: str | None) -> None:
    from patcher.analysis.causal import rank_agreement

    width = max(len(e.layer) for e in effects)
    click.echo(f"{'rank':>4}  {'layer':<{width}}  {'restored (top neurons)':>22}  "
               f"{'neurons swapped':>15}  {'restored (all)':>14}")
    for i, e in enumerate(effects, 1):
        click.echo(f"{i:>4}  {e.layer:<{width}}  {e.score:>22.1%}  "
                   f"{f'{e.top} of {e.neurons}':>15}  {e.restored:>14.1%}")
    agreement = rank_agreement([e.layer for e in effects], [s.layer for s in attribution_ranking])
    click.echo(f"attribution ranking: {', '.join(s.layer for s in attribution_ranking[:3])}"
               f"{', ...' if len(attribution_ranking) > 3 else ''}; same top-1: "
               f"{'yes' if agreement['top1_same'] else 'no'}, top-3 overlap "
               f"{agreement['top3_overlap']}, Spearman {agreement['spearman']:.2f}")
    if json_path:
        _write_json(json_path, {"method": "causal", "ranking": [
            {"rank": i, "layer": e.layer, "score": e.score, "restored_all": e.restored,
             "neurons": e.neurons, "swapped": e.top_neurons}
            for i, e in enumerate(effects, 1)]})


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@_rectify_options
@click.option("--eval", "eval_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="npz with x, y: clean data for the accuracy budget.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file (default: MODEL.rectified.onnx beside the input).")
@click.option("--budget", type=FRACTION, default=MAX_ACCURACY_DROP, show_default=True,
              help="Largest accuracy drop allowed on the eval set (0.01 = 1 point); the "
              "default is verify's --max-accuracy-drop, so a patch within it passes the "
              "gate's accuracy check.")
@click.option("--gap", "gap_target", type=FRACTION, default=PATCH_GAP, show_default=True,
              help="Target pair gap: mean of p_y(clean) - p_y(corrupted). The loop steers by "
              "it on held-out transplanted pairs (calibration images given the pairs' "
              "corruption, never fitted; with --transplant none, on the pairs); the exit "
              "status checks it on the given pairs in the written file. verify --max-gap "
              f"(default {MAX_GAP}) gates the pairs given to verify; this target is "
              "stricter.")
@click.option("--max-rounds", type=click.IntRange(0, 100), default=10, show_default=True,
              help="Round limit of the loop.")
@click.option("--strategy", type=click.Choice(["dynamic", "static", "finetune", "care"]),
              default="dynamic", show_default=True, help="dynamic: the paper's loop; static: "
              "one edit at the last layer; finetune: fine-tune the last layer; care: CARE's "
              "causal neuron repair (particle swarm).")
@click.option("--objective", type=click.Choice(["prediction", "attribution"]),
              default="prediction", show_default=True, help="prediction: remove the "
              "corruption's effect on the output (backdoor, spurious pattern); attribution: "
              "lower the share of input attribution on the corrupted region (feature "
              "leakage) with silencing edits (--strategy dynamic; --gap is not used).")
@click.option("--care-neurons", type=click.IntRange(1, 1 << 20), default=None,
              help="--strategy care: neurons to repair (default: 10% of the layer's).")
@click.option("--layer", default=None, help="Force one edit at this layer (node name).")
@click.option("--solver", type=click.Choice(["closed", "iterative"]), default="closed",
              show_default=True, help="Rank-one solve: closed-form least squares, or the "
              "paper's iterative optimiser (Adam, rank-one projection every 10 steps).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="onnxruntime provider for verification.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write everything (rounds, scores, metrics, timings, hashes) as JSON.")
@click.option("--report-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write an HTML report (rounds, scores chart, attribution heatmaps before and "
                   "after, verify results) into this folder; needs onnx-rectify[report].")
@click.option("--attack", "attack_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="npz with x, y, target: prints the attack success rate of "
              "the input and the written file (onnxruntime) and adds it to --report and the "
              "HTML report.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@reports_errors
def patch(model: Path, pairs_path: Path, calib_path: Path | None, steps: int, score: str,
          transplant: str, transplant_count: int, heldout_count: int, attribution: str,
          allow_shared: bool, device: str, seed: int,
          statistics: str, stat_rows: int | None, cache_dir: str | None, eval_path: Path,
          output: Path | None,
          budget: float, gap_target: float, max_rounds: int, strategy: str, objective: str,
          layer: str | None, care_neurons: int | None, solver: str, provider: str,
          report_path: str | None, report_dir: Path | None, attack_path: Path | None,
          force: bool) -> None:
    """Patch MODEL's weights (rank-one edits; CARE's neuron rows with --strategy care) and
    write the result (same graph, new weight values), verified under onnxruntime from
    disk. Exit 0 when the pairs' gap meets --gap within --budget on the written file
    (with --objective attribution: when an edit lowered the attribution share within
    --budget), 1 when not (the best model found is still written), 2 for bad input."""
    from patcher.patch import patch as run_patch
    from patcher.rectify import RectifyConfig

    from patcher.patch import default_output

    out = output if output is not None else default_output(model)
    reads = {"MODEL": model, "--pairs": pairs_path, "--eval": eval_path, "--calib": calib_path,
             "--attack": attack_path}
    writes = {"-o": out, "-o's data file": out.with_name(f"{out.name}.data"),
              "--report": report_path}
    _check_paths(reads, writes)  # -o's --force: once the model's data files are known
    _check_folders(report_dir, cache_dir, {**reads, **writes})
    attack = _load_attack(model, attack_path) if attack_path is not None else None
    config = RectifyConfig(strategy=strategy, objective=objective, budget=budget,
                           gap=gap_target, max_rounds=max_rounds, layer=layer, steps=steps,
                           score=score,
                           transplant=transplant, transplant_count=transplant_count,
                           heldout_count=heldout_count, seed=seed, attribution_form=attribution,
                           allow_shared=allow_shared, cache_dir=cache_dir, solver=solver,
                           stat_rows=stat_rows, statistics=statistics,
                           care_neurons=care_neurons)
    extras: dict = {}

    def stage_reports(rep, outputs, staged_model: Path) -> None:
        """The reports, staged beside their targets and committed with the model."""
        if attack is not None:  # measured on the written file, before it is renamed
            extras["attack"] = _attack_rates(model, staged_model, attack, provider)
        if report_path:
            payload = rep.as_dict()
            if "attack" in extras:
                payload["attack"] = {"path": str(attack_path), **extras["attack"]}
            outputs.add_text(Path(report_path), _json_text(payload))
        if report_dir is not None:
            from patcher.gate.report import write_report

            write_report(rep.as_dict(), outputs.tree(report_dir), attack_path=attack_path,
                         device=rep.device, provider=provider,
                         read_from={"output": staged_model})

    report = run_patch(model, pairs_path, eval_path, calib_path, out, config, device,
                       provider, force, log=lambda m: click.echo(m, err=True),
                       attack=attack_path, writes={"--report": report_path and Path(report_path)},
                       stage_reports=stage_reports)
    from patcher.rectify.results import format_accuracy

    r, v = report.result, report.verification
    what = "share" if r.objective == "attribution" else "gap"
    click.echo(f"{'round':>5}  {'layer':<28} {'score':>10} {what + ' before':>12} "
               f"{what + ' after':>11} {'target gap':>10} {'accuracy':>9}  decision")
    for rd in r.rounds:
        score_text = f"{rd.score:.4g}" if rd.score is not None else "-"
        tau = f"{rd.target_gap_after:.4f}" if rd.target_gap_after is not None else "-"
        click.echo(f"{rd.index:>5}  {rd.layer:<28} {score_text:>10} {rd.gap_before:>12.4f} "
                   f"{rd.gap_after:>11.4f} {tau:>10} "
                   f"{format_accuracy(rd.accuracy, rd.evaluated):>9}  {rd.reason}")
    click.echo(f"wrote {', '.join(report.written)}")
    click.echo(f"onnxruntime ({v.provider}), reloaded from disk: accuracy {v.base_accuracy:.2%} -> "
               f"{v.patched_accuracy:.2%}, pair gap {v.base_pair_gap:.4f} -> "
               f"{v.patched_pair_gap:.4f}, shadow parity "
               f"{'ok' if v.parity.get('within_tolerance') else 'FAILED'}")
    attack_figures = extras.get("attack")
    if attack_figures is not None:
        click.echo(f"attack success rate ({attack_path.name}, onnxruntime, "
                   f"{attack_figures['inputs']} triggered inputs not of class "
                   f"{attack.target}): {attack_figures['base_asr']:.2%} -> "
                   f"{attack_figures['patched_asr']:.2%}")
    if report_dir is not None:
        click.echo(f"report: {report_dir / 'index.html'}")
    if r.objective == "attribution":
        click.echo(f"attribution share on the corrupted region (shadow graph, on "
                   f"{r.gap_measured_on}): {r.base_gap:.4f} -> {r.final_gap:.4f}")
    if not report.passed:
        if r.objective == "attribution":
            click.echo("onnx-rectify: no edit lowered the attribution share within --budget "
                       "on the written file; the best model found was written", err=True)
        else:
            click.echo("onnx-rectify: the pairs' gap did not meet --gap within --budget on "
                       "the written file; the best model found was written", err=True)
        sys.exit(1)


def _check_folders(report_dir: Path | None, cache_dir: str | None,
                   reads: dict[str, Path | None]) -> None:
    """Before any work: the HTML report's libraries are there, --report-dir and --cache-dir
    are (or can be made) folders one can write in, and no file read or written elsewhere
    is one the report would write into its folder."""
    from patcher.model.paths import check_folder_outputs, check_output_folder

    if report_dir is not None:
        from patcher.gate.report import require_libraries, writes_name

        require_libraries()
        check_output_folder("--report-dir", report_dir)
        check_folder_outputs("--report-dir", report_dir, reads, writes_name)
    if cache_dir is not None:
        check_output_folder("--cache-dir", Path(cache_dir))


def _load_attack(model: Path, attack_path: Path):
    """The attack set of ``patch --attack``, checked against MODEL before the patch runs
    (bad input exits 2 before any work)."""
    from patcher.model.modelio import load_model
    from patcher.samples import InputSpec, load_labelled, num_classes_of

    proto = load_model(model, warn=False).proto
    return load_labelled(attack_path, InputSpec.of(proto), num_classes_of(proto),
                         with_target=True)


def _attack_rates(model: Path, written: Path, attack, provider: str) -> dict:
    """ASR of the input model and of the written file under onnxruntime."""
    from patcher.gate.metrics import attack_success_rate

    rates = {key: attack_success_rate(path, attack.x, attack.y, attack.target, provider,
                                      label="attack")
             for key, path in (("base_asr", model), ("patched_asr", written))}
    return {**rates, "inputs": int((attack.y != attack.target).sum()), "target": attack.target}


@main.command()
@click.argument("patched", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--base", "base_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The model before patching.")
@click.option("--eval", "eval_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="npz with x, y: clean data for the accuracy gate.")
@click.option("--attack", "attack_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="npz with x, y, target: gate the attack success rate.")
@click.option("--pairs", "pairs_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="npz with corrupted, clean, label: gate the pair gap.")
@click.option("--max-accuracy-drop", type=FRACTION, default=MAX_ACCURACY_DROP,
              show_default=True,
              help="Largest accuracy drop on --eval (0.01 = 1 point); patch --budget "
              "defaults to it.")
@click.option("--max-asr", type=FRACTION, default=MAX_ASR, show_default=True,
              help="Largest attack success rate on --attack.")
@click.option("--max-gap", type=FRACTION, default=MAX_GAP, show_default=True,
              help="Largest mean pair gap p_y(clean) - p_y(corrupted) on --pairs. patch "
              f"aims lower (--gap, default {PATCH_GAP}: steered by on held-out transplanted "
              "pairs, checked on its given pairs).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Every figure, with a top-level \"passed\".")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), default=None,
              help="JUnit XML, one test case per check.")
@reports_errors
def verify(patched: Path, base_path: Path, eval_path: Path, attack_path: Path | None,
           pairs_path: Path | None, max_accuracy_drop: float, max_asr: float, max_gap: float,
           provider: str, json_path: str | None, junit_path: str | None) -> None:
    """The release gate: is PATCHED safe to ship in place of --base? Checks that both files
    load and pass onnx.checker, that only Conv/Gemm/MatMul weight values changed and each
    change is declared in the provenance, and (under onnxruntime) accuracy, flip rate,
    output differences, ASR, pair gap and latency. Exit 0 when every gate passes, 1 when
    one fails, 2 when an input is unusable."""
    from patcher.gate.verify import verify as run_verify
    from patcher.graph.support import load_supported_model as load_model

    reads = {"PATCHED": patched, "--base": base_path, "--eval": eval_path,
             "--attack": attack_path, "--pairs": pairs_path}
    writes = {"--json": json_path, "--junit": junit_path}
    _check_paths(reads, writes)
    base, candidate = load_model(base_path), load_model(patched)
    _check_paths({**reads, **_data_reads("--base", base), **_data_reads("PATCHED", candidate)},
                 writes)
    report = run_verify(base, candidate, eval_path, attack_path,
                        pairs_path, max_accuracy_drop, max_asr, max_gap, provider)
    for check in report.checks:
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in check.figures.items()
                            if not isinstance(v, (dict, list)))
        click.echo(f"{'PASS' if check.passed else 'FAIL':<5} {check.name:<20} {figures}")
        if not check.passed:
            click.echo(f"      {check.message}")
    for name, reason in report.skipped.items():
        click.echo(f"{'SKIP':<5} {name:<20} {reason}")
    click.echo(f"verify: {'PASSED' if report.passed else 'FAILED'} "
               f"(onnxruntime provider: {report.provider or '-'})")
    texts = {}  # both written in one step (or neither)
    if json_path:
        texts[Path(json_path)] = _json_text(report.as_dict())
    if junit_path:
        texts[Path(junit_path)] = report.junit() + "\n"
    _commit_texts(texts)
    if not report.passed:
        sys.exit(1)


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
    _check_paths(reads, {"--json": json_path})
    first, second = load_model(a), load_model(b)
    _check_paths({**reads, **_data_reads("A", first), **_data_reads("B", second)},
                 {"--json": json_path})
    result = diff_models(first.proto, second.proto)
    for t in result.tensors:
        click.echo(f"tensor  {t.name}  [{'x'.join(map(str, t.shape))}]  ||delta||_F {t.frobenius:.4g}"
                   f"  max |delta| {t.max_abs:.4g}  rank {t.rank}  feeds {', '.join(t.feeds)}")
    for s in result.structural:
        click.echo(f"structure  {s}")
    click.echo("identical" if result.identical else
               f"{len(result.tensors)} tensor(s) and {len(result.structural)} structural "
               "difference(s)")
    if json_path:
        _write_json(json_path, {"identical": result.identical,
                                "tensors": [asdict(t) for t in result.tensors],
                                "structural": result.structural})
    if not result.identical:
        sys.exit(1)


#: The parts of a patch report (and of verify --json) that the HTML page reads, and their
#: JSON types: a dict names the keys of an object, a one-item list the items of an array,
#: "number" is int, float or null; keys not listed are not read. Every key may be absent.
_NUMBER = "number"
_ROWS = [{"layer": str, "score": _NUMBER, "index": _NUMBER, "gap_before": _NUMBER,
          "gap_after": _NUMBER, "target_gap_after": _NUMBER, "accuracy": _NUMBER,
          "accuracy_drop": _NUMBER, "delta_norm": _NUMBER, "fit_residual_ratio": _NUMBER,
          "completeness_error": _NUMBER}]
_PATCH_REPORT_SHAPE = {
    "model": str, "output": str, "pairs": str, "eval": str, "device": str, "written": [str],
    "timings": {}, "verification": {"parity": {}, "rounding_errors": {}},
    "result": {"rounds": _ROWS, "edits": _ROWS, "scores": _ROWS, "conditioning": {},
               "timings": {}, "strategy": str, "objective": str, "base_accuracy": _NUMBER,
               "base_gap": _NUMBER, "final_accuracy": _NUMBER, "final_gap": _NUMBER},
}
_VERIFY_REPORT_SHAPE = {"checks": [{"name": str, "message": str, "figures": {}}],
                        "provider": str}


def _json_shape_error(value, shape, where: str = "") -> str | None:
    """Where ``value`` departs from ``shape`` (see :data:`_PATCH_REPORT_SHAPE`), or None;
    ``where`` is the path of ``value`` in the document ('' at the top)."""
    if not where:
        problem = _json_shape_error(value, shape, "$")
        return problem.replace("$ is", "the top level is", 1).replace("$.", "", 1) \
            if problem else None
    if shape is _NUMBER:
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
        return None if ok else f"{where} is {type(value).__name__}, expected a number"
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} is {type(value).__name__}, expected an object"
        for key, inner in shape.items():
            if key in value and value[key] is not None:
                if problem := _json_shape_error(value[key], inner, f"{where}.{key}"):
                    return problem
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} is {type(value).__name__}, expected an array"
        for i, item in enumerate(value):
            if problem := _json_shape_error(item, shape[0], f"{where}[{i}]"):
                return problem
        return None
    if not isinstance(value, shape):
        return f"{where} is {type(value).__name__}, expected {shape.__name__}"
    return None


def _read_json(path: Path, shape: dict, what: str):
    """A JSON file whose structure fits ``shape``, or a one-line RectifyError."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        text = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise RectifyError(f"{path}: not JSON ({' '.join(text.split())[:200]})") from None
    except OSError as exc:
        raise RectifyError(f"{path}: cannot read ({exc.strerror})") from None
    if problem := _json_shape_error(data, shape):
        raise RectifyError(f"{path}: not {what}: {problem}")
    return data


@main.command()
@click.argument("report_json", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="Folder for the HTML page.")
@click.option("--attack", "attack_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="npz with x, y, target: adds ASR and held-out heatmaps.")
@click.option("--verify-json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Use the results of `verify --json` instead of re-running it.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where the heatmaps' attributions are computed.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@reports_errors
def report(report_json: Path, out_dir: Path, attack_path: Path | None,
           verify_json: Path | None, device: str, provider: str) -> None:
    """Write the HTML report of an existing run from the JSON of `patch --report`."""
    from patcher.gate.report import write_report

    data = _read_json(report_json, _PATCH_REPORT_SHAPE, "the JSON of 'onnx-rectify patch "
                      "--report'")
    verify_data = _read_json(verify_json, _VERIFY_REPORT_SHAPE, "the JSON of 'onnx-rectify "
                             "verify --json'") if verify_json else None
    from patcher.gate.report import referenced_files, require_libraries, writes_name
    from patcher.model.paths import Outputs, check_folder_outputs, check_output_folder
    from patcher.patch import resolve_device

    require_libraries()
    reads = {"REPORT_JSON": report_json, "--verify-json": verify_json, "--attack": attack_path,
             **referenced_files(data, report_json.parent)}
    check_output_folder("-o", out_dir)
    check_folder_outputs("-o", out_dir, reads, writes_name)
    with Outputs() as outputs:  # the page and its images appear together, or not at all
        write_report(data, outputs.tree(out_dir), verify_report=verify_data,
                     attack_path=attack_path, base_dir=report_json.parent,
                     device=str(resolve_device(device)), provider=provider)
        outputs.commit()
    click.echo(f"report: {out_dir / 'index.html'}")
