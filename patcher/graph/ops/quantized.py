"""Quantized ops of the default domain: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear,
QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger.

Forward values are onnxruntime's integer results (see :mod:`patcher.graph.ops.qmath`: round half
to even, saturate, float32 rescaling); under autograd integer outputs travel in float carriers
with straight-through gradients, so attribution can flow through a quantized model.
"""
from __future__ import annotations

import torch

import patcher.graph.ops.qmath as qmath
from patcher.errors import UnsupportedOpError
from patcher.graph.ops.conv import conv
from patcher.graph.ops.registry import register
from patcher.graph.ops.shape import cast_tensor
from patcher.model import dtypes

_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)


# ----------------------------------------------------------------------- QuantizeLinear
def _quantize(x: torch.Tensor, y_scale: torch.Tensor, y_zero_point: "torch.Tensor | None",
              axis: int = 1, saturate: int = 1, block_size: int = 0, output_dtype: int = 0,
              precision: int = 0, input_types: tuple = ()) -> torch.Tensor:
    """y = saturate(round_half_even(x / y_scale) + y_zero_point).

    The output type is the zero point's (its declared type in ``input_types`` for the sub-byte
    types carried in int8/uint8), else ``output_dtype``, else uint8. Float8 outputs are
    cast(x / y_scale) (saturating unless ``saturate`` = 0); FLOAT4E2M1 (carried in float32)
    is cast(x / y_scale + zero point)."""
    scale = qmath.along_axis(y_scale, x, axis, block_size)
    zp = qmath.along_axis(y_zero_point, x, axis, block_size)
    declared = input_types[2] if len(input_types) > 2 else 0
    if y_zero_point is not None and declared in dtypes.CARRIED:
        qtype = declared
    elif y_zero_point is not None:
        qtype = qmath.TORCH_TO_QTYPE.get(y_zero_point.dtype)
    else:
        qtype = output_dtype or dtypes.TensorProto.UINT8
    if qtype is None:
        raise UnsupportedOpError(f"QuantizeLinear to {y_zero_point.dtype} is not supported")
    work = (dtypes.torch_dtype(precision) if precision
            else x.dtype if x.dtype == torch.float64 else torch.float32)
    v = x.to(work) / scale.to(work)
    if qtype in qmath.INT_RANGES:
        lo, hi = qmath.INT_RANGES[qtype]
        carrier = dtypes.torch_dtype(qtype)
        z = qmath.zero(zp)
        exact = qmath.quantize_values(v, z, lo, hi)
        return qmath.emit(exact, carrier, lambda: torch.clamp(qmath.f64(v) + z, lo, hi),
                          qmath.tracking(x))
    if qtype == dtypes.TensorProto.FLOAT4E2M1 and zp is not None:
        v = v + zp.to(work)
    return cast_tensor(v.detach(), qtype, saturate)


@register("QuantizeLinear", since=10, until=12)
def quantize_linear_10(x, y_scale, y_zero_point=None, *, input_types_=()):
    """y = saturate(round(x / y_scale) + y_zero_point), per tensor."""
    return _quantize(x, y_scale, y_zero_point, input_types=input_types_)


@register("QuantizeLinear", since=13, until=18)
def quantize_linear_13(x, y_scale, y_zero_point=None, *, axis=1, input_types_=()):
    """Per tensor or per ``axis`` (1-D scale and zero point)."""
    return _quantize(x, y_scale, y_zero_point, axis, input_types=input_types_)


@register("QuantizeLinear", since=19, until=20)
def quantize_linear_19(x, y_scale, y_zero_point=None, *, axis=1, saturate=1, input_types_=()):
    """Adds float8 outputs (``saturate``)."""
    return _quantize(x, y_scale, y_zero_point, axis, saturate, input_types=input_types_)


@register("QuantizeLinear", since=21, until=22)
def quantize_linear_21(x, y_scale, y_zero_point=None, *, axis=1, saturate=1, block_size=0,
                       output_dtype=0, input_types_=()):
    """Adds blocked scales and ``output_dtype``."""
    return _quantize(x, y_scale, y_zero_point, axis, saturate, block_size, output_dtype,
                     input_types=input_types_)


@register("QuantizeLinear", since=23)
def quantize_linear_23(x, y_scale, y_zero_point=None, *, axis=1, saturate=1, block_size=0,
                       output_dtype=0, precision=0, input_types_=()):
    """Adds ``precision`` (the float type x / y_scale is computed in)."""
    return _quantize(x, y_scale, y_zero_point, axis, saturate, block_size, output_dtype,
                     precision, input_types_)


# --------------------------------------------------------------------- DequantizeLinear
def _dequantize(x: torch.Tensor, x_scale: torch.Tensor, x_zero_point: "torch.Tensor | None",
                axis: int = 1, block_size: int = 0, output_dtype: int = 0) -> torch.Tensor:
    """y = (x - x_zero_point) * x_scale, computed in float32, returned in the scale's dtype
    (or ``output_dtype``)."""
    scale = qmath.along_axis(x_scale, x, axis, block_size)
    zp = qmath.along_axis(x_zero_point, x, axis, block_size)
    target = dtypes.torch_dtype(output_dtype) if output_dtype else x_scale.dtype
    if x.dtype in _FLOAT8 or (zp is not None and zp.dtype in _FLOAT8):
        y = (x.to(torch.float32) - (0.0 if zp is None else zp.to(torch.float32))) * scale.float()
    else:
        y = qmath.dequantize(x, scale, zp)
    return y.to(target)


@register("DequantizeLinear", since=10, until=12)
def dequantize_linear_10(x, x_scale, x_zero_point=None):
    """y = (x - x_zero_point) * x_scale, per tensor."""
    return _dequantize(x, x_scale, x_zero_point)


@register("DequantizeLinear", since=13, until=20)
def dequantize_linear_13(x, x_scale, x_zero_point=None, *, axis=1):
    """Per tensor or per ``axis``."""
    return _dequantize(x, x_scale, x_zero_point, axis)


@register("DequantizeLinear", since=21, until=22)
def dequantize_linear_21(x, x_scale, x_zero_point=None, *, axis=1, block_size=0):
    """Adds blocked scales."""
    return _dequantize(x, x_scale, x_zero_point, axis, block_size)


@register("DequantizeLinear", since=23)
def dequantize_linear_23(x, x_scale, x_zero_point=None, *, axis=1, block_size=0,
                         output_dtype=0):
    """Adds ``output_dtype``."""
    return _dequantize(x, x_scale, x_zero_point, axis, block_size, output_dtype)


# ---------------------------------------------------------------- DynamicQuantizeLinear
@register("DynamicQuantizeLinear", since=11)
def dynamic_quantize_linear(x):
    """uint8 with parameters from the data (onnxruntime's rule):
    lo = min(0, min x), hi = max(0, max x), scale = (hi - lo) / 255 (1 when hi == lo),
    zp = round(clamp(-lo / scale, 0, 255)), y = saturate(round(x / scale) + zp).
    Returns (y, scale, zp); the gradient reaches x through y only."""
    xf = x.detach().to(torch.float32)
    lo = torch.clamp(xf.min(), max=0.0) if xf.numel() else torch.zeros((), dtype=torch.float32)
    hi = torch.clamp(xf.max(), min=0.0) if xf.numel() else torch.zeros((), dtype=torch.float32)
    scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 255.0)
    zp = torch.round(torch.clamp(0.0 - lo / scale, 0.0, 255.0))
    y = qmath.quantize_float(x, scale, zp, torch.uint8)
    return y, scale.to(x.dtype if x.dtype.is_floating_point else torch.float32), zp.to(torch.uint8)


# ------------------------------------------------------------------ integer matmul / conv
def _row_zero(zp: "torch.Tensor | None") -> "torch.Tensor | None":
    """A's zero point: scalar, or per row ([M] -> [M, 1])."""
    if zp is None:
        return None
    return zp.reshape(-1, 1) if zp.dim() == 1 and zp.numel() > 1 else zp.reshape(())


def _column(p: "torch.Tensor | None") -> "torch.Tensor | None":
    """B's zero point or scale: scalar, or per column ([N], broadcast on the last axis)."""
    if p is None:
        return None
    return p.reshape(-1) if p.numel() > 1 else p.reshape(())


def exact_work_dtype(terms: int, *centered: torch.Tensor) -> torch.dtype:
    """float32 when every partial sum of ``terms`` products of the centered operands stays
    below 2**24 (so float32 sums them exactly, in any order), else float64."""
    bound = float(terms)
    for t in centered:
        bound *= float(t.detach().abs().max()) if t.numel() else 0.0
    return torch.float32 if bound < 2.0**24 else torch.float64


def integer_matmul(a: torch.Tensor, b: torch.Tensor, a_zero_point=None, b_zero_point=None
                   ) -> torch.Tensor:
    """acc = (a - a_zero_point) @ (b - b_zero_point), exact (float32 or float64)."""
    ac = qmath.centered(a, _row_zero(a_zero_point))
    bc = qmath.centered(b, _column(b_zero_point))
    work = exact_work_dtype(ac.shape[-1], ac, bc)
    return torch.matmul(ac.to(work), bc.to(work))


def _channel_zero(w_zero_point: "torch.Tensor | None", w: torch.Tensor):
    if w_zero_point is None or w_zero_point.numel() == 1:
        return None if w_zero_point is None else w_zero_point.reshape(())
    return w_zero_point.reshape([-1] + [1] * (w.dim() - 1))


def integer_conv(x, w, x_zero_point, w_zero_point, bias, attrs: dict) -> torch.Tensor:
    """acc = conv(x - x_zero_point, w - w_zero_point) + bias, exact (float32 or float64)."""
    xs = qmath.centered(x, None if x_zero_point is None else x_zero_point.reshape(()))
    ws = qmath.centered(w, _channel_zero(w_zero_point, w))
    work = exact_work_dtype(ws[0].numel() if ws.dim() else 1, xs, ws)
    acc = conv(xs.to(work), ws.to(work), None, **attrs)
    if bias is not None:
        acc = qmath.add_exact(acc, bias.reshape([1, -1] + [1] * (acc.dim() - 2)))
    return acc


@register("MatMulInteger", since=10)
def matmul_integer(a, b, a_zero_point=None, b_zero_point=None):
    """int32 y = (a - a_zero_point) @ (b - b_zero_point); zero points per tensor, per row of a
    or per column of b."""
    acc = integer_matmul(a, b, a_zero_point, b_zero_point)
    return qmath.emit(acc, torch.int32, track=qmath.tracking(acc))


@register("ConvInteger", since=10)
def conv_integer(x, w, x_zero_point=None, w_zero_point=None, *, auto_pad="NOTSET",
                 dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
    """int32 y = conv(x - x_zero_point, w - w_zero_point); w's zero point per output channel."""
    attrs = dict(auto_pad=auto_pad, dilations=dilations, group=group, pads=pads, strides=strides)
    acc = integer_conv(x, w, x_zero_point, w_zero_point, None, attrs)
    return qmath.emit(acc, torch.int32, track=qmath.tracking(acc))


@register("QLinearMatMul", since=10)
def qlinear_matmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
    """y = saturate(round(((a - a_zp) @ (b - b_zp)) * (a_scale * b_scale / y_scale)) + y_zp);
    b's scale and zero point per tensor or per column."""
    acc = integer_matmul(a, b, a_zero_point, b_zero_point)
    a_s = a_scale.to(torch.float32)
    a_s = a_s.reshape(-1, 1) if a_s.numel() > 1 else a_s.reshape(())
    b_s = b_scale.to(torch.float32)
    b_s = b_s.reshape(-1) if b_s.numel() > 1 else b_s.reshape(())
    multiplier = a_s * b_s / y_scale.to(torch.float32).reshape(())
    return qmath.requantize(acc, multiplier, y_zero_point.reshape(()),
                            qmath.output_dtype_of(y_zero_point, a))


@register("QLinearConv", since=10)
def qlinear_conv(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point,
                 B=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
                 pads=None, strides=None):
    """y = saturate(round((conv(x - x_zp, w - w_zp) + B) * (x_scale * w_scale / y_scale)) + y_zp);
    w's scale and zero point per tensor or per output channel, B int32."""
    attrs = dict(auto_pad=auto_pad, dilations=dilations, group=group, pads=pads, strides=strides)
    acc = integer_conv(x, w, x_zero_point, w_zero_point, B, attrs)
    multiplier = (x_scale.to(torch.float32).reshape(()) * w_scale.to(torch.float32).reshape(-1)
                  / y_scale.to(torch.float32).reshape(()))
    multiplier = multiplier.reshape([1, -1] + [1] * (acc.dim() - 2))
    return qmath.requantize(acc, multiplier, y_zero_point.reshape(()),
                            qmath.output_dtype_of(y_zero_point, x))
