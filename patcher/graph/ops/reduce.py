"""Reductions: ReduceMean/Sum/Max/Min/Prod/L1/L2/SumSquare/LogSum/LogSumExp, ArgMax/ArgMin,
CumSum and TopK.

Every Reduce* op reduces over ``axes`` (all axes when empty, or nothing when
``noop_with_empty_axes`` is set); the axes are an attribute up to opset 17 (ReduceSum: 12)
and an optional int64 input from then on. Integer inputs are reduced in float64 or int64
and cast back, so the output dtype equals the input dtype.
"""
from __future__ import annotations

import math

import torch

from patcher.graph.ops.registry import register
from patcher.graph.ops.shape import _ints


def _reduce(fn, x, axes: list[int], keepdims: int, noop: int, empty_value: float):
    """fn(work, dims, keepdim) over ``axes`` of x (all when empty, unless ``noop``).

    A reduction over an empty set gives ``empty_value`` (0 for sums, -inf for max, ...), as
    in the ONNX reference."""
    if not axes:
        if noop:
            return x
        axes = list(range(x.dim()))
    dims = tuple(a % x.dim() for a in axes) if x.dim() else ()
    work = x if x.dtype.is_floating_point else x.to(torch.float64)  # ints and bool
    if any(x.shape[d] == 0 for d in dims):
        shape = [1 if d in dims else s for d, s in enumerate(x.shape)] if keepdims else \
            [s for d, s in enumerate(x.shape) if d not in dims]
        return torch.full(shape, _empty_fill(empty_value, x.dtype), dtype=x.dtype)
    out = fn(work, dims, bool(keepdims)) if dims else work
    return out.to(x.dtype)


def _empty_fill(value: float, dtype: torch.dtype):
    """A reduction's value over an empty set in ``dtype``: +-inf become the dtype's extremes
    (True/False for bool), NaN becomes 0 in an integer dtype."""
    if dtype == torch.bool:
        return value > 0
    if dtype.is_floating_point:
        return value
    if math.isinf(value):
        return torch.iinfo(dtype).max if value > 0 else torch.iinfo(dtype).min
    return 0 if math.isnan(value) else value


def _mean(w, dims, keep):
    return w.mean(dim=dims, keepdim=keep)


def _sum(w, dims, keep):
    return w.sum(dim=dims, keepdim=keep)


def _max(w, dims, keep):
    return torch.amax(w, dim=dims, keepdim=keep)


def _min(w, dims, keep):
    return torch.amin(w, dim=dims, keepdim=keep)


def _prod(w, dims, keep):
    for d in sorted(dims, reverse=True):
        w = w.prod(dim=d, keepdim=keep)
    return w


def _l1(w, dims, keep):
    return w.abs().sum(dim=dims, keepdim=keep)


def _l2(w, dims, keep):
    return torch.sqrt((w * w).sum(dim=dims, keepdim=keep))


def _sum_square(w, dims, keep):
    return (w * w).sum(dim=dims, keepdim=keep)


def _log_sum(w, dims, keep):
    return torch.log(w.sum(dim=dims, keepdim=keep))


def _log_sum_exp(w, dims, keep):
    return torch.logsumexp(w, dim=dims, keepdim=keep)


#: op -> (reduction, value over an empty set, first opset whose axes are an input)
_REDUCTIONS = {
    "ReduceMean": (_mean, float("nan"), 18),
    "ReduceSum": (_sum, 0.0, 13),
    "ReduceMax": (_max, float("-inf"), 18),
    "ReduceMin": (_min, float("inf"), 18),
    "ReduceProd": (_prod, 1.0, 18),
    "ReduceL1": (_l1, 0.0, 18),
    "ReduceL2": (_l2, 0.0, 18),
    "ReduceSumSquare": (_sum_square, 0.0, 18),
    "ReduceLogSum": (_log_sum, float("-inf"), 18),
    "ReduceLogSumExp": (_log_sum_exp, float("-inf"), 18),
}


def _register_reduction(op: str) -> None:
    fn, empty, input_since = _REDUCTIONS[op]

    def with_attribute(x, *, axes=None, keepdims=1):
        return _reduce(fn, x, list(axes or []), keepdims, 0, empty)

    def with_input(x, axes=None, *, keepdims=1, noop_with_empty_axes=0):
        return _reduce(fn, x, _ints(axes), keepdims, noop_with_empty_axes, empty)

    with_attribute.__name__ = f"{op.lower()}_attribute_axes"
    with_input.__name__ = f"{op.lower()}_input_axes"
    with_input.__doc__ = f"{op} over ``axes`` (all when empty, unless noop_with_empty_axes)."
    register(op, since=1, until=input_since - 1)(with_attribute)
    register(op, since=input_since)(with_input)


for _op in _REDUCTIONS:
    _register_reduction(_op)


def _arg_extreme(x, axis: int, keepdims: int, select_last_index: int, largest: bool):
    """Index of the first (or last) maximum/minimum along ``axis``, int64."""
    work = x if x.dtype.is_floating_point else x.to(torch.float64)
    if select_last_index:
        flipped = torch.flip(work, dims=[axis])
        index = (flipped.argmax if largest else flipped.argmin)(dim=axis, keepdim=bool(keepdims))
        return work.shape[axis] - 1 - index
    return (work.argmax if largest else work.argmin)(dim=axis, keepdim=bool(keepdims))


@register("ArgMax", since=1)
def arg_max(x, *, axis=0, keepdims=1, select_last_index=0):
    return _arg_extreme(x, axis, keepdims, select_last_index, True)


@register("ArgMin", since=1)
def arg_min(x, *, axis=0, keepdims=1, select_last_index=0):
    return _arg_extreme(x, axis, keepdims, select_last_index, False)


@register("CumSum", since=11)
def cum_sum(x, axis, *, exclusive=0, reverse=0):
    """y[i] = sum of x[j] for j <= i along ``axis`` (j < i when exclusive; from the end when
    reverse)."""
    dim = int(_ints(axis)[0]) % x.dim()
    work = torch.flip(x, dims=[dim]) if reverse else x
    out = torch.cumsum(work, dim=dim).to(x.dtype)
    if exclusive:
        out = out - work
    return torch.flip(out, dims=[dim]) if reverse else out


@register("TopK", since=10)
def top_k(x, k, *, axis=-1, largest=1, sorted=1):
    """The k largest (or smallest) values along ``axis`` and their int64 indices; ties go to
    the lower index, as in the ONNX reference."""
    count = int(_ints(k)[0])
    dim = axis % x.dim()
    work = x if x.dtype.is_floating_point else x.to(torch.float64)
    # A stable sort keeps equal values in index order (torch.topk does not promise it).
    values, indices = torch.sort(work, dim=dim, descending=bool(largest), stable=True)
    values = values.narrow(dim, 0, count).to(x.dtype)
    indices = indices.narrow(dim, 0, count)
    return values, indices
