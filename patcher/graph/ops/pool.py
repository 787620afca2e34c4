"""MaxPool, AveragePool, GlobalAveragePool with ONNX's padding and ceil_mode rules.

Output size per axis: floor or ceil of (L + p_b + p_e - ((k - 1) * d + 1)) / s, plus 1;
with ceil_mode a last window that would start inside the end padding is dropped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from patcher.graph.ops.conv import resolve_pads, torch_pad_list
from patcher.graph.ops.registry import register

_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _out_size(length, k, s, d, pb, pe, ceil_mode) -> int:
    span = (k - 1) * d + 1
    num = length + pb + pe - span
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= length + pb:
        out -= 1
    return out


def _geometry(x, kernel, strides, dilations, pads, auto_pad, ceil_mode):
    """Strides, dilations, explicit pads, and the extra end padding ceil_mode needs."""
    n = len(kernel)
    strides = list(strides or [1] * n)
    dilations = list(dilations or [1] * n)
    p = resolve_pads(x.shape[2:], kernel, strides, dilations, pads, auto_pad)
    extra = []
    for i in range(n):
        size = x.shape[2 + i]
        out = _out_size(size, kernel[i], strides[i], dilations[i], p[i], p[i + n], ceil_mode)
        need = (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
        extra.append(max(0, need - (size + p[i] + p[i + n])))
    return strides, dilations, p, extra


def _native_ok(kernel, dilations, p) -> bool:
    n = len(kernel)
    return p[:n] == p[n:] and all(p[i] <= ((kernel[i] - 1) * dilations[i] + 1) // 2
                                  for i in range(n))


@register("MaxPool", since=1)
def max_pool(x, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape=(), pads=None,
             storage_order=0, strides=None, num_outputs_=1):
    """Max over each window; padding never wins. Second output: flat indices into x."""
    kernel = list(kernel_shape)
    n = len(kernel)
    strides, dilations, p, extra = _geometry(x, kernel, strides, dilations, pads, auto_pad,
                                             ceil_mode)
    is_int = not x.dtype.is_floating_point
    xf = x.to(torch.float32) if is_int else x
    if _native_ok(kernel, dilations, p):
        res = _MAX[n](xf, kernel, strides, p[:n], dilations, bool(ceil_mode),
                      return_indices=num_outputs_ > 1)
    else:
        if num_outputs_ > 1:
            from patcher.errors import UnsupportedOpError
            raise UnsupportedOpError("MaxPool with an Indices output and asymmetric pads")
        xf = F.pad(xf, torch_pad_list(p[:n] + [p[n + i] + extra[i] for i in range(n)]),
                   value=float("-inf"))
        res = _MAX[n](xf, kernel, strides, 0, dilations, False)
    if num_outputs_ == 1:
        return res.to(x.dtype) if is_int else res
    y, idx = res
    spatial = list(x.shape[2:])
    if storage_order == 1 and n == 2:
        h, w = idx // spatial[1], idx % spatial[1]
        idx = w * spatial[0] + h
    plane = 1
    for s in spatial:
        plane *= s
    offsets = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(
        x.shape[0], x.shape[1], *([1] * n)) * plane
    return (y.to(x.dtype) if is_int else y), idx + offsets


@register("AveragePool", since=1)
def average_pool(x, *, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None,
                 kernel_shape=(), pads=None, strides=None):
    """Mean over each window. Divisor: window cells inside x, or inside x and the
    explicit pads when count_include_pad; never the extra cells ceil_mode adds."""
    kernel = list(kernel_shape)
    n = len(kernel)
    strides, dilations, p, extra = _geometry(x, kernel, strides, dilations, pads, auto_pad,
                                             ceil_mode)
    if _native_ok(kernel, dilations, p) and all(d == 1 for d in dilations):
        return _AVG[n](x, kernel, strides, p[:n], bool(ceil_mode), bool(count_include_pad))
    ends = [p[n + i] + extra[i] for i in range(n)]
    ones_w = torch.ones([x.shape[1], 1] + kernel, dtype=x.dtype, device=x.device)
    total = _CONV[n](F.pad(x, torch_pad_list(p[:n] + ends)), ones_w, None, strides, 0, dilations,
                     x.shape[1])
    mask = torch.ones([1, 1] + list(x.shape[2:]), dtype=x.dtype, device=x.device)
    if count_include_pad:
        mask = F.pad(mask, torch_pad_list(p), value=1.0)
        mask = F.pad(mask, torch_pad_list([0] * n + extra))
    else:
        mask = F.pad(mask, torch_pad_list(p[:n] + ends))
    count = _CONV[n](mask, ones_w[:1], None, strides, 0, dilations)
    return total / count


@register("GlobalAveragePool", since=1)
def global_average_pool(x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool", since=1)
def global_max_pool(x):
    return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)
