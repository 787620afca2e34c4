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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from patcher.errors import BadSamplesError

#: Refuse sample files whose arrays hold more than this (uncompressed bytes, all the keys
#: read). Checked from the array headers, before anything is decompressed.
MAX_SAMPLE_BYTES = 4 << 30


@dataclass(frozen=True)
class InputSpec:
    """The model's (first) input: name, dims (None where symbolic), numpy dtype."""

    name: str
    dims: tuple[int | None, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "InputSpec":
        inits = {t.name for t in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in inits]
        if not inputs:
            raise BadSamplesError("the model has no graph input to feed samples to")
        tt = inputs[0].type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in tt.shape.dim)
        return cls(inputs[0].name, dims, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))


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


def _declared_sizes(path: Path, keys: tuple[str, ...]) -> dict[str, int]:
    """Bytes each array declares in its .npy header, read without loading the data (so a
    huge or zip-bombed file is refused before it is decompressed)."""
    sizes = {}
    with zipfile.ZipFile(path) as zf:
        members = {name[:-4] if name.endswith(".npy") else name: name for name in zf.namelist()}
        for key in keys:
            if key not in members:
                continue
            with zf.open(members[key]) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                else:  # 3.0: only structured dtypes with non-Latin-1 field names need it
                    raise BadSamplesError(f"{path}: '{key}' has a structured dtype (.npy "
                                          f"format {version[0]}.{version[1]}); expected plain "
                                          "float or integer arrays")
            sizes[key] = int(np.prod(shape, dtype=object)) * dtype.itemsize
    return sizes


def read_npz(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named arrays of an npz file (no pickles), or a BadSamplesError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise BadSamplesError(f"{path}: no such file")
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise BadSamplesError(f"{path}: not a readable npz file (npz files are zip "
                                  "archives written by numpy.savez)")
    try:
        sizes = _declared_sizes(path, keys)
        total = sum(sizes.values())
        if total > MAX_SAMPLE_BYTES:
            big = max(sizes, key=sizes.get)
            raise BadSamplesError(f"{path}: its arrays hold {total / 2**30:.1f} GiB ('{big}': "
                                  f"{sizes[big] / 2**30:.1f} GiB), more than the "
                                  f"{MAX_SAMPLE_BYTES / 2**30:g} GiB a sample file may hold; "
                                  "use fewer samples")
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
    except (OSError, zipfile.BadZipFile, EOFError, KeyError, TypeError) as exc:
        raise BadSamplesError(f"{path}: not a readable npz file "
                              f"({' '.join(str(exc).split())[:200] or type(exc).__name__})") \
            from None


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
    if not np.isfinite(array).all():
        raise BadSamplesError(f"{where}: contains NaN or Inf")
    return np.ascontiguousarray(array, dtype=spec.dtype if spec.dtype.kind == "f" else np.float32)


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


def _dims(spec: InputSpec) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in spec.dims) + "]"


def load_pairs(path, spec: InputSpec, num_classes: int | None) -> Pairs:
    data = read_npz(path, ("corrupted", "clean", "label"))
    corrupted = check_images(data["corrupted"], f"{path}: 'corrupted'", spec)
    clean = check_images(data["clean"], f"{path}: 'clean'", spec)
    if corrupted.shape != clean.shape:
        raise BadSamplesError(f"{path}: 'corrupted' {list(corrupted.shape)} and 'clean' "
                              f"{list(clean.shape)} differ in shape")
    label = check_labels(data["label"], f"{path}: 'label'", len(clean), num_classes)
    same = [i for i in range(len(clean)) if np.array_equal(corrupted[i], clean[i])]
    if len(same) == len(clean):
        raise BadSamplesError(f"{path}: every corrupted sample equals its clean one: "
                              "nothing to fix")
    return Pairs(corrupted, clean, label)


def load_labelled(path, spec: InputSpec, num_classes: int | None, with_target: bool = False
                  ) -> LabelledSet:
    keys = ("x", "y", "target") if with_target else ("x", "y")
    data = read_npz(path, keys)
    x = check_images(data["x"], f"{path}: 'x'", spec)
    y = check_labels(data["y"], f"{path}: 'y'", len(x), num_classes)
    target = None
    if with_target:
        t = data["target"]
        if t.size != 1 or t.dtype.kind not in "iu":
            raise BadSamplesError(f"{path}: 'target' must be one integer class")
        target = int(t.reshape(-1)[0])
        if target < 0 or (num_classes is not None and target >= num_classes):
            raise BadSamplesError(f"{path}: 'target' {target} is not a class of the model")
    return LabelledSet(x, y, target)


def num_classes_of(model: onnx.ModelProto) -> int | None:
    """Size of the first output's last axis, when the file states it."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value > 0:
        return int(dims[-1].dim_value)
    return None
