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
