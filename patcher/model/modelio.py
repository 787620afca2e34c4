"""Reading ONNX files safely and keeping track of where every weight is stored.

External data is resolved by this module, not by onnx's loader: a location must
be a relative path that stays inside the model's folder, names a regular file
(no symlink, no device), and its offset/length must fit the file and the
tensor. Tensors read from external files are recorded in
:attr:`LoadedModel.external` so that writing back can put them in a data file
again.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Iterator
from pathlib import Path

import onnx
from onnx import ModelProto, TensorProto

from patcher.errors import BadModelError, UnsafeModelError

LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
LOG = logging.getLogger("onnx_rectify")


@dataclass(frozen=True)
class ExternalRef:
    """Where an externally stored tensor's bytes came from."""

    location: str
    offset: int
    length: int


@dataclass
class LoadedModel:
    """A parsed model with all tensor data in memory, and its provenance."""

    proto: ModelProto
    path: Path | None = None
    sha256: str | None = None
    external: dict[str, ExternalRef] = field(default_factory=dict)

    @property
    def base_dir(self) -> Path | None:
        return self.path.parent if self.path is not None else None


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def iter_tensors(graph: onnx.GraphProto):
    """Every TensorProto that holds weights: initializers and Constant node values."""
    yield from graph.initializer
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    yield attr.t


def named_tensors(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    """Weight tensors by the name the graph uses for them: initializers by their name,
    Constant values by the node's output name (the inner tensor may be unnamed)."""
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    out[node.output[0]] = attr.t
    return out


@dataclass(frozen=True)
class TensorSite:
    """Where a TensorProto sits in a model: ``label`` names it in messages; ``weight`` is
    True for initializers and Constant values (the tensors :func:`iter_tensors` yields,
    whose external storage write-back keeps)."""

    tensor: TensorProto
    label: str
    weight: bool


def iter_all_tensors(graph: onnx.GraphProto, _prefix: str = "") -> Iterator[TensorSite]:
    """Every TensorProto of a graph, wherever it sits: initializers, sparse initializers
    (values and indices), TENSOR, TENSORS and SPARSE_TENSOR(S) attributes of any node, and
    the same inside subgraphs (If, Loop, Scan bodies), recursively."""
    for t in graph.initializer:
        yield TensorSite(t, f"{_prefix}tensor '{t.name}'", not _prefix)
    for i, sparse in enumerate(graph.sparse_initializer):
        name = sparse.values.name or f"#{i}"
        yield TensorSite(sparse.values, f"{_prefix}sparse initializer '{name}' (values)", False)
        yield TensorSite(sparse.indices, f"{_prefix}sparse initializer '{name}' (indices)",
                         False)
    for i, node in enumerate(graph.node):
        node_name = node.name or f"{node.op_type}_{i}"
        for attr in node.attribute:
            where = f"{_prefix}attribute '{attr.name}' of node '{node_name}'"
            constant = not _prefix and node.op_type == "Constant" and attr.name == "value"
            if attr.HasField("t"):
                label = f"tensor '{attr.t.name}'" if constant and attr.t.name else where
                yield TensorSite(attr.t, label, constant)
            for k, t in enumerate(attr.tensors):
                yield TensorSite(t, f"{where} (#{k})", False)
            sparse_list = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + \
                list(attr.sparse_tensors)
            for sp in sparse_list:
                yield TensorSite(sp.values, f"{where} (sparse values)", False)
                yield TensorSite(sp.indices, f"{where} (sparse indices)", False)
            subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for sub in subgraphs:
                yield from iter_all_tensors(sub, f"{where}, subgraph '{sub.name}': ")


def _external_fields(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


#: Longest external-data location accepted, and longest path component (POSIX NAME_MAX).
MAX_LOCATION_CHARS, MAX_NAME_BYTES = 1024, 255


def _resolve_location(base_dir: Path, location: str, label: str) -> Path:
    """The file an external-data ``location`` names, confined to ``base_dir``: relative, no
    '..', no symlink on the way, a regular file with one link. ``label`` names the tensor
    in messages (e.g. "tensor 'w1'")."""
    if not isinstance(location, str):
        raise BadModelError(f"{label}: external data location is not valid UTF-8 text")
    if not location:
        raise UnsafeModelError(f"{label}: external data location is empty")
    shown = location if len(location) <= 80 else location[:60] + "..."
    if "\0" in location:
        raise UnsafeModelError(f"{label}: external data location {ascii(shown)} contains a NUL "
                               "character")
    if len(location) > MAX_LOCATION_CHARS or any(
            len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
            for part in location.split("/")):
        raise BadModelError(f"{label}: external data location '{shown}' is too long (at most "
                            f"{MAX_LOCATION_CHARS} characters, {MAX_NAME_BYTES} bytes a name)")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
        raise UnsafeModelError(
            f"{label}: external data location '{location}' is absolute")
    parts = Path(location).parts
    if ".." in parts or "\\.." in location or "..\\" in location:
        raise UnsafeModelError(
            f"{label}: external data location '{location}' leaves the model folder")
    if not parts:
        raise BadModelError(f"{label}: external data location '{location}' names no file")
    path = base_dir / location
    probe = base_dir
    for i, part in enumerate(parts):
        probe = probe / part
        try:
            info = os.lstat(probe)
        except FileNotFoundError:
            raise BadModelError(
                f"{label}: external data file '{location}' not found next to the model"
            ) from None
        except OSError as exc:
            raise BadModelError(f"{label}: external data file '{location}' cannot be "
                                f"opened ({exc.strerror})") from None
        if stat.S_ISLNK(info.st_mode):
            raise UnsafeModelError(
                f"{label}: external data path '{location}' goes through a symlink")
        if i < len(parts) - 1 and not stat.S_ISDIR(info.st_mode):
            raise BadModelError(f"{label}: external data location '{location}' goes through "
                                f"'{'/'.join(parts[:i + 1])}', which is not a folder")
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeModelError(
            f"{label}: external data '{location}' is not a regular file")
    if info.st_nlink > 1:
        raise UnsafeModelError(
            f"{label}: external data '{location}' is a hard link")
    real_base = os.path.realpath(base_dir)
    if os.path.commonpath([real_base, os.path.realpath(path)]) != real_base:
        raise UnsafeModelError(
            f"{label}: external data '{location}' resolves outside the model folder")
    return path


def _external_int(text: str) -> int:
    """An external-data offset or length: ASCII digits only, as onnxruntime reads them (no
    ``+``, spaces, ``_`` separators or non-ASCII digits, which Python's int() would take);
    a ``-`` is parsed so that the range check can name the negative value."""
    digits = text[1:] if text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(text)
    return int(text)


def _stored_bytes(tensor: TensorProto, label: str) -> int:
    """Bytes a tensor's dims and type need (sub-byte types packed), checked before any data
    is read: a valid element type, no negative dims, at most :data:`MAX_ELEMENTS`."""
    import numpy as np
    from onnx import helper

    count = 1
    for d in tensor.dims:
        if d < 0:
            raise BadModelError(f"{label} has a negative dimension {d}")
        count *= d
        if count > MAX_ELEMENTS:
            raise BadModelError(f"{label} declares more than 2^40 elements")
    if tensor.data_type in _PACKED_BITS:
        return (count * _PACKED_BITS[tensor.data_type] + 7) // 8
    if tensor.data_type == TensorProto.STRING:
        raise BadModelError(f"{label}: string tensors cannot be stored in external data")
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        raise BadModelError(f"{label} has no valid element type ({tensor.data_type})") from None
    return count * itemsize


def _read_range(fd: int, offset: int, length: int, label: str) -> bytes:
    """``length`` bytes at ``offset`` of an open file: only that range is read."""
    try:
        data = os.pread(fd, length, offset) if length else b""
        while len(data) < length:  # pread may return less than asked for on large reads
            more = os.pread(fd, length - len(data), offset + len(data))
            if not more:
                raise BadModelError(f"{label}: external data ended early (the file shrank "
                                    "while it was read)")
            data += more
    except MemoryError:
        raise BadModelError(f"{label}: its {length} bytes of external data do not fit in "
                            "memory") from None
    except OSError as exc:
        raise BadModelError(f"{label}: external data cannot be read ({exc.strerror})") from None
    return data


def _load_external(model: ModelProto, base_dir: Path | None) -> dict[str, ExternalRef]:
    """Read every externally stored tensor of ``model`` (wherever it sits: see
    :func:`iter_all_tensors`) through :func:`_resolve_location`, by offset and length only,
    into the tensor; return where the weights (initializers, Constant values) came from."""
    refs: dict[str, ExternalRef] = {}
    files: dict[Path, tuple[int, int]] = {}  # path -> (descriptor, size)
    try:
        for site in iter_all_tensors(model.graph):
            tensor, label = site.tensor, site.label
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            fields = _external_fields(tensor)
            if any(isinstance(k, bytes) or isinstance(v, bytes) for k, v in fields.items()):
                raise BadModelError(f"{label}: external data keys or values are not valid "
                                    "UTF-8 text")
            unknown = set(fields) - {"location", "offset", "length", "checksum"}
            if unknown:
                raise BadModelError(f"{label}: unknown external data keys {sorted(unknown)}")
            if base_dir is None:
                raise BadModelError(
                    f"{label} is stored in external data; load the model from its file")
            path = _resolve_location(base_dir, fields.get("location", ""), label)
            try:
                offset = _external_int(fields.get("offset", "0"))
                length = _external_int(fields["length"]) if "length" in fields else None
            except ValueError:
                raise BadModelError(f"{label}: external offset/length not integers") from None
            if path not in files:
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                except OSError as exc:
                    raise BadModelError(f"{label}: external data file '{fields['location']}' "
                                        f"cannot be opened ({exc.strerror})") from None
                files[path] = (fd, os.fstat(fd).st_size)
            fd, size = files[path]
            if length is None:
                length = size - offset
            if offset < 0 or length < 0 or offset + length > size:
                raise BadModelError(
                    f"{label}: external data range offset={offset} length={length} "
                    f"does not fit '{fields['location']}' ({size} bytes)")
            need = _stored_bytes(tensor, label)
            if length != need:
                raise BadModelError(
                    f"{label}: external data length {length} does not match its dims "
                    f"{list(tensor.dims)} and type "
                    f"{TensorProto.DataType.Name(tensor.data_type)} ({need} bytes)")
            tensor.raw_data = _read_range(fd, offset, length, label)
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
            if site.weight:
                refs[tensor.name] = ExternalRef(fields["location"], offset, length)
    finally:
        for fd, _ in files.values():
            os.close(fd)
    return refs


def overridable_initializers(model: ModelProto) -> list[str]:
    """Initializers also listed as graph inputs: a runtime feed of that name replaces them."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name in inits]


def _warn_overridable(model: ModelProto, where: str) -> None:
    names = overridable_initializers(model)
    if names:
        LOG.warning(f"{where}: {len(names)} initializer(s) are also graph inputs "
                    f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); a runtime "
                    "feed of the same name would override them, and any edit with them; to rule "
                    "that out, remove them from the model's graph inputs (IR 4 and later allow it)")


NodeCheck = Callable[[ModelProto, str], None]


def load_model(source: str | os.PathLike | ModelProto, base_dir: str | os.PathLike | None = None,
               warn: bool = True, node_check: NodeCheck | None = None) -> LoadedModel:
    """Parse a model file (or take a ModelProto) and bring all external data into memory.
    Everything refused raises a :class:`RectifyError`; with ``warn``, what is allowed but
    risky (initializers that are also graph inputs) is logged to the ``onnx_rectify`` logger.
    ``node_check(model, where)`` runs among the graph checks, before the structural ones (the
    op-support check of :func:`patcher.graph.support.load_supported_model`)."""
    if isinstance(source, ModelProto):
        model = ModelProto()
        model.CopyFrom(source)
        refs = _load_external(model, Path(base_dir) if base_dir is not None else None)
        # A graph built in code may list its nodes in any order (the shadow graph sorts
        # them); a file must be in the topological order ONNX requires.
        validate_model(model, "model", require_order=False, node_check=node_check)
        if warn:
            _warn_overridable(model, "model")
        return LoadedModel(model, None, None, refs)
    path = Path(source)
    if not path.exists():
        raise BadModelError(f"{path}: no such file")
    if not path.is_file():
        raise BadModelError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise BadModelError(f"{path}: the file is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(len(LFS_MAGIC))
    if head == LFS_MAGIC:
        raise BadModelError(
            f"{path}: this is a Git LFS pointer, not a model; run 'git lfs pull' to fetch it")
    digest = sha256_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise BadModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") \
            from None
    if not model.graph.node and not model.graph.output:
        raise BadModelError(f"{path}: not an ONNX model (no graph found)")
    refs = _load_external(model, Path(base_dir) if base_dir else path.parent)
    validate_model(model, str(path), node_check=node_check)
    if warn:
        _warn_overridable(model, str(path))
    return LoadedModel(model, path, digest, refs)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the destination folder, fsync, then rename into place.
    On any failure (a full disk, Ctrl-C) the temporary file is removed and ``path`` is as
    it was."""
    import tempfile

    from patcher.errors import OutputError

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: folder '{folder}' does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write in '{folder}' ({exc.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes owner-only files; outputs are ordinary
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: write failed ({exc.strerror or exc})") from None
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


#: Largest element count a tensor may declare (guards against overflowing dims).
MAX_ELEMENTS = 1 << 40

#: Bits per element of the packed sub-byte types (two or four elements a byte).
_PACKED_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4,
                TensorProto.INT2: 2, TensorProto.UINT2: 2}


def validate_model(model: ModelProto, where: str, require_order: bool = True,
                   node_check: NodeCheck | None = None) -> None:
    """Refuse versions newer than this onnx knows, graphs that cannot run as written (see
    :func:`check_graph`), and tensors whose dims or data are inconsistent (negative or
    overflowing dims, raw_data of the wrong size, NaN anywhere, Inf in weights)."""
    import numpy as np
    from onnx import helper

    _check_text_fields(model.graph, where)
    texts = [model.producer_name, model.producer_version,
             *(f for p in model.metadata_props for f in (p.key, p.value)),
             *(o.domain for o in model.opset_import)]
    if any(isinstance(t, bytes) for t in texts):
        raise BadModelError(f"{where}: producer, metadata or opset domain text is not valid "
                            "UTF-8 (corrupted file?)")
    if model.ir_version > onnx.IR_VERSION:
        raise BadModelError(f"{where}: IR version {model.ir_version} is newer than this onnx "
                            f"({onnx.__version__}) supports (IR {onnx.IR_VERSION}); upgrade onnx")
    newest = onnx.defs.onnx_opset_version()
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version > newest:
            raise BadModelError(f"{where}: opset {o.version} is newer than this onnx supports "
                                f"({newest}); upgrade onnx")
    _check_attribute_types(model, where)
    check_graph(model, where, require_order, node_check)
    initializer_names = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in initializer_names:
            continue
        if vi.type.WhichOneof("value") is None:
            raise BadModelError(f"{where}: graph input '{vi.name}' has no type")
        if not vi.type.HasField("tensor_type"):
            continue
        elem = vi.type.tensor_type.elem_type
        if elem == TensorProto.UNDEFINED or elem not in TensorProto.DataType.values():
            raise BadModelError(f"{where}: graph input '{vi.name}' has no valid element type")
    weights = _weight_consumers(model.graph)
    for site in iter_all_tensors(model.graph):
        t, label = site.tensor, site.label
        if site.weight and not t.name:
            label = "tensor '<unnamed Constant>'"
        if t.data_type == TensorProto.UNDEFINED or t.data_type not in TensorProto.DataType.values():
            raise BadModelError(f"{where}: {label} has no valid element type "
                                f"({t.data_type})")
        count = 1
        for d in t.dims:
            if d < 0:
                raise BadModelError(f"{where}: {label} has a negative dimension {d}")
            count *= d
            if count > MAX_ELEMENTS:
                raise BadModelError(f"{where}: {label} declares more than 2^40 elements")
        weight_of = weights.get(t.name) if site.weight else None
        if weight_of is not None and count == 0:
            raise BadModelError(f"{where}: {label} (a weight of node '{weight_of}') has no "
                                f"elements (dims {list(t.dims)})")
        if t.data_type == TensorProto.STRING or t.data_location == TensorProto.EXTERNAL:
            continue
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        if t.raw_data and t.data_type not in _PACKED_BITS:
            if len(t.raw_data) != count * itemsize:
                raise BadModelError(f"{where}: {label} holds {len(t.raw_data)} bytes of "
                                    f"data, its dims {list(t.dims)} need {count * itemsize}")
        try:
            with np.errstate(all="ignore"):
                values = onnx.numpy_helper.to_array(t)
        except Exception as exc:  # numpy/onnx raise several kinds for inconsistent data
            raise BadModelError(f"{where}: {label}: its data does not match its dims "
                                f"{list(t.dims)} and type ({' '.join(str(exc).split())[:120]})") \
                from None
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE,
                           TensorProto.BFLOAT16) and count:
            if t.data_type == TensorProto.BFLOAT16:
                values = values.astype(np.float32)
            if np.isnan(values).any():
                raise BadModelError(f"{where}: {label} contains NaN values")
            if weight_of is not None and np.isinf(values).any():
                raise BadModelError(f"{where}: {label} (a weight of node "
                                    f"'{weight_of}') contains Inf values")


def _check_text_fields(graph: onnx.GraphProto, where: str) -> None:
    """Names must be text: protobuf hands back bytes for strings that are not UTF-8."""
    def bad(value) -> bool:
        return isinstance(value, bytes)

    for i, node in enumerate(graph.node):
        fields = [node.name, node.op_type, node.domain, *node.input, *node.output]
        if any(bad(f) for f in fields) or any(bad(a.name) for a in node.attribute):
            raise BadModelError(f"{where}: node {i} has a name, op type or tensor name that is "
                                "not valid UTF-8 (corrupted file?)")
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.UNDEFINED:
                raise BadModelError(f"{where}: node '{node.name or i}' attribute '{attr.name}' "
                                    "has no type (corrupted file?)")
            try:
                attr.s.decode("utf-8")
                for text in attr.strings:
                    text.decode("utf-8")
            except UnicodeDecodeError:
                raise BadModelError(f"{where}: node '{node.name or i}' attribute "
                                    f"'{attr.name}' holds text that is not valid UTF-8 "
                                    "(corrupted file?)") from None
    for kind, items in (("initializer", graph.initializer), ("graph input", graph.input),
                        ("graph output", graph.output), ("value info", graph.value_info)):
        for item in items:
            if bad(item.name):
                raise BadModelError(f"{where}: a {kind} name is not valid UTF-8 (corrupted file?)")


def _check_attribute_types(model: ModelProto, where: str) -> None:
    """Each attribute of a default-domain node has the type its op's schema declares."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        return
    for i, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except Exception:  # unknown op: reported as unsupported later
            continue
        for attr in node.attribute:
            declared = schema.attributes.get(attr.name)
            if declared is not None and int(declared.type) != int(attr.type):
                raise BadModelError(
                    f"{where}: node '{node.name or i}' attribute '{attr.name}' has type "
                    f"{onnx.AttributeProto.AttributeType.Name(attr.type)}, its op expects "
                    f"{onnx.AttributeProto.AttributeType.Name(int(declared.type))}")


#: Ops whose constant inputs are weights: Inf there is corruption (elsewhere, +-Inf is a
#: legitimate constant, e.g. an attention mask or a Clip bound).
WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization",
              "LayerNormalization", "InstanceNormalization"}


def _weight_consumers(graph: onnx.GraphProto) -> dict[str, str]:
    """Tensor name -> the first weight-op node that reads it."""
    out: dict[str, str] = {}
    for i, node in enumerate(graph.node):
        if node.op_type in WEIGHT_OPS:
            for name in node.input:
                out.setdefault(name, node.name or f"{node.op_type}_{i}")
    # Constant nodes: their tensor may be unnamed; key it by the node's output name too
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in out:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t") and attr.t.name:
                    out.setdefault(attr.t.name, out[node.output[0]])
    return out


def check_graph(model: ModelProto, where: str, require_order: bool = True,
                node_check: NodeCheck | None = None) -> None:
    """The graph must be runnable as written: unique names, every tensor defined once and
    before it is used (topological order, no cycle, no dangling input), every graph output
    produced. ``node_check`` (which ops the shadow graph runs:
    :func:`patcher.graph.support.require_supported`) runs first. ``require_order=False`` accepts nodes out
    of order (the shadow graph sorts them) but still refuses cycles."""
    from collections import Counter

    graph = model.graph
    nodes = list(graph.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise BadModelError(f"{where}: the model imports no default-domain opset")
    names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(nodes)]
    if node_check is not None:
        node_check(model, where)

    def dupes(items) -> list[str]:
        return sorted(k for k, c in Counter(items).items() if c > 1)

    if d := dupes(n.name for n in nodes if n.name):
        raise BadModelError(f"{where}: duplicate node names: {', '.join(d[:10])}")
    if d := dupes(t.name for t in graph.initializer):
        raise BadModelError(f"{where}: duplicate initializer names: {', '.join(d[:10])}")
    if d := dupes(o.name for o in graph.output):
        raise BadModelError(f"{where}: graph output '{d[0]}' is listed more than once")
    if d := dupes(i.name for i in graph.input):
        raise BadModelError(f"{where}: graph input '{d[0]}' is listed more than once")
    defined: dict[str, str] = {}
    for vi in graph.input:
        defined[vi.name] = "graph input"
    for t in graph.initializer:
        defined.setdefault(t.name, "initializer")  # an initializer may also be a graph input
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if not out:
                continue
            if out in defined:
                raise BadModelError(f"{where}: tensor '{out}' is defined twice: by node "
                                    f"'{names[i]}' and by {defined[out]}")
            defined[out] = f"node '{names[i]}'"
            producer[out] = i
    done: set[str] = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    for i, node in enumerate(nodes):
        for inp in node.input:
            if not inp or inp in done:
                continue
            if inp not in producer:
                raise BadModelError(f"{where}: node '{names[i]}' reads '{inp}', which no node, "
                                    "initializer or graph input defines")
            j = producer[inp]
            if _reaches(nodes, producer, start=j, target=i):
                raise BadModelError(f"{where}: the graph has a cycle through nodes "
                                    f"'{names[i]}' and '{names[j]}' (tensor '{inp}')")
            if require_order:
                raise BadModelError(f"{where}: node '{names[i]}' reads '{inp}' before node "
                                    f"'{names[j]}' makes it (the graph is not in topological "
                                    "order, as ONNX requires)")
        done.update(o for o in node.output if o)
    for o in graph.output:
        if o.name not in defined:
            raise BadModelError(f"{where}: graph output '{o.name}' is not made by any node")


def _reaches(nodes, producer: dict[str, int], start: int, target: int) -> bool:
    """Whether node ``start`` depends (through its inputs) on node ``target``."""
    seen, stack = set(), [start]
    while stack:
        k = stack.pop()
        if k == target:
            return True
        if k in seen:
            continue
        seen.add(k)
        stack.extend(producer[n] for n in nodes[k].input if n in producer)
    return False
