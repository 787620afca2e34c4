"""The com.microsoft quantized ops onnxruntime's quantizer emits in QOperator format: QGemm,
QLinearAdd, QLinearMul, QLinearGlobalAveragePool, QLinearAveragePool, QLinearConcat,
QLinearSigmoid, QLinearLeakyRelu; and MatMulIntegerToFloat and DynamicQuantizeMatMul, which
onnxruntime's optimizer writes into dynamically quantized models it saves.

Each follows onnxruntime's CPU kernel: operands are dequantized as float32(x - zp) * scale or
accumulated exactly in integers, rescaled in float32, rounded half to even and saturated to the
output zero point's type (see :mod:`patcher.graph.ops.qmath` for the straight-through gradient).
"""
from __future__ import annotations

import torch

import patcher.graph.ops.qmath as qmath
from patcher.graph.ops.pool import average_pool
from patcher.graph.ops.quantized import (dequantize_linear_13, dynamic_quantize_linear,
                                        exact_work_dtype, integer_matmul, quantize_linear_13)
from patcher.graph.ops.registry import register

MS = "com.microsoft"


def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).reshape(())


def _lookup_op(x, x_scale, x_zero_point, y_scale, y_zero_point, fn) -> torch.Tensor:
    """y = saturate(round(fn(float32(x - x_zp) * x_scale) / y_scale) + y_zp): onnxruntime's
    256-entry lookup table, applied element-wise."""
    real = qmath.dequantize(x, _scalar(x_scale), x_zero_point)
    dtype = qmath.output_dtype_of(y_zero_point, x_zero_point, x)
    return qmath.quantize_float(fn(real), _scalar(y_scale),
                                None if y_zero_point is None else y_zero_point.reshape(()), dtype)


@register("QGemm", domain=MS)
def qgemm(A, a_scale, a_zero_point, B, b_scale, b_zero_point, C=None, y_scale=None,
          y_zero_point=None, *, alpha=1.0, transA=0, transB=0):
    """acc = (A' - a_zp) @ (B' - b_zp) + C (int32); with y_scale:
    y = saturate(round(acc * (alpha * a_scale * b_scale / y_scale)) + y_zp), else float32
    y = acc * (alpha * a_scale * b_scale). b's scale and zero point per tensor or per column."""
    a = A.transpose(0, 1) if transA else A
    b = B.transpose(0, 1) if transB else B
    acc = integer_matmul(a, b, a_zero_point, b_zero_point)
    if C is not None:
        acc = qmath.add_exact(acc, C)
    b_s = b_scale.to(torch.float32)
    multiplier = (torch.tensor(alpha, dtype=torch.float32) * _scalar(a_scale)
                  * (b_s.reshape(-1) if b_s.numel() > 1 else b_s.reshape(())))
    if y_zero_point is None:  # float output (onnxruntime keys on the zero point)
        return acc.to(torch.float32) * multiplier
    multiplier = multiplier / _scalar(y_scale)
    return qmath.requantize(acc, multiplier, y_zero_point.reshape(()),
                            qmath.output_dtype_of(y_zero_point, A))


@register("MatMulIntegerToFloat", domain=MS)
def matmul_integer_to_float(A, B, a_scale, b_scale, a_zero_point=None, b_zero_point=None,
                            bias=None):
    """Y = float32((A - a_zp) @ (B - b_zp)) * (a_scale * b_scale) + bias; b's scale and zero
    point per tensor or per column (onnxruntime fuses MatMulInteger, Cast and Mul into it)."""
    acc = integer_matmul(A, B, a_zero_point, b_zero_point)
    b_s = b_scale.to(torch.float32)
    scale = _scalar(a_scale) * (b_s.reshape(-1) if b_s.numel() > 1 else b_s.reshape(()))
    y = acc.to(torch.float32) * scale
    return y if bias is None else y + bias.to(torch.float32)


@register("DynamicQuantizeMatMul", domain=MS)
def dynamic_quantize_matmul(A, B, b_scale, b_zero_point=None, bias=None):
    """A quantized to uint8 as DynamicQuantizeLinear does (scale and zero point from its
    range), then Y = MatMulIntegerToFloat(A_q, B, a_scale, b_scale, a_zp, b_zp, bias)."""
    a_q, a_scale, a_zero_point = dynamic_quantize_linear(A)
    return matmul_integer_to_float(a_q, B, a_scale, b_scale, a_zero_point, b_zero_point, bias)


def _fma(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """float32(x * y + z) rounded once, as a fused multiply-add (exact in float64 for 8-bit x)."""
    return (qmath.f64(x) * qmath.f64(y) + qmath.f64(z)).to(torch.float32)


def _trailing_scalar(t: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether onnxruntime's broadcast loop hands ``t`` to the kernel as a scalar."""
    return t.numel() == 1 or (t.dim() > 0 and t.shape[-1] == 1 and other.dim() > 0
                              and other.shape[-1] > 1)


@register("QLinearAdd", domain=MS)
def qlinear_add(A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point=None):
    """C = saturate(round((A_scale * (A - A_zp) + B_scale * (B - B_zp)) / C_scale) + C_zp),
    with numpy broadcasting, evaluated as onnxruntime's AVX2 kernel does (float32):
    rA = A_scale / C_scale, rB = B_scale / C_scale, f = C_zp - fma(rA, A_zp, rB * B_zp),
    C = saturate(round(fma(A, rA, fma(B, rB, f)))); a scalar operand is made B (the operands
    swap when A is the scalar)."""
    dtype = qmath.output_dtype_of(C_zero_point, A_zero_point, A)
    lo, hi = qmath.int_range(dtype)
    sc = _scalar(C_scale)
    ra, rb = _scalar(A_scale) / sc, _scalar(B_scale) / sc
    za, zb = (torch.zeros((), dtype=torch.float32) if z is None else z.reshape(()).float()
              for z in (A_zero_point, B_zero_point))
    zc = torch.zeros((), dtype=torch.float32) if C_zero_point is None else \
        C_zero_point.reshape(()).float()
    a, b = A.detach(), B.detach()
    if _trailing_scalar(a, b):  # onnxruntime swaps the operands: the scalar goes second
        (a, ra, za), (b, rb, zb) = (b, rb, zb), (a, ra, za)
    fixed = zc - _fma(ra, za, rb * zb)  # the compiler fuses the first product
    v = _fma(a, ra, _fma(b, rb, fixed))  # a scalar B is folded into the fixed part first
    exact = torch.clamp(torch.round(v).to(torch.float64), lo, hi)

    def surrogate() -> torch.Tensor:
        real = (qmath.dequantize(A, _scalar(A_scale), A_zero_point)
                + qmath.dequantize(B, _scalar(B_scale), B_zero_point))
        return torch.clamp(real / sc + zc, lo, hi)

    return qmath.emit(exact, dtype, surrogate, qmath.tracking(A, B))


@register("QLinearMul", domain=MS)
def qlinear_mul(A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point=None):
    """C = saturate(round((A - A_zp) * (B - B_zp) * (A_scale * B_scale / C_scale) + C_zp)),
    the multiplier and the sum with the zero point in float32 (onnxruntime's kernel)."""
    dtype = qmath.output_dtype_of(C_zero_point, A_zero_point, A)
    lo, hi = qmath.int_range(dtype)
    acc = qmath.centered(A, A_zero_point) * qmath.centered(B, B_zero_point)  # |.| < 2**16
    ratio = _scalar(A_scale) * _scalar(B_scale) / _scalar(C_scale)
    zc = 0.0 if C_zero_point is None else float(C_zero_point.reshape(()))
    v = torch.clamp(acc.detach().to(torch.float32) * ratio, lo - zc, hi - zc) + zc
    exact = torch.round(v).to(torch.float64)
    return qmath.emit(exact, dtype, lambda: torch.clamp(acc * qmath.f64(ratio) + zc, lo, hi),
                      qmath.tracking(acc))


def _channels_first(x: torch.Tensor, channels_last: int) -> torch.Tensor:
    return x.movedim(-1, 1) if channels_last else x


def _channels_back(y: torch.Tensor, channels_last: int) -> torch.Tensor:
    return y.movedim(1, -1) if channels_last else y


@register("QLinearGlobalAveragePool", domain=MS)
def qlinear_global_average_pool(X, x_scale, x_zero_point, y_scale, y_zero_point, *,
                                channels_last=0):
    """acc = sum(X - x_zp) over the image (exact); y = saturate(round(acc * (x_scale /
    (y_scale * image_size))) + y_zp), shape [N, C, 1, ...]."""
    x = _channels_first(X, channels_last)
    size = 1
    for d in x.shape[2:]:
        size *= int(d)
    xc = qmath.centered(x, x_zero_point)
    work = exact_work_dtype(size, xc)  # every partial sum exact
    acc = xc.to(work).sum(dim=tuple(range(2, x.dim())), keepdim=True)
    multiplier = _scalar(x_scale) / (_scalar(y_scale) * torch.tensor(float(size),
                                                                     dtype=torch.float32))
    y = qmath.requantize(acc, multiplier, y_zero_point.reshape(()),
                         qmath.output_dtype_of(y_zero_point, X))
    return _channels_back(y, channels_last)


@register("QLinearAveragePool", domain=MS)
def qlinear_average_pool(X, x_scale, x_zero_point, y_scale, y_zero_point=None, *,
                         auto_pad="NOTSET", ceil_mode=0, channels_last=0, count_include_pad=0,
                         kernel_shape=(), pads=None, strides=None):
    """y = saturate(round(avgpool(float32(X - x_zp) * x_scale) / y_scale + y_zp)), the average
    pool in float32 as onnxruntime dequantizes, pools and requantizes."""
    x = _channels_first(X, channels_last)
    real = qmath.dequantize(x, _scalar(x_scale), x_zero_point)
    pooled = average_pool(real, auto_pad=auto_pad, ceil_mode=ceil_mode,
                          count_include_pad=count_include_pad, kernel_shape=kernel_shape,
                          pads=pads, strides=strides)
    dtype = qmath.output_dtype_of(y_zero_point, x_zero_point, X)
    lo, hi = qmath.int_range(dtype)
    z = qmath.zero(None if y_zero_point is None else y_zero_point.reshape(()))
    v = pooled.to(torch.float32) / _scalar(y_scale) + (z if isinstance(z, float)
                                                       else z.to(torch.float32))
    exact = torch.clamp(torch.round(v.detach()).to(torch.float64), lo, hi)
    y = qmath.emit(exact, dtype, lambda: torch.clamp(v, lo, hi), qmath.tracking(v))
    return _channels_back(y, channels_last)


@register("QLinearConcat", domain=MS)
def qlinear_concat(Y_scale, Y_zero_point, *inputs, axis):
    """Each (X, X_scale, X_zp) requantized to the output's scale and zero point,
    saturate(round(float32(X - X_zp) * X_scale / Y_scale) + Y_zp), then concatenated."""
    dtype = qmath.output_dtype_of(Y_zero_point)
    zp = Y_zero_point.reshape(())
    parts = []
    for k in range(0, len(inputs), 3):
        x, xs, xz = inputs[k:k + 3]
        real = qmath.dequantize(x, _scalar(xs), xz)
        parts.append(qmath.quantize_float(real, _scalar(Y_scale), zp, dtype))
    return torch.cat(parts, dim=axis)


@register("QLinearSigmoid", domain=MS)
def qlinear_sigmoid(X, X_scale, X_zero_point, Y_scale, Y_zero_point):
    """Y = saturate(round(sigmoid(float32(X - X_zp) * X_scale) / Y_scale) + Y_zp)."""
    return _lookup_op(X, X_scale, X_zero_point, Y_scale, Y_zero_point, torch.sigmoid)


@register("QLinearLeakyRelu", domain=MS)
def qlinear_leaky_relu(X, X_scale, X_zero_point, Y_scale, Y_zero_point, *, alpha=0.01):
    """Y = saturate(round(leaky_relu(float32(X - X_zp) * X_scale, alpha) / Y_scale) + Y_zp)."""
    return _lookup_op(X, X_scale, X_zero_point, Y_scale, Y_zero_point,
                      lambda v: torch.where(v >= 0, v, v * alpha))


@register("QuantizeLinear", domain=MS)
def ms_quantize_linear(x, y_scale, y_zero_point=None, *, axis=1, input_types_=()):
    """com.microsoft QuantizeLinear (the quantizer's form for int16/int4 before opset 21):
    y = saturate(round(x / y_scale) + y_zero_point), per tensor or per ``axis``."""
    return quantize_linear_13(x, y_scale, y_zero_point, axis=axis, input_types_=input_types_)


@register("DequantizeLinear", domain=MS)
def ms_dequantize_linear(x, x_scale, x_zero_point=None, *, axis=1):
    """com.microsoft DequantizeLinear: y = (x - x_zero_point) * x_scale."""
    return dequantize_linear_13(x, x_scale, x_zero_point, axis=axis)
