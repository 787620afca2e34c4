"""Comparisons, boolean logic, rounding and other elementwise math without a weight.

Comparison and logic ops return bool tensors (numpy-style broadcasting); rounding ops keep
the input dtype. Round rounds halves to even, as numpy and the ONNX spec do.
"""
from __future__ import annotations

import torch

from patcher.graph.ops.registry import register

_SIGN_BIT = -(1 << 63)


def _ordered(x):
    """x in a dtype torch can compare, order kept: uint16/uint32 widen to int64; uint64's
    bits are read as int64 with the sign bit flipped (an order-preserving map)."""
    if x.dtype in (torch.uint16, torch.uint32):
        return x.to(torch.int64)
    if x.dtype == torch.uint64:
        return x.view(torch.int64) ^ _SIGN_BIT
    return x


@register("Less", since=7)
def less(a, b):
    return torch.lt(_ordered(a), _ordered(b))


@register("LessOrEqual", since=12)
def less_or_equal(a, b):
    return torch.le(_ordered(a), _ordered(b))


@register("Greater", since=7)
def greater(a, b):
    return torch.gt(_ordered(a), _ordered(b))


@register("GreaterOrEqual", since=12)
def greater_or_equal(a, b):
    return torch.ge(_ordered(a), _ordered(b))


@register("Not", since=1)
def not_(x):
    return torch.logical_not(x)


@register("And", since=7)
def and_(a, b):
    return torch.logical_and(a, b)


@register("Or", since=7)
def or_(a, b):
    return torch.logical_or(a, b)


@register("Xor", since=7)
def xor(a, b):
    return torch.logical_xor(a, b)


@register("IsNaN", since=9)
def is_nan(x):
    return torch.isnan(x)


@register("IsInf", since=10)
def is_inf(x, *, detect_negative=1, detect_positive=1):
    return (torch.isposinf(x) & bool(detect_positive)) | (torch.isneginf(x) & bool(detect_negative))


@register("Floor", since=6)
def floor(x):
    return torch.floor(x)


@register("Ceil", since=6)
def ceil(x):
    return torch.ceil(x)


@register("Round", since=11)
def round_(x):
    """Halves to even: round(2.5) = 2, round(-1.5) = -2."""
    return torch.round(x)


@register("Reciprocal", since=6)
def reciprocal(x):
    return torch.reciprocal(x)


@register("Sign", since=9)
def sign(x):
    return torch.sign(x)


@register("Sin", since=7)
def sin(x):
    return torch.sin(x)


@register("Cos", since=7)
def cos(x):
    return torch.cos(x)
