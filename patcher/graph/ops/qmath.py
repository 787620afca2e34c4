"""Integer arithmetic of quantized ops, as onnxruntime computes it, with straight-through gradients.

Forward values are exact: integers are centered (x - zero point) in float32 where they fit its
24-bit mantissa (8- and 16-bit types) and in float64 otherwise, accumulated in float32 only when
every partial sum is provably below 2**24, rescaled in float32 like onnxruntime's kernels,
rounded half to even and saturated. An integer output leaves the op in its ONNX dtype (int8,
uint8, int32, ...).

Integer tensors cannot carry gradients in torch. When an input requires a gradient (and grad
mode is on), an integer output is therefore *carried* in a float dtype (float32 for 8- and
16-bit types, float64 for int32) holding exactly the same integer values; its backward is the
straight-through estimator of fake quantization: the gradient of the unrounded value, clamped
to the output range (so 1/scale inside the range and 0 where the output saturates). Every
quantized op accepts such carriers as inputs.
"""
from __future__ import annotations

from typing import Callable

import torch
from onnx import TensorProto

from patcher.errors import UnsupportedOpError

_T = TensorProto
#: Integer ranges of the ONNX quantized types (sub-byte types travel in int8/uint8 carriers).
INT_RANGES: dict[int, tuple[int, int]] = {
    _T.UINT8: (0, 255), _T.INT8: (-128, 127), _T.UINT16: (0, 65535), _T.INT16: (-32768, 32767),
    _T.INT32: (-2**31, 2**31 - 1), _T.UINT4: (0, 15), _T.INT4: (-8, 7), _T.UINT2: (0, 3),
    _T.INT2: (-2, 1),
}
#: torch dtype of a zero point -> the ONNX type it stands for (float32 carries FLOAT4E2M1).
TORCH_TO_QTYPE: dict[torch.dtype, int] = {
    torch.uint8: _T.UINT8, torch.int8: _T.INT8, torch.uint16: _T.UINT16, torch.int16: _T.INT16,
    torch.int32: _T.INT32, torch.float8_e4m3fn: _T.FLOAT8E4M3FN,
    torch.float8_e4m3fnuz: _T.FLOAT8E4M3FNUZ, torch.float8_e5m2: _T.FLOAT8E5M2,
    torch.float8_e5m2fnuz: _T.FLOAT8E5M2FNUZ, torch.float32: _T.FLOAT4E2M1,
}


def tracking(*tensors: "torch.Tensor | None") -> bool:
    """Whether an output computed from ``tensors`` needs a gradient (grad mode and an input
    that requires one)."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class _StraightThrough(torch.autograd.Function):
    """Forward: ``value``; backward: the gradient goes to ``surrogate`` unchanged."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, d(surrogate) in the backward pass."""
    return _StraightThrough.apply(value.detach(), surrogate.to(value.dtype))


def carrier_dtype(dtype: torch.dtype) -> torch.dtype:
    """The float dtype that carries integer ``dtype`` exactly under autograd."""
    return torch.float64 if dtype in (torch.int32, torch.uint32, torch.int64) else torch.float32


def f64(t: torch.Tensor) -> torch.Tensor:
    """A tensor (integer, float or carrier) as float64, keeping its gradient."""
    return t.to(torch.float64)


def zero(t: "torch.Tensor | None") -> "torch.Tensor | float":
    """A zero point as float64 (0 when omitted)."""
    return 0.0 if t is None else f64(t)


_WIDE = (torch.int32, torch.uint32, torch.int64, torch.uint64, torch.float64)


def exact_dtype(t: torch.Tensor) -> torch.dtype:
    """The float dtype holding ``t``'s integer values exactly: float32 for 8/16-bit types and
    their float32 carriers, float64 for wider ones."""
    return torch.float64 if t.dtype in _WIDE else torch.float32


def centered(x: torch.Tensor, zp: "torch.Tensor | None") -> torch.Tensor:
    """x - zp, exact, in float32 for 8/16-bit x (float64 for wider), keeping x's gradient."""
    work = exact_dtype(x)
    return x.to(work) if zp is None else x.to(work) - zp.to(work)


def int_range(dtype: torch.dtype) -> tuple[int, int]:
    """(qmin, qmax) of an integer torch dtype."""
    info = torch.iinfo(dtype)
    return info.min, info.max


def emit(exact: torch.Tensor, dtype: torch.dtype,
         surrogate: "Callable[[], torch.Tensor] | None" = None,
         track: bool = False) -> torch.Tensor:
    """An integer result leaving an op: ``exact`` (a float tensor of integer values) in
    ``dtype``, or, when ``track``, in its float carrier with ``surrogate()``'s gradient
    (straight-through), or ``exact``'s own gradient when there is no surrogate (an exact
    integer accumulator)."""
    if not track:
        return exact.detach().to(dtype)
    carrier = carrier_dtype(dtype)
    if surrogate is None:
        return exact.to(carrier)
    return straight_through(exact.detach().to(carrier), surrogate())


def along_axis(p: "torch.Tensor | None", x: torch.Tensor, axis: int,
               block_size: int = 0) -> "torch.Tensor | None":
    """A scale or zero point shaped to broadcast against ``x``: per tensor (scalar), per axis
    (1-D of length x.shape[axis]) or blocked (x's rank, blocks of ``block_size`` on ``axis``)."""
    if p is None:
        return None
    if block_size:
        axis = axis % x.dim()
        return p.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])
    if p.dim() == 0 or p.numel() == 1:
        return p.reshape(())
    if p.dim() != 1:
        raise UnsupportedOpError(f"a per-axis scale or zero point must be 1-D, not {list(p.shape)}")
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return p.reshape(shape)


def add_exact(acc: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """acc + other for integer-valued tensors, exact: in float32 when no sum can reach 2**24."""
    bound = sum(float(t.detach().abs().max()) if t.numel() else 0.0 for t in (acc, other))
    work = torch.float32 if bound < 2.0**24 else torch.float64
    return acc.to(work) + other.to(work)


def quantize_values(v: torch.Tensor, zp: "torch.Tensor | float", lo: int, hi: int
                    ) -> torch.Tensor:
    """q = saturate(round_half_even(v) + zp) (``v`` already divided by the scale), in float32 for
    ranges within 2**24 (a sum inexact there saturates anyway), else float64."""
    work = torch.float32 if max(-lo, hi) <= 2**24 else torch.float64
    z = zp.to(work) if isinstance(zp, torch.Tensor) else zp
    return torch.clamp(torch.round(v.detach()).to(work) + z, lo, hi)


def requantize(acc: torch.Tensor, scale: torch.Tensor, zp: "torch.Tensor | None",
               dtype: torch.dtype) -> torch.Tensor:
    """y = saturate(round(float32(acc) * scale) + zp): onnxruntime's requantization of an integer
    accumulator ``acc`` (float32 or float64, exact) with the float32 multiplier ``scale``.

    Straight-through gradient: that of clamp(acc * scale + zp, qmin, qmax)."""
    lo, hi = int_range(dtype)
    z = zero(zp)
    exact = quantize_values(acc.detach().to(torch.float32) * scale.to(torch.float32), z, lo, hi)
    return emit(exact, dtype, lambda: torch.clamp(acc * f64(scale) + z, lo, hi), tracking(acc))


def quantize_float(v: torch.Tensor, y_scale: torch.Tensor, zp: "torch.Tensor | None",
                   dtype: torch.dtype) -> torch.Tensor:
    """y = saturate(round(v / y_scale) + zp) with the division in float32 (MlasQuantizeLinear);
    straight-through gradient of clamp(v / y_scale + zp, qmin, qmax)."""
    lo, hi = int_range(dtype)
    z = zero(zp)
    s = y_scale.to(torch.float32)
    exact = quantize_values(v.detach().to(torch.float32) / s, z, lo, hi)
    return emit(exact, dtype, lambda: torch.clamp(v.to(torch.float32) / s + z, lo, hi),
                tracking(v))


def dequantize(x: torch.Tensor, scale: torch.Tensor, zp: "torch.Tensor | None") -> torch.Tensor:
    """x_real = float32(x - zp) * scale, differentiable in ``x`` when it is a carrier."""
    return centered(x, zp).to(torch.float32) * scale.to(torch.float32)


def output_dtype_of(*candidates: "torch.Tensor | None") -> torch.dtype:
    """The integer dtype of the first candidate that has one (a zero point, then the input);
    uint8 when all are omitted or float carriers."""
    for t in candidates:
        if isinstance(t, torch.Tensor) and not t.dtype.is_floating_point:
            return t.dtype
    return torch.uint8
