"""Writing edited weights into the ONNX file: same tensors, same dtype, same storage.

Each delta is added to the tensor of the same name in a copy of the loaded
ModelProto (an initializer or a Constant node's value), in the tensor's own field
(raw_data or the typed field) and dtype; float16/bfloat16 weights are updated in
float32 and rounded back, and the rounding error is reported. Tensors that came
from external data go to a fresh data file beside the output (``<out name>.data``,
never the input's), as do the largest tensors when the model would exceed protobuf's
2 GB limit. Provenance of the edits is recorded in ``metadata_props`` under
``onnx_rectify.provenance``. Files are written into a private folder inside the
destination folder, fsynced, verified from there by the caller, and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, numpy_helper

from patcher.errors import NumericalError, OutputError
from patcher.model.modelio import LoadedModel
from patcher.model.tensors import iter_tensors, named_tensors
from patcher.model.paths import Outputs, held_signals

PROVENANCE_KEY = "onnx_rectify.provenance"


@dataclass
class WrittenTensor:
    name: str
    delta_norm: float
    rounding_error: float  # max |stored - (old + delta)| after casting back


def _numpy_dtype(tensor: TensorProto):
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)


#: Integer types whose typed field is int32_data.
_INT32_DATA = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
               TensorProto.INT32)


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
    elif tensor.data_type in _INT32_DATA:  # int8/uint8 weights, int32 biases (quantized)
        del tensor.int32_data[:]
        tensor.int32_data.extend(values.reshape(-1).astype(np.int64).tolist())
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


#: Largest serialised ModelProto protobuf can write (2 GiB - 1). Above it, weights go to
#: external data. A module constant so that tests can lower it instead of allocating 2 GB.
PROTOBUF_LIMIT = (1 << 31) - 1

#: Tensors at least this large move to external data when the limit would be hit.
EXTERNAL_MIN_BYTES = 1024


@dataclass
class StagedModel:
    """A written model (and its data file) in a private folder inside the destination folder,
    fsynced and ready to be renamed into place: verify :attr:`model` from disk, then
    :meth:`commit` (or :meth:`into` a larger :class:`~patcher.model.paths.Outputs`);
    :meth:`discard` (always call it, e.g. in ``finally``) removes what is left."""

    folder: Path
    files: list[tuple[Path, Path]]  # (staged, final), the data file first
    #: the targets must not exist when they are renamed into place (no --force)
    exclusive: bool = False

    @property
    def model(self) -> Path:
        return self.files[-1][0]

    @property
    def finals(self) -> list[Path]:
        """The files this writes, the model first."""
        return [final for _, final in self.files[::-1]]

    def into(self, outputs: Outputs) -> None:
        """Add the model and its data file to ``outputs``, committed with the rest."""
        for staged, final in self.files:
            outputs.add(staged, final, self.exclusive)

    def commit(self) -> list[Path]:
        """Rename the data file and the model into place; on failure both targets keep
        what they held before (see :meth:`patcher.model.paths.Outputs.commit`)."""
        with Outputs() as outputs:
            self.into(outputs)
            outputs.commit()
        return self.finals

    def discard(self) -> None:
        with held_signals():
            shutil.rmtree(self.folder, ignore_errors=True)


def _externalize(model: ModelProto, names: set[str], data_name: str) -> bytes:
    """Move the named tensors' bytes out of ``model`` into one blob (64-byte aligned)."""
    blob = bytearray()
    for tensor in iter_tensors(model.graph):
        if tensor.name in names and tensor.data_location != TensorProto.EXTERNAL:
            raw = tensor.raw_data if tensor.HasField("raw_data") else \
                numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
            blob.extend(b"\0" * ((-len(blob)) % 64))
            offset = len(blob)
            blob.extend(raw)
            for f in ("raw_data", "float_data", "int32_data", "double_data", "int64_data"):
                tensor.ClearField(f)
            del tensor.external_data[:]
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)),
                               ("length", str(len(raw)))):
                tensor.external_data.add(key=key, value=value)
    return bytes(blob)


def _too_big_inline(model: ModelProto, keep_external: set[str]) -> set[str]:
    """Names of tensors to store externally so that the protobuf stays under the limit:
    those that were external in the input, plus the largest others while it is too big."""
    names = set(keep_external)
    size = model.ByteSize()
    if size <= PROTOBUF_LIMIT:
        return names
    sizes = sorted(((t.ByteSize(), t.name) for t in iter_tensors(model.graph)
                    if t.name and t.name not in names and t.ByteSize() >= EXTERNAL_MIN_BYTES),
                   reverse=True)
    for nbytes, name in sizes:
        names.add(name)
        size -= nbytes
        if size <= PROTOBUF_LIMIT:
            break
    return names


def stage_model(model: ModelProto, loaded: LoadedModel, out: Path,
                exclusive: bool = False) -> StagedModel:
    """Write ``model`` for ``out`` into a private folder next to it (see :class:`StagedModel`).
    Tensors that were external in the input, and any others needed to stay under protobuf's
    2 GB limit, go to ``<out name>.data``. ``model`` is modified (tensors moved out)."""
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{out}: folder '{folder}' does not exist")
    data_name = f"{out.name}.data"
    external = _too_big_inline(model, set(loaded.external))
    blob = _externalize(model, external, data_name) if external else None
    if model.ByteSize() > PROTOBUF_LIMIT:
        raise OutputError(f"{out}: the model's graph alone exceeds protobuf's 2 GB limit, even "
                          "with its weights in external data")
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=folder))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write in '{folder}' ({exc.strerror or exc})") from None
    staged = StagedModel(stage, [], exclusive)
    try:
        if blob is not None:
            _write_synced(stage / data_name, blob)
            staged.files.append((stage / data_name, folder / data_name))
        _write_synced(stage / out.name, model.SerializeToString())
        staged.files.append((stage / out.name, out))
    except BaseException as exc:
        staged.discard()
        if isinstance(exc, OSError):
            raise OutputError(f"{out}: write failed ({exc.strerror or exc})") from None
        raise
    return staged


def probe_writable(out: Path) -> None:
    """Fail now, before any work, if files cannot be created in ``out``'s folder (read-only
    folder or file system, no permission): create and remove a private folder there."""
    folder = out.parent if str(out.parent) else Path(".")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".probe", dir=folder))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write in '{folder}' ({exc.strerror or exc})") from None


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_model(model: ModelProto, loaded: LoadedModel, out: Path) -> list[Path]:
    """Write ``model`` to ``out`` (staged, fsynced, renamed into place); tensors that were
    external go to ``<out name>.data``. Returns the files written, the model first. The
    input's own files are never touched."""
    staged = stage_model(model, loaded, out)
    try:
        return staged.commit()
    finally:
        staged.discard()
