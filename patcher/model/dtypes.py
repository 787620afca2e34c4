"""ONNX element types <-> torch dtypes, and tensor conversion that keeps bytes exact.

ONNX types without a torch dtype of their own (INT4, UINT4, INT2, UINT2,
FLOAT4E2M1) travel in the shadow graph in a *carrier* dtype (int8, uint8,
float32) holding only values of the narrow type's grid; ``Cast`` rounds onto
that grid. Strings have no torch form at all and are refused.

Integer tensors (int8, uint8, int32, ...) travel in their own torch dtypes. Under autograd,
the quantized ops (QuantizeLinear, QLinearConv, ...) return their integer outputs in a float
carrier instead (float32, or float64 for int32) holding the same integer values, so that a
gradient can pass (see :mod:`patcher.graph.ops.qmath`).
"""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, numpy_helper

from patcher.errors import UnsupportedOpError

_T = TensorProto
#: ONNX element type -> torch dtype in which the shadow graph carries it.
ONNX_TO_TORCH: dict[int, torch.dtype] = {
    _T.FLOAT: torch.float32,
    _T.DOUBLE: torch.float64,
    _T.FLOAT16: torch.float16,
    _T.BFLOAT16: torch.bfloat16,
    _T.INT8: torch.int8,
    _T.UINT8: torch.uint8,
    _T.INT16: torch.int16,
    _T.UINT16: torch.uint16,
    _T.INT32: torch.int32,
    _T.UINT32: torch.uint32,
    _T.INT64: torch.int64,
    _T.UINT64: torch.uint64,
    _T.BOOL: torch.bool,
    _T.FLOAT8E4M3FN: torch.float8_e4m3fn,
    _T.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    _T.FLOAT8E5M2: torch.float8_e5m2,
    _T.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
    _T.FLOAT8E8M0: torch.float8_e8m0fnu,
    _T.INT4: torch.int8,
    _T.UINT4: torch.uint8,
    _T.INT2: torch.int8,
    _T.UINT2: torch.uint8,
    _T.FLOAT4E2M1: torch.float32,
}

#: Types carried in a wider torch dtype; value is the ml_dtypes name of the narrow type.
CARRIED: dict[int, str] = {
    _T.INT4: "int4",
    _T.UINT4: "uint4",
    _T.INT2: "int2",
    _T.UINT2: "uint2",
    _T.FLOAT4E2M1: "float4_e2m1fn",
}

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def onnx_type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type)


def torch_dtype(elem_type: int) -> torch.dtype:
    """The torch dtype that carries ONNX element type ``elem_type``."""
    try:
        return ONNX_TO_TORCH[elem_type]
    except KeyError:
        raise UnsupportedOpError(
            f"ONNX element type {onnx_type_name(elem_type)} has no torch form"
        ) from None


def numpy_to_torch(array: np.ndarray, elem_type: int | None = None) -> torch.Tensor:
    """Convert a numpy array (including ml_dtypes arrays) to a torch tensor, values exact."""
    array = np.asarray(array)
    kind = array.dtype.name
    if kind in ("bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
                "float8_e5m2fnuz", "float8_e8m0fnu"):
        raw = np.ascontiguousarray(array).view(np.uint16 if kind == "bfloat16" else np.uint8)
        target = {"bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn,
                  "float8_e4m3fnuz": torch.float8_e4m3fnuz, "float8_e5m2": torch.float8_e5m2,
                  "float8_e5m2fnuz": torch.float8_e5m2fnuz,
                  "float8_e8m0fnu": torch.float8_e8m0fnu}[kind]
        return torch.from_numpy(raw.copy()).view(target)
    if kind in ("int4", "int2"):
        return torch.from_numpy(array.astype(np.int8))
    if kind in ("uint4", "uint2"):
        return torch.from_numpy(array.astype(np.uint8))
    if kind == "float4_e2m1fn":
        return torch.from_numpy(array.astype(np.float32))
    if array.dtype.kind in ("U", "S", "O"):
        raise UnsupportedOpError("string tensors have no torch form")
    return torch.from_numpy(np.array(array, copy=True))


def tensor_proto_to_torch(tensor: TensorProto) -> torch.Tensor:
    """Read a TensorProto whose data is in memory (raw_data or typed fields)."""
    if tensor.data_type == TensorProto.STRING:
        raise UnsupportedOpError(f"tensor '{tensor.name}' holds strings, which torch cannot carry")
    return numpy_to_torch(numpy_helper.to_array(tensor), tensor.data_type)


def torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    """Convert a torch tensor to numpy; bfloat16 and float8 come back as ml_dtypes arrays."""
    t = t.detach().cpu()
    names = {torch.bfloat16: ("bfloat16", np.uint16), torch.float8_e4m3fn: ("float8_e4m3fn", np.uint8),
             torch.float8_e4m3fnuz: ("float8_e4m3fnuz", np.uint8),
             torch.float8_e5m2: ("float8_e5m2", np.uint8),
             torch.float8_e5m2fnuz: ("float8_e5m2fnuz", np.uint8),
             torch.float8_e8m0fnu: ("float8_e8m0fnu", np.uint8)}
    if t.dtype in names:
        import ml_dtypes

        name, raw = names[t.dtype]
        bits = torch.uint16 if raw is np.uint16 else torch.uint8
        return t.contiguous().view(bits).numpy().view(getattr(ml_dtypes, name))
    return t.numpy()
