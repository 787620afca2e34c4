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
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import ModelProto

from patcher.errors import BadModelError
from patcher.model.external import ExternalRef, load_external
from patcher.model.validate import NodeCheck, validate_model

LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
LOG = logging.getLogger("onnx_rectify")


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
        refs = load_external(model, Path(base_dir) if base_dir is not None else None)
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
    refs = load_external(model, Path(base_dir) if base_dir else path.parent)
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
