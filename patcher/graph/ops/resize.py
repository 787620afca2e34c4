"""Resize (nearest, linear, cubic; every coordinate transformation mode; antialias).

Resizing is separable: along each resized axis the output is M @ input with an
interpolation matrix M of shape [out, in] built from the source coordinate of
each output index (ONNX's coordinate_transformation_mode) and the 1-D kernel
(nearest: one tap; linear: triangle; cubic: Keys with coefficient a). Taps
outside the input are clamped to the edge, or dropped and the weights
renormalised with exclude_outside. With antialias and scale < 1 the kernel is
stretched by 1/scale.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from patcher.errors import UnsupportedOpError
from patcher.graph.ops.registry import register
from patcher.graph.ops.shape import _ints


def _source_coordinate(x: np.ndarray, scale: float, in_len: int, out_len: int, ctm: str,
                       roi: tuple[float, float]) -> np.ndarray:
    """Source coordinate of output index x. As in the ONNX reference, the resized
    length in the formulas is in_len * scale (not rounded) except in the
    half_pixel_symmetric adjustment, which compares the rounded and exact lengths."""
    resized = in_len * scale
    if ctm == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if ctm == "half_pixel_symmetric":
        adjustment = out_len / (scale * in_len)
        offset = in_len / 2 * (1 - adjustment)
        return offset + (x + 0.5) / scale - 0.5
    if ctm == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if resized > 1 else np.zeros_like(x)
    if ctm == "align_corners":
        return x * (in_len - 1) / (resized - 1) if resized > 1 else np.zeros_like(x)
    if ctm == "asymmetric":
        return x / scale
    if ctm == "tf_crop_and_resize":
        start, end = roi
        if resized > 1:
            return start * (in_len - 1) + x * (end - start) * (in_len - 1) / (resized - 1)
        return np.full_like(x, 0.5 * (start + end) * (in_len - 1))
    raise UnsupportedOpError(f"Resize coordinate_transformation_mode '{ctm}'")


def _nearest_index(src: np.ndarray, nearest_mode: str) -> np.ndarray:
    if nearest_mode == "round_prefer_floor":
        return np.ceil(src - 0.5)
    if nearest_mode == "round_prefer_ceil":
        return np.floor(src + 0.5)
    if nearest_mode == "floor":
        return np.floor(src)
    if nearest_mode == "ceil":
        return np.ceil(src)
    raise UnsupportedOpError(f"Resize nearest_mode '{nearest_mode}'")


def _kernel(mode: str, a: float):
    if mode == "linear":
        return 1.0, lambda t: np.maximum(0.0, 1.0 - np.abs(t))

    def cubic(t):
        t = np.abs(t)
        near = ((a + 2) * t - (a + 3)) * t * t + 1
        far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return np.where(t <= 1, near, np.where(t < 2, far, 0.0))

    return 2.0, cubic


def axis_matrix(in_len: int, out_len: int, scale: float, *, mode: str, ctm: str,
                nearest_mode: str, cubic_coeff_a: float, exclude_outside: int, antialias: int,
                roi: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Interpolation matrix [out_len, in_len] and a mask of outputs inside the input."""
    src = _source_coordinate(np.arange(out_len, dtype=np.float64), scale, in_len, out_len, ctm,
                             roi)
    inside = (src >= 0) & (src <= in_len - 1) if ctm == "tf_crop_and_resize" else \
        np.ones(out_len, dtype=bool)
    m = np.zeros((out_len, in_len), dtype=np.float64)
    rows = np.arange(out_len)
    if mode == "nearest":
        idx = np.clip(_nearest_index(src, nearest_mode), 0, in_len - 1).astype(np.int64)
        m[rows, idx] = 1.0
        return m, inside
    radius, kernel = _kernel(mode, cubic_coeff_a)
    stretch = 1.0 / scale if antialias and scale < 1 else 1.0
    reach = radius * stretch
    for r in rows:
        base = math.floor(src[r])
        taps = np.arange(base - math.ceil(reach) + 1, base + math.ceil(reach) + 1)
        w = kernel((src[r] - taps) / stretch)
        if antialias and scale < 1:
            w = w / w.sum() if w.sum() else w
        valid = (taps >= 0) & (taps <= in_len - 1)
        if exclude_outside:
            w = np.where(valid, w, 0.0)
            w = w / w.sum() if w.sum() else w
        np.add.at(m[r], np.clip(taps, 0, in_len - 1), w)
    return m, inside


def _resize(x, roi, scales, sizes, *, mode, ctm, nearest_mode, cubic_coeff_a, exclude_outside,
            extrapolation_value, antialias=0, axes=None, keep_aspect_ratio_policy="stretch"):
    rank = x.dim()
    axes = [a % rank for a in axes] if axes else list(range(rank))
    in_shape = [x.shape[a] for a in axes]
    scale_list = [float(v) for v in scales.reshape(-1).tolist()] if scales is not None and \
        scales.numel() else []
    size_list = _ints(sizes) if sizes is not None and sizes.numel() else []
    if size_list:
        if keep_aspect_ratio_policy != "stretch":
            pick = min if keep_aspect_ratio_policy == "not_larger" else max
            common = pick(s / i for s, i in zip(size_list, in_shape))
            scale_list = [common] * len(axes)
            size_list = [int(math.floor(common * i + 0.5)) for i in in_shape]
        else:
            scale_list = [s / i for s, i in zip(size_list, in_shape)]
    elif scale_list:
        size_list = [int(math.floor(i * s)) for i, s in zip(in_shape, scale_list)]
    else:
        raise UnsupportedOpError("Resize needs scales or sizes")
    roi_list = [float(v) for v in roi.reshape(-1).tolist()] if roi is not None and roi.numel() \
        else []
    work = x if x.dtype.is_floating_point else x.to(torch.float32)
    masks = []
    for j, axis in enumerate(axes):
        if ctm == "tf_crop_and_resize":
            n = len(roi_list) // 2
            k = j if n == len(axes) else axis
            axis_roi = (roi_list[k], roi_list[k + n])
        else:
            axis_roi = (0.0, 1.0)
        if size_list[j] == in_shape[j] and scale_list[j] == 1.0 and ctm != "tf_crop_and_resize":
            masks.append(None)
            continue
        m, inside = axis_matrix(in_shape[j], size_list[j], scale_list[j], mode=mode, ctm=ctm,
                                nearest_mode=nearest_mode, cubic_coeff_a=cubic_coeff_a,
                                exclude_outside=exclude_outside, antialias=antialias,
                                roi=axis_roi)
        mt = torch.from_numpy(m).to(device=x.device, dtype=work.dtype)
        work = torch.movedim(torch.tensordot(mt, torch.movedim(work, axis, 0), dims=1), 0, axis)
        masks.append((axis, inside))
    if ctm == "tf_crop_and_resize":
        keep = torch.ones(work.shape, dtype=torch.bool, device=x.device)
        for entry in masks:
            if entry is None:
                continue
            axis, inside = entry
            shape = [1] * rank
            shape[axis] = -1
            keep = keep & torch.from_numpy(inside).to(x.device).reshape(shape)
        work = torch.where(keep, work, torch.tensor(extrapolation_value, dtype=work.dtype,
                                                    device=x.device))
    if not x.dtype.is_floating_point:
        work = torch.round(work).to(x.dtype)
    return work


@register("Resize", since=10, until=10)
def resize_10(x, scales, *, mode="nearest"):
    """Opset 10: scales only, asymmetric coordinates, nearest rounds down."""
    return _resize(x, None, scales, None, mode=mode, ctm="asymmetric", nearest_mode="floor",
                   cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0)


@register("Resize", since=11, until=17)
def resize_11(x, roi=None, scales=None, sizes=None, *, coordinate_transformation_mode="half_pixel",
              cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0, mode="nearest",
              nearest_mode="round_prefer_floor"):
    return _resize(x, roi, scales, sizes, mode=mode, ctm=coordinate_transformation_mode,
                   nearest_mode=nearest_mode, cubic_coeff_a=cubic_coeff_a,
                   exclude_outside=exclude_outside, extrapolation_value=extrapolation_value)


@register("Resize", since=18)
def resize_18(x, roi=None, scales=None, sizes=None, *, antialias=0, axes=None,
              coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75,
              exclude_outside=0, extrapolation_value=0.0, keep_aspect_ratio_policy="stretch",
              mode="nearest", nearest_mode="round_prefer_floor"):
    return _resize(x, roi, scales, sizes, mode=mode, ctm=coordinate_transformation_mode,
                   nearest_mode=nearest_mode, cubic_coeff_a=cubic_coeff_a,
                   exclude_outside=exclude_outside, extrapolation_value=extrapolation_value,
                   antialias=antialias, axes=list(axes) if axes else None,
                   keep_aspect_ratio_policy=keep_aspect_ratio_policy)
