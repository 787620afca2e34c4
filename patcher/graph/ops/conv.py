"""Conv and ConvTranspose, with ONNX's padding rules (explicit, asymmetric, auto_pad).

Weights are used exactly as stored: OIHW for Conv, IOHW for ConvTranspose.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from patcher.graph.ops.registry import register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def same_pads(in_sizes, kernel, strides, dilations, auto_pad: str) -> list[int]:
    """ONNX pads [b1.., e1..] for auto_pad SAME_UPPER / SAME_LOWER / VALID.

    out = ceil(in / stride); total = max(0, (out - 1) * stride + (k - 1) * d + 1 - in);
    SAME_UPPER puts the odd pixel at the end, SAME_LOWER at the beginning.
    """
    n = len(in_sizes)
    if auto_pad == "VALID":
        return [0] * (2 * n)
    begins, ends = [], []
    for i in range(n):
        out = -(-in_sizes[i] // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_sizes[i])
        small = total // 2
        begin = small if auto_pad == "SAME_UPPER" else total - small
        begins.append(begin)
        ends.append(total - begin)
    return begins + ends


def resolve_pads(x_spatial, kernel, strides, dilations, pads, auto_pad) -> list[int]:
    """Explicit pads [b1.., e1..] for a Conv or pool node."""
    n = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        return same_pads(list(x_spatial), kernel, strides, dilations, auto_pad)
    return list(pads) if pads else [0] * (2 * n)


def torch_pad_list(pads: list[int]) -> list[int]:
    """ONNX [b1, b2, .., e1, e2, ..] -> torch F.pad order (last axis first)."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


@register("Conv", since=1)
def conv(x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
         pads=None, strides=None):
    """y = conv(x, W) + b, W of shape [M, C/group, k1, ...]."""
    n = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = list(strides or [1] * n)
    dilations = list(dilations or [1] * n)
    p = resolve_pads(x.shape[2:], kernel, strides, dilations, pads, auto_pad)
    if p[:n] == p[n:]:
        padding = p[:n]
    else:
        x = F.pad(x, torch_pad_list(p))
        padding = [0] * n
    return _CONV[n](x, w, b, strides, padding, dilations, group)


@register("ConvTranspose", since=1)
def conv_transpose(x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1,
                   kernel_shape=None, output_padding=None, output_shape=None, pads=None,
                   strides=None):
    """Transposed convolution; W of shape [C, M/group, k1, ...].

    Full size = stride * (in - 1) + (k - 1) * d + 1 + output_padding; the result is
    that full output cropped by pads (given, or derived from output_shape / auto_pad).
    """
    n = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = list(strides or [1] * n)
    dilations = list(dilations or [1] * n)
    out_pad = list(output_padding or [0] * n)
    in_sizes = list(x.shape[2:])
    full = [strides[i] * (in_sizes[i] - 1) + (kernel[i] - 1) * dilations[i] + 1 + out_pad[i]
            for i in range(n)]
    if output_shape:
        target = list(output_shape)[-n:]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = [in_sizes[i] * strides[i] for i in range(n)]
    else:
        target = None
    if target is not None:
        begins = []
        for i in range(n):
            total = full[i] - target[i]
            small = total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else total - small)
    else:
        p = list(pads or [0] * (2 * n))
        begins = p[:n]
        target = [full[i] - p[i] - p[i + n] for i in range(n)]
    y = _CONV_T[n](x, w, None, strides, 0, 0, group, dilations)
    # Zero-extend to cover [begin, begin + target) (output_padding, or an output_shape
    # larger than the full size), then crop.
    before = [max(0, -begins[i]) for i in range(n)]
    after = [max(0, begins[i] + target[i] - y.shape[2 + i]) for i in range(n)]
    if any(before) or any(after):
        y = F.pad(y, torch_pad_list(before + after))
    index = [slice(None), slice(None)] + [
        slice(begins[i] + before[i], begins[i] + before[i] + target[i]) for i in range(n)]
    y = y[tuple(index)]
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * n)
    return y
