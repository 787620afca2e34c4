"""Reductions."""
from __future__ import annotations

import torch

from patcher.graph.ops.registry import register
from patcher.graph.ops.shape import _ints


def _reduce_mean(x, axes: list[int], keepdims: int, noop: int):
    if not axes:
        if noop:
            return x
        axes = list(range(x.dim()))
    work = x if x.dtype.is_floating_point else x.to(torch.float64)
    out = work.mean(dim=tuple(axes), keepdim=bool(keepdims))
    return out.to(x.dtype)


@register("ReduceMean", since=1, until=17)
def reduce_mean_1(x, *, axes=None, keepdims=1):
    return _reduce_mean(x, list(axes or []), keepdims, 0)


@register("ReduceMean", since=18)
def reduce_mean_18(x, axes=None, *, keepdims=1, noop_with_empty_axes=0):
    """Mean over ``axes`` (all when empty, unless noop_with_empty_axes)."""
    return _reduce_mean(x, _ints(axes), keepdims, noop_with_empty_axes)
