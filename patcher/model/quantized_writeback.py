"""Writing an edit into a weight stored as int8/uint8, in the stored precision.

The stored weight is ``W = (q - z) * s`` (per tensor, or per channel along ``axis``); an edit
asks for ``W + dW``. It is written as ``q' = clip(round((W + dW) / s) + z, lo, hi)`` with the
existing scales wherever that fits. A per-channel channel whose edited values would saturate
gets a new scale ``s_c' = max(s_c, max(v) / (hi - z_c), min(v) / (lo - z_c))`` (so that none
saturates), and only that channel; its int32 bias is requantized
``b_c' = round(b_c * s_c / s_c')`` (the same as ``round(b_float / (x_scale * s_c'))``) and, in
QDQ, the bias DequantizeLinear's scale becomes ``x_scale * s_c'`` (onnxruntime's fused
kernels assume it). A dynamically quantized layer (ConvInteger/MatMulInteger) has a float
bias of its own and a run-time input scale: only its weight and weight scale are written. A per-tensor weight has one scale for all: both options (keep it and
clamp, or raise it for the whole tensor) are measured and the one whose written weight is
closer to ``W + dW`` (Frobenius norm) is taken, and said so. Zero points are kept.

Every written tensor is recorded in the provenance (kind ``quantized-writeback``) with the
quantization error of the delta: ``relative_error = ||dW_written - dW|| / ||dW||`` and the
share of the written delta's energy in its first singular value (1.0 for an exact rank-one
edit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, numpy_helper

from patcher.errors import NumericalError
from patcher.model.modelio import LoadedModel
from patcher.model.tensors import named_tensors
from patcher.model.writeback import (WrittenTensor, apply_deltas, record_provenance,
                                     set_tensor_values)

#: Integer ranges of the weight types.
RANGES = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255)}
INT32 = (-(1 << 31), (1 << 31) - 1)


class QuantizedStorage(Protocol):
    """What the write-back needs of :class:`patcher.graph.quantized_layers.QuantizedWeight`."""

    layer: str
    form: str
    weight: str
    scale: str
    zero_point: str | None
    axis: int | None
    input_scale: str | None
    bias: str | None
    bias_scale: str | None


@dataclass
class QuantizedWrite:
    """The integers and scales chosen for one edited weight."""

    q: np.ndarray
    scale: np.ndarray
    rescaled: list[int]  # channels (or [0] for a per-tensor scale) whose scale changed
    written_delta: np.ndarray
    option: str  # "existing scales", "new scales for saturating channels", ...
    clamped: int  # values clamped to the integer range


def _broadcast(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _dequantize(q, scale, zero, axis) -> np.ndarray:
    s = _broadcast(scale.astype(np.float32), q.ndim, axis)
    z = _broadcast(zero.astype(np.int64), q.ndim, axis)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float64)


def _quantize(target, scale, zero, axis, lo, hi) -> tuple[np.ndarray, int]:
    s = _broadcast(scale.astype(np.float32), target.ndim, axis).astype(np.float64)
    z = _broadcast(zero.astype(np.int64), target.ndim, axis)
    exact = np.rint(target / s) + z
    clamped = int(np.count_nonzero((exact < lo) | (exact > hi)))
    return np.clip(exact, lo, hi).astype(np.int64), clamped


def _clamped_channels(target, scale, zero, axis, lo, hi) -> np.ndarray:
    """Per channel along ``axis``: whether any of its values falls outside the integer range
    at the given scale (before clamping)."""
    s = _broadcast(scale.astype(np.float32), target.ndim, axis).astype(np.float64)
    z = _broadcast(zero.astype(np.int64), target.ndim, axis)
    exact = np.rint(target / s) + z
    outside = (exact < lo) | (exact > hi)
    return outside.any(axis=tuple(k for k in range(target.ndim) if k != axis)).reshape(-1)


def _needed_scale(target, zero, axis, lo, hi) -> np.ndarray:
    """Per channel (or for the tensor): the least scale at which no value saturates."""
    reduce = tuple(k for k in range(target.ndim) if k != axis) if axis is not None else None
    top = np.maximum(target.max(axis=reduce), 0.0)
    bottom = np.minimum(target.min(axis=reduce), 0.0)
    z = zero.astype(np.float64).reshape(-1) if axis is not None else float(zero.reshape(-1)[0])
    # v / s + z <= hi - 0.5 and >= lo + 0.5 keep rounding inside the range
    return np.maximum(top / np.maximum(hi - z - 0.5, 1e-12),
                      bottom / np.minimum(lo - z + 0.5, -1e-12))


def requantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int | None,
               delta: np.ndarray, lo: int, hi: int) -> QuantizedWrite:
    """Integers (and scales) for ``dequantize(q) + delta``; see the module docstring."""
    old = _dequantize(q, scale, zero, axis)
    target = old + delta.astype(np.float64)
    kept_q, clamped = _quantize(target, scale, zero, axis, lo, hi)
    if not clamped:
        return QuantizedWrite(kept_q, scale, [], _dequantize(kept_q, scale, zero, axis) - old,
                              "existing scales", 0)
    needed = _needed_scale(target, zero, axis, lo, hi)
    if axis is not None:
        flat = scale.reshape(-1).astype(np.float64)
        # only channels that clamp: one whose values already reach the range's end (a
        # symmetric quantizer's +127) but do not pass it keeps its scale
        grow = np.flatnonzero(_clamped_channels(target, scale, zero, axis, lo, hi)
                              & (needed > flat))
        new_scale = flat.copy()
        new_scale[grow] = needed[grow]
        new_scale = new_scale.astype(scale.dtype).reshape(scale.shape)
        # float32 rounding of the new scale may fall just short: nudge up until nothing clamps
        for _ in range(4):
            new_q, left = _quantize(target, new_scale, zero, axis, lo, hi)
            if not left:
                break
            new_scale = np.where(np.isin(np.arange(flat.size), grow).reshape(scale.shape),
                                 np.nextafter(new_scale, np.inf, dtype=new_scale.dtype),
                                 new_scale).astype(scale.dtype)
        return QuantizedWrite(new_q, new_scale, [int(c) for c in grow],
                              _dequantize(new_q, new_scale, zero, axis) - old,
                              "new scales for saturating channels", left)
    # one scale for the tensor: keep it and clamp, or raise it for every value
    new_scale = np.asarray(max(float(needed), float(scale.reshape(-1)[0])),
                           dtype=scale.dtype).reshape(scale.shape)
    new_q, left = _quantize(target, new_scale, zero, axis, lo, hi)
    kept_err = np.linalg.norm(_dequantize(kept_q, scale, zero, axis) - target)
    new_err = np.linalg.norm(_dequantize(new_q, new_scale, zero, axis) - target)
    if new_err < kept_err:
        return QuantizedWrite(new_q, new_scale, [0], _dequantize(new_q, new_scale, zero, axis)
                              - old, f"per-tensor scale raised (error {new_err:.4g} vs "
                              f"{kept_err:.4g} clamped at the existing scale)", left)
    return QuantizedWrite(kept_q, scale, [], _dequantize(kept_q, scale, zero, axis) - old,
                          f"per-tensor scale kept, {clamped} value(s) clamped (error "
                          f"{kept_err:.4g} vs {new_err:.4g} with a raised scale)", clamped)


def delta_error(intended: np.ndarray, written: np.ndarray) -> dict:
    """Quantization error of a written delta: relative Frobenius error and the share of its
    energy in its first singular value (sigma_1^2 / sum sigma_i^2)."""
    intended = intended.astype(np.float64)
    norm = float(np.linalg.norm(intended))
    rel = float(np.linalg.norm(written - intended) / norm) if norm else 0.0
    mat = written.reshape(written.shape[0], -1) if written.ndim > 1 else written.reshape(1, -1)
    sv = np.linalg.svd(mat, compute_uv=False) if mat.size else np.zeros(1)
    energy = float((sv ** 2).sum())
    share = float(sv[0] ** 2 / energy) if energy else 0.0
    return {"relative_error": rel, "first_singular_value_share": share}


def _set_values(tensor: TensorProto, values: np.ndarray) -> None:
    """Store ``values`` in the tensor's own dtype and field (see :func:`set_tensor_values`)."""
    set_tensor_values(tensor, values.astype(onnx.helper.tensor_dtype_to_np_dtype(
        tensor.data_type)))


def _write_one(by_name: dict, info: QuantizedStorage, delta: np.ndarray) -> list[dict]:
    """Write ``delta`` into ``info``'s tensors; the provenance records of what changed."""
    for name in (info.weight, info.scale, info.zero_point, info.input_scale, info.bias,
                 info.bias_scale):
        if name and name not in by_name:
            raise NumericalError(f"no tensor named '{name}' to write the quantized edit into")
    wt = by_name[info.weight]
    if wt.data_type not in RANGES:
        raise NumericalError(f"tensor '{info.weight}': quantized weights of type "
                             f"{TensorProto.DataType.Name(wt.data_type)} cannot be written")
    lo, hi = RANGES[wt.data_type]
    q = numpy_helper.to_array(wt)
    if q.shape != delta.shape:
        raise NumericalError(f"tensor '{info.weight}': edit of shape {delta.shape} does not "
                             f"fit the stored shape {q.shape}")
    if not np.isfinite(delta).all():
        raise NumericalError(f"tensor '{info.weight}': the edit is not finite; refusing to write")
    scale = numpy_helper.to_array(by_name[info.scale])
    zero = (numpy_helper.to_array(by_name[info.zero_point]) if info.zero_point
            else np.zeros(scale.shape, np.int64))
    axis = info.axis if scale.size > 1 else None
    result = requantize(q, scale, zero, axis, delta, lo, hi)
    steps = result.q - q.astype(np.int64)
    _set_values(wt, result.q)
    error = delta_error(delta, result.written_delta)
    records = [{"kind": "quantized-writeback", "layer": info.layer, "weight": info.weight,
                "role": "weight", "form": info.form, "units": "steps",
                "delta_norm": float(np.linalg.norm(steps)), "max_steps": int(np.abs(steps).max()),
                "steps_changed": int(np.count_nonzero(steps)), "option": result.option,
                "clamped": result.clamped, "rescaled_channels": result.rescaled,
                "intended_delta_norm": float(np.linalg.norm(delta)),
                "max_abs_error": float(np.abs(result.written_delta - delta).max()), **error}]
    if not result.rescaled:
        return records
    _set_values(by_name[info.scale], result.scale)
    ratio = (scale.astype(np.float64).reshape(-1) / result.scale.astype(np.float64).reshape(-1))
    records.append({"kind": "quantized-writeback", "layer": info.layer, "weight": info.scale,
                    "role": "weight scale", "form": info.form, "units": "value",
                    "channels": result.rescaled,
                    "delta_norm": float(np.linalg.norm(result.scale.astype(np.float64)
                                                       - scale.astype(np.float64)))})
    if info.bias:
        bt = by_name[info.bias]
        b = numpy_helper.to_array(bt).astype(np.int64)
        factor = ratio if ratio.size == b.size else np.full(b.shape, float(ratio[0]))
        new_b = np.clip(np.rint(b * factor), *INT32).astype(np.int64)
        _set_values(bt, new_b)
        records.append({"kind": "quantized-writeback", "layer": info.layer, "weight": info.bias,
                        "role": "bias (int32, requantized for the rescaled channels)",
                        "form": info.form, "units": "steps",
                        "delta_norm": float(np.linalg.norm(new_b - b)),
                        "steps_changed": int(np.count_nonzero(new_b - b))})
        if info.bias_scale:
            st = by_name[info.bias_scale]
            old_bs = numpy_helper.to_array(st)
            x_scale = float(numpy_helper.to_array(by_name[info.input_scale]).reshape(-1)[0])
            new_w = result.scale.astype(np.float32).reshape(-1)
            if old_bs.size == b.size:
                new_bs = old_bs.astype(np.float32).reshape(-1).copy()
                chans = result.rescaled if new_w.size > 1 else range(b.size)
                for c in chans:
                    new_bs[c] = np.float32(x_scale) * new_w[c if new_w.size > 1 else 0]
            else:
                new_bs = np.float32(x_scale) * new_w[:1]
            new_bs = new_bs.reshape(old_bs.shape)
            _set_values(st, new_bs)
            records.append({"kind": "quantized-writeback", "layer": info.layer,
                            "weight": info.bias_scale, "role": "bias scale", "form": info.form,
                            "units": "value",
                            "delta_norm": float(np.linalg.norm(new_bs.astype(np.float64)
                                                               - old_bs.astype(np.float64)))})
    return records


def apply_quantized_deltas(loaded: LoadedModel, deltas: dict[str, np.ndarray],
                           weights: dict[str, QuantizedStorage], provenance: dict | None = None
                           ) -> tuple[ModelProto, list[WrittenTensor], list[dict]]:
    """A copy of the model with ``deltas`` added: those on quantized weights (``weights``, by
    the int8 tensor's name) written in the stored precision, the others as
    :func:`patcher.model.writeback.apply_deltas` writes them. Returns the model, the written
    tensors (rounding error: the largest |written - intended| of the float weight) and the
    quantized write-back records, which are also appended to the provenance."""
    plain = {k: v for k, v in deltas.items() if k not in weights}
    model, written = apply_deltas(loaded, plain, None)
    by_name = named_tensors(model.graph)
    records: list[dict] = []
    for name, delta in deltas.items():
        if name not in weights:
            continue
        new = _write_one(by_name, weights[name], np.asarray(delta, dtype=np.float64))
        records.extend(new)
        first = new[0]
        written.append(WrittenTensor(name, first["intended_delta_norm"], first["max_abs_error"]))
    if provenance is not None:
        entry = dict(provenance)
        entry["edits"] = list(provenance.get("edits", [])) + records
        record_provenance(model, entry)
    return model, written, records
