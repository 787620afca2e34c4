"""Ops that generate, repeat or rearrange elements: Range, Tile, Size, Trilu, DepthToSpace,
SpaceToDepth and Einsum."""
from __future__ import annotations

import math

import torch

from patcher.graph.ops.registry import register
from patcher.graph.ops.shape import _ints


def _scalar(t):
    return t.reshape(-1)[0].item() if isinstance(t, torch.Tensor) else t


@register("Range", since=11)
def range_(start, limit, delta):
    """start, start + delta, ... while below ``limit`` (above it for a negative delta);
    max(ceil((limit - start) / delta), 0) elements of start's dtype."""
    a, b, d = _scalar(start), _scalar(limit), _scalar(delta)
    count = max(int(math.ceil((b - a) / d)), 0)
    steps = torch.arange(count, dtype=torch.float64 if start.dtype.is_floating_point
                         else torch.int64)
    return (a + steps * d).to(start.dtype)


@register("Tile", since=6)
def tile(x, repeats):
    return x.repeat(*_ints(repeats)) if x.dim() else x


@register("Size", since=1)
def size(x):
    return torch.tensor(x.numel(), dtype=torch.int64)


@register("Trilu", since=14)
def trilu(x, k=None, *, upper=1):
    """Keep the upper (or lower) triangle of the last two axes, from diagonal k."""
    diagonal = int(_ints(k)[0]) if k is not None else 0
    return torch.triu(x, diagonal) if upper else torch.tril(x, diagonal)


@register("DepthToSpace", since=1)
def depth_to_space(x, *, blocksize, mode="DCR"):
    """[n, c*b*b, h, w] -> [n, c, h*b, w*b]; DCR reads depth as (b, b, c), CRD as (c, b, b)."""
    n, c, h, w = x.shape
    b = blocksize
    if mode == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


def _space_to_depth(x, blocksize: int, mode: str):
    n, c, h, w = x.shape
    b = blocksize
    y = x.reshape(n, c, h // b, b, w // b, b)
    y = y.permute(0, 3, 5, 1, 2, 4) if mode == "DCR" else y.permute(0, 1, 3, 5, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@register("SpaceToDepth", since=1, until=27)
def space_to_depth_1(x, *, blocksize):
    """[n, c, h*b, w*b] -> [n, c*b*b, h, w], depth ordered (b, b, c)."""
    return _space_to_depth(x, blocksize, "DCR")


@register("SpaceToDepth", since=28)
def space_to_depth_28(x, *, blocksize, mode="DCR"):
    """As opset 1; mode CRD orders depth (c, b, b)."""
    return _space_to_depth(x, blocksize, mode)


@register("Einsum", since=12)
def einsum(*xs, equation):
    """torch.einsum with the equation as written (spaces removed)."""
    eq = equation.decode() if isinstance(equation, bytes) else equation
    return torch.einsum(eq.replace(" ", ""), *xs)
