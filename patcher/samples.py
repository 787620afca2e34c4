"""Sample files: the npz contract every command reads, validated against the model's input.

- ``pairs.npz``: ``corrupted`` [n, ...], ``clean`` [n, ...], ``label`` [n] int64 (the
  correct class of both);
- ``eval.npz``: ``x`` [m, ...], ``y`` [m] (clean data: accuracy budget and calibration);
- ``attack.npz``: ``x`` (corrupted inputs), ``y`` (their true labels), ``target`` (the
  class a backdoor forces, a scalar).

Images are float32, laid out exactly as the model's input (NCHW for most). Files are
opened with ``allow_pickle=False``; every problem is a :class:`BadSamplesError`
naming the file and the key.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from patcher.errors import BadModelError, BadSamplesError

#: Refuse sample files whose arrays would take more than this in memory (all the keys read:
#: the stored arrays plus the copies converted to the dtypes used, float32 images and int64
#: labels). Checked from the .npy headers, before anything is decompressed or converted.
MAX_SAMPLE_BYTES = 4 << 30

#: Compression methods an npz member may use: what numpy writes (savez stores,
#: savez_compressed deflates) and what Python's zipfile reads besides (bzip2, lzma).
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16)


@dataclass(frozen=True)
class InputSpec:
    """The model's (first) input: name, dims (None where symbolic), numpy dtype."""

    name: str
    dims: tuple[int | None, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "InputSpec":
        """The one input of a classifier; a model with none, several, or one that is not a
        tensor of numbers is refused (:class:`BadModelError`)."""
        inits = {t.name for t in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in inits]
        if not inputs:
            raise BadSamplesError("the model has no graph input to feed samples to")
        if len(inputs) > 1:
            names = ", ".join(f"'{i.name}'" for i in inputs[:5])
            raise BadModelError(f"the model has {len(inputs)} graph inputs ({names}"
                                f"{', ...' if len(inputs) > 5 else ''}); samples feed a "
                                "classifier with one input")
        kind = inputs[0].type.WhichOneof("value")
        if kind != "tensor_type":
            raise BadModelError(f"graph input '{inputs[0].name}' is a "
                                f"{(kind or 'untyped value').replace('_type', '')}, not a "
                                "tensor; samples feed a classifier with one tensor input")
        tt = inputs[0].type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):
            dtype = None
        if dtype is None or dtype.kind not in "fiub":
            raise BadModelError(f"graph input '{inputs[0].name}' has element type "
                                f"{_type_name(tt.elem_type)}; samples feed numbers")
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in tt.shape.dim)
        return cls(inputs[0].name, dims, dtype)


@dataclass
class Pairs:
    corrupted: np.ndarray
    clean: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.label)


@dataclass
class LabelledSet:
    x: np.ndarray
    y: np.ndarray
    target: int | None = None

    def __len__(self) -> int:
        return len(self.y)


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, key: str
                   ) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a member's .npy header, read without loading the data."""
    if info.flag_bits & 0x1:
        raise BadSamplesError(f"{path}: '{key}' is encrypted; write the file with numpy.savez")
    if info.compress_type not in ZIP_METHODS:
        raise BadSamplesError(f"{path}: '{key}' uses zip compression method "
                              f"{info.compress_type}, which is not supported (stored, deflate, "
                              "bzip2 and lzma are; numpy.savez and savez_compressed write them)")
    with zf.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:  # 3.0: only structured dtypes with non-Latin-1 field names need it
            raise BadSamplesError(f"{path}: '{key}' has a structured dtype (.npy "
                                  f"format {version[0]}.{version[1]}); expected plain "
                                  "float or integer arrays")
    return tuple(int(d) for d in shape), np.dtype(dtype)


def _declared_sizes(path: Path, keys: tuple[str, ...],
                    convert: dict[str, np.dtype] | None = None) -> dict[str, int]:
    """Bytes each array will take in memory, from its .npy header, without loading the data
    (so a huge or zip-bombed file is refused before it is decompressed): the stored array,
    plus its copy in ``convert[key]``'s dtype where that differs. Encrypted members and
    compression methods numpy does not write are refused here too."""
    sizes = {}
    with zipfile.ZipFile(path) as zf:
        members = {info.filename[:-4] if info.filename.endswith(".npy") else info.filename: info
                   for info in zf.infolist()}
        for key in keys:
            if key not in members:
                continue
            shape, dtype = _member_header(zf, members[key], path, key)
            count = 1
            for d in shape:
                count *= d
            sizes[key] = count * dtype.itemsize
            target = (convert or {}).get(key)
            if target is not None and np.dtype(target) != dtype:
                sizes[key] += count * np.dtype(target).itemsize
    return sizes


def read_npz(path: str | os.PathLike, keys: tuple[str, ...],
             convert: dict[str, np.dtype] | None = None) -> dict[str, np.ndarray]:
    """The named arrays of an npz file (no pickles), or a BadSamplesError saying what is wrong.
    ``convert`` names the dtype each key will be converted to, so that the memory bound
    (:data:`MAX_SAMPLE_BYTES`) counts the converted copies too."""
    path = Path(path)
    if not path.is_file():
        raise BadSamplesError(f"{path}: no such file")
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise BadSamplesError(f"{path}: not a readable npz file (npz files are zip "
                                  "archives written by numpy.savez)")
    try:
        sizes = _declared_sizes(path, keys, convert)
        total = sum(sizes.values())
        if total > MAX_SAMPLE_BYTES:
            big = max(sizes, key=sizes.get)
            raise BadSamplesError(f"{path}: its arrays take {total / 2**30:.1f} GiB in memory "
                                  f"as read and converted ('{big}': {sizes[big] / 2**30:.1f} "
                                  f"GiB), more than the {MAX_SAMPLE_BYTES / 2**30:g} GiB a "
                                  "sample file may take; use fewer samples")
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise BadSamplesError(f"{path}: missing key(s) {', '.join(missing)} "
                                      f"(has: {', '.join(data.files) or 'nothing'})")
            return {k: data[k] for k in keys}
    except BadSamplesError:
        raise
    except ValueError as exc:  # object arrays need pickles; bad headers
        raise BadSamplesError(f"{path}: cannot read without pickles or not a valid npz "
                              f"({' '.join(str(exc).split())[:200]})") from None
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError, KeyError, TypeError,
            NotImplementedError) as exc:  # damaged members: CRC, deflate stream, truncation
        raise BadSamplesError(f"{path}: not a readable npz file ("
                              f"{' '.join(str(exc).split())[:200] or type(exc).__name__})") \
            from None
    except RuntimeError as exc:  # zipfile: an encrypted member not flagged in the header
        raise BadSamplesError(f"{path}: not a readable npz file "
                              f"({' '.join(str(exc).split())[:200]})") from None
    except MemoryError:
        raise BadSamplesError(f"{path}: its arrays do not fit in memory; use fewer "
                              "samples") from None


def check_images(array: np.ndarray, where: str, spec: InputSpec) -> np.ndarray:
    """Images laid out as the model's input, finite; cast to the input's float type."""
    if array.dtype.kind not in "f":
        raise BadSamplesError(f"{where}: dtype {array.dtype}, expected float32 images")
    if array.ndim != len(spec.dims):
        raise BadSamplesError(f"{where}: shape {list(array.shape)} has rank {array.ndim}; the "
                              f"model input '{spec.name}' has rank {len(spec.dims)} "
                              f"({_dims(spec)})")
    for axis, (got, want) in enumerate(zip(array.shape, spec.dims)):
        if axis > 0 and want is not None and got != want:
            raise BadSamplesError(f"{where}: shape {list(array.shape)} does not fit the model "
                                  f"input '{spec.name}' ({_dims(spec)}) at axis {axis}")
    if len(array) == 0:
        raise BadSamplesError(f"{where}: holds no samples")
    dtype = image_dtype(spec)
    # Check the values the model will see: a float64 1e300 is finite, its float32 is Inf.
    with np.errstate(all="ignore"):
        converted = np.ascontiguousarray(array, dtype=dtype)
    if not np.isfinite(converted).all():
        if np.isfinite(array).all():
            raise BadSamplesError(f"{where}: values beyond the range of {dtype} (largest "
                                  f"magnitude {float(np.abs(array).max()):.3g}) become Inf "
                                  f"when converted to the model's input type {dtype}")
        raise BadSamplesError(f"{where}: contains NaN or Inf")
    return converted


def image_dtype(spec: InputSpec) -> np.dtype:
    """The dtype images are converted to: the input's float type, else float32."""
    return np.dtype(spec.dtype if spec.dtype.kind == "f" else np.float32)


def check_labels(labels: np.ndarray, where: str, n: int, num_classes: int | None) -> np.ndarray:
    if labels.dtype.kind not in "iu":
        raise BadSamplesError(f"{where}: dtype {labels.dtype}, expected integer labels")
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != n:
        raise BadSamplesError(f"{where}: {len(labels)} labels for {n} samples")
    if labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes):
        raise BadSamplesError(f"{where}: labels must lie in 0..{(num_classes or 1) - 1} "
                              f"(found {labels.min()}..{labels.max()})")
    return labels


def _type_name(elem_type: int) -> str:
    if elem_type in onnx.TensorProto.DataType.values():
        return onnx.TensorProto.DataType.Name(elem_type)
    return str(elem_type)


def _dims(spec: InputSpec) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in spec.dims) + "]"


def load_pairs(path, spec: InputSpec, num_classes: int | None) -> Pairs:
    image = image_dtype(spec)
    data = read_npz(path, ("corrupted", "clean", "label"),
                    convert={"corrupted": image, "clean": image, "label": np.dtype(np.int64)})
    return check_pairs(data, str(path), spec, num_classes)


def check_pairs(arrays: dict[str, np.ndarray], where: str, spec: InputSpec,
                num_classes: int | None) -> Pairs:
    """``corrupted``, ``clean`` and ``label`` (from a file or given as arrays) checked as
    :func:`load_pairs` checks a file; a refusal names ``where`` and the key."""
    corrupted = check_images(arrays["corrupted"], f"{where}: 'corrupted'", spec)
    clean = check_images(arrays["clean"], f"{where}: 'clean'", spec)
    if corrupted.shape != clean.shape:
        raise BadSamplesError(f"{where}: 'corrupted' {list(corrupted.shape)} and 'clean' "
                              f"{list(clean.shape)} differ in shape")
    label = check_labels(arrays["label"], f"{where}: 'label'", len(clean), num_classes)
    same = [i for i in range(len(clean)) if np.array_equal(corrupted[i], clean[i])]
    if len(same) == len(clean):
        raise BadSamplesError(f"{where}: every corrupted sample equals its clean one: "
                              "nothing to fix")
    return Pairs(corrupted, clean, label)


def load_labelled(path, spec: InputSpec, num_classes: int | None, with_target: bool = False
                  ) -> LabelledSet:
    keys = ("x", "y", "target") if with_target else ("x", "y")
    data = read_npz(path, keys, convert={"x": image_dtype(spec), "y": np.dtype(np.int64)})
    return check_labelled(data, str(path), spec, num_classes, with_target)


def check_labelled(arrays: dict[str, np.ndarray], where: str, spec: InputSpec,
                   num_classes: int | None, with_target: bool = False) -> LabelledSet:
    """``x``, ``y`` (and with ``with_target``, ``target``), from a file or given as arrays,
    checked as :func:`load_labelled` checks a file; a refusal names ``where`` and the key."""
    x = check_images(arrays["x"], f"{where}: 'x'", spec)
    y = check_labels(arrays["y"], f"{where}: 'y'", len(x), num_classes)
    target = None
    if with_target:
        t = arrays["target"]
        if t.size != 1 or t.dtype.kind not in "iu":
            raise BadSamplesError(f"{where}: 'target' must be one integer class (the class "
                                  "an all-to-one attack forces; a per-image target array "
                                  f"is not supported){_per_image(t)}")
        target = int(t.reshape(-1)[0])
        if target < 0 or (num_classes is not None and target >= num_classes):
            raise BadSamplesError(f"{where}: 'target' {target} is not a class of the model")
        if (y == target).all():
            raise BadSamplesError(f"{where}: every label in 'y' equals 'target' {target}: no "
                                  "sample on which the attack could change the prediction")
    return LabelledSet(x, y, target)


def _per_image(target: np.ndarray) -> str:
    """What to say about a target array of one class per image."""
    if target.size > 1 and target.dtype.kind in "iu" and len(np.unique(target)) == 1:
        return f"; every entry is {int(target.reshape(-1)[0])}: store that one integer"
    return ""


def check_scores(scores: np.ndarray, where: str, labels: dict[str, np.ndarray]) -> None:
    """The model's scores as it computed them, [n, classes], bound the labels: for a file
    whose class count neither its output nor shape inference states."""
    if scores.ndim != 2:
        raise BadModelError(f"{where}: its first output has shape {list(scores.shape)} at run "
                            "time; a classifier outputs [batch, classes] scores (rank 2)")
    width = scores.shape[1]
    for name, values in labels.items():
        if len(values) and int(values.max()) >= width:
            raise BadSamplesError(f"{name}: labels must lie in 0..{width - 1}, the classes the "
                                  f"model computes (found up to {int(values.max())})")


def classifier_contract(model: onnx.ModelProto, where: str) -> tuple[InputSpec, int | None]:
    """:meth:`InputSpec.of` and :func:`num_classes_of` of a model that samples are fed to;
    a refusal names ``where`` (the model's file)."""
    try:
        return InputSpec.of(model), num_classes_of(model)
    except BadModelError as exc:
        raise BadModelError(f"{where}: {exc}") from None


def num_classes_of(model: onnx.ModelProto) -> int | None:
    """The class count of a classifier: the last axis of its first output, [batch, classes],
    as its graph computes it (shape inference) or, failing that, as the file states it.
    A first output that is not a floating-point score matrix, is the graph's input, or whose
    stated class count contradicts the graph is refused (:class:`BadModelError`)."""
    if not model.graph.output:
        raise BadModelError("the model has no graph output")
    out = model.graph.output[0]
    inputs = {i.name for i in model.graph.input}
    if out.name in inputs:
        raise BadModelError(f"graph output '{out.name}' is the graph's input itself, not "
                            "class scores computed from it")
    if out.type.WhichOneof("value") != "tensor_type":
        raise BadModelError(f"graph output '{out.name}' is not a tensor; a classifier outputs "
                            "[batch, classes] scores")
    elem = out.type.tensor_type.elem_type
    if elem not in _FLOAT_TYPES and elem != onnx.TensorProto.UNDEFINED:
        raise BadModelError(f"graph output '{out.name}' has element type {_type_name(elem)}; a "
                            "classifier outputs floating-point [batch, classes] scores (logits "
                            "or probabilities)")
    declared = _shape_dims(out.type.tensor_type)
    inferred = _inferred_output_dims(model)
    for dims in (declared, inferred):
        if dims is not None and len(dims) != 2:
            raise BadModelError(f"graph output '{out.name}' has rank {len(dims)}; a classifier "
                                "outputs [batch, classes] scores (rank 2)")
    stated = declared[-1] if declared else None
    computed = inferred[-1] if inferred else None
    if stated is not None and computed is not None and stated != computed:
        raise BadModelError(f"graph output '{out.name}' states {stated} classes, its graph "
                            f"computes {computed}")
    classes = computed if computed is not None else stated
    if classes is not None and classes < 2:
        raise BadModelError(f"graph output '{out.name}' has {classes} class; a classifier "
                            "has at least 2")
    return classes


def _shape_dims(tensor_type) -> tuple[int | None, ...] | None:
    """A tensor type's dims (None where symbolic), or None when it states no shape."""
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                 for d in tensor_type.shape.dim)


#: Initializers and Constant values larger than this are handed to shape inference as typed
#: graph inputs instead of with their data (it needs only small integer constants).
_INFER_INLINE_BYTES = 1 << 16


def _inferred_output_dims(model: onnx.ModelProto) -> tuple[int | None, ...] | None:
    """The first output's dims as onnx shape inference computes them from the graph (the
    weights' data left out), or None when inference cannot tell."""
    graph = onnx.GraphProto()
    graph.name = model.graph.name
    graph.input.extend(model.graph.input)
    declared = {i.name for i in model.graph.input}
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")),
                     None) if node.op_type == "Constant" and len(node.output) == 1 else None
        if value is not None and value.ByteSize() > _INFER_INLINE_BYTES:
            graph.input.append(onnx.helper.make_tensor_value_info(
                node.output[0], value.data_type, list(value.dims)))  # weights in a Constant
        else:
            graph.node.append(node)
    for t in model.graph.initializer:
        if t.ByteSize() <= _INFER_INLINE_BYTES:
            graph.initializer.append(t)
        elif t.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type,
                                                                  list(t.dims)))
    out = graph.output.add()
    out.name = model.graph.output[0].name
    probe = onnx.ModelProto()
    probe.ir_version = model.ir_version
    probe.opset_import.extend(model.opset_import)
    probe.graph.CopyFrom(graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False)
    except Exception:  # inference is a bonus: onnx raises several kinds on odd graphs
        return None
    tt = inferred.graph.output[0].type.tensor_type
    return _shape_dims(tt) if inferred.graph.output[0].type.HasField("tensor_type") else None
