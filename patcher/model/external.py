"""External data, read by this module and not by onnx's loader: a location must be a relative
path that stays inside the model's folder and names a regular file (no symlink, no hard
link, no device); its offset and length must be plain digits, fit the file and equal what
the tensor needs; only that range is read. Tensors read from external files are recorded
(:class:`ExternalRef`) so that writing back can put them in a data file again.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from onnx import ModelProto, TensorProto

from patcher.errors import BadModelError, UnsafeModelError
from patcher.model.tensors import PACKED_BITS, element_count, iter_all_tensors


@dataclass(frozen=True)
class ExternalRef:
    """Where an externally stored tensor's bytes came from."""

    location: str
    offset: int
    length: int


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

    count = element_count(tensor, label)
    if tensor.data_type in PACKED_BITS:
        return (count * PACKED_BITS[tensor.data_type] + 7) // 8
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


def available_memory() -> int | None:
    """Bytes of memory the system says can still be allocated without swapping
    (``MemAvailable`` of /proc/meminfo; free physical pages elsewhere), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gib(n: int) -> str:
    """A byte count in the largest binary unit that keeps it at 1 or more (B to GiB)."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def load_external(model: ModelProto, base_dir: Path | None) -> dict[str, ExternalRef]:
    """Read every externally stored tensor of ``model`` (wherever it sits: see
    :func:`iter_all_tensors`) through :func:`_resolve_location`, by offset and length only,
    into the tensor; return where the weights (initializers, Constant values) came from."""
    refs: dict[str, ExternalRef] = {}
    files: dict[Path, tuple[int, int]] = {}  # path -> (descriptor, size)
    budget, total = available_memory(), 0  # external bytes read so far, against what is free
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
            total += length
            if budget is not None and total > budget:
                raise BadModelError(
                    f"{label}: the model's external data needs at least {_gib(total)} of memory "
                    f"and {_gib(budget)} is available; run it on a machine with more memory")
            tensor.raw_data = _read_range(fd, offset, length, label)
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
            if site.weight:
                refs[tensor.name] = ExternalRef(fields["location"], offset, length)
    finally:
        for fd, _ in files.values():
            os.close(fd)
    return refs
