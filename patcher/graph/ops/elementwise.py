"""Elementwise arithmetic and comparison ops (numpy-style broadcasting)."""
from __future__ import annotations

import torch

from patcher.graph.ops.registry import register

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32,
               torch.uint32, torch.int64, torch.uint64)
#: torch has few kernels for these: compute in int64 and cast back (wrapping as ONNX does).
_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def _widened(fn):
    def run(*xs):
        dtype = xs[0].dtype
        if dtype in _WIDE_UNSIGNED:
            return fn(*[x.to(torch.int64) for x in xs]).to(dtype)
        return fn(*xs)
    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


@register("Add", since=7)
@_widened
def add(a, b):
    return a + b


@register("Sub", since=7)
@_widened
def sub(a, b):
    return a - b


@register("Mul", since=7)
@_widened
def mul(a, b):
    return a * b


@register("Div", since=7)
@_widened
def div(a, b):
    """Integer division truncates towards zero, as in the ONNX reference."""
    if a.dtype in _INT_DTYPES:
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


@register("Mod", since=10)
def mod(a, b, *, fmod=0):
    """fmod 0: the remainder takes the divisor's sign (numpy.mod, Python's %); fmod 1: it
    takes the dividend's sign (C fmod). onnxruntime runs fmod 0 on integers only; the ONNX
    spec defines it for floats too, as numpy.mod."""
    return _widened(torch.fmod if fmod else torch.remainder)(a, b)


@register("Pow", since=7)
def pow_(x, y):
    """x ** y in the base's dtype (the exponent may have another type)."""
    if x.dtype in _INT_DTYPES:
        return torch.pow(x.to(torch.float64), y.to(torch.float64)).to(x.dtype)
    return torch.pow(x, y.to(x.dtype))


def _variadic(fn):
    def run(*xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return run


@register("Sum", since=8)
@_widened
def sum_(*xs):
    return _variadic(torch.add)(*xs)


@register("Mean", since=8)
@_widened
def mean(*xs):
    return _variadic(torch.add)(*xs) / len(xs)


@register("Max", since=8)
@_widened
def max_(*xs):
    return _variadic(torch.maximum)(*xs)


@register("Min", since=8)
@_widened
def min_(*xs):
    return _variadic(torch.minimum)(*xs)


@register("Neg", since=6)
def neg(x):
    return -x


@register("Abs", since=6)
def abs_(x):
    return torch.abs(x)


@register("Exp", since=6)
def exp(x):
    return torch.exp(x)


@register("Log", since=6)
def log(x):
    return torch.log(x)


@register("Sqrt", since=6)
def sqrt(x):
    return torch.sqrt(x)


@register("Erf", since=9)
def erf(x):
    return torch.erf(x)


@register("Equal", since=7)
def equal(a, b):
    return torch.eq(a, b)


@register("Where", since=9)
def where(condition, x, y):
    return torch.where(condition, x, y)
