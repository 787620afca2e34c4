"""PyTorch -> ONNX export with the conventions patching needs.

- a dynamic batch axis on the input and output (fixed at the example's batch for a module
  that hard-codes it; the verbs run such a model that many images at a time);
- an opset onnxruntime accepts (17 for the TorchScript exporter, 18+ for dynamo);
- BatchNorm folded into the preceding Conv (what edge models ship) or kept as a node;
- weights inline or in an external ``<name>.data`` file beside the model;
- stable weight names: BatchNorm is folded in torch before export (``torch.fx``), so
  a folded Conv keeps its state_dict name instead of the TorchScript exporter's
  ``onnx::Conv_N`` (the dynamo exporter keeps state_dict names anyway);
- preprocessing, class names and input layout in ``metadata_props``;
- an onnxruntime parity check against the torch module before returning.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from patcher.errors import CheckFailedError, OutputError, RectifyError, UnsupportedOpError
from patcher.graph.support import require_supported
from patcher.model.paths import Outputs
from patcher.model.runtime import open_session

EXPORTERS = ("torchscript", "dynamo")
#: Highest IR version onnxruntime 1.18+ reads; exporters may stamp newer ones.
MAX_IR_VERSION = 10


@dataclass
class ExportResult:
    """What was written and how closely onnxruntime reproduces the torch module."""

    path: Path
    data_path: Path | None
    exporter: str
    opset: int
    batchnorm_folded: bool
    max_abs_diff: float
    top1_agreement: float
    provider: str
    weight_names: list[str] = field(default_factory=list)
    #: The batch size the file fixes (None: the batch axis is dynamic, as asked).
    fixed_batch: int | None = None


def fold_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Conv followed by BatchNorm -> one Conv with folded weights, names kept (eval mode)."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(copy.deepcopy(module).eval())
    except Exception as exc:  # fx cannot trace every module
        raise RectifyError(
            f"cannot fold BatchNorm in torch ({type(exc).__name__}: {exc}); "
            "export with BatchNorm kept (--keep-bn) instead") from None


def _metadata(model: onnx.ModelProto, metadata: dict[str, object]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if key in existing:
            existing[key].value = text
        else:
            model.metadata_props.add(key=key, value=text)


def batch_is_fixed(module: torch.nn.Module, example: torch.Tensor) -> bool:
    """Whether ``module`` runs only at the example's batch size (it hard-codes the batch,
    e.g. ``x.reshape(1, -1)``): it fails, or answers with another batch, on one more image."""
    more = torch.cat([example, example[:1]])
    try:
        with torch.no_grad():
            out = module(more)
    except Exception:  # any failure of the module's own code at another batch size
        return True
    return not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != len(more)


@contextlib.contextmanager
def _quiet_torch():
    """Silence torch's loggers (torch.export logs whole tracebacks on a failed guard) and
    warnings while exporting; failures are reported by us, in one line."""
    import logging

    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _export_bytes(module, example, exporter: str, opset: int | None, input_name: str,
                  output_name: str, keep_bn: bool, dynamic_batch: bool = True
                  ) -> onnx.ModelProto:
    try:
        with _quiet_torch():
            return _run_exporter(module, example, exporter, opset, input_name, output_name,
                                 keep_bn, dynamic_batch)
    except RectifyError:
        raise
    except Exception as exc:  # the exporters raise many kinds
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise RectifyError(f"the {exporter} exporter failed: {type(exc).__name__}: "
                           f"{text[:300]}") from None


def _run_exporter(module, example, exporter: str, opset: int | None, input_name: str,
                  output_name: str, keep_bn: bool, dynamic_batch: bool) -> onnx.ModelProto:
    if exporter == "torchscript":
        buf = io.BytesIO()
        torch.onnx.export(
            module, (example,), buf, dynamo=False, opset_version=opset or 17,
            input_names=[input_name], output_names=[output_name],
            dynamic_axes=({input_name: {0: "batch"}, output_name: {0: "batch"}}
                          if dynamic_batch else None),
            training=torch.onnx.TrainingMode.PRESERVE if keep_bn else
            torch.onnx.TrainingMode.EVAL,
            do_constant_folding=True)
        return onnx.load_from_string(buf.getvalue())
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "model.onnx")
        shapes = None
        if dynamic_batch:
            shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},)
            if example.shape[0] == 1:  # torch.export specialises a size-1 dim to the constant 1
                example = example.repeat(2, *[1] * (example.dim() - 1))
        torch.onnx.export(module, (example,), target, dynamo=True, opset_version=opset or 18,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_shapes=shapes, external_data=True, verbose=False)
        return onnx.load(target)  # external data read into memory


def name_weights(model: onnx.ModelProto, module: torch.nn.Module) -> dict[str, str]:
    """Rename initializers the exporter named after nothing (``onnx::MatMul_N``, ``val_N``)
    after the module tensor they hold: ``<state_dict name>``, or ``<name>.T`` for its
    transpose (a Linear's weight stored for ``x @ W``). Only exact copies are renamed, each
    name once. Returns old name -> new name."""
    known: dict[tuple, str] = {}
    for name, tensor in module.state_dict().items():
        if not tensor.is_floating_point():
            continue
        array = tensor.detach().cpu().numpy()
        known.setdefault((array.shape, array.dtype.str, array.tobytes()), name)
        if array.ndim == 2:
            t = np.ascontiguousarray(array.T)
            known.setdefault((t.shape, t.dtype.str, t.tobytes()), f"{name}.T")
    taken = {t.name for t in model.graph.initializer}
    renames: dict[str, str] = {}
    for init in model.graph.initializer:
        if init.name in known.values() or init.data_location == onnx.TensorProto.EXTERNAL:
            continue
        array = onnx.numpy_helper.to_array(init)
        new = known.get((array.shape, array.dtype.str, array.tobytes()))
        if new and new not in taken:
            renames[init.name] = new
            taken.add(new)
    if not renames:
        return renames
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in model.graph.node:  # exports hold no subgraphs reading weights
        node.input[:] = [renames.get(i, i) for i in node.input]
    for info in list(model.graph.value_info) + list(model.graph.input):
        info.name = renames.get(info.name, info.name)
    return renames


def stage_model(model: onnx.ModelProto, path: Path, external_data: bool,
                outputs: Outputs, exclusive: bool = False) -> Path:
    """Write the model (with ``external_data``, every tensor of 1 KiB or more to
    ``<name>.data`` beside it; small shape constants stay inline: onnxruntime's shape
    inference cannot read them from external data) into a private folder beside ``path``,
    added to ``outputs`` (renamed into place by its commit; ``exclusive``: refuse there if
    a target exists by then). Returns the staged model's path."""
    path = Path(path)
    if not external_data:
        return outputs.add_bytes(path, model.SerializeToString(), exclusive)
    data_name = f"{path.name}.data"
    stage = outputs.private_folder(path.parent, path.name)
    staged = stage / path.name
    try:
        onnx.save_model(model, str(staged), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
    except OSError as exc:
        raise OutputError(f"{path}: write failed ({exc.strerror or exc})") from None
    if (stage / data_name).exists():
        outputs.add(stage / data_name, path.parent / data_name, exclusive)
    outputs.add(staged, path, exclusive)
    return staged


def save_model(model: onnx.ModelProto, path: Path, external_data: bool,
               force: bool = True) -> Path | None:
    """Write the model (and with ``external_data`` its ``<name>.data``) and rename both into
    place in one step; without ``force``, refuse if either exists. Returns the data file."""
    with Outputs() as outputs:
        stage_model(model, path, external_data, outputs, exclusive=not force)
        outputs.commit()
    return Path(path).parent / f"{Path(path).name}.data" if external_data else None


def export_pytorch(module: torch.nn.Module, example_input: torch.Tensor, path: str | os.PathLike,
                   *, fold_bn: bool = True, external_data: bool = False,
                   exporter: str = "torchscript", opset: int | None = None,
                   input_name: str = "input", output_name: str = "logits",
                   class_names: list[str] | None = None, preprocessing: dict | None = None,
                   input_layout: str = "NCHW", check_batch: int = 8, seed: int = 0,
                   force: bool = True, tolerance: float = 1e-4) -> ExportResult:
    """Export ``module`` (in eval mode) to ``path`` and check it under onnxruntime.

    The check feeds ``check_batch`` seeded random inputs shaped like ``example_input``
    (batch axis replaced) to both and requires |onnx - torch| <= tol + tol |torch|
    (``tolerance``, 1e-4 by default: deep random networks may need more) with identical
    top-1. The files are written beside ``path``, checked there, and only
    then renamed into place (with the data file, in one step); without ``force``, an
    existing ``path`` or data file is refused.
    """
    if exporter not in EXPORTERS:
        raise RectifyError(f"unknown exporter '{exporter}' (choose from {', '.join(EXPORTERS)})")
    if exporter == "dynamo" and not fold_bn:
        raise RectifyError("the dynamo exporter always folds BatchNorm into the Conv weights; "
                           "use the torchscript exporter to keep BatchNorm nodes")
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"{path}: folder '{path.parent}' does not exist")
    module = copy.deepcopy(module).eval()
    if fold_bn:
        module = fold_batchnorm(module)
    dynamic = not batch_is_fixed(module, example_input)
    model = _export_bytes(module, example_input, exporter, opset, input_name, output_name,
                          keep_bn=not fold_bn, dynamic_batch=dynamic)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    name_weights(model, module)
    try:  # before anything is written: a file the other verbs would refuse is no export
        require_supported(model)
    except UnsupportedOpError as exc:
        raise UnsupportedOpError(f"{path}: the {exporter} export is refused, nothing written: "
                                 f"{exc}") from None
    _metadata(model, {"onnx_rectify.input_layout": input_layout,
                      **({"onnx_rectify.class_names": class_names} if class_names else {}),
                      **({"onnx_rectify.preprocessing": preprocessing} if preprocessing else {})})
    has_bn = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    with Outputs() as outputs:
        staged = stage_model(model, path, external_data, outputs, exclusive=not force)
        result = _check_export(module, example_input, model, staged, path, check_batch, seed,
                               tolerance)
        outputs.commit()
    data_path = path.parent / f"{path.name}.data" if external_data else None
    return ExportResult(path, data_path, exporter, next(o.version for o in model.opset_import
                                                          if o.domain in ("", "ai.onnx")),
                        not has_bn, *result, fixed_batch=fixed_batch_of(model))


def fixed_batch_of(model: onnx.ModelProto) -> int | None:
    """The batch size the first graph input fixes, or None when its batch axis is symbolic."""
    inputs = {i.name for i in model.graph.initializer}
    first = next((i for i in model.graph.input if i.name not in inputs), None)
    dims = first.type.tensor_type.shape.dim if first is not None else []
    return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") else None


def _check_export(module, example_input, model, staged: Path, path: Path, check_batch: int,
                  seed: int, tolerance: float = 1e-4) -> tuple[float, float, str, list[str]]:
    """The staged file under onnxruntime against the torch module: (max abs diff, top-1
    agreement, provider, weight names); refuses (exit 1) a mismatch. A file whose batch is
    fixed (the module hard-codes it) is checked on that many images at a time."""
    gen = torch.Generator().manual_seed(seed)
    step = fixed_batch_of(model) or check_batch
    count = -(-check_batch // step) * step
    x = torch.rand((count,) + tuple(example_input.shape[1:]), generator=gen,
                   dtype=example_input.dtype)
    session = open_session(staged, "cpu")
    with torch.no_grad():
        want = np.concatenate([module(x[i:i + step]).detach().cpu().numpy()
                               for i in range(0, count, step)])
    got = np.concatenate([session.run(x[i:i + step].numpy())[0] for i in range(0, count, step)])
    diff = float(np.abs(got - want).max())
    top1 = float(np.mean(got.reshape(len(got), -1).argmax(1) == want.reshape(len(want), -1).argmax(1)))
    if not np.allclose(got, want, rtol=tolerance, atol=tolerance) or top1 < 1.0:
        raise CheckFailedError(f"{path}: the export differs from the torch module under "
                               f"onnxruntime (max abs diff {diff:.3g}, top-1 agreement {top1:.0%})")
    weights = [t.name for t in model.graph.initializer]
    return diff, top1, session.provider, weights
