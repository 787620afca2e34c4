"""Writing edited weights into the ONNX file: same tensors, same dtype, same storage.

Each delta is added to the tensor of the same name in a copy of the loaded
ModelProto (an initializer or a Constant node's value), in the tensor's own field
(raw_data or the typed field) and dtype; float16/bfloat16 weights are updated in
float32 and rounded back, and the rounding error is reported. Tensors that came
from external data go to a fresh data file beside the output. Provenance of the
edits is recorded in ``metadata_props`` under ``onnx_rectify.provenance``.
Files are written to a temporary name in the destination folder, fsynced and
renamed into place.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, numpy_helper

from .errors import NumericalError, OutputError
from .modelio import LoadedModel, iter_tensors, named_tensors, write_bytes_atomic

PROVENANCE_KEY = "onnx_rectify.provenance"


@dataclass
class WrittenTensor:
    name: str
    delta_norm: float
    rounding_error: float  # max |stored - (old + delta)| after casting back


def _numpy_dtype(tensor: TensorProto):
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)


def set_tensor_values(tensor: TensorProto, values: np.ndarray) -> None:
    """Replace a tensor's values in place, keeping its name, dims, dtype and field
    (raw_data, or the typed field the exporter used)."""
    values = np.ascontiguousarray(values)
    half = tensor.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    if tensor.raw_data or not (tensor.float_data or tensor.double_data or tensor.int32_data):
        tensor.raw_data = numpy_helper.from_array(values, tensor.name).raw_data
    elif half:
        del tensor.int32_data[:]
        tensor.int32_data.extend(values.view(np.uint16).astype(np.int32).reshape(-1).tolist())
    elif tensor.data_type == TensorProto.FLOAT:
        del tensor.float_data[:]
        tensor.float_data.extend(values.reshape(-1).astype(np.float32).tolist())
    elif tensor.data_type == TensorProto.DOUBLE:
        del tensor.double_data[:]
        tensor.double_data.extend(values.reshape(-1).astype(np.float64).tolist())
    else:
        raise NumericalError(f"tensor '{tensor.name}': cannot write values of type "
                             f"{TensorProto.DataType.Name(tensor.data_type)}")


def apply_deltas(loaded: LoadedModel, deltas: dict[str, np.ndarray], provenance: dict | None = None
                 ) -> tuple[ModelProto, list[WrittenTensor]]:
    """A copy of the model with ``deltas`` (float32/64 arrays by tensor name) added."""
    model = ModelProto()
    model.CopyFrom(loaded.proto)
    by_name = named_tensors(model.graph)
    written = []
    for name, delta in deltas.items():
        tensor = by_name.get(name)
        if tensor is None:
            raise NumericalError(f"no tensor named '{name}' to write the edit into")
        old = numpy_helper.to_array(tensor)
        if old.shape != delta.shape:
            raise NumericalError(f"tensor '{name}': edit of shape {delta.shape} does not fit "
                                 f"the stored shape {old.shape}")
        exact = old.astype(np.float64) + delta.astype(np.float64)
        if not np.isfinite(exact).all():
            raise NumericalError(f"tensor '{name}': the edit produces non-finite weights; "
                                 "refusing to write")
        new = exact.astype(old.dtype)
        if not np.isfinite(new.astype(np.float64)).all():
            raise NumericalError(f"tensor '{name}': the edited weights overflow "
                                 f"{old.dtype}; refusing to write")
        set_tensor_values(tensor, new)
        written.append(WrittenTensor(name, float(np.linalg.norm(delta)),
                                     float(np.abs(new.astype(np.float64) - exact).max())))
    if provenance is not None:
        record_provenance(model, provenance)
    return model, written


def read_provenance(model: ModelProto) -> dict | None:
    for prop in model.metadata_props:
        if prop.key == PROVENANCE_KEY:
            try:
                return json.loads(prop.value)
            except ValueError:
                return None
    return None


def record_provenance(model: ModelProto, entry: dict) -> None:
    """Append ``entry['edits']`` to the model's provenance (earlier patches are kept)."""
    existing = read_provenance(model) or {"tool": entry.get("tool"), "edits": []}
    existing["tool"] = entry.get("tool", existing.get("tool"))
    existing.setdefault("edits", []).extend(entry.get("edits", []))
    for key, value in entry.items():
        if key not in ("edits", "tool"):
            existing[key] = value
    text = json.dumps(existing, sort_keys=True)
    for prop in model.metadata_props:
        if prop.key == PROVENANCE_KEY:
            prop.value = text
            return
    model.metadata_props.add(key=PROVENANCE_KEY, value=text)


def save_model(model: ModelProto, loaded: LoadedModel, out: Path) -> list[Path]:
    """Write ``model`` to ``out``; tensors that were external go to ``<out name>.data``.

    Returns the files written. The input's own files are never touched."""
    out = Path(out)
    if not out.parent.is_dir():
        raise OutputError(f"{out}: folder '{out.parent}' does not exist")
    if not loaded.external:
        write_bytes_atomic(out, model.SerializeToString())
        return [out]
    data_name = f"{out.name}.data"
    blob = bytearray()
    for tensor in iter_tensors(model.graph):
        if tensor.name in loaded.external and tensor.data_location != TensorProto.EXTERNAL:
            raw = tensor.raw_data if tensor.HasField("raw_data") else \
                numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
            pad = (-len(blob)) % 64
            blob.extend(b"\0" * pad)
            offset = len(blob)
            blob.extend(raw)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)),
                               ("length", str(len(raw)))):
                tensor.external_data.add(key=key, value=value)
    data_path = out.parent / data_name
    write_bytes_atomic(data_path, bytes(blob))
    write_bytes_atomic(out, model.SerializeToString())
    return [out, data_path]
