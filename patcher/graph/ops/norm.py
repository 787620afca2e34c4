"""BatchNormalization (inference, and training mode for completeness) and LayerNormalization."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from patcher.graph.ops.registry import register


@register("BatchNormalization", since=7, until=8)
def batch_norm_7(x, scale, b, mean, var, *, epsilon=1e-5, momentum=0.9, spatial=1,
                 num_outputs_=1):
    return batch_norm_9(x, scale, b, mean, var, epsilon=epsilon, momentum=momentum)


@register("BatchNormalization", since=9, until=13)
def batch_norm_9(x, scale, b, mean, var, *, epsilon=1e-5, momentum=0.9, num_outputs_=1):
    """y = scale * (x - mean) / sqrt(var + epsilon) + b over channel axis 1."""
    return F.batch_norm(x, mean, var, scale, b, False, 0.0, epsilon)


@register("BatchNormalization", since=14)
def batch_norm_14(x, scale, b, mean, var, *, epsilon=1e-5, momentum=0.9, training_mode=0,
                  num_outputs_=1):
    """Inference form as above. training_mode normalises with the batch statistics
    (population variance) and also returns
    running = input_running * momentum + batch * (1 - momentum)."""
    if not training_mode:
        return F.batch_norm(x, mean, var, scale, b, False, 0.0, epsilon)
    dims = [0] + list(range(2, x.dim()))
    batch_mean = x.mean(dim=dims)
    batch_var = x.var(dim=dims, unbiased=False)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x - batch_mean.reshape(shape)) / torch.sqrt(batch_var.reshape(shape) + epsilon)
    y = y * scale.reshape(shape) + b.reshape(shape)
    running_mean = mean * momentum + batch_mean * (1 - momentum)
    running_var = var * momentum + batch_var * (1 - momentum)
    return (y, running_mean, running_var)[:num_outputs_]


@register("LayerNormalization", since=17)
def layer_norm(x, scale, b=None, *, axis=-1, epsilon=1e-5, stash_type=1, num_outputs_=1):
    """Normalise over axes axis..rank-1 in float32 (stash_type 1):
    y = (x - mean) / sqrt(var + epsilon) * scale + b; also returns mean and 1/std."""
    axis = axis % x.dim()
    dims = tuple(range(axis, x.dim()))
    work = x.to(torch.float32) if stash_type == 1 and x.dtype != torch.float64 else x
    mean = work.mean(dim=dims, keepdim=True)
    centred = work - mean
    inv_std = torch.rsqrt((centred * centred).mean(dim=dims, keepdim=True) + epsilon)
    y = (centred * inv_std).to(x.dtype) * scale
    if b is not None:
        y = y + b
    return (y, mean, inv_std)[:num_outputs_]


@register("InstanceNormalization", since=6)
def instance_norm(x, scale, b, *, epsilon=1e-5):
    """y = scale * (x - mean) / sqrt(var + epsilon) + b, mean and (population) var per
    sample and channel over the spatial axes."""
    return F.instance_norm(x, None, None, scale, b, True, 0.0, epsilon)


def _group_norm(x, scale, bias, num_groups, epsilon, per_group_affine):
    n, c = x.shape[:2]
    work = x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x
    grouped = work.reshape(n, num_groups, -1)
    mean = grouped.mean(dim=-1, keepdim=True)
    var = ((grouped - mean) ** 2).mean(dim=-1, keepdim=True)
    y = ((grouped - mean) / torch.sqrt(var + epsilon)).reshape(x.shape).to(x.dtype)
    if per_group_affine:
        scale = scale.repeat_interleave(c // num_groups)
        bias = bias.repeat_interleave(c // num_groups)
    shape = [1, c] + [1] * (x.dim() - 2)
    return y * scale.reshape(shape) + bias.reshape(shape)


@register("GroupNormalization", since=18, until=20)
def group_norm_18(x, scale, bias, *, num_groups, epsilon=1e-5):
    """Normalise each group of channels per sample; scale and bias are per group (opset 18)."""
    return _group_norm(x, scale, bias, num_groups, epsilon, True)


@register("GroupNormalization", since=21)
def group_norm_21(x, scale, bias, *, num_groups, epsilon=1e-5, stash_type=1):
    """As opset 18, but scale and bias are per channel."""
    return _group_norm(x, scale, bias, num_groups, epsilon, False)


@register("LpNormalization", since=1)
def lp_norm(x, *, axis=-1, p=2):
    """x / ||x||_p along ``axis`` (p 1 or 2); a zero vector stays zero."""
    norm = x.abs().sum(dim=axis, keepdim=True) if p == 1 else \
        torch.sqrt((x * x).sum(dim=axis, keepdim=True))
    return torch.where(norm == 0, torch.zeros_like(x), x / torch.where(norm == 0,
                                                                        torch.ones_like(norm), norm))
