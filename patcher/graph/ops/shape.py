"""Shape manipulation, indexing, type casts and constants.

Shape-valued inputs arrive as int64 tensors (as in ONNX) and are read with
``.tolist()``; the data path stays differentiable.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from patcher.model import dtypes
from patcher.errors import UnsupportedOpError
from patcher.graph.ops.registry import register


def _ints(t) -> list[int]:
    """An int64 tensor (or list) of sizes/axes/indices as a Python list."""
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


@register("Identity", since=1)
def identity(x):
    return x


@register("Flatten", since=1)
def flatten(x, *, axis=1):
    """[d0..d(axis-1)] x [d(axis)..] -> 2-D."""
    axis = axis % x.dim() if axis < 0 else axis
    return x.reshape(int(math.prod(x.shape[:axis])), int(math.prod(x.shape[axis:])))


@register("Reshape", since=5)
def reshape(x, shape, *, allowzero=0):
    """0 copies the input's dimension (unless allowzero), -1 is inferred."""
    target = _ints(shape)
    if not allowzero:
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


@register("Transpose", since=1)
def transpose(x, *, perm=None):
    perm = list(perm) if perm is not None else list(reversed(range(x.dim())))
    return x.permute(perm)


@register("Concat", since=4)
def concat(*xs, axis):
    return torch.cat(xs, dim=axis)


def _split(x, axis, sizes, count):
    if not sizes:
        dim = x.shape[axis]
        chunk = -(-dim // count)
        sizes = [min(chunk, dim - i * chunk) for i in range(count)]
    return tuple(torch.split(x, list(sizes), dim=axis))


@register("Split", since=2, until=12)
def split_2(x, *, axis=0, split=None, num_outputs_=1):
    return _split(x, axis, list(split or []), num_outputs_)


@register("Split", since=13, until=17)
def split_13(x, split=None, *, axis=0, num_outputs_=1):
    return _split(x, axis, _ints(split), num_outputs_)


@register("Split", since=18)
def split_18(x, split=None, *, axis=0, num_outputs=None, num_outputs_=1):
    """Equal parts (the last smaller) when no split sizes are given."""
    return _split(x, axis, _ints(split), num_outputs or num_outputs_)


def _pad(x, pads: list[int], mode: str, value, axes: list[int] | None = None):
    r = x.dim()
    if axes:
        full = [0] * (2 * r)
        for j, a in enumerate(axes):
            a %= r
            full[a], full[a + r] = pads[j], pads[j + len(axes)]
        pads = full
    if mode == "constant":
        fill = 0 if value is None else (value.item() if isinstance(value, torch.Tensor) else value)
        torch_pads: list[int] = []
        for i in reversed(range(r)):
            torch_pads += [pads[i], pads[i + r]]
        return F.pad(x, torch_pads, value=fill)
    for i in range(r):
        b, e = pads[i], pads[i + r]
        if b == 0 and e == 0:
            continue
        n = x.shape[i]
        pos = torch.arange(-b, n + e, device=x.device)
        if mode == "edge":
            idx = pos.clamp(0, n - 1)
        elif mode == "reflect":
            period = 2 * (n - 1) if n > 1 else 1
            m = pos.remainder(period)
            idx = torch.where(m >= n, period - m, m)
        elif mode == "wrap":
            idx = pos.remainder(n)
        else:
            raise UnsupportedOpError(f"Pad mode '{mode}'")
        x = x.index_select(i, idx)
    return x


@register("Pad", since=2, until=10)
def pad_2(x, *, mode="constant", pads=(), value=0.0):
    return _pad(x, list(pads), mode, value)


@register("Pad", since=11)
def pad_11(x, pads, constant_value=None, axes=None, *, mode="constant"):
    """Negative pads crop. Modes: constant, reflect, edge, wrap."""
    return _pad(x, _ints(pads), mode, constant_value, _ints(axes) if axes is not None else None)


def _squeeze(x, axes: list[int]):
    if not axes:
        return x.reshape([d for d in x.shape if d != 1])
    axes = sorted(a % x.dim() for a in axes)
    return x.reshape([d for i, d in enumerate(x.shape) if i not in axes])


@register("Squeeze", since=1, until=12)
def squeeze_1(x, *, axes=None):
    return _squeeze(x, list(axes or []))


@register("Squeeze", since=13)
def squeeze_13(x, axes=None):
    return _squeeze(x, _ints(axes))


def _unsqueeze(x, axes: list[int]):
    rank = x.dim() + len(axes)
    axes = sorted(a % rank for a in axes)
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return x.reshape(shape)


@register("Unsqueeze", since=1, until=12)
def unsqueeze_1(x, *, axes):
    return _unsqueeze(x, list(axes))


@register("Unsqueeze", since=13)
def unsqueeze_13(x, axes):
    return _unsqueeze(x, _ints(axes))


@register("Gather", since=1)
def gather(x, indices, *, axis=0):
    """out = x taken at ``indices`` along ``axis``; negative indices count from the end.
    Output shape: x.shape[:axis] + indices.shape + x.shape[axis+1:]."""
    axis %= x.dim()
    idx = indices.to(torch.int64)
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    picked = x.index_select(axis, idx.reshape(-1))
    return picked.reshape(list(x.shape[:axis]) + list(indices.shape) + list(x.shape[axis + 1:]))


def _slice(x, starts, ends, axes, steps):
    axes = [a % x.dim() for a in (axes or range(len(starts)))]
    steps = steps or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        dim = x.shape[axis]
        if step == 0:
            raise UnsupportedOpError("Slice with step 0")
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            index = [slice(None)] * x.dim()
            index[axis] = slice(start, end, step)
            x = x[tuple(index)]
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            idx = torch.arange(start, end, step, device=x.device)
            x = x.index_select(axis, idx)
    return x


@register("Slice", since=1, until=9)
def slice_1(x, *, starts, ends, axes=None):
    return _slice(x, list(starts), list(ends), list(axes) if axes else None, None)


@register("Slice", since=10)
def slice_10(x, starts, ends, axes=None, steps=None):
    """Clamped ranges as in numpy; negative steps walk backwards."""
    return _slice(x, _ints(starts), _ints(ends), _ints(axes) if axes is not None else None,
                  _ints(steps) if steps is not None else None)


@register("Shape", since=1)
def shape(x, *, start=0, end=None):
    dims = list(x.shape)[start:end]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@register("Expand", since=8)
def expand(x, shape):
    """Bidirectional broadcast of x against ``shape``."""
    target = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))
    return x.expand(target)


_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 240.0,
            torch.float8_e5m2: 57344.0, torch.float8_e5m2fnuz: 57344.0}
#: Smallest magnitude that rounds past the largest finite value (max + half an ulp).
_FP8_OVERFLOW = {torch.float8_e4m3fn: 464.0, torch.float8_e4m3fnuz: 248.0,
                 torch.float8_e5m2: 61440.0, torch.float8_e5m2fnuz: 61440.0}
_INT_RANGES = {"int4": (-8, 7), "uint4": (0, 15), "int2": (-2, 1), "uint2": (0, 3)}


def cast_tensor(x, to: int, saturate: int = 1, round_mode: str = "up"):
    """Cast to ONNX element type ``to``; narrow types are rounded onto their grid."""
    target = dtypes.torch_dtype(to)
    narrow = dtypes.CARRIED.get(to)
    if narrow in _INT_RANGES:
        lo, hi = _INT_RANGES[narrow]
        v = torch.round(x.to(torch.float64)) if x.dtype.is_floating_point else x.to(torch.float64)
        span = hi - lo + 1  # out-of-range values wrap around, as in the ONNX reference
        return (torch.remainder(v - lo, span) + lo).to(target)
    if narrow == "float4_e2m1fn":
        import ml_dtypes

        arr = x.detach().to(torch.float32).cpu().numpy()
        arr = np.clip(arr, -6.0, 6.0) if saturate else arr
        out = arr.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
        return torch.from_numpy(out).to(x.device)
    if target in _FP8_MAX and x.dtype.is_floating_point:
        m = _FP8_MAX[target]
        if saturate:
            x = torch.where(torch.isnan(x), x, x.clamp(-m, m))
        else:
            over = x.abs() >= _FP8_OVERFLOW[target]
            y = x.to(target)
            flood = float("inf") if target == torch.float8_e5m2 else float("nan")
            return torch.where(over, (torch.sign(x) * flood).to(target), y)
    if target == torch.float8_e8m0fnu:
        return _to_e8m0(x, round_mode)
    if target == torch.bool:
        return x != 0
    return x.to(target)


def _to_e8m0(x, round_mode: str):
    """E8M0 holds powers of two 2^(e - 127); round the exponent up, down or to nearest."""
    f = x.to(torch.float32).abs()
    bits = f.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    if round_mode == "up":
        exponent = exponent + (mantissa != 0).to(torch.int32)
    elif round_mode == "nearest":
        exponent = exponent + (mantissa >= 0x400000).to(torch.int32)
    exponent = exponent.clamp(0, 254)
    exponent = torch.where(torch.isnan(f) | torch.isinf(f), torch.full_like(exponent, 255), exponent)
    return exponent.to(torch.uint8).view(torch.float8_e8m0fnu)


@register("Cast", since=6)
def cast(x, *, to, saturate=1, round_mode="up"):
    return cast_tensor(x, to, saturate, round_mode)


@register("Constant", since=1)
def constant(*, value=None, value_float=None, value_floats=None, value_int=None,
             value_ints=None):
    """The attribute as a tensor (scalars are 0-d, lists 1-d)."""
    if value is not None:
        return value
    if value_float is not None:
        return torch.tensor(value_float, dtype=torch.float32)
    if value_floats is not None:
        return torch.tensor(list(value_floats), dtype=torch.float32)
    if value_int is not None:
        return torch.tensor(value_int, dtype=torch.int64)
    if value_ints is not None:
        return torch.tensor(list(value_ints), dtype=torch.int64)
    raise UnsupportedOpError("Constant without a numeric value attribute")


@register("ConstantOfShape", since=9)
def constant_of_shape(shape, *, value=None):
    fill = value if value is not None else torch.zeros(1, dtype=torch.float32)
    dims = _ints(shape)
    return fill.reshape(-1)[0].to(shape.device).expand(dims).clone() if dims else \
        fill.reshape(()).to(shape.device).clone()


@register("Dropout", since=7, until=11)
def dropout_7(x, *, ratio=0.5, num_outputs_=1):
    return (x, torch.ones_like(x, dtype=torch.bool))[:num_outputs_]


@register("Dropout", since=12)
def dropout_12(x, ratio=None, training_mode=None, *, seed=None, num_outputs_=1):
    """Inference: identity, mask all true. Training with a non-zero ratio is random: refused."""
    if training_mode is not None and bool(training_mode.item()):
        if ratio is None or float(ratio.item()) != 0.0:
            raise UnsupportedOpError("Dropout in training mode is random and cannot be reproduced")
    return (x, torch.ones_like(x, dtype=torch.bool))[:num_outputs_]
